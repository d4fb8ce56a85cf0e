"""The main job, end to end on the embedded stack: what a newcomer runs first.

Every asset of the code location is materialized through Dagster, in dependency order,
against the stack's real PostgreSQL (primary + streaming replica), S3 and Redis, and the
runs are recorded in the stack's `dagster` database (so `dagster dev` with the printed
exports shows them). The summary at the end is read back from the database, S3 and
Redis, never from what the steps claimed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import psycopg
from psycopg import sql

from wedefi_pipelines import catalog, devstack
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.cache.refresh import keep_refreshing
from wedefi_pipelines.cache.store import count_keys
from wedefi_pipelines.definitions import defs
from wedefi_pipelines.defs.cache import redis_cache
from wedefi_pipelines.defs.health.assets import index_usage_report, slow_query_report
from wedefi_pipelines.defs.provisioning.assets import partition_horizon, table_partitions
from wedefi_pipelines.defs.rollups import portfolio_rollups, price_rollups
from wedefi_pipelines.defs.schema import database_schema
from wedefi_pipelines.defs.tiering.assets import cold_archive, warm_tier
from wedefi_pipelines.defs.tiering.schedules import tiering_requests
from wedefi_pipelines.health.monitor import health_lines
from wedefi_pipelines.ingest.report import format_rows
from wedefi_pipelines.demo import ingestion as walkthrough
from wedefi_pipelines.foreground import wait_until_interrupted
from wedefi_pipelines.instance import instance_environment
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.cache import connect_redis
from wedefi_pipelines.resources.database import Database, DatabaseResource
from wedefi_pipelines.rollups.reads import price_chart
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines.tiering.report import format_tiers, iceberg_lines, month_tiers

REPO = Path(__file__).resolve().parent.parent.parent
HISTORY_MONTHS = 14
DEMO_LOG_LEVEL = "WARNING"



class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.step = 0

    @contextmanager
    def __call__(self, title: str):
        self.step += 1
        started = time.monotonic()
        print(f"[{self.step:2d}] {title}", flush=True)
        yield
        print(f"     done in {time.monotonic() - started:.1f}s (total {time.monotonic() - self.t0:.0f}s)", flush=True)


def say(text: str) -> None:
    for line in str(text).splitlines():
        print(f"     {line}", flush=True)


PARTITIONING_QUERY = """
SELECT c.relname,
       CASE p.partstrat WHEN 'r' THEN 'RANGE' WHEN 'h' THEN 'HASH' WHEN 'l' THEN 'LIST' END,
       (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
          FROM unnest(p.partattrs) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum),
       (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)
  FROM pg_partitioned_table p
  JOIN pg_class c ON c.oid = p.partrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND NOT c.relispartition
 ORDER BY c.relname
"""


def partitioning_lines(conn: psycopg.Connection) -> list[str]:
    return [f"{name:<18} PARTITION BY {strategy} ({columns}), {children} children"
            for name, strategy, columns, children in conn.execute(PARTITIONING_QUERY)]


@contextmanager
def demo_instance(env: dict[str, str]):
    """A Dagster instance on the stack's `dagster` database, configured by this repo's dagster.yaml."""
    home = Path(tempfile.mkdtemp(prefix="wedefi-demo-dagster-home-"))
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    try:
        with instance_environment(home, env["DAGSTER_PG_URL"]), dg.DagsterInstance.get() as instance:
            yield instance
    finally:
        shutil.rmtree(home, ignore_errors=True)


def materialize(assets, instance, resources, **kwargs) -> dg.ExecuteInProcessResult:
    """Materialize through Dagster, its console log at WARNING: the demo prints its own progress."""
    result = dg.materialize(assets, instance=instance, resources=resources, raise_on_error=False,
                            run_config=walkthrough.console_log_level(DEMO_LOG_LEVEL), **kwargs)
    if not result.success:
        failures = [str(e.event_specific_data.error.message).strip() for e in result.all_events if e.is_step_failure]
        raise RuntimeError("materialization failed: " + " | ".join(failures))
    return result


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events()
              if e.materialization.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in events[-1].materialization.metadata.items()} if events else {}


def run_demo(args: argparse.Namespace) -> int:
    progress = Progress()
    replicas = (devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA) if args.analytics_replica else (devstack.READ_REPLICA,)
    with progress("start the embedded stack: PostgreSQL primary + streaming replica, S3 (moto), Redis"):
        stack = devstack.LocalStack(pg_bin=args.pg_bin, replicas=replicas).start()
    try:
        env = stack.env()
        os.environ.update(env)
        say(f"primary {env['DATABASE_URL_PRIMARY']}\nread replica {env['DATABASE_URL_READ']}\n"
            f"S3 {env['AWS_ENDPOINT_URL_S3']} bucket {env['ARCHIVE_BUCKET']}, Redis {env['REDIS_URL']}")
        with demo_instance(env) as instance:
            _run_steps(args, progress, stack, env, instance)
        print(f"demo finished in {time.monotonic() - progress.t0:.0f}s", flush=True)
        if args.keep:
            _keep(stack)
    finally:
        stack.stop()
    return 0


def _run_steps(args, progress: Progress, stack: devstack.LocalStack, env: dict, instance) -> None:
    scale = walkthrough.DEMO_SCALE * args.scale
    resources = {**defs.resources, **walkthrough.demo_resources(scale)}
    now = datetime.now(timezone.utc).replace(tzinfo=None)

    with progress("database_schema: apply sql/ (WeDefiDaily's tables, partitioned)"):
        result = materialize([database_schema], instance, resources)
        say(f"applied {', '.join(metadata_of(result, 'database_schema')['applied'])}")

    with progress("partition_horizon: the current month and the next 6 for every range table"):
        result = materialize([partition_horizon], instance, resources)
        say(metadata_of(result, "partition_horizon").get("summary", ""))

    with progress(f"seed_history: {HISTORY_MONTHS} months of synthetic history at scale {scale:g} "
                  "(whole months: bare table, indexes, ATTACH)"):
        walkthrough.seed_history(months=HISTORY_MONTHS, scale=scale, end=now, instance=instance,
                                 log_level=DEMO_LOG_LEVEL)

    first = p.add_months(p.month_of(now), -(HISTORY_MONTHS - 1))
    last = p.add_months(p.month_of(now), 6)
    with progress(f"table_partitions: a single-run backfill {p.month_year(first)}..{p.month_year(last)}, "
                  "as the UI launches it (every month already exists: verified, nothing created)"):
        result = materialize([table_partitions], instance, resources, tags={
            "dagster/asset_partition_range_start": p.partition_key(first),
            "dagster/asset_partition_range_end": p.partition_key(last)})
        meta = metadata_of(result, "table_partitions")
        say(f"months {meta['months']}: {meta['months_created']} created, "
            f"{meta['rows_moved_from_default']} rows moved from default partitions")

    with progress("ingestion: price_snapshots for the last 3 days, 3 ticks of token_balances, "
                  "portfolio_snapshots, position_snapshots, governance_locks, then asset_correlations"):
        walkthrough.recent_ingestion(days=3, ticks=3, scale=scale, now=now, instance=instance, progress=say,
                                     log_level=DEMO_LOG_LEVEL)

    days = (p.month_bounds(first)[0].date(), now.date())
    with progress(f"rollups: price_rollups as one single-run backfill {days[0]}..{days[1]}, then portfolio_rollups "
                  "(hourly and daily aggregates, kept after their months are archived)"):
        result = materialize([price_rollups], instance, resources, tags={
            "dagster/asset_partition_range_start": days[0].isoformat(),
            "dagster/asset_partition_range_end": days[1].isoformat()})
        prices = metadata_of(result, "price_rollups")
        result = materialize([portfolio_rollups], instance, resources)
        portfolios = metadata_of(result, "portfolio_rollups")
        say(f"price_rollups: {prices['days_refreshed']} days, rows {prices['rows_written']}; portfolio_rollups: "
            f"{portfolios['days_refreshed']} days, rows {portfolios['rows_written']}")

    database = DatabaseResource()
    with progress("tiering: warm_tier and cold_archive for exactly the months the daily schedule finds due"):
        requests = tiering_requests(database, now.replace(tzinfo=timezone.utc), now.strftime("%Y-%m-%d"))
        requests = [] if isinstance(requests, dg.SkipReason) else requests
        assets = {"warm_tier": warm_tier, "cold_archive": cold_archive}
        for request in sorted(requests, key=lambda r: (r.asset_selection[0].to_user_string() != "warm_tier",
                                                       r.partition_key)):
            asset = request.asset_selection[0].to_user_string()
            result = materialize([assets[asset]], instance, resources, partition_key=request.partition_key)
            changed = metadata_of(result, asset).get("changed", [])
            say(f"{asset} {request.partition_key[:7]}: {', '.join(changed) if changed else 'nothing to do'}")

    with progress("redis_cache: refresh price:latest:*, portfolio:*, governance:* from the read replica"):
        result = materialize([redis_cache], instance, resources)
        meta = metadata_of(result, "redis_cache")
        say(", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)))[:400])

    with progress("health: slow_query_report and index_usage_report, then every probe once"):
        materialize([slow_query_report, index_usage_report], instance, resources)
        with Database.from_env(env) as db:
            say("\n".join(health_lines(db)))

    _summary(stack, env)


def _summary(stack: devstack.LocalStack, env: dict) -> None:
    print("\n== summary (read back from PostgreSQL, S3 and Redis) ==", flush=True)
    store = ArchiveStore.from_env(env)
    with Database.from_env(env) as db:
        with db.connect("primary") as conn:
            print("tables:")
            say("\n".join(partitioning_lines(conn)))
            print("rows per table and monthly child:")
            say(format_rows(conn))
        tiers = month_tiers(db, store)
        print("tiers (hot < 30 days, warm to 1 year, cold beyond: Parquet on S3):")
        say(format_tiers(tiers))
        print("Iceberg tables (catalog 'wedefi' in PostgreSQL, schema iceberg_catalog; any engine reads them):")
        say("\n".join(iceberg_lines(db, store)))
        archived = sorted({m.month for m in tiers if m.objects and m.table == "PriceSnapshot"})
        if archived:
            month = archived[-1]
            start = p.month_bounds(month)[1] - timedelta(days=2)  # the archive's last days ...
            end = p.month_bounds(month)[1] + timedelta(days=2)  # ... into the warm month after it
            stack.wait_replicas_caught_up()
            with db.connect("primary") as conn:
                token = conn.execute('SELECT id, symbol FROM "Token" ORDER BY id LIMIT 1').fetchone()
            history = price_history(db, store, token[0], start, end)
            print(f"cross-tier read: {token[1]} from {start:%Y-%m-%d} to {end:%Y-%m-%d} "
                  f"(`wedefi-pipelines history --token {token[0]} --start {start:%Y-%m-%d} --end {end:%Y-%m-%d}`)")
            months = ", ".join(p.month_year(m) for m in history.archived_months)
            through = f" through the Iceberg table {history.iceberg}, {history.iceberg_files} file(s)" \
                if history.iceberg else ""
            say(f"{history.rows.num_rows} rows: {history.from_archive} from S3 ({months}){through}, "
                f"{history.from_postgres} from PostgreSQL ({history.server})")
        say("\n".join(rollup_lines(db, stack)))
    client = connect_redis(env["REDIS_URL"])
    counts = count_keys(client)
    print("cache keys by family: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    sample = next(iter(sorted(client.scan_iter(match="portfolio:*", count=1000))), None)
    if sample is not None:
        say(f"{sample.decode()} (TTL {client.ttl(sample)} s): {client.get(sample).decode()[:300]}...")
    print("where to look next:")
    say("wedefi-pipelines demo --keep     keeps this stack up and prints its exports; then, in another shell,\n"
        "                                 paste them and run `dagster dev` here: the runs above are in its UI\n"
        "docs/partitioning.md, docs/ingestion.md, docs/tiering.md, docs/rollups.md, docs/cache.md, docs/health.md,\n"
        "docs/runbook.md")


def rollup_lines(db: Database, stack: devstack.LocalStack) -> list[str]:
    """Rows per rollup table, and a daily chart of one token over a year (back to the first
    archived month) served from them alone."""
    with db.connect("primary") as conn:
        counts = [(t.name, conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t.name))).fetchone()[0])
                  for t in (p.PRICE_ROLLUP_HOURLY, p.PRICE_ROLLUP_DAILY, p.PORTFOLIO_ROLLUP_DAILY)]
        token = conn.execute('SELECT id, symbol FROM "Token" ORDER BY id LIMIT 1').fetchone()
        archived = catalog.archived_months(conn, p.PRICE_SNAPSHOT)
    lines = ["rollups: " + ", ".join(f"{name} {n:,} rows" for name, n in counts)]
    if token is not None:
        stack.wait_replicas_caught_up()
        end = datetime.now(timezone.utc).replace(tzinfo=None)
        start = min([end - timedelta(days=365), *(p.month_bounds(m)[0] for m in archived)])  # a year, archive included
        started = time.perf_counter()
        chart = price_chart(db, token[0], start, end, "1d")
        elapsed = (time.perf_counter() - started) * 1000
        cold = sum(1 for row in chart.rows if p.month_of(row[0]) in archived)
        lines.append(f"daily chart of {token[1]} over {start:%Y-%m-%d}..{end:%Y-%m-%d} from PriceRollupDaily alone: "
                     f"{len(chart.rows)} days ({cold} in archived months), {elapsed:.0f} ms on {chart.server} "
                     f"(`wedefi-pipelines history --token {token[0]} --start {start:%Y-%m-%d} --end {end:%Y-%m-%d} "
                     "--resolution 1d`)")
    return lines


def _keep(stack: devstack.LocalStack) -> None:
    """Keep the stack up in the foreground, the cache warm, until Ctrl-C."""
    env = stack.env()
    stop = threading.Event()
    database = Database.from_env(env)
    client = connect_redis(env["REDIS_URL"])
    refresher = threading.Thread(target=keep_refreshing, args=(database, client, 60, stop), daemon=True)
    refresher.start()
    print("# the stack stays up (the cache refreshed every 60 s) until Ctrl-C; in another shell:")
    print(stack.export_lines(), flush=True)
    try:
        wait_until_interrupted()
    finally:
        stop.set()
        refresher.join(10)
        database.close()
