"""Benchmark partition provisioning against plain PostgreSQL, in one run on the embedded stack.

    python benchmarks/partition_provisioning.py                  # 120 months x 11; 1,000,000 rows x 5
    python benchmarks/partition_provisioning.py --rows 100000 --repeat 3 --repeat-a 3   # quick run
    python benchmarks/partition_provisioning.py --pg-bin /usr/lib/postgresql/15/bin

Figures printed (medians; each repetition runs every method on its own fresh database
cloned from the same template, in alternating order, so drift on this shared machine
affects them alike):

  (a) provisioning `--months` months of "PriceSnapshot" on an empty database with
      `provisioning.ensure_months` (advisory lock, catalog reads, up-front locks,
      `--per-transaction` months per transaction) against a plain loop of
      `CREATE TABLE ... PARTITION OF ...` plus the child's own index in one transaction:
      the same catalog (checked). Goal <= 1.2x; pg_partman 4.7's create_parent measured
      1.7x. Also shown: a bare table + ATTACH for every empty month, the path we did not
      take for empty months.
  (b) draining `--rows` "PriceSnapshot" rows spread over 3 months out of the default
      partition with `provisioning.ensure_months` (per month: bare table, rows copied in
      and deleted from the default, indexes built, ATTACH, one transaction) against a plain
      `INSERT ... SELECT` of the same rows into a standalone table that already has the
      indexes of a monthly child. Goal <= 0.5x; pg_partman 4.7's partition_data_proc
      measured 2.0x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from typing import Callable

import psycopg
from psycopg import sql

from wedefi_pipelines import devstack, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.migrations import migrate

TABLE = p.PRICE_SNAPSHOT
DRAIN_MONTHS = [date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)]


def clone(stack: devstack.LocalStack, template: str, name: str) -> str:
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY = FILE_COPY").format(
            sql.Identifier(name), sql.Identifier(template)))
    return stack.primary.url(name)


def drop(stack: devstack.LocalStack, name: str) -> None:
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def children_catalog(conn: psycopg.Connection) -> list[tuple]:
    """Monthly children with their bounds and indexes: what both methods must leave behind."""
    return conn.execute("""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid),
               (SELECT string_agg(i.indexrelid::regclass::text, ',' ORDER BY i.indexrelid::regclass::text)
                  FROM pg_index i WHERE i.indrelid = c.oid)
          FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
         WHERE h.inhparent = '"PriceSnapshot"'::regclass AND c.relname <> 'PriceSnapshot_default'
         ORDER BY 1""").fetchall()


# -- (a) empty months -----------------------------------------------------------------------

def plain_loop(conn: psycopg.Connection, months: list[date]) -> None:
    with conn.transaction():
        for month in months:
            for statement in p.create_child_sql(TABLE, month):
                conn.execute(statement)


def ours_empty(conn: psycopg.Connection, months: list[date], policy: provisioning.LockPolicy) -> None:
    outcomes = provisioning.ensure_months(conn, TABLE, months, policy=policy)
    assert all(o.action == "created" for o in outcomes), outcomes


def attach_loop(conn: psycopg.Connection, months: list[date]) -> None:
    with conn.transaction():
        for month in months:
            with month_ops.staged_month(conn, TABLE, month):
                pass


# -- (b) draining the default ---------------------------------------------------------------

def seed_default(url: str, rows: int, tokens: int) -> None:
    """`rows` prices over January-March 2025 for `tokens` tokens, all in the default
    partition (no monthly child exists), then vacuumed so every method starts alike."""
    ticks = -(-rows // tokens)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
        conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                        SELECT 'tok-' || t, 1, '0x' || to_hex(t), 'T' || t, 'Token ' || t, 18, now()
                          FROM generate_series(1, %s) t""", (tokens,))
        conn.execute("""
            INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
            SELECT 'tok-' || t, round((t + s * 0.001)::numeric, 9), 'synthetic',
                   timestamp '2025-01-01' + (interval '90 days' / %(ticks)s) * s
              FROM generate_series(0, %(ticks)s - 1) s, generate_series(1, %(tokens)s) t
             LIMIT %(rows)s""", {"ticks": ticks, "tokens": tokens, "rows": rows})
        conn.execute('VACUUM (FREEZE, ANALYZE) "PriceSnapshot_default"')
        loaded = conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0]
        if loaded != rows:
            raise SystemExit(f"seeded {loaded} rows instead of {rows}")


def plain_insert_select(conn: psycopg.Connection) -> int:
    conn.execute('CREATE TABLE bench_target (LIKE "PriceSnapshot" INCLUDING DEFAULTS)')
    conn.execute('ALTER TABLE bench_target ADD PRIMARY KEY ("id", "recordedAt")')
    for statement in p.create_child_indexes_sql(TABLE, date(2000, 1, 1), target="bench_target"):
        conn.execute(statement)
    start = time.perf_counter()
    with conn.transaction():
        moved = conn.execute('INSERT INTO bench_target SELECT * FROM "PriceSnapshot_default"').rowcount
    return moved, time.perf_counter() - start


def ours_drain(conn: psycopg.Connection, policy: provisioning.LockPolicy) -> int:
    start = time.perf_counter()
    outcomes = provisioning.ensure_months(conn, TABLE, DRAIN_MONTHS, policy=policy)
    elapsed = time.perf_counter() - start
    assert all(o.action == "created" for o in outcomes), outcomes
    left = conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0]
    assert left == 0, f"{left} rows left in the default"
    return sum(o.moved for o in outcomes), elapsed


# -- driver -----------------------------------------------------------------------------------

def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--months", type=int, default=120, help="empty months to provision in (a)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to drain from the default in (b)")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of (b)")
    parser.add_argument("--repeat-a", type=int, default=11,
                        help="repetitions of (a): about a second each, and noisy on a shared machine")
    parser.add_argument("--per-transaction", type=int, default=provisioning.DEFAULT_POLICY.months_per_transaction)
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL binaries (default: the embedded PostgreSQL 18)")
    parser.add_argument("--skip", choices=("a", "b"), default=None, help="leave out one figure")
    args = parser.parse_args(argv)
    policy = provisioning.LockPolicy(months_per_transaction=args.per_transaction)
    months = [p.add_months(date(2020, 1, 1), i) for i in range(args.months)]

    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(), with_s3=False, with_redis=False) as stack:
        with psycopg.connect(stack.primary.url("postgres")) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(f"PostgreSQL {version}; medians of {args.repeat_a} (a) and {args.repeat} (b) repetitions; "
              "no replica attached")
        stack.create_database("bench_schema")
        migrate(stack.primary.url("bench_schema"))

        if args.skip != "a":
            times: dict[str, list[float]] = {"plain": [], "ours": [], "attach": []}
            catalogs = {}
            for rep in range(args.repeat_a):
                order = ["plain", "ours", "attach"] if rep % 2 == 0 else ["attach", "ours", "plain"]
                for method in order:
                    url = clone(stack, "bench_schema", f"bench_a_{method}")
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("SELECT 1")
                        run = {"plain": lambda: plain_loop(conn, months),
                               "ours": lambda: ours_empty(conn, months, policy),
                               "attach": lambda: attach_loop(conn, months)}[method]
                        times[method].append(timed(run))
                        catalogs[method] = children_catalog(conn)
                    drop(stack, f"bench_a_{method}")
            same = catalogs["plain"] == catalogs["ours"] and len(catalogs["ours"]) == args.months
            base = statistics.median(times["plain"])
            ratio = statistics.median(times["ours"]) / base
            print(f"(a) {args.months} empty months of \"PriceSnapshot\" (same catalog: {'yes' if same else 'NO'})")
            print(f"    baseline: CREATE TABLE ... PARTITION OF + child index, one transaction {base:8.3f} s")
            print(f"    provisioning.ensure_months ({args.per_transaction} months per transaction)"
                  f"{statistics.median(times['ours']):14.3f} s   ratio {ratio:.2f}x (goal <= 1.2x: "
                  f"{'met' if ratio <= 1.2 else 'MISSED'})")
            print(f"    not taken for empty months: bare table + ATTACH each"
                  f"{statistics.median(times['attach']):22.3f} s   ratio {statistics.median(times['attach']) / base:.2f}x")
            print(f"    runs (s): " + "; ".join(f"{k} {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()))

        if args.skip != "b":
            stack.create_database("bench_seeded", template="bench_schema")
            t0 = time.perf_counter()
            seed_default(stack.primary.url("bench_seeded"), args.rows, args.tokens)
            print(f"(b) seeded {args.rows:,} rows over 3 months into \"PriceSnapshot_default\" "
                  f"in {time.perf_counter() - t0:.1f} s")
            times = {"plain": [], "ours": []}
            for rep in range(args.repeat):
                for method in (["plain", "ours"] if rep % 2 == 0 else ["ours", "plain"]):
                    url = clone(stack, "bench_seeded", f"bench_b_{method}")
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("SELECT 1")
                        moved, elapsed = plain_insert_select(conn) if method == "plain" else ours_drain(conn, policy)
                    if moved != args.rows:
                        raise SystemExit(f"{method} moved {moved} rows, expected {args.rows}")
                    times[method].append(elapsed)
                    drop(stack, f"bench_b_{method}")
            base = statistics.median(times["plain"])
            ratio = statistics.median(times["ours"]) / base
            print(f"    baseline: INSERT ... SELECT into a standalone table with a child's indexes {base:8.3f} s")
            print(f"    provisioning.ensure_months: bare table, move, index, ATTACH per month"
                  f"{statistics.median(times['ours']):10.3f} s   ratio {ratio:.2f}x (goal <= 0.5x: "
                  f"{'met' if ratio <= 0.5 else 'MISSED'})")
            print(f"    rows/s: baseline {args.rows / base:,.0f}, ours {args.rows / statistics.median(times['ours']):,.0f}")
            print(f"    runs (s): " + "; ".join(f"{k} {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
