import sys

from wedefi_pipelines.cli import main

sys.exit(main())
