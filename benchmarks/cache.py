"""Benchmark the Redis cache: refresh throughput, and a cached portfolio summary against the
same uncached database query, in one run on the embedded stack.

    python benchmarks/cache.py                      # 10,000 wallets x 50 balances, 500 tokens
    python benchmarks/cache.py --wallets 1000       # quick run while developing

Figures printed:
  * refresh of every key (empty Redis): seconds, keys/s, per family;
  * the same refresh with nothing changed (values compared, not resent) and with 10% of
    the wallets changed, as ratios of the first;
  * median and p95 latency of `CacheManager.get_portfolio_summary` on a warm cache
    against the query a miss runs (`queries.portfolio_summaries` for one wallet: the
    seed's getPortfolioSummary, through the same routing to the read replica), and their
    ratio (goal: cached <= 0.1x).

Samples alternate blocks of 50 cached and 50 uncached calls on random wallets, so drift
on this shared machine affects both alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg

from wedefi_pipelines import devstack
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.invalidation import invalidate_wallets
from wedefi_pipelines.cache.manager import CacheManager
from wedefi_pipelines.cache.refresh import WALLET_WORKLOAD, refresh_cache
from wedefi_pipelines.cache.store import count_keys
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.resources.cache import connect_redis
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import current_settings

SEED_SQL = [
    """INSERT INTO "Chain" (id, name, "updatedAt") VALUES (8453, 'Base', now())""",
    """INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
       SELECT 'tok-' || lpad(i::text, 5, '0'), 8453, '0x' || lpad(to_hex(i), 40, '0'), 'T' || i, 'Token ' || i,
              18, now()
         FROM generate_series(0, %(tokens)s - 1) i""",
    """INSERT INTO "Wallet" (id, address, "chainId", label, "createdAt", "updatedAt")
       SELECT 'w-' || lpad(w::text, 7, '0'), '0x' || lpad(to_hex(w), 40, '0'), 8453, 'wallet ' || w,
              %(now)s - make_interval(secs => %(wallets)s - w), now()
         FROM generate_series(0, %(wallets)s - 1) w""",
    # each wallet holds per_wallet distinct tokens, priced at 10 significant digits
    """INSERT INTO "TokenBalance" ("walletId", "tokenId", "rawBalance", quantity, "usdValue", "updatedAt")
       SELECT 'w-' || lpad(w::text, 7, '0'), 'tok-' || lpad(((w * 7 + k) %% %(tokens)s)::text, 5, '0'),
              (1000000 + w * 31 + k)::text, (1000000 + w * 31 + k) / 1e6,
              round(((1000000 + w * 31 + k) / 1e6 * (1 + ((w * 7 + k) %% %(tokens)s)) * 1.2345678)::numeric, 6), now()
         FROM generate_series(0, %(wallets)s - 1) w, generate_series(0, %(per_wallet)s - 1) k""",
    """INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
       SELECT 'tok-' || lpad(t::text, 5, '0'), round((1 + t) * (1 + 0.001 * s)::numeric, 6), 'synthetic',
              %(now)s - make_interval(mins => 30 * s)
         FROM generate_series(0, %(tokens)s - 1) t, generate_series(0, 95) s""",
    """INSERT INTO "PortfolioSnapshot" ("walletId", "totalUsdValue", "totalUsdValueChange24h", "tokensTracked",
                                        "capturedAt")
       SELECT 'w-' || lpad(w::text, 7, '0'), 1000 + w + s, s - 6, %(per_wallet)s, %(now)s - make_interval(mins => 5 * s)
         FROM generate_series(0, %(wallets)s - 1) w, generate_series(0, 11) s""",
    """INSERT INTO "Protocol" (id, slug, name, "chainId", "updatedAt")
       SELECT 'p-' || i, 'protocol-' || i, 'Protocol ' || i, 8453, now() FROM generate_series(0, 4) i""",
    """INSERT INTO "GovernanceLock" (id, "protocolId", "walletId", "lockAmount", "votingPower", "boostMultiplier",
                                     "lockEndsAt", "updatedAt")
       SELECT 'g-' || w || '-' || i, 'p-' || i, 'w-' || lpad(w::text, 7, '0'), 1000 + w, 250.5 + w, 1.5,
              %(now)s + interval '365 days', now()
         FROM generate_series(0, %(wallets)s - 1, 3) w, generate_series(0, 1 + w %% 3) i""",
]


def seed(url: str, wallets: int, tokens: int, per_wallet: int, now: datetime) -> None:
    if per_wallet > tokens:
        raise SystemExit(f"--per-wallet ({per_wallet}) cannot exceed --tokens ({tokens})")
    params = {"wallets": wallets, "tokens": tokens, "per_wallet": per_wallet, "now": now}
    with psycopg.connect(url, autocommit=True) as conn:
        for table in (p.PRICE_SNAPSHOT, p.PORTFOLIO_SNAPSHOT):
            for month in {p.month_of(now), p.month_of(now - timedelta(days=2))}:
                for statement in p.create_child_sql(table, month):
                    conn.execute(statement)
        for statement in SEED_SQL:
            conn.execute(statement, params)
        conn.execute("ANALYZE")


def median_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def measure_latency(manager: CacheManager, database: Database, wallet_ids: list[str], samples: int,
                    rng: random.Random, block: int = 50) -> tuple[list[float], list[float]]:
    """Alternating blocks of cached and uncached calls on random wallets: drift on this
    shared machine hits both alike, and each path runs warm within its block."""
    def cached_call(wallet: str) -> None:
        value = manager.get_portfolio_summary(wallet)
        assert value is not None and value.source == "cache", "the cache must be warm"

    def uncached_call(wallet: str) -> None:
        with database.connection(WALLET_WORKLOAD) as conn:
            assert wallet in q.portfolio_summaries(conn, [wallet])

    timings: dict[str, list[float]] = {"cached": [], "uncached": []}
    calls = {"cached": cached_call, "uncached": uncached_call}
    for n in range(0, samples, block):
        order = ("cached", "uncached") if (n // block) % 2 == 0 else ("uncached", "cached")
        for kind in order:
            for wallet in rng.choices(wallet_ids, k=min(block, samples - n)):
                t0 = time.perf_counter()
                calls[kind](wallet)
                timings[kind].append(time.perf_counter() - t0)
    return timings["cached"], timings["uncached"]


def family_line(name: str, report) -> str:
    fam = report.families[name]
    w = fam.writes
    return f"{name:<11} {fam.keys:>7} keys  written {w.written:>7}  unchanged {w.unchanged:>7}  kept newer {w.kept_newer}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--per-wallet", type=int, default=50, help="balances per wallet")
    parser.add_argument("--samples", type=int, default=2000, help="latency samples of each kind")
    parser.add_argument("--pg-bin", default=None, help="PostgreSQL binaries (default: embedded PostgreSQL 18)")
    parser.add_argument("--seed", type=int, default=20240101)
    args = parser.parse_args(argv)

    settings = current_settings()
    print(f"cache benchmark: {args.wallets:,} wallets x {args.per_wallet} balances, {args.tokens:,} tokens, "
          f"pipeline batch {settings.cache.pipeline_batch}, cache contract v{c.CONTRACT_VERSION} "
          f"(each portfolio value lists every balance worth > 0, with its token)")
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(devstack.READ_REPLICA,), with_s3=False) as stack:
        env = stack.env()
        migrate(env["DATABASE_URL_PRIMARY"])
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        t0 = time.perf_counter()
        seed(env["DATABASE_URL_PRIMARY"], args.wallets, args.tokens, args.per_wallet, now)
        stack.wait_replicas_caught_up(timeout=300)
        print(f"seeded in {time.perf_counter() - t0:.1f}s (PostgreSQL {stack.primary.bin_dir})")

        client = connect_redis(env["REDIS_URL"], settings)
        client.flushdb()
        with Database.from_env(env, settings=settings) as database:
            cold = refresh_cache(database, client, settings)
            nothing = refresh_cache(database, client, settings)
            with psycopg.connect(env["DATABASE_URL_PRIMARY"], autocommit=True) as conn:
                conn.execute("""UPDATE "TokenBalance" SET "usdValue" = "usdValue" + 1
                                 WHERE "walletId" IN (SELECT id FROM "Wallet" ORDER BY id LIMIT %s)
                                   AND "tokenId" = (SELECT min("tokenId") FROM "TokenBalance" b
                                                     WHERE b."walletId" = "TokenBalance"."walletId")""",
                             (args.wallets // 10,))
            stack.wait_replicas_caught_up(timeout=300)
            tenth = refresh_cache(database, client, settings)

            counts = count_keys(client)
            t0 = time.perf_counter()
            invalidated = invalidate_wallets(client, database, [f"w-{w:07d}" for w in range(args.wallets)],
                                             families=["portfolio"])
            invalidation_s = time.perf_counter() - t0
            sample = client.get(c.PORTFOLIO.key("w-0000000"))

            wallet_ids = [f"w-{w:07d}" for w in range(args.wallets)]
            with CacheManager(database, client, settings) as manager:
                refresh_cache(database, client, settings)  # warm again: the 60 s price TTL has no say here
                cached, uncached = measure_latency(manager, database, wallet_ids, args.samples,
                                                   random.Random(args.seed))
                assert manager.stats.db_queries == 0, "every cached call must have been a hit"

    print()
    print("refresh, empty Redis (every key written):")
    for name in c.FAMILIES:
        print("  " + family_line(name, cold))
    print(f"  total {cold.keys:,} keys in {cold.seconds:.2f}s = {cold.keys_per_s:,.0f} keys/s")
    print(f"refresh, nothing changed: {nothing.seconds:.2f}s = {nothing.keys_per_s:,.0f} keys/s "
          f"(ratio to the first: {nothing.seconds / cold.seconds:.2f}x)")
    for name in c.FAMILIES:
        print("  " + family_line(name, nothing))
    print(f"refresh, 10% of wallets changed: {tenth.seconds:.2f}s (ratio to the first: "
          f"{tenth.seconds / cold.seconds:.2f}x)")
    for name in c.FAMILIES:
        print("  " + family_line(name, tenth))
    print(f"invalidation of every wallet's portfolio key from the primary (a balance sync that changed them all): "
          f"{invalidation_s:.2f}s, {invalidated['portfolio_written']} written "
          f"(ratio to the full refresh: {invalidation_s / cold.seconds:.2f}x)")
    print(f"keys in Redis: {counts}")
    print(f"sample {c.PORTFOLIO.key('w-0000000')}: {len(sample)} bytes, {sample[:160].decode()}...")
    cm, cp = median_p95(cached)
    um, up = median_p95(uncached)
    print()
    print(f"get_portfolio_summary, {args.samples} samples each:")
    print(f"  cached (Redis GET+PTTL + JSON decode) median {cm * 1e3:.3f} ms   p95 {cp * 1e3:.3f} ms")
    print(f"  uncached (the miss's query, replica)  median {um * 1e3:.3f} ms   p95 {up * 1e3:.3f} ms")
    ratio = cm / um
    print(f"  cached / uncached median ratio: {ratio:.3f}x (goal <= 0.1x: {'met' if ratio <= 0.1 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
