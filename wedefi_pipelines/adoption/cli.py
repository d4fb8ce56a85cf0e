"""`wedefi-pipelines adopt [--plan | --abort]`: convert the app's database online (docs/adoption.md).

Kept apart from the conversion so the CLI starts without importing it until the command runs.
"""

from __future__ import annotations

import argparse
import sys


def add_adopt_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "adopt", help="convert a live, Prisma-built WeDefiDaily database to the partitioned layout, online",
        description="Convert the app's \"PriceSnapshot\", \"PortfolioSnapshot\", \"PositionSnapshot\" and "
                    "\"TokenBalance\" to sql/'s partitioned layout while the app keeps reading and writing them, "
                    "then record sql/ as applied. Interrupted, it resumes when run again. Review --plan first; "
                    "see docs/adoption.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="print what it would do (rows, months, disk headroom, strong locks) and change nothing")
    mode.add_argument("--abort", action="store_true",
                      help="undo an adoption that has not swapped any table yet (the app's tables stay as they were)")
    parser.add_argument("--database-url", help="override DATABASE_URL_PRIMARY")
    parser.set_defaults(func=cmd_adopt)


def cmd_adopt(args: argparse.Namespace) -> int:
    from wedefi_pipelines.adoption.model import ModelError
    from wedefi_pipelines.adoption.session import AdoptionError
    from wedefi_pipelines.resources.database import (
        ENV_PRIMARY,
        ConfigurationError,
        require_env,
    )

    try:
        url = args.database_url or require_env(ENV_PRIMARY, "the database to adopt (or pass --database-url)")
        if args.plan:
            from wedefi_pipelines.adoption.plan import make_plan

            print(make_plan(url).as_text())
            return 0
        if args.abort:
            from wedefi_pipelines.adoption.run import abort

            print("adoption aborted: the app's tables are as they were" if abort(url)
                  else "no adoption in progress: nothing to abort")
            return 0
        from wedefi_pipelines.adoption.run import adopt

        print(adopt(url, say=lambda line: print(line, flush=True)).as_text())
        return 0
    except (ConfigurationError, AdoptionError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
