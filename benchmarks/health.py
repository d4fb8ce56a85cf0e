"""Benchmark the health probes against a SELECT 1 round trip, in one run on the embedded stack.

    python benchmarks/health.py                                   # 1,000 statements, 200 indexes, 200 repetitions
    python benchmarks/health.py --statements 200 --indexes 60 --repeat 30   # quick run while developing
    python benchmarks/health.py --pg-bin /usr/lib/postgresql/15/bin

The database is WeDefiDaily's migrated schema plus small tables, so that
pg_stat_user_indexes lists `--indexes` indexes and pg_stat_statements tracks at least
`--statements` distinct statements of this database (the read-only ones also run on the
read replica). Each probe runs on an already open connection, as a sensor tick does,
`--repeat` times in rounds that interleave every probe with the SELECT 1 baseline (so
drift on this shared machine affects them alike). Printed: each probe's median and its
ratio to the median SELECT 1 round trip. Goal: every probe a sensor runs <= 50x, cheap
enough for a 30 s sensor interval. The report probes (daily), whole sensor
evaluations (every server they concern, connections included) and one metrics scrape
are shown for information.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import psycopg
from psycopg import sql

from wedefi_pipelines import devstack
from wedefi_pipelines.health import probes
from wedefi_pipelines.health.metrics import PlatformCollector
from wedefi_pipelines.health.monitor import EVALUATIONS, HealthMonitor
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.resources.database import Database

GOAL = 50.0
# Statement shapes per table: each is a distinct normalized statement (queryid) per table.
READ_SHAPES = [
    "SELECT * FROM {t} WHERE id = %s", "SELECT * FROM {t} WHERE v = %s", "SELECT count(*) FROM {t}",
    "SELECT max(v) FROM {t}", "SELECT min(id) FROM {t} WHERE v > %s",
    "SELECT id FROM {t} WHERE id > %s ORDER BY id LIMIT 5", "SELECT sum(v) FROM {t} WHERE v < %s",
]
WRITE_SHAPES = ["UPDATE {t} SET v = v + 1 WHERE id = %s",
                "INSERT INTO {t} (id, v) VALUES (%s, 0) ON CONFLICT (id) DO NOTHING"]


def user_indexes(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_user_indexes").fetchone()[0]


def tracked_statements(conn: psycopg.Connection) -> int:
    return conn.execute(
        """SELECT count(DISTINCT queryid) FROM pg_stat_statements(false)
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"""
    ).fetchone()[0]


def build(stack: devstack.LocalStack, statements: int, indexes: int) -> tuple[int, int]:
    url = stack.primary.url()
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        tables = max(1, indexes - user_indexes(conn))  # one primary key index per table
        names = [sql.Identifier(f"bench_t{i:04d}") for i in range(tables)]
        for name in names:
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(name))
            conn.execute(sql.SQL("INSERT INTO {} SELECT g, g FROM generate_series(1, 100) g").format(name))
        shapes = READ_SHAPES + WRITE_SHAPES
        if tables * len(shapes) < statements:
            raise SystemExit(f"{tables} tables x {len(shapes)} shapes cannot make {statements} statements: "
                             "raise --indexes")
        stack.wait_replicas_caught_up()
        with psycopg.connect(stack.replica("read").url(), autocommit=True) as replica:
            for shape in shapes:
                for name in names:
                    query = sql.SQL(shape).format(t=name)
                    params = (7,) if "%s" in shape else None
                    conn.execute(query, params)
                    if shape in READ_SHAPES:
                        replica.execute(query, params)
                if tracked_statements(conn) >= statements:
                    break
        conn.execute("ANALYZE")
        return tracked_statements(conn), user_indexes(conn)


def measure(probes_to_run: dict[str, Callable[[], object]], baseline: Callable[[], object], repeat: int):
    timings: dict[str, list[float]] = {name: [] for name in probes_to_run}
    base: list[float] = []
    for _ in range(repeat):
        for name, probe in probes_to_run.items():
            t0 = time.perf_counter()
            baseline()
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            probe()
            timings[name].append(time.perf_counter() - t0)
    return statistics.median(base), {name: statistics.median(ts) for name, ts in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=1000, help="distinct statements to track (default 1000)")
    parser.add_argument("--indexes", type=int, default=200, help="indexes in the database (default 200)")
    parser.add_argument("--repeat", type=int, default=200, help="measurements per probe (default 200)")
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL binaries (default: the embedded PostgreSQL 18)")
    args = parser.parse_args()

    stack = devstack.LocalStack(pg_bin=args.pg_bin, replicas=(devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA),
                                with_s3=False, with_redis=False).start()
    try:
        tracked, indexes = build(stack, args.statements, args.indexes)
        stack.wait_replicas_caught_up()
        env = stack.env()
        primary = psycopg.connect(env["DATABASE_URL_PRIMARY"], autocommit=True)
        replica = psycopg.connect(env["DATABASE_URL_READ"], autocommit=True)
        version = primary.execute("SHOW server_version").fetchone()[0]
        print(f"PostgreSQL {version}: {tracked} statements tracked, {indexes} indexes, "
              f"{args.repeat} repetitions, medians")
        top20 = sorted(probes.statement_snapshot(primary).statements)[:20]
        sensor_probes = {
            "replica_lags (primary, replication_lag_sensor)": lambda: probes.replica_lags(primary),
            "replica_identity (replica, replication_lag_sensor)": lambda: probes.replica_identity(replica),
            "statement_snapshot over 5,000 ms (slow_query_sensor)":
                lambda: probes.statement_snapshot(primary, min_max_exec_ms=5000),
            "running_queries (slow_query_sensor)": lambda: probes.running_queries(primary, 5000),
            "index_io (index_hit_ratio_sensor)": lambda: probes.index_io(primary),
            "connection_counts (connection_count_sensor)": lambda: probes.connection_counts(primary),
            # issue 15
            "database_age (wraparound_sensor)": lambda: probes.database_age(primary),
            "open_transactions over 1 min (long_transactions_sensor)":
                lambda: probes.open_transactions(primary, 60_000),
            "replication_slots (replication_slots_sensor)": lambda: probes.replication_slots(primary),
            "invalid_indexes (invalid_indexes_sensor)": lambda: probes.invalid_indexes(primary),
            "dead_tuples (vacuum_health_sensor)": lambda: probes.dead_tuples(primary),
            "database_counters (deadlocks_sensor)": lambda: probes.database_counters(primary),
            "database_counters, replica (standby_conflicts_sensor)": lambda: probes.database_counters(replica),
        }
        report_probes = {
            "statement_snapshot, all, read time (report)":
                lambda: probes.statement_snapshot(primary, with_read_time=True),
            "statement_texts, 20 statements (report)": lambda: probes.statement_texts(primary, top20),
            "index_usage (report)": lambda: probes.index_usage(primary),
        }
        select_1 = lambda: primary.execute("SELECT 1").fetchone()  # noqa: E731
        base, sensor = measure(sensor_probes, select_1, args.repeat)
        _base2, report = measure(report_probes, select_1, max(5, args.repeat // 4))
        with Database.from_env(env) as database:
            monitor = HealthMonitor(database)
            evaluations = {f"HealthMonitor.{name}() (connects)": (lambda fn=fn: fn(monitor))
                           for name, fn in EVALUATIONS.items()}
            collector = PlatformCollector(database)
            evaluations["metrics scrape (every probe, platform figures)"] = lambda: list(collector.collect())
            _base3, whole = measure(evaluations, select_1, max(5, args.repeat // 10))
        print(f"  {'SELECT 1 round trip (baseline)':<56} {base * 1000:8.3f} ms      1.0x")
        worst = 0.0
        for title, results, held in (("sensor probes (goal <= 50x)", sensor, True),
                                     ("report probes (daily; for information)", report, False),
                                     ("whole sensor evaluations (for information)", whole, False)):
            print(f"  {title}:")
            for name, seconds in results.items():
                ratio = seconds / base
                if held:
                    worst = max(worst, ratio)
                print(f"    {name:<54} {seconds * 1000:8.3f} ms {ratio:8.1f}x")
        verdict = "met" if worst <= GOAL else "MISSED"
        print(f"goal every sensor probe <= {GOAL:.0f}x SELECT 1: {verdict} (worst {worst:.1f}x)")
        primary.close()
        replica.close()
        return 0 if worst <= GOAL else 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
