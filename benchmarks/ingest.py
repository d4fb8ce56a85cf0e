"""Benchmark the price load path against raw `psql \\copy`, in one run on the embedded stack.

    python benchmarks/ingest.py                         # one month: 500 tokens every 5 minutes, 4,464,000 rows
    python benchmarks/ingest.py --days 2 --repeat 1     # quick run while developing
    python benchmarks/ingest.py --pg-bin /usr/lib/postgresql/15/bin
    WEDEFI_STACK_DIR=/tmp/wedefi-bench python benchmarks/ingest.py   # full size on disk instead of tmpfs

Each repetition loads the same month three ways, each into its own fresh database cloned
from one template (migrated, the synthetic market registered), in alternating order:

  ours   `price_snapshots`' load path (wedefi_pipelines.ingest.prices.load_prices): the
         synthetic market generates each day, validation, ids, CSV formatting, then COPY
         into "PriceSnapshot" (the month's child exists, with its PK and UNIQUE index),
         day by day under the day locks. Everything from generation on is timed.
  raw    `psql \\copy "PriceSnapshot" FROM <file>` of the very same rows (ids included,
         exported from `ours`) into an identical database: the baseline. Goal: ours >= 0.8x.
  whole  seed_history's whole-month path (load_whole_month): COPY into a bare table named
         like the child, then its indexes, a bounds CHECK and ATTACH, in one transaction.
         Goal: >= 1.5x the raw \\copy.

Printed: rows/s of each (median over repetitions), the ratios, and the CPU seconds used by
the server and the client, which the other loads of this shared machine do not inflate.
Autovacuum is off during the run (`--autovacuum` leaves it on): its VACUUM and ANALYZE
of the loaded child would otherwise run inside the day-by-day path's timing only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from wedefi_pipelines import devstack, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.ingest import price_sources
from wedefi_pipelines.ingest.prices import load_prices, load_whole_month
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.sources.synthetic import SOURCE, SyntheticMarket

MONTH = date(2025, 1, 1)
NOW = datetime(2026, 1, 1)
COLUMNS = '(id, "tokenId", "priceUsd", source, "recordedAt")'
# Sized like a modest production server rather than PostgreSQL's defaults (128 MB / 4 MB),
# which a month's child and its indexes (~800 MB) outgrow; the same for every path.
SERVER_SETTINGS = {"shared_buffers": "'2GB'", "work_mem": "'64MB'", "maintenance_work_mem": "'512MB'"}


def clone(stack: devstack.LocalStack, template: str, name: str) -> str:
    drop(stack, name)
    stack.create_database(name, template=template)
    return stack.primary.url(name)


def drop(stack: devstack.LocalStack, name: str) -> None:
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int, with_reaped: bool = False) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if with_reaped else 0)
    return used / _TICKS


def cpu_seconds(stack: devstack.LocalStack) -> float:
    """CPU used so far by the PostgreSQL server (every process, exited backends included)
    and by this process and its finished children (psql): a figure the other loads on this
    shared machine do not inflate, unlike wall time."""
    postmaster = stack.primary.process.pid
    total = _proc_cpu(postmaster, with_reaped=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == postmaster:
                    total += _proc_cpu(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def checkpoint(stack: devstack.LocalStack) -> None:
    """Start each measurement from a clean checkpoint, so none pays for another's WAL."""
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def run_ours(url: str, market: SyntheticMarket, end: datetime) -> tuple[float, int]:
    start = datetime(MONTH.year, MONTH.month, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        provisioning.ensure_months(conn, p.PRICE_SNAPSHOT, [MONTH])
        t0 = time.perf_counter()
        plan = price_sources.synthetic_plan(market, start, end, NOW)
        result = load_prices(conn, plan.chunks, window=(start, end), origin=SOURCE, now=NOW, provision=False)
        elapsed = time.perf_counter() - t0
    assert result.rejected == 0 and result.direct_chunks == (end - start).days, result.metadata()
    return elapsed, result.inserted


def export_rows(url: str, path: Path) -> None:
    with psycopg.connect(url) as conn, path.open("wb") as out:
        with conn.cursor().copy(sql.SQL('COPY (SELECT id, "tokenId", "priceUsd", source, "recordedAt" '
                                        'FROM "PriceSnapshot") TO STDOUT (FORMAT csv)')) as copy:
            for block in copy:
                out.write(block)


def run_raw(stack: devstack.LocalStack, url: str, path: Path) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        provisioning.ensure_months(conn, p.PRICE_SNAPSHOT, [MONTH])
    command = f'\\copy "PriceSnapshot" {COLUMNS} FROM \'{path}\' (FORMAT csv)'
    t0 = time.perf_counter()
    subprocess.run([stack.primary.tool("psql"), url, "-v", "ON_ERROR_STOP=1", "-qc", command], check=True)
    return time.perf_counter() - t0


def run_whole(url: str, market: SyntheticMarket, end: datetime) -> tuple[float, int]:
    start = datetime(MONTH.year, MONTH.month, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        result = load_whole_month(conn, MONTH, market.iter_price_days(start, end), origin=SOURCE, now=NOW)
        elapsed = time.perf_counter() - t0
    return elapsed, result.inserted


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=31, help="days of January 2025 to load (31: the full month)")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--tick-minutes", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (medians are printed)")
    parser.add_argument("--autovacuum", action="store_true",
                        help="leave autovacuum on (it then works inside the day-by-day path's timing only)")
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL binaries (default: the embedded PostgreSQL 18)")
    args = parser.parse_args()
    if not 1 <= args.days <= 31:
        parser.error("--days must be 1..31")

    market = SyntheticMarket(tokens=args.tokens, wallets=1, max_tokens_per_wallet=1, tick_minutes=args.tick_minutes)
    end = datetime(MONTH.year, MONTH.month, 1) + timedelta(days=args.days)
    expected = args.tokens * (1440 // args.tick_minutes) * args.days
    times: dict[str, list[float]] = {"ours": [], "raw": [], "whole": []}
    cpus: dict[str, list[float]] = {"ours": [], "raw": [], "whole": []}
    # Autovacuum off for all three: the day-by-day path commits 31 times, so autovacuum's
    # insert-driven VACUUM and ANALYZE of the child run inside its timing, while the same
    # work after the single-transaction \copy would fall outside the baseline's.
    pg_settings = {**SERVER_SETTINGS, **({} if args.autovacuum else {"autovacuum": "off"})}
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(), with_s3=False, with_redis=False,
                             extra_pg_settings=pg_settings) as stack, \
            tempfile.TemporaryDirectory(prefix="wedefi-bench-") as tmp:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(f"PostgreSQL {version}; {expected:,} rows: {args.tokens} tokens every {args.tick_minutes} min, "
              f"{args.days} day(s) of {MONTH:%Y-%m}; {args.repeat} repetition(s)", flush=True)
        stack.create_database("bench_template")
        migrate(stack.primary.url("bench_template"))
        with psycopg.connect(stack.primary.url("bench_template"), autocommit=True) as conn:
            register_market(conn, market)
        rows_file = Path(tmp) / "rows.csv"
        warm = clone(stack, "bench_template", "bench_warmup")  # caches, imports and the walk's anchors, untimed
        run_ours(warm, market, datetime(MONTH.year, MONTH.month, 2))
        drop(stack, "bench_warmup")
        for rep in range(args.repeat):
            order = ["ours", "raw", "whole"] if rep % 2 == 0 else ["whole", "ours", "raw"]
            if not rows_file.exists():  # the raw baseline needs ours' rows: measure ours first once
                order = ["ours", "raw", "whole"]
            for method in order:
                name = f"bench_{method}"
                url = clone(stack, "bench_template", name)
                checkpoint(stack)
                cpu0 = cpu_seconds(stack)
                if method == "ours":
                    elapsed, rows = run_ours(url, market, end)
                    if not rows_file.exists():
                        export_rows(url, rows_file)
                elif method == "raw":
                    elapsed = run_raw(stack, url, rows_file)
                    rows = count(url)
                else:
                    elapsed, rows = run_whole(url, market, end)
                if rows != expected:
                    raise SystemExit(f"{method}: loaded {rows} rows, expected {expected}")
                times[method].append(elapsed)
                cpus[method].append(cpu_seconds(stack) - cpu0)
                print(f"  rep {rep + 1} {method:<5} {elapsed:7.2f} s  {rows / elapsed:>10,.0f} rows/s  "
                      f"cpu {cpus[method][-1]:6.2f} s", flush=True)
                drop(stack, name)

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    rate = {k: expected / v for k, v in med.items()}
    labels = {"raw": "raw psql \\copy into the indexed child (baseline)",
              "ours": "price_snapshots load path (generate+validate+COPY)",
              "whole": "seed_history whole-month path (bare+index+ATTACH)"}
    print()
    print(f"{'path':<52} {'seconds':>8} {'rows/s':>11} {'CPU s':>8}")
    for key in ("raw", "ours", "whole"):
        print(f"{labels[key]:<52} {med[key]:8.2f} {rate[key]:11,.0f} {cpu[key]:8.2f}")
    print()
    ours_ratio = rate["ours"] / rate["raw"]
    whole_ratio = rate["whole"] / rate["raw"]
    print(f"load path / raw \\copy:   {ours_ratio:.2f}x  (goal >= 0.8)  {'OK' if ours_ratio >= 0.8 else 'BELOW GOAL'}"
          f"   by CPU: {cpu['raw'] / cpu['ours']:.2f}x")
    print(f"whole month / raw \\copy: {whole_ratio:.2f}x  (goal >= 1.5)  {'OK' if whole_ratio >= 1.5 else 'BELOW GOAL'}"
          f"   by CPU: {cpu['raw'] / cpu['whole']:.2f}x")
    print("(ratios of rows/s, medians; CPU = server processes + client, which other load on the machine does not "
          "inflate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
