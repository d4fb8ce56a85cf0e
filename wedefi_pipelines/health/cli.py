"""`wedefi-pipelines healthcheck` and `wedefi-pipelines metrics`: the platform watched from
outside Dagster (cron, an alerting job, Prometheus). Kept apart from cli.py; heavy imports
wait until a command runs."""

from __future__ import annotations

import argparse
import sys
import time


def add_health_parsers(subparsers) -> None:
    check = subparsers.add_parser(
        "healthcheck", help="exit non-zero naming what is wrong with the Dagster daemon, sensors or schedules",
        description="Reads the Dagster instance of $DAGSTER_HOME (DAGSTER_PG_URL for this repository's "
                    "dagster.yaml): a stale daemon heartbeat, a RUNNING sensor that has not ticked within its "
                    "interval plus monitoring.healthcheck_tolerance_s (300 s), a sensor or schedule whose last "
                    "tick failed. Exit 0 healthy, 1 something is wrong (one line each), 2 cannot check.")
    check.add_argument("--liveness", action="store_true",
                       help="daemon heartbeats only (a liveness probe must not restart the daemon over a user-code error)")
    check.add_argument("--tolerance", type=float, default=None,
                       help="seconds past an interval before it is late (default monitoring.healthcheck_tolerance_s)")
    check.set_defaults(func=cmd_healthcheck)

    metrics = subparsers.add_parser(
        "metrics", help="serve the health probes, platform figures and run outcomes to Prometheus at /metrics",
        description="Every scrape runs the probes on the primary and each replica (DATABASE_URL_*), reads the "
                    "partition catalog, the archive metadata, Redis (REDIS_URL, optional) and the Dagster instance "
                    "(DAGSTER_HOME, optional). --print-rules prints the matching Prometheus alerting rules.")
    metrics.add_argument("--port", type=int, default=9187, help="port to listen on (default 9187)")
    metrics.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    metrics.add_argument("--print-rules", action="store_true", help="print the Prometheus rules for the settings and exit")
    metrics.set_defaults(func=cmd_metrics)


def _instance_factory():
    import os

    if not os.environ.get("DAGSTER_HOME"):
        return None
    import dagster as dg

    return dg.DagsterInstance.get


def cmd_healthcheck(args: argparse.Namespace) -> int:
    import os

    from wedefi_pipelines.health import dagster_state
    from wedefi_pipelines.health.healthcheck import judge
    from wedefi_pipelines.settings import SettingsError, current_settings

    if not os.environ.get("DAGSTER_HOME"):
        print("error: DAGSTER_HOME is not set: point it at the folder holding the instance's dagster.yaml "
              "(and DAGSTER_PG_URL at its storage)", file=sys.stderr)
        return 2
    try:
        tolerance = args.tolerance if args.tolerance is not None else current_settings().monitoring.healthcheck_tolerance_s
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            beats, required = dagster_state.heartbeats(instance)
            found = [] if args.liveness else dagster_state.instigators(instance, dagster_state.code_location_repository())
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the instance's storage down or misconfigured: cannot judge, say why
        print(f"error: cannot read the Dagster instance: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 2
    problems = judge(beats, required, found, time.time(), tolerance, liveness=args.liveness)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    what = f"{len(required)} daemon heartbeat(s) fresh"
    if not args.liveness:
        sensors = sum(1 for i in found if i.running and i.kind == "sensor")
        schedules = sum(1 for i in found if i.running and i.kind == "schedule")
        what += f", {sensors} running sensor(s) ticking, {schedules} running schedule(s) without a failed last tick"
    print(f"ok: {what}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from wedefi_pipelines.health.metrics import rules_yaml
    from wedefi_pipelines.settings import SettingsError, current_settings

    try:
        settings = current_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_rules:
        sys.stdout.write(rules_yaml(settings))
        return 0
    if not 0 < args.port < 65536:
        print(f"error: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    import os

    from prometheus_client import CollectorRegistry, start_http_server

    from wedefi_pipelines.health.dagster_state import code_location_repository
    from wedefi_pipelines.health.metrics import PlatformCollector
    from wedefi_pipelines.resources.database import ConfigurationError, Database

    try:
        database = Database.from_env(settings=settings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    redis_client = None
    if os.environ.get("REDIS_URL"):
        from wedefi_pipelines.resources.cache import redis_client as make_client

        redis_client = make_client(os.environ["REDIS_URL"], settings)  # no PING: a scrape reports Redis down
    factory = _instance_factory()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(database, settings, redis_client, factory,
                                        code_location_repository() if factory else None))
    try:
        server, _thread = start_http_server(args.port, addr=args.host, registry=registry)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"serving http://{args.host}:{server.server_port}/metrics (each scrape runs the probes); Ctrl-C stops",
          flush=True)
    from wedefi_pipelines.foreground import wait_until_interrupted

    try:
        wait_until_interrupted()
    finally:
        server.shutdown()
        database.close()
    return 0
