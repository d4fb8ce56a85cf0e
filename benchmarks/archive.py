"""Benchmark the warm and cold tiers on one month of "PriceSnapshot", in one run on the embedded stack.

    python benchmarks/archive.py                 # 500 tokens every 5 minutes: 4,464,000 rows
    python benchmarks/archive.py --scale 0.1 --year-tokens 10   # quick, while developing
    WEDEFI_STACK_DIR=/tmp/wedefi-bench python benchmarks/archive.py --scale 10   # 44.6M rows, ~12 GB

The month is loaded as ingestion leaves it (time order, hot indexes; random UUID ids, token
ids that are UUIDs, random-walk prices at 10 significant digits, "createdAt" one insert
transaction's time per tick), then goes through its
life: warm conversion (measured against the hot layout), then the cold archive (measured
against `pg_dump --format=custom --compress=9` of the same child, from the server's own bin
directory). The archive runs in a child process, so its peak RSS is its own (the S3 server
lives in this process); its wall time covers freeze, export, upload, verification
(download and re-hash), metadata and drop.

Figures printed (ratios of the same run):
  * archive wall time / pg_dump wall time   (goal <= 0.5)
  * archive bytes / pg_dump bytes           (goal <= 0.75 with ids as text, issue 14; the same
    rows in the format-1 layout, UUID ids and millisecond timestamps, are printed beside it:
    the archived file converted back, written with that release's writer settings)
    (pg_dump of the warm child, which is what gets archived; the dump of the same rows in
    ingestion order, before the warm rewrite, is printed for reference)
  * registration of the month's object in its Iceberg table (inside the record transaction)
  * archive rows/s and peak RSS
  * warm: total relation size after / before (goal <= 0.75; the parent's keys stay)
  * warm: one token's week, execution time after / before (goal <= 2)
  * a one-token year query through the cross-tier path (`tiering.history.price_history`:
    twelve archived months read through the Iceberg table) / the same call while the twelve
    months were warm in PostgreSQL, before archiving (goal <= 3); `--year-tokens` tokens
    (default 50) every 5 minutes over the calendar year before the benchmark's month.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pcsv
from psycopg import sql

import pyarrow.parquet as pq

from wedefi_pipelines import devstack, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines.tiering.warm import warm_month

TICK_MINUTES = 5
REPO = Path(__file__).resolve().parent.parent
ARCHIVE_RUNNER = """
import json, sys
from datetime import date
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering.archive import Archiver
with Database.from_env() as db:
    out = Archiver(db, ArchiveStore.from_env()).archive_month("PriceSnapshot", date.fromisoformat(sys.argv[1]))
print(json.dumps({"action": out.action, "reason": out.reason, "rows": out.rows, "bytes": out.bytes,
                  "seconds": out.seconds, "peak_rss_mb": out.peak_rss_mb, "source": out.exported_from,
                  "keys": [x.key for x in out.parts]}))
"""


def token_ids(tokens: int) -> list[str]:
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"wedefi-bench-token-{i}")) for i in range(tokens)]


def load_month(url: str, month: date, tokens: int, seed: int = 7) -> int:
    """One month of prices in ingestion order, loaded bare then indexed and attached."""
    rng = np.random.default_rng(seed)
    token_ids_ = token_ids(tokens)
    start, end = p.month_bounds(month)
    per_day = 24 * 60 // TICK_MINUTES
    log_price = np.log(rng.uniform(0.01, 5000, tokens))
    vol = rng.uniform(0.01, 0.08, tokens) / np.sqrt(per_day)
    total = 0
    with psycopg.connect(url) as conn:
        conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())
                        ON CONFLICT DO NOTHING""")
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                               VALUES (%s, 1, %s, %s, %s, 18, now()) ON CONFLICT DO NOTHING""",
                            [(t, f"0x{i:040x}", f"T{i}", f"Token {i}") for i, t in enumerate(token_ids_)])
        with month_ops.staged_month(conn, p.PRICE_SNAPSHOT, month) as child:
            copy_sql = sql.SQL('COPY {} ("tokenId", "priceUsd", source, "recordedAt", "createdAt") '
                               "FROM STDIN WITH (FORMAT csv)").format(sql.Identifier(child))
            with conn.cursor().copy(copy_sql) as copy:
                day = start
                while day < end:
                    steps = rng.normal(0, 1, (per_day, tokens)) * vol
                    walk = log_price + np.cumsum(steps, axis=0)
                    log_price = walk[-1]
                    prices = np.exp(walk)
                    digits = 10 - np.floor(np.log10(prices)).astype(int) - 1
                    prices = np.round(prices * 10.0 ** digits) / 10.0 ** digits  # 10 significant digits
                    ticks = np.datetime64(day, "ms") + np.arange(per_day) * np.timedelta64(TICK_MINUTES * 60_000, "ms")
                    recorded = np.repeat(ticks, tokens)
                    # "createdAt" DEFAULT CURRENT_TIMESTAMP: the inserting transaction's time, one per tick
                    lag = np.repeat(rng.integers(200, 3000, per_day), tokens).astype("timedelta64[ms]")
                    created = recorded + lag
                    table = pa.table({
                        "tokenId": pa.array(token_ids_ * per_day),
                        "priceUsd": pa.array(prices.ravel()).cast(pa.string()),
                        "source": pa.array(["synthetic"] * (per_day * tokens)),
                        "recordedAt": pa.array(recorded), "createdAt": pa.array(created)})
                    sink = pa.BufferOutputStream()
                    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style="none"))
                    copy.write(sink.getvalue().to_pybytes())
                    total += table.num_rows
                    day += timedelta(days=1)
        conn.commit()
        conn.autocommit = True
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(p.child_name(p.PRICE_SNAPSHOT, month))))
    return total


def pg_dump(stack: devstack.LocalStack, url: str, month: date, out: Path) -> tuple[float, int]:
    started = time.monotonic()
    table = f'"{p.child_name(p.PRICE_SNAPSHOT, month)}"'  # a pg_dump pattern: quoted to keep the case
    subprocess.run([stack.primary.tool("pg_dump"), "--format=custom", "--compress=9", "--no-owner",
                    "--table", table, "--file", str(out), url], check=True)
    return time.monotonic() - started, out.stat().st_size


def format_1_bytes(current: Path, out: Path) -> int:
    """The same rows in the layout the archive wrote before issue 14 (ids as Parquet UUID,
    timestamps as UTC-adjusted milliseconds, every column at zstd level 1), with that
    release's writer settings: what this month cost in bytes before the type change."""
    parquet = pq.ParquetFile(current)

    def old(table: pa.Table) -> pa.Table:
        arrays, fields = [], []
        for field, column in zip(table.schema, table.columns):
            if field.name == "id":
                raw = np.frombuffer(bytes.fromhex("".join(column.to_pylist()).replace("-", "")), dtype=np.uint8)
                storage = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(column), [None, pa.py_buffer(raw)])
                column, field = pa.ExtensionArray.from_storage(pa.uuid(), storage), pa.field("id", pa.uuid(), False)
            elif pa.types.is_timestamp(field.type):
                column = column.cast(pa.timestamp("ms")).cast(pa.timestamp("ms", tz="UTC"))
                field = pa.field(field.name, column.type, field.nullable)
            arrays.append(column)
            fields.append(field)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    first = old(parquet.read_row_group(0).slice(0, 0))
    names = first.schema.names
    writer = pq.ParquetWriter(out, first.schema, compression="zstd", compression_level=1, write_statistics=True,
                              write_page_index=True, use_dictionary=["tokenId", "source"],
                              column_encoding={"recordedAt": "DELTA_BINARY_PACKED", "createdAt": "DELTA_BINARY_PACKED"},
                              sorting_columns=[pq.SortingColumn(names.index(c)) for c in p.PRICE_SNAPSHOT.export_order])
    for index in range(parquet.metadata.num_row_groups):
        group = parquet.read_row_group(index)
        writer.write_table(old(group), row_group_size=group.num_rows)
    writer.close()
    return out.stat().st_size


def year_query(stack: devstack.LocalStack, env: dict, year: int, tokens: int, repeats: int = 3) -> dict:
    """One token's year through the cross-tier path, while the twelve months are warm in
    PostgreSQL and again once they are archived (read through the Iceberg table)."""
    url = env["DATABASE_URL_PRIMARY"]
    months = [date(year, m, 1) for m in range(1, 13)]
    started = time.monotonic()
    rows = sum(load_month(url, month, tokens, seed=100 + month.month) for month in months)
    print(f"year {year}: loaded {rows:,} rows ({tokens} tokens) in {time.monotonic() - started:.1f}s", flush=True)
    token = token_ids(tokens)[0]
    start, end = datetime(year, 1, 1), datetime(year + 1, 1, 1)
    timings: dict[str, list[float]] = {"postgresql": [], "cross-tier": []}
    with Database.from_env(env, settings=Settings()) as db:
        store = ArchiveStore.from_env(env)
        for month in months:
            as_if_warm = datetime.combine(p.month_bounds(month)[1].date() + timedelta(days=60), datetime.min.time())
            warm_month(db, "PriceSnapshot", month, now=as_if_warm)
        stack.wait_replicas_caught_up()

        def timed(label: str) -> object:
            for _ in range(repeats):
                mark = time.perf_counter()
                result = price_history(db, store, token, start, end)
                timings[label].append(time.perf_counter() - mark)
            return result

        before = timed("postgresql")
        assert before.from_archive == 0, "the year was meant to be in PostgreSQL"
        registration = []
        for month in months:
            outcome = Archiver(db, store).archive_month("PriceSnapshot", month)
            assert outcome.action == "archived", outcome.reason
            registration.append(outcome.seconds["register"])
        stack.wait_replicas_caught_up()
        after = timed("cross-tier")
        assert after.from_postgres == 0 and after.rows.equals(before.rows), "the cross-tier read differs"
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    return {"rows": before.rows.num_rows, "postgresql_s": median["postgresql"], "cross_tier_s": median["cross-tier"],
            "files": after.iceberg_files, "iceberg": after.iceberg, "register_s": sorted(registration)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="tokens = 500 x scale (1.0: 4,464,000 rows)")
    parser.add_argument("--pg-bin", default=devstack.EMBEDDED, help="'embedded' (PostgreSQL 18) or a bin directory")
    parser.add_argument("--year-tokens", type=int, default=50,
                        help="tokens of the twelve months of the year query (0: skip it)")
    args = parser.parse_args()
    tokens = max(1, round(500 * args.scale))
    now = datetime.now(timezone.utc)
    month = date(p.add_months(p.month_of(now), -14).year, 1, 1)  # a 31-day month, at least 14 months old: cold
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(devstack.READ_REPLICA,)) as stack:
        env = stack.env()
        migrate(env["DATABASE_URL_PRIMARY"])
        print(f"PostgreSQL {stack.primary.bin_dir}; month {p.month_year(month)}, {tokens} tokens every "
              f"{TICK_MINUTES} min", flush=True)
        started = time.monotonic()
        rows = load_month(env["DATABASE_URL_PRIMARY"], month, tokens)
        print(f"loaded {rows:,} rows in {time.monotonic() - started:.1f}s", flush=True)

        hot_dump_s, hot_dump_bytes = pg_dump(stack, env["DATABASE_URL_PRIMARY"], month, Path(stack.base_dir) / "hot.dump")
        print(f"for reference, pg_dump -Fc -Z9 of the hot child (ingestion order): {hot_dump_s:.1f}s, "
              f"{hot_dump_bytes / 1e6:.1f} MB", flush=True)

        with Database.from_env(env, settings=Settings()) as db:
            as_if_warm = datetime.combine(p.month_bounds(month)[1].date() + timedelta(days=60), datetime.min.time())
            warm = warm_month(db, "PriceSnapshot", month, now=as_if_warm)
        assert warm.action == "converted", warm.reason
        size_ratio = warm.after.bytes / warm.before.bytes
        query_ratio = warm.after.query_ms / warm.before.query_ms
        print(f"warm: {warm.before.bytes / 2**20:.0f} MiB -> {warm.after.bytes / 2**20:.0f} MiB "
              f"({warm.before.bytes_per_row:.1f} -> {warm.after.bytes_per_row:.1f} B/row) in "
              f"{sum(warm.seconds.values()):.1f}s; one token's week {warm.before.query_ms:.2f} ms -> "
              f"{warm.after.query_ms:.2f} ms", flush=True)

        dump_s, dump_bytes = pg_dump(stack, env["DATABASE_URL_PRIMARY"], month, Path(stack.base_dir) / "month.dump")
        print(f"pg_dump -Fc -Z9: {dump_s:.1f}s, {dump_bytes / 1e6:.1f} MB", flush=True)

        child_env = {**os.environ, **env}
        runner = subprocess.run([sys.executable, "-c", ARCHIVE_RUNNER, month.isoformat()], env=child_env, cwd=REPO,
                                capture_output=True, text=True)
        if runner.returncode != 0:
            print(runner.stderr, file=sys.stderr)
            return 1
        archive = json.loads(runner.stdout.strip().splitlines()[-1])
        assert archive["action"] == "archived" and archive["rows"] == rows, archive
        seconds = archive["seconds"]
        print(f"archive: {seconds['total']:.1f}s (freeze {seconds['freeze']:.1f}, export {seconds['export']:.1f}, "
              f"upload {seconds['upload']:.1f}, verify {seconds['verify']:.1f}, record+register+drop "
              f"{seconds['record_and_drop']:.1f} of which Iceberg registration {seconds['register']:.2f}), "
              f"{archive['bytes'] / 1e6:.1f} MB, exported from the {archive['source']}", flush=True)
        store = ArchiveStore.from_env(env)
        current = Path(stack.base_dir) / "current.parquet"
        store.download(archive["keys"][0], current)
        old_bytes = format_1_bytes(current, Path(stack.base_dir) / "format1.parquet")
        print(f"the same rows in the format-1 layout (UUID ids, millisecond timestamps): {old_bytes / 1e6:.1f} MB",
              flush=True)
        year = year_query(stack, env, month.year - 1, args.year_tokens) if args.year_tokens else None
        if year:
            print(f"year query ({year['rows']:,} rows of one token over {month.year - 1}): PostgreSQL (warm) "
                  f"{year['postgresql_s'] * 1000:.0f} ms, cross-tier through {year['iceberg']} "
                  f"({year['files']} files after pruning) {year['cross_tier_s'] * 1000:.0f} ms; registration per "
                  f"month {min(year['register_s']):.2f}..{max(year['register_s']):.2f}s", flush=True)

    time_ratio = seconds["total"] / dump_s
    bytes_ratio = archive["bytes"] / dump_bytes
    print()
    print(f"rows                               {rows:>12,}")
    print(f"archive time / pg_dump time        {time_ratio:12.2f}   (goal <= 0.5)  {'ok' if time_ratio <= 0.5 else 'MISSED'}")
    print(f"archive bytes / pg_dump bytes      {bytes_ratio:12.2f}   (goal <= 0.75) {'ok' if bytes_ratio <= 0.75 else 'MISSED'}"
          f"   format 1 (before issue 14): {old_bytes / dump_bytes:.2f}")
    print(f"Iceberg registration               {seconds['register']:12.2f} s (inside the record transaction)")
    print(f"  (against the hot child's dump:    {seconds['total'] / hot_dump_s:12.2f} time, "
          f"{archive['bytes'] / hot_dump_bytes:.2f} bytes)")
    print(f"archive rows/s                     {rows / seconds['total']:12,.0f}")
    print(f"archive peak RSS                   {archive['peak_rss_mb']:12.0f} MB")
    print(f"warm size after / before           {size_ratio:12.2f}   (goal <= 0.75) {'ok' if size_ratio <= 0.75 else 'MISSED'}")
    print(f"warm query after / before          {query_ratio:12.2f}   (goal <= 2)    {'ok' if query_ratio <= 2 else 'MISSED'}")
    if year:
        ratio = year["cross_tier_s"] / year["postgresql_s"]
        print(f"year query cross-tier / PostgreSQL {ratio:12.2f}   (goal <= 3)    {'ok' if ratio <= 3 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
