"""Benchmark a portfolio tick against the bare aggregate SELECT, in one run on the embedded stack.

    python benchmarks/portfolio.py          # 10,000 wallets x 50 balances over 2 months of prices, then 100,000 wallets
    python benchmarks/portfolio.py --wallets 2000 --large-wallets 0 --price-days 3 --repeat 3   # quick run
    WEDEFI_STACK_DIR=/tmp/wedefi-bench python benchmarks/portfolio.py   # full size on disk instead of tmpfs

Setup (untimed): 500 tokens priced every 5 minutes over `--price-days` days (default 59:
January and February 2025, loaded month by month through seed_history's whole-month
path), `--wallets` wallets holding exactly 50 tokens each, synced into "TokenBalance"
as of the tick, then ANALYZE.

Measured (medians of `--repeat`, after one untimed warm-up each, in the steady state where
every wallet has rows 24 h, 7 d and 30 d before the tick to compute its changes against):

  bare   the aggregate alone: each token's latest price (bounded LATERAL lookups) joined
         to every balance, summed per wallet; all rows fetched.
  tick   `portfolio_snapshots`' write path for a new tick (capture_tick): the same
         aggregate plus the 24 h / 7 d / 30 d reference probes and changes, the INSERT of
         every wallet's row and the all-wallets row, the advisory lock, in one transaction.
         Goal: tick <= 1.5x bare.

Also printed, without a goal: the position rows of one tick (one per balance), and the
same figures for `--large-wallets` wallets (default 100,000) to show the cost per wallet
stays flat (linear growth); `--large-positions` times that run's 5,000,000 position rows too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date, datetime, timedelta

import psycopg

from wedefi_pipelines import devstack, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.ingest.balances import sync_balances
from wedefi_pipelines.ingest.latest_prices import LATEST_PRICE_TABLE, latest_prices_query, stage_latest_prices
from wedefi_pipelines.ingest.portfolio import _WALLET_ROWS as WALLET_ROWS
from wedefi_pipelines.ingest.portfolio import CHANGE_INTERVALS, capture_tick, provision_tick
from wedefi_pipelines.ingest.prices import PriceChunk, load_prices, load_whole_month
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.sources.synthetic import SOURCE, SyntheticMarket

END = datetime(2025, 3, 1)  # prices end here; ticks follow
# Sized like a modest production server rather than PostgreSQL's defaults (128 MB / 4 MB):
# with the defaults, 100,000 wallets' 5,000,000 balances spill the aggregate to disk and
# outgrow the buffer cache, which measures the defaults rather than the tick.
SERVER_SETTINGS = {"shared_buffers": "'2GB'", "work_mem": "'64MB'", "maintenance_work_mem": "'512MB'"}
LOOKBACK = timedelta(hours=48)
BARE = """
SELECT b."walletId", sum(b.quantity * lp."priceUsd"), count(*)
  FROM "TokenBalance" b
  JOIN ({latest}) lp ON lp."tokenId" = b."tokenId"
 WHERE b.quantity > 0
 GROUP BY b."walletId"
"""


def load_price_history(conn: psycopg.Connection, market: SyntheticMarket, days: int) -> int:
    start = END - timedelta(days=days)
    rows = 0
    for month in p.months_between(start, END - timedelta(seconds=1)):
        lo, hi = (max(start, b) if i == 0 else min(END, b) for i, b in enumerate(p.month_bounds(month)))
        if lo == p.month_bounds(month)[0] and hi == p.month_bounds(month)[1]:
            rows += load_whole_month(conn, month, market.iter_price_days(lo, hi), origin=SOURCE, now=END).inserted
        else:
            chunk = PriceChunk(lo, hi, market.iter_price_days(lo, hi), source=SOURCE, tokens=market.token_ids,
                               unique_keys=True)
            rows += load_prices(conn, [chunk], window=(lo, hi), origin=SOURCE, now=END).inserted
    return rows


def bare_select(conn: psycopg.Connection, tick: datetime) -> tuple[float, int]:
    query = psycopg.sql.SQL(BARE).format(latest=latest_prices_query(tick, LOOKBACK))
    t0 = time.perf_counter()
    rows = conn.execute(query).fetchall()
    return time.perf_counter() - t0, len(rows)


def timed_tick(conn: psycopg.Connection, tick: datetime, **kwargs) -> tuple[float, int]:
    t0 = time.perf_counter()
    result = capture_tick(conn, tick, lookback=LOOKBACK, **kwargs)
    return time.perf_counter() - t0, result.wallet_rows + int(result.all_wallets_row) + result.positions


def measure(conn: psycopg.Connection, wallets: int, first_tick: datetime, repeat: int, positions: bool = True) -> dict:
    # the steady state: every wallet has rows 24 h, 7 d and 30 d earlier to compute its changes against
    for back in (timedelta(days=30), timedelta(days=7), timedelta(hours=24)):
        provision_tick(conn, first_tick - back)
        capture_tick(conn, first_tick - back, positions=False, lookback=LOOKBACK)
    bare_select(conn, first_tick)  # warm-up
    timed_tick(conn, first_tick, positions=False)
    bare, ticks = [], []
    for i in range(1, repeat + 1):
        tick = first_tick + timedelta(minutes=5 * i)
        elapsed, rows = bare_select(conn, tick)
        assert rows == wallets, (rows, wallets)
        bare.append(elapsed)
        elapsed, rows = timed_tick(conn, tick, positions=False)
        assert rows == wallets + 1, (rows, wallets)
        ticks.append(elapsed)
    changes = conn.execute('SELECT count("totalUsdValueChange30d") FROM "PortfolioSnapshot" WHERE "capturedAt" = %s',
                           (tick,)).fetchone()[0]
    assert changes == wallets + 1, "the timed ticks must compute their changes"
    insert, triggers = fk_check_seconds(conn, first_tick + timedelta(minutes=5 * (repeat + 1)))
    result = {"wallets": wallets, "bare": statistics.median(bare), "tick": statistics.median(ticks),
              "insert": insert, "fk": triggers}
    if positions:
        result["positions"], result["position_rows"] = timed_tick(conn, first_tick, portfolio=False, positions=True)
    return result


def fk_check_seconds(conn: psycopg.Connection, tick: datetime) -> tuple[float, float]:
    """(INSERT of the tick's wallet rows, of which the per-row FK triggers on "walletId"),
    from EXPLAIN ANALYZE of the real statement, rolled back: where the write overhead goes."""
    conn.execute("BEGIN")
    try:
        stage_latest_prices(conn, tick, LOOKBACK)
        names = {"tick": psycopg.sql.Literal(tick), "tick_text": psycopg.sql.Literal(tick.isoformat(sep=" ")),
                 "latest": psycopg.sql.Identifier(LATEST_PRICE_TABLE)}
        refs = {f"ref_{label}": psycopg.sql.Literal(tick - interval) for label, interval in CHANGE_INTERVALS}
        plan = conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") +
                            psycopg.sql.SQL(WALLET_ROWS).format(**names, **refs)).fetchone()[0][0]
    finally:
        conn.execute("ROLLBACK")
    return plan["Execution Time"] / 1000, sum(t["Time"] for t in plan.get("Triggers", [])) / 1000


def setup_wallets(conn: psycopg.Connection, market: SyntheticMarket, tick: datetime) -> float:
    register_market(conn, market)
    t0 = time.perf_counter()
    result = sync_balances(conn, market.balances(tick), tick, LOOKBACK)
    elapsed = time.perf_counter() - t0
    conn.execute('ANALYZE "TokenBalance"')
    conn.execute('ANALYZE "Wallet"')
    print(f"  synced {result.received:,} balances for {market.wallets:,} wallets in {elapsed:.1f} s", flush=True)
    return elapsed


def report(m: dict) -> None:
    per_wallet = m["tick"] / m["wallets"] * 1e6
    positions = f"   positions {m['position_rows']:,} rows in {m['positions']:.2f} s" if "positions" in m else ""
    print(f"  {m['wallets']:>7,} wallets: bare SELECT {m['bare']:7.3f} s   tick {m['tick']:7.3f} s   "
          f"tick/bare {m['tick'] / m['bare']:.2f}x   {per_wallet:6.1f} us/wallet{positions}", flush=True)
    print(f"           the wallet-rows INSERT under EXPLAIN ANALYZE: {m['insert']:.3f} s, of which the per-row FK "
          f"checks on \"walletId\": {m['fk']:.3f} s; tick without them / bare: "
          f"{(m['tick'] - m['fk']) / m['bare']:.2f}x", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--large-wallets", type=int, default=100_000, help="second run's wallets (0: skip it)")
    parser.add_argument("--balances", type=int, default=50, help="balances per wallet")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--price-days", type=int, default=59, help="days of 5-minute prices before the tick")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--large-positions", action="store_true",
                        help="also time the large run's position rows (5,000,000 rows at 100,000 wallets)")
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL binaries (default: the embedded PostgreSQL 18)")
    args = parser.parse_args()

    def market(wallets: int) -> SyntheticMarket:
        return SyntheticMarket(tokens=args.tokens, wallets=wallets, max_tokens_per_wallet=args.balances,
                               min_tokens_per_wallet=args.balances, tick_minutes=5)

    tick = END + timedelta(minutes=5)
    results = []
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(), with_s3=False, with_redis=False,
                             extra_pg_settings=SERVER_SETTINGS) as stack:
        stack.create_database("bench_portfolio")
        url = stack.primary.url("bench_portfolio")
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            print(f"PostgreSQL {version}; {args.tokens} tokens every 5 min over {args.price_days} days; "
                  f"{args.balances} balances per wallet", flush=True)
            small = market(args.wallets)
            register_market(conn, small)
            t0 = time.perf_counter()
            rows = load_price_history(conn, small, args.price_days)
            print(f"  loaded {rows:,} prices in {time.perf_counter() - t0:.1f} s", flush=True)
            conn.execute('ANALYZE "PriceSnapshot"')
            provision_tick(conn, tick)
            provisioning.ensure_months(conn, p.POSITION_SNAPSHOT, [date(2025, 3, 1)])
            setup_wallets(conn, small, tick)
            results.append(measure(conn, args.wallets, tick, args.repeat))
            report(results[-1])
            if args.large_wallets:
                large_tick = tick + timedelta(hours=1)
                setup_wallets(conn, market(args.large_wallets), large_tick)
                results.append(measure(conn, args.large_wallets, large_tick, args.repeat,
                                       positions=args.large_positions))
                report(results[-1])

    print()
    base = results[0]
    ratio = base["tick"] / base["bare"]
    print(f"tick / bare SELECT at {base['wallets']:,} wallets: {ratio:.2f}x  (goal <= 1.5)  "
          f"{'OK' if ratio <= 1.5 else 'ABOVE GOAL'}")
    if len(results) > 1:
        large = results[1]
        factor = large["wallets"] / base["wallets"]
        positions = f", positions {large['positions'] / base['positions']:.1f}x" if "positions" in large else ""
        print(f"{factor:.0f}x the wallets: tick {large['tick'] / base['tick']:.1f}x the time, bare SELECT "
              f"{large['bare'] / base['bare']:.1f}x{positions} (linear would be {factor:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
