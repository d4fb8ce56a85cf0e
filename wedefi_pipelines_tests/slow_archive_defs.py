"""Test seam for `dagster asset materialize`: the product's definitions, with every cold
archive pausing after its freeze step (`$WEDEFI_TEST_FREEZE_PAUSE_S` seconds), so two CLI
runs of one month surely overlap. Loaded by the CLI with `-m wedefi_pipelines_tests.slow_archive_defs`."""

import os
import time

from wedefi_pipelines.definitions import defs  # noqa: F401 (the code location the CLI loads)
from wedefi_pipelines.tiering import archive

PAUSE_ENV = "WEDEFI_TEST_FREEZE_PAUSE_S"
_step = archive.Archiver._step


def _pausing_step(self, name, parts):
    _step(self, name, parts)
    if name == "frozen":
        time.sleep(float(os.environ.get(PAUSE_ENV, "3")))


archive.Archiver._step = _pausing_step
