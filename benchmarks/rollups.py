"""Benchmark the rollups (issue 16) against their baselines, in one run.

    python benchmarks/rollups.py                      # 50,112 price rows a day; a 50-token year
    python benchmarks/rollups.py --year-tokens 10     # quicker year
    python benchmarks/rollups.py --pg-bin /usr/lib/postgresql/15/bin

(a) One day's refresh at the seed's volume (521 tokens every 15 minutes: 50,016 rows)
    against that day's COPY into "PriceSnapshot" (goal <= 0.1x): the day's rows are copied
    out, deleted, timed back in with COPY, then the day's rollups are refreshed (hourly and
    daily, watermark included), timed; and again with nothing changed.
(b) One token's one-year daily chart from "PriceRollupDaily" against the same chart computed
    from raw rows across PostgreSQL and the archive (`price_history`, then open/high/low/
    close/count per day in pyarrow), with nine of the twelve months archived (goal <= 0.01x).
    Both charts are compared value by value first.
(c) The rollups' bytes per year at the seed's volume: the price tables' size per raw row
    measured on the loaded month, scaled to 50,000 price rows a day at 15-minute ticks; one
    day of "PortfolioRollupDaily" for the seed's 10,000 wallets, times 365.
The year chart's months use the same 15-minute ticks.
Printed: seconds (median of --repeat) and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archive as archive_bench  # noqa: E402  (benchmarks/archive.py: its synthetic month loader)

from wedefi_pipelines import devstack  # noqa: E402
from wedefi_pipelines import partitioning as p  # noqa: E402
from wedefi_pipelines.migrations import migrate  # noqa: E402
from wedefi_pipelines.resources.archive import ArchiveStore  # noqa: E402
from wedefi_pipelines.resources.database import Database  # noqa: E402
from wedefi_pipelines.rollups.reads import price_chart  # noqa: E402
from wedefi_pipelines.rollups.refresh import month_days, refresh  # noqa: E402
from wedefi_pipelines.rollups.tables import PORTFOLIO, PRICE, ensure_months  # noqa: E402
from wedefi_pipelines.settings import Settings  # noqa: E402
from wedefi_pipelines.tiering.archive import Archiver  # noqa: E402
from wedefi_pipelines.tiering.history import price_history  # noqa: E402

SEED_TOKENS = 521  # x 96 ticks a day (every 15 minutes, the seed's cadence) = 50,016 rows: its 50,000 a day
archive_bench.TICK_MINUTES = 15


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        mark = time.perf_counter()
        fn()
        times.append(time.perf_counter() - mark)
    return statistics.median(times)


def day_refresh(db: Database, url: str, month: date, repeat: int) -> dict:
    day = p.month_bounds(month)[0] + timedelta(days=14)
    window = (day, day + timedelta(days=1))
    refresh(db, PRICE, days=[d for d in month_days(month) if d != day.date()])
    copies, refreshes, unchanged = [], [], []
    for _ in range(repeat):
        with psycopg.connect(url, autocommit=True) as conn:
            buffer = io.BytesIO()
            with conn.cursor().copy('COPY (SELECT * FROM "PriceSnapshot" WHERE "recordedAt" >= %s AND "recordedAt" < %s)'
                                    ' TO STDOUT', window) as copy:
                for chunk in copy:
                    buffer.write(chunk)
            rows = conn.execute('DELETE FROM "PriceSnapshot" WHERE "recordedAt" >= %s AND "recordedAt" < %s',
                                window).rowcount
            conn.execute("""DELETE FROM "PriceRollupHourly" WHERE "bucketStart" >= %s AND "bucketStart" < %s""", window)
            conn.execute("""DELETE FROM "PriceRollupDaily" WHERE "bucketStart" >= %s AND "bucketStart" < %s""", window)
            conn.execute("DELETE FROM wedefi_rollup_watermark WHERE day = %s", (day.date(),))
            conn.execute("VACUUM ANALYZE \"PriceSnapshot\"")
            mark = time.perf_counter()
            with conn.cursor().copy('COPY "PriceSnapshot" FROM STDIN') as copy:
                copy.write(buffer.getvalue())
            copies.append(time.perf_counter() - mark)
        mark = time.perf_counter()
        result = refresh(db, PRICE, days=[day.date()])
        refreshes.append(time.perf_counter() - mark)
        assert result.refreshed == [day.date()] and result.rows_written["PriceRollupHourly"] == SEED_TOKENS * 24
        mark = time.perf_counter()
        again = refresh(db, PRICE, days=[day.date()])
        unchanged.append(time.perf_counter() - mark)
        assert sum(again.rows_written.values()) == 0
    return {"rows": rows, "copy_s": statistics.median(copies), "refresh_s": statistics.median(refreshes),
            "unchanged_s": statistics.median(unchanged)}


def raw_daily_chart(db: Database, store: ArchiveStore, token: str, start: datetime, end: datetime) -> list[tuple]:
    """The baseline: every raw row of the year from any tier, then the daily chart in pyarrow
    (open/close: earliest/latest "recordedAt", ties by the greatest source)."""
    rows = price_history(db, store, token, start, end).rows
    table = rows.append_column("day", pc.floor_temporal(rows["recordedAt"], unit="day"))
    table = table.set_column(table.schema.get_field_index("priceUsd"), "priceUsd",
                             table["priceUsd"].cast(pa.float64()))  # pyarrow's first/last take no decimals
    ordered = table.sort_by([("day", "ascending"), ("recordedAt", "ascending"), ("source", "ascending")])
    grouped = ordered.group_by("day", use_threads=False).aggregate([
        ("priceUsd", "first"), ("priceUsd", "max"), ("priceUsd", "min"), ("priceUsd", "last"), ("priceUsd", "count")])
    return sorted(zip(*(grouped[c].to_pylist() for c in ("day", "priceUsd_first", "priceUsd_max", "priceUsd_min",
                                                         "priceUsd_last", "priceUsd_count"))))


def year_chart(stack: devstack.LocalStack, env: dict, db: Database, year: int, tokens: int, repeat: int) -> dict:
    url = env["DATABASE_URL_PRIMARY"]
    months = [date(year, m, 1) for m in range(1, 13)]
    started = time.monotonic()
    rows = sum(archive_bench.load_month(url, month, tokens, seed=200 + month.month) for month in months)
    print(f"year {year}: loaded {rows:,} rows ({tokens} tokens) in {time.monotonic() - started:.1f}s", flush=True)
    mark = time.monotonic()
    refresh(db, PRICE, days=[d for m in months for d in month_days(m)])
    backfill_s = time.monotonic() - mark
    store = ArchiveStore.from_env(env)
    as_if_cold = datetime(year + 3, 1, 1, tzinfo=timezone.utc)
    for month in months[:9]:
        outcome = Archiver(db, store).archive_month("PriceSnapshot", month, now=as_if_cold)
        assert outcome.action == "archived", outcome.reason
    stack.wait_replicas_caught_up()
    token = archive_bench.token_ids(tokens)[0]
    start, end = datetime(year, 1, 1), datetime(year + 1, 1, 1)
    raw = raw_daily_chart(db, store, token, start, end)
    rolled = [(r[0], float(r[1]), float(r[2]), float(r[3]), float(r[4]), r[6])
              for r in price_chart(db, token, start, end, "1d").rows]
    assert len(raw) == len(rolled) == 365 and raw == rolled, "the rollup chart differs from the raw one"
    return {"rows": rows, "backfill_s": backfill_s,
            "raw_s": median_s(lambda: raw_daily_chart(db, store, token, start, end), repeat),
            "rollup_s": median_s(lambda: price_chart(db, token, start, end, "1d"), max(repeat, 5))}


def sizes(url: str) -> dict:
    with psycopg.connect(url) as conn:
        def size(table: str) -> int:
            return conn.execute("SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint "
                                "FROM pg_partition_tree(%s)",
                                (sql.Identifier(table).as_string(conn),)).fetchone()[0]
        counts = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0]
                  for t in ("PriceRollupHourly", "PriceRollupDaily")}
        return {t: {"rows": counts[t], "bytes": size(t)} for t in counts}


def portfolio_bytes_per_day(url: str, month: date) -> int:
    """One day of "PortfolioRollupDaily" at the seed's 10,000 wallets (+ the all-wallets row),
    written as the refresh writes them (values of the same width), measured on disk."""
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_months(conn, PORTFOLIO, [month])
        day = p.month_bounds(month)[0]
        conn.execute("""INSERT INTO "PortfolioRollupDaily" (id, "walletId", "bucketStart", "openUsd", "closeUsd",
                            "minUsd", "maxUsd", "sampleCount", "firstAt", "lastAt")
                        SELECT md5(coalesce(w, '') || '/' || %(d)s::text)::uuid::text, w, %(d)s,
                               123456.123456789012345678, 123457.5, 123000.25, 124000.75, 288, %(d)s, %(d)s
                          FROM (SELECT gen_random_uuid()::text AS w FROM generate_series(1, 10000)
                                UNION ALL SELECT NULL) wallets""", {"d": day})
        conn.execute('VACUUM ANALYZE "PortfolioRollupDaily"')
        return conn.execute("SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree(%s)",
                            ('"PortfolioRollupDaily"',)).fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-bin", default=devstack.EMBEDDED, help="'embedded' (PostgreSQL 18) or a bin directory")
    parser.add_argument("--year-tokens", type=int, default=50, help="tokens of the year chart's twelve months")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    now = datetime.now(timezone.utc)
    month = p.add_months(p.month_of(now), -2)
    year = now.year - 3
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(devstack.READ_REPLICA,)) as stack:
        env = stack.env()
        migrate(env["DATABASE_URL_PRIMARY"])
        print(f"PostgreSQL {stack.primary.bin_dir}", flush=True)
        with Database.from_env(env, settings=Settings()) as db:
            loaded = archive_bench.load_month(env["DATABASE_URL_PRIMARY"], month, SEED_TOKENS)
            print(f"(a) {p.month_year(month)}: {loaded:,} rows, {SEED_TOKENS} tokens every 15 min", flush=True)
            day = day_refresh(db, env["DATABASE_URL_PRIMARY"], month, args.repeat)
            print(f"(a) one day ({day['rows']:,} rows): COPY in {day['copy_s']:.3f}s; refresh {day['refresh_s']:.3f}s "
                  f"= {day['refresh_s'] / day['copy_s']:.3f}x COPY (goal <= 0.1x); refresh with nothing changed "
                  f"{day['unchanged_s']:.3f}s = {day['unchanged_s'] / day['copy_s']:.3f}x", flush=True)
            measured = sizes(env["DATABASE_URL_PRIMARY"])
            per_raw = {t: v["bytes"] / loaded for t, v in measured.items()}
            yearly = {t: b * 50_000 * 365 for t, b in per_raw.items()}
            print("(c) at 50,000 price rows a day: " + ", ".join(
                f"{t} {measured[t]['rows']:,} rows for the month, {yearly[t] / 1e6:.0f} MB a year" for t in measured),
                flush=True)
            portfolio = portfolio_bytes_per_day(env["DATABASE_URL_PRIMARY"], p.add_months(month, -1))
            print(f"(c) PortfolioRollupDaily at 10,000 wallets: {portfolio / 1e6:.2f} MB a day, "
                  f"{portfolio * 365 / 1e6:.0f} MB a year", flush=True)
            chart = year_chart(stack, env, db, year, args.year_tokens, args.repeat)
            print(f"(b) one token's {year} daily chart (9 of 12 months archived, {chart['rows']:,} raw rows in all; "
                  f"rollups backfilled in {chart['backfill_s']:.1f}s): raw across tiers {chart['raw_s']:.3f}s; "
                  f"rollups {chart['rollup_s'] * 1000:.1f} ms = {chart['rollup_s'] / chart['raw_s']:.4f}x "
                  "(goal <= 0.01x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
