"""The Redis cache on the real stack: the stack's own Redis, a real primary and streaming
replicas. Every expected value is computed here, in Python, from the raw rows."""

import logging
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.invalidation import invalidate_wallets
from wedefi_pipelines.cache.manager import CacheManager, DataUnavailable
from wedefi_pipelines.cache.refresh import keep_refreshing, refresh_cache
from wedefi_pipelines.cache.store import CacheStore, CacheUnavailable, count_keys
from wedefi_pipelines.defs.cache import redis_cache
from wedefi_pipelines.resources.cache import CacheResource, connect_redis
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import parse_settings

WALLETS = ("w-alice", "w-bob", "w-carol")
BIG_USD = "123456789012345678.123456789012345678"  # 36 significant digits: beyond floats and Decimal's 28
HUGE_QTY = "12345678901234567890.123456789012345678901234567891"


def make_settings(**cache):
    fast = {"connect_timeout_s": 1}
    return parse_settings({"cache": cache, "database": {"primary": fast, "read_replica": fast}})


@pytest.fixture
def client(stack):
    """The stack's Redis, emptied: these tests own its keyspace while they run."""
    if not stack.redis.running:
        stack.redis.start()
    redis_client = connect_redis(stack.redis.url, make_settings())
    redis_client.flushdb()
    yield redis_client
    redis_client.close()


@pytest.fixture
def redis_server(stack):
    """The stack's Redis server, always running again after the test."""
    yield stack.redis
    if not stack.redis.running:
        stack.redis.start()


# -- data ---------------------------------------------------------------------------------------

def seed(conn: psycopg.Connection) -> datetime:
    """Three wallets, five tokens, prices in and out of the lookback window, snapshots and locks."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    old = now - timedelta(days=95)
    for table in (p.PRICE_SNAPSHOT, p.PORTFOLIO_SNAPSHOT):
        for month in {p.month_of(now), p.month_of(now - timedelta(hours=1)), p.month_of(old)}:
            for statement in p.create_child_sql(table, month):
                conn.execute(statement)
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (8453, 'Base', now())""")
    conn.execute("""
        INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "isNative", "updatedAt") VALUES
          ('tok-eth', 8453, '0x01', 'ETH', 'Ether', 18, true, now()),
          ('tok-usdc', 8453, '0x02', 'USDC', 'USD Coin', 6, false, now()),
          ('tok-aero', 8453, '0x03', 'AERO', 'Aerodrome', 18, false, now()),
          ('tok-degen', 8453, '0x04', 'DEGEN', 'Degen', 18, false, now()),
          ('tok-old', 8453, '0x05', 'OLD', 'Only old prices', 18, false, now())""")
    for i, wallet in enumerate(WALLETS):
        conn.execute(
            """INSERT INTO "Wallet" (id, address, "chainId", label, "createdAt", "updatedAt")
               VALUES (%s, %s, 8453, %s, %s, now())""",
            (wallet, f"0x{i:040x}", None if wallet == "w-carol" else wallet[2:].title(), now - timedelta(days=3 - i)),
        )
    prices = [("tok-eth", "3000.5", "synthetic", now - timedelta(minutes=30)),
              ("tok-eth", "3001.25", "synthetic", now - timedelta(minutes=2)),
              ("tok-usdc", "0.9999", "coingecko", now - timedelta(minutes=2)),
              ("tok-usdc", "1.0001", "synthetic", now - timedelta(minutes=2)),  # same instant: greatest source wins
              ("tok-aero", "1.234567890123456789", "synthetic", now - timedelta(days=6)),
              ("tok-degen", "0.000000000000000001", "synthetic", now - timedelta(minutes=1))]
    prices += [(t, "99999", "synthetic", old) for t in ("tok-eth", "tok-usdc", "tok-aero", "tok-degen", "tok-old")]
    conn.cursor().executemany(
        """INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt") VALUES (%s, %s, %s, %s)""", prices)
    balances = [("w-alice", "tok-eth", "1.5", "4500.123456789012345678"),
                ("w-alice", "tok-usdc", HUGE_QTY, BIG_USD),
                ("w-alice", "tok-aero", "10", None),
                ("w-alice", "tok-degen", "5", "0"),
                ("w-bob", "tok-usdc", "10", "10"),
                ("w-bob", "tok-eth", "0.0033", "10.000"),
                ("w-bob", "tok-aero", "4", "5.5")]
    conn.cursor().executemany(
        """INSERT INTO "TokenBalance" ("walletId", "tokenId", "rawBalance", quantity, "usdValue", "updatedAt")
           VALUES (%s, %s, %s, %s, %s, now())""",
        [(w, t, str(int(Decimal(qty) * 10**6)), qty, usd) for w, t, qty, usd in balances])
    conn.cursor().executemany(
        """INSERT INTO "PortfolioSnapshot" ("walletId", "totalUsdValue", "totalUsdValueChange24h", "tokensTracked",
                                            "capturedAt") VALUES (%s, %s, %s, %s, %s)""",
        [("w-alice", "100.5", "-1.25", 4, now - timedelta(minutes=20)),
         ("w-alice", "200.250", "99.75", 4, now - timedelta(minutes=5)),
         ("w-bob", "1", None, 3, old)])
    conn.execute("""
        INSERT INTO "Protocol" (id, slug, name, "chainId", "updatedAt") VALUES
          ('p-velo', 'velodrome', 'Velodrome', 8453, now()), ('p-aero', 'aerodrome', 'Aerodrome', 8453, now())""")
    conn.execute(
        """INSERT INTO "GovernanceLock" (id, "protocolId", "walletId", "lockAmount", "votingPower", "boostMultiplier",
                                         "lockEndsAt", "updatedAt") VALUES
             ('g1', 'p-velo', 'w-alice', 1000, 250.5, NULL, NULL, now()),
             ('g2', 'p-aero', 'w-alice', 5000.000000000000000001, 4999.9, 1.5, %s, now())""",
        (now + timedelta(days=365),))
    return now


def dec(value):
    """Exact decimal text, computed independently of PostgreSQL's trim_scale."""
    if value is None:
        return None
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def iso(moment):
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


def expected_price(conn, token_id, since):
    rows = conn.execute("""SELECT "priceUsd", source, "recordedAt" FROM "PriceSnapshot" WHERE "tokenId" = %s""",
                        (token_id,)).fetchall()
    recent = [r for r in rows if r[2] >= since]
    if not recent:
        return None
    price, source, at = max(recent, key=lambda r: (r[2], r[1]))
    return {"tokenId": token_id, "priceUsd": dec(price), "source": source, "recordedAt": iso(at)}


def expected_portfolio(conn, wallet_id, since, top=20):
    wallet = conn.execute("""SELECT w.id, w.address, w.label, w."chainId", c.name FROM "Wallet" w
                             JOIN "Chain" c ON c.id = w."chainId" WHERE w.id = %s""", (wallet_id,)).fetchone()
    if wallet is None:
        return None
    balances = conn.execute(
        """SELECT b."tokenId", t.symbol, t.name, t.decimals, t."isNative", b.quantity, b."rawBalance", b."usdValue"
             FROM "TokenBalance" b JOIN "Token" t ON t.id = b."tokenId" WHERE b."walletId" = %s""",
        (wallet_id,)).fetchall()
    with localcontext() as ctx:
        ctx.prec = 200
        total = sum((b[7] or Decimal(0) for b in balances), Decimal(0))
    priced = sorted((b for b in balances if b[7] is not None and b[7] > 0), key=lambda b: (-b[7], b[0]))[:top]
    snaps = conn.execute(
        """SELECT "capturedAt", "totalUsdValue", "totalUsdValueChange24h", "totalUsdValueChange7d",
                  "totalUsdValueChange30d" FROM "PortfolioSnapshot" WHERE "walletId" = %s""", (wallet_id,)).fetchall()
    recent = [s for s in snaps if s[0] >= since]
    snap = max(recent, key=lambda s: s[0]) if recent else None
    return {
        "wallet": {"id": wallet[0], "address": wallet[1], "label": wallet[2], "chainId": wallet[3],
                   "chainName": wallet[4]},
        "totals": {"usdValue": dec(total), "tokensTracked": len(balances)},
        "topHoldings": [{"token": {"id": b[0], "symbol": b[1], "name": b[2], "decimals": b[3], "isNative": b[4]},
                         "quantity": dec(b[5]), "rawBalance": b[6], "usdValue": dec(b[7])} for b in priced],
        "snapshot": None if snap is None else {
            "capturedAt": iso(snap[0]), "totalUsdValue": dec(snap[1]), "totalUsdValueChange24h": dec(snap[2]),
            "totalUsdValueChange7d": dec(snap[3]), "totalUsdValueChange30d": dec(snap[4])},
    }


def expected_governance(conn, wallet_id):
    if conn.execute("""SELECT 1 FROM "Wallet" WHERE id = %s""", (wallet_id,)).fetchone() is None:
        return None
    rows = conn.execute(
        """SELECT g."protocolId", p.slug, p.name, g."lockAmount", g."votingPower", g."boostMultiplier",
                  g."lockEndsAt", g."lastRefreshedAt"
             FROM "GovernanceLock" g JOIN "Protocol" p ON p.id = g."protocolId" WHERE g."walletId" = %s""",
        (wallet_id,)).fetchall()
    return {"walletId": wallet_id, "locks": [
        {"protocol": {"id": r[0], "slug": r[1], "name": r[2]}, "lockAmount": dec(r[3]), "votingPower": dec(r[4]),
         "boostMultiplier": dec(r[5]), "lockEndsAt": iso(r[6]), "lastRefreshedAt": iso(r[7])}
        for r in sorted(rows, key=lambda r: r[1])]}


def cached(client, key):
    raw = client.get(key)
    return None if raw is None else c.decode(raw)


def keys_of(client, fam):
    return sorted(k.decode() for k in client.scan_iter(match=fam.pattern, count=1000))


@pytest.fixture
def seeded(db):
    with db.connect() as conn:
        now = seed(conn)
    db.wait_replicas()
    return now


# -- refresh --------------------------------------------------------------------------------------

def test_refresh_writes_the_databases_answer_for_every_key_with_the_specified_ttls(db, seeded, client):
    settings = make_settings()
    with db.database(settings) as database:
        report = refresh_cache(database, client, settings)
    since = q.window_start(7)
    assert "wedefi_read" in report.read_from["portfolio_queries"]  # read from the replica
    assert keys_of(client, c.PRICE) == ["price:latest:tok-aero", "price:latest:tok-degen", "price:latest:tok-eth",
                                        "price:latest:tok-usdc"]  # tok-old has no price inside the window
    assert keys_of(client, c.PORTFOLIO) == [f"portfolio:{w}" for w in sorted(WALLETS)]
    assert keys_of(client, c.GOVERNANCE) == [f"governance:{w}" for w in sorted(WALLETS)]
    assert report.families["portfolio"].keys == 3 and report.families["portfolio"].writes.written == 3
    for fam, limit in ((c.PRICE, 60), (c.PORTFOLIO, 300), (c.GOVERNANCE, 1800)):
        for key in keys_of(client, fam):
            assert limit - 5 <= client.ttl(key) <= limit, key
    with db.connect() as conn:
        for key in keys_of(client, c.PRICE):
            assert cached(client, key).data == expected_price(conn, c.PRICE.entity_id(key), since)
        for wallet in WALLETS:
            assert cached(client, c.PORTFOLIO.key(wallet)).data == expected_portfolio(conn, wallet, since)
            assert cached(client, c.GOVERNANCE.key(wallet)).data == expected_governance(conn, wallet)
    alice = cached(client, "portfolio:w-alice").data
    assert alice["topHoldings"][0]["usdValue"] == BIG_USD and alice["topHoldings"][0]["quantity"] == HUGE_QTY
    assert alice["totals"]["tokensTracked"] == 4 and len(alice["topHoldings"]) == 2  # NULL and 0 are not holdings
    assert cached(client, "price:latest:tok-usdc").data["source"] == "synthetic"
    # read on the replica: dated back by the lag it may have, so it never outranks a primary read
    assert cached(client, "portfolio:w-alice").computed_at <= datetime.now(timezone.utc) - timedelta(milliseconds=50)


def test_top_holdings_are_cut_at_the_configured_count_ties_by_token(db, seeded, client):
    settings = make_settings(top_holdings=2)
    with db.database(settings) as database:
        refresh_cache(database, client, settings, families=["portfolio"])
    bob = cached(client, "portfolio:w-bob").data
    assert [h["token"]["id"] for h in bob["topHoldings"]] == ["tok-eth", "tok-usdc"]  # both 10 USD
    assert bob["totals"] == {"usdValue": "25.5", "tokensTracked": 3}
    assert bob["snapshot"] is None  # its only snapshot is older than the window
    assert keys_of(client, c.PRICE) == [] and keys_of(client, c.GOVERNANCE) == []


def test_a_second_refresh_resends_only_what_changed_and_renews_every_ttl(db, seeded, client):
    settings = make_settings()
    with db.database(settings) as database:
        refresh_cache(database, client, settings)
        first = cached(client, "portfolio:w-bob")
        for key in keys_of(client, c.PORTFOLIO):
            client.expire(key, 10)
        again = refresh_cache(database, client, settings)
        assert again.families["portfolio"].writes.as_dict() | {"keys": 3} == {
            "written": 0, "unchanged": 3, "kept_newer": 0, "compared": 3, "keys": 3}
        for key in keys_of(client, c.PORTFOLIO):
            assert client.ttl(key) > 290, key  # renewed although not resent
        second = cached(client, "portfolio:w-bob")
        assert second.data == first.data and second.computed_at > first.computed_at
        with db.connect() as conn:
            conn.execute("""UPDATE "TokenBalance" SET "usdValue" = 11 WHERE "walletId" = 'w-bob' AND "tokenId" = 'tok-eth'""")
        db.wait_replicas()
        third = refresh_cache(database, client, settings, families=["portfolio"])
    assert third.families["portfolio"].writes.written == 1 and third.families["portfolio"].writes.unchanged == 2
    assert cached(client, "portfolio:w-bob").data["totals"]["usdValue"] == "26.5"


def test_a_refresh_never_overwrites_a_value_computed_after_its_read(db, seeded, client):
    """An invalidation that ran after the refresh read the replica wins, whatever the write order."""
    settings = make_settings()
    later = c.iso_utc(datetime.now(timezone.utc) + timedelta(minutes=1))
    newer = c.encode("portfolio:w-bob", {"written": "by a later invalidation"}, later)
    assert CacheStore(client).put_many([newer], ttl=300).written == 1
    with db.database(settings) as database:
        report = refresh_cache(database, client, settings, families=["portfolio"])
    assert report.families["portfolio"].writes.kept_newer == 1
    assert client.get("portfolio:w-bob") == newer.value
    stale = c.encode("portfolio:w-bob", {"written": "by an older read"}, "2000-01-01T00:00:00.000Z")
    counts = CacheStore(client).put_many([stale], ttl=300, compare=True)
    assert (counts.written, counts.kept_newer) == (0, 1) and client.get("portfolio:w-bob") == newer.value


def test_redis_stopped_mid_refresh_fails_naming_redis_and_the_next_refresh_heals(db, seeded, client, redis_server):
    settings = make_settings(pipeline_batch=1)

    def stop_after_first_portfolio_batch(family, batch):
        if family == "portfolio" and batch == 1:
            redis_server.stop()

    with db.database(settings) as database:
        with pytest.raises(CacheUnavailable) as failure:
            refresh_cache(database, client, settings, on_batch=stop_after_first_portfolio_batch)
        assert f"Redis at redis://127.0.0.1:{redis_server.port}/0 failed during the cache refresh" in str(failure.value)
        assert "portfolio: 1" in str(failure.value)
        redis_server.start()  # same port, empty: it keeps nothing on disk
        assert client.dbsize() == 0
        healed = refresh_cache(database, client, settings)
    assert healed.families["portfolio"].writes.written == 3
    since = q.window_start(7)
    with db.connect() as conn:
        for wallet in WALLETS:
            assert cached(client, c.PORTFOLIO.key(wallet)).data == expected_portfolio(conn, wallet, since)
        assert len(keys_of(client, c.PRICE)) == 4 and len(keys_of(client, c.GOVERNANCE)) == 3


def test_the_latest_price_lookup_reads_only_the_children_inside_the_window(db, seeded):
    old_child = p.child_name(p.PRICE_SNAPSHOT, p.month_of(datetime.now(timezone.utc) - timedelta(days=95)))
    with db.connect("read") as conn:
        query = psycopg.sql.SQL(q.LATEST_PRICES).format(where=psycopg.sql.SQL(""))
        plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + query, {"since": q.window_start(7)}))
    current_child = p.child_name(p.PRICE_SNAPSHOT, p.month_of(datetime.now(timezone.utc)))
    assert current_child in plan and old_child not in plan
    assert "Index" in plan and "Limit" in plan


# -- the asset ------------------------------------------------------------------------------------

def _failure_text(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected the step to fail"
    data = failures[0].step_failure_data
    return " ".join(filter(None, [data.error.message if data.error else "",
                                  data.user_failure_data.description if data.user_failure_data else ""]))


def test_the_redis_cache_asset_reports_keys_per_family_and_fails_naming_redis(db_env, seeded, client, redis_server,
                                                                             monkeypatch):
    resources = {"database": DatabaseResource(), "cache": CacheResource()}
    result = dg.materialize([redis_cache], resources=resources)
    metadata = result.asset_materializations_for_node("redis_cache")[0].metadata
    assert (metadata["price_keys"].value, metadata["portfolio_keys"].value, metadata["governance_keys"].value) == (4, 3, 3)
    assert metadata["seconds"].value >= 0 and "wedefi_read" in metadata["read_from_portfolio_queries"].value
    assert len(keys_of(client, c.PORTFOLIO)) == 3

    redis_server.stop()
    down = dg.materialize([redis_cache], resources=resources, raise_on_error=False)
    assert not down.success and "does not answer" in _failure_text(down) and "REDIS_URL" in _failure_text(down)
    redis_server.start()

    monkeypatch.delenv("REDIS_URL")
    unset = dg.materialize([redis_cache], resources=resources, raise_on_error=False)
    assert not unset.success and "REDIS_URL is not set" in _failure_text(unset)


def test_the_refresh_is_requested_once_after_upstream_ingestion():
    @dg.asset(partitions_def=dg.DailyPartitionsDefinition("2025-01-01"), name="price_snapshots")
    def price_snapshots_upstream(): ...

    @dg.asset(name="portfolio_snapshots")
    def portfolio_snapshots_upstream(): ...

    defs = dg.Definitions(assets=[price_snapshots_upstream, portfolio_snapshots_upstream, redis_cache],
                          resources={"database": DatabaseResource(), "cache": CacheResource()})
    selection = dg.AssetSelection.assets(redis_cache)
    with dg.instance_for_test() as instance:
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        assert tick.total_requested == 0  # nothing ingested yet
        instance.report_runless_asset_event(dg.AssetMaterialization("portfolio_snapshots"))
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                 cursor=tick.cursor)
        assert tick.total_requested == 1
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                 cursor=tick.cursor)
        assert tick.total_requested == 0  # handled: not requested again until the next ingestion


# -- read-through CacheManager ------------------------------------------------------------------

def test_a_miss_reads_through_and_stores_with_the_ttl_then_hits(db, seeded, client):
    since = q.window_start(7)
    with CacheManager(db.database(make_settings()), client) as manager:
        first = manager.get_portfolio_summary("w-alice")
        assert first.source == "database" and client.ttl("portfolio:w-alice") > 290
        again = manager.get_portfolio_summary("w-alice")
        assert again.source == "cache" and again.data == first.data and again.computed_at == first.computed_at
        price = manager.get_latest_price("tok-eth")
        locks = manager.get_governance_locks("w-carol")
        assert 55 <= client.ttl("price:latest:tok-eth") <= 60 and 1795 <= client.ttl("governance:w-carol") <= 1800
        assert manager.get_latest_price("tok-old") is None and manager.get_portfolio_summary("w-nobody") is None
        assert manager.stats.hits == 1 and manager.stats.queries == {"portfolio": 2, "price": 2, "governance": 1}
    with db.connect() as conn:
        assert first.data == expected_portfolio(conn, "w-alice", since)
        assert price.data == expected_price(conn, "tok-eth", since)
        assert locks.data == {"walletId": "w-carol", "locks": []}
    assert 0 <= first.age_s() < 60


@pytest.mark.parametrize("managers", [1, 50], ids=["threads-of-one-process", "one-manager-per-thread"])
def test_fifty_concurrent_misses_on_one_key_run_one_database_query(db, seeded, client, managers):
    """One process: single flight; 50 managers stand for 50 API processes: the Redis lock."""
    with db.database(make_settings()) as database:
        pool = [CacheManager(database, client) for _ in range(managers)]
        start = threading.Barrier(50)
        results, errors = [None] * 50, []

        def read(i):
            try:
                start.wait(10)
                results[i] = pool[i % managers].get_portfolio_summary("w-alice")
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert sum(m.stats.queries["portfolio"] for m in pool) == 1
    assert all(r is not None and r.data == results[0].data for r in results)
    assert sum(m.stats.hits + m.stats.misses for m in pool) == 50


def test_with_redis_down_every_call_is_served_from_the_database_and_logged_once(db, seeded, client, redis_server,
                                                                                 caplog):
    settings = make_settings(outage_retry_s=0)  # probe Redis on every call: still one log line per outage
    with CacheManager(db.database(settings), client) as manager:
        assert manager.get_portfolio_summary("w-bob").source == "database"
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="wedefi_pipelines.cache.manager"):
            for _ in range(10):
                served = manager.get_portfolio_summary("w-alice")
                assert served.source == "database" and served.data["wallet"]["id"] == "w-alice"
                assert manager.get_latest_price("tok-eth").source == "database"
                assert set(manager.get_batched_portfolio_data(["w-alice", "w-bob"])) == {"w-alice", "w-bob"}
            redis_server.start()
            back = manager.get_portfolio_summary("w-alice")
        assert back.source == "database" and manager.get_portfolio_summary("w-alice").source == "cache"
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("Redis unavailable")]) == 1, messages
    assert len([m for m in messages if m.startswith("Redis is back")]) == 1, messages
    assert manager.stats.redis_errors >= 10


def test_with_the_database_down_cached_values_are_served_with_their_age(db, seeded, client, stack, caplog):
    settings = make_settings(outage_retry_s=60)
    primary, read = stack.primary, stack.replica("read")
    with CacheManager(db.database(settings), client) as manager:
        warm = manager.get_portfolio_summary("w-alice")
        invalidated = manager.get_portfolio_summary("w-bob")
        try:
            read.stop()
            primary.stop()
            with caplog.at_level(logging.WARNING, logger="wedefi_pipelines.cache.manager"):
                served = manager.get_portfolio_summary("w-alice")
                assert served.source == "cache" and served.data == warm.data
                assert served.computed_at == warm.computed_at and served.age_s() >= 0
                for _ in range(3):
                    with pytest.raises(DataUnavailable, match="not cached, and the database"):
                        manager.get_portfolio_summary("w-carol")
                batch = manager.get_batched_portfolio_data(["w-alice", "w-carol"])
                assert list(batch) == ["w-alice"] and batch.unavailable == ["w-carol"]
                # invalidation with the database down deletes instead, so no stale value outlives it
                outcome = invalidate_wallets(client, manager.db, ["w-bob"], families=["portfolio"])
                assert outcome["status"] == "deleted" and client.get("portfolio:w-bob") is None
        finally:
            primary.start()
            read.start()
            stack.wait_for_replica(read.name)
    assert invalidated.source == "database"
    outage_logs = [r for r in caplog.records if r.getMessage().startswith("database unavailable")]
    assert len(outage_logs) == 1
    assert manager.stats.database_errors == 1  # later misses failed fast, without waiting on a connection


def test_a_batch_reads_the_cached_wallets_and_loads_all_misses_with_one_statement(db, seeded, client):
    since = q.window_start(7)
    with CacheManager(db.database(make_settings()), client) as manager:
        manager.get_portfolio_summary("w-bob")
        batch = manager.get_batched_portfolio_data(["w-carol", "w-bob", "w-nobody", "w-alice", "w-bob"])
        assert list(batch) == ["w-carol", "w-bob", "w-alice"] and batch.unavailable == []
        assert batch["w-bob"].source == "cache" and batch["w-alice"].source == "database"
        assert manager.stats.queries["portfolio"] == 2  # one for w-bob's miss, one for the batch's misses
        assert manager.get_portfolio_summary("w-carol").source == "cache"  # the batch stored its loads
    with db.connect() as conn:
        for wallet, value in batch.items():
            assert value.data == expected_portfolio(conn, wallet, since)


def test_keyset_pages_return_every_wallet_exactly_once_while_wallets_are_inserted(db, seeded, client):
    base = datetime(2025, 1, 1)
    with db.connect() as conn:
        conn.cursor().executemany(
            """INSERT INTO "Wallet" (id, address, "chainId", "createdAt", "updatedAt") VALUES (%s, %s, 8453, %s, now())""",
            [(f"w-{i:03d}", f"0x{i + 100:040x}", base + timedelta(seconds=i)) for i in range(30)])
        before = {r[0] for r in conn.execute('SELECT id FROM "Wallet"')}
    db.wait_replicas()
    with CacheManager(db.database(make_settings()), client) as manager:
        seen, cursor, page, inserted = [], None, 0, 0
        while True:
            result = manager.get_paged_portfolio_data(limit=7, cursor=cursor, include_total=False)
            seen += [v.data["wallet"]["id"] for v in result.data]
            page += 1
            if result.next_cursor is None:
                break
            cursor = result.next_cursor
            with db.connect() as conn:  # one wallet before the cursor, one after it, on every page
                for created in (base + timedelta(seconds=page * 7 - 3.5), base + timedelta(days=30, seconds=page)):
                    inserted += 1
                    conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "createdAt", "updatedAt")
                                    VALUES (%s, %s, 8453, %s, now())""", (f"w-new-{inserted}", f"0xn{inserted:039x}", created))
            db.wait_replicas()
        assert len(seen) == len(set(seen)) and before <= set(seen)

        # the seed's offset paging under the same kind of insert repeats a wallet
        first = manager.get_paged_portfolio_data(page=1, limit=5)
        with db.connect() as conn:
            conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "createdAt", "updatedAt")
                            VALUES ('w-early', '0xee', 8453, '2024-01-01', now())""")
        db.wait_replicas()
        second = manager.get_paged_portfolio_data(page=2, limit=5)
        assert first.data[-1].key == second.data[0].key
        with db.connect() as conn:
            total = conn.execute('SELECT count(*) FROM "Wallet"').fetchone()[0]
        assert (second.total, second.pages, second.page) == (total, -(-total // 5), 2)


def test_pages_filter_by_wallet_and_minimum_value_like_the_seed(db, seeded, client):
    with CacheManager(db.database(make_settings()), client) as manager:
        rich = manager.get_paged_portfolio_data(min_value="10")
        assert [v.data["wallet"]["id"] for v in rich.data] == ["w-alice", "w-bob"]  # by "createdAt"
        assert (rich.total, rich.pages, rich.next_cursor) == (2, 1, None)
        assert [v.data["wallet"]["id"] for v in manager.get_paged_portfolio_data(min_value=Decimal("10.5")).data] == ["w-alice"]
        one = manager.get_paged_portfolio_data(wallet_id="w-carol")
        assert [v.key for v in one.data] == ["portfolio:w-carol"] and one.total == 1
        with pytest.raises(ValueError, match="limit"):
            manager.get_paged_portfolio_data(limit=0)
        with pytest.raises(ValueError, match="cursor"):
            manager.get_paged_portfolio_data(cursor="garbage")


# -- invalidation ---------------------------------------------------------------------------------

def test_invalidation_refreshes_changed_wallets_from_the_primary_in_the_same_run(db, seeded, client, stack):
    settings = make_settings()
    with db.database(settings) as database:
        refresh_cache(database, client, settings)
        with db.connect("read") as replica:
            replica.execute("SELECT pg_wal_replay_pause()")
        try:
            with db.connect() as conn:
                conn.execute("""UPDATE "TokenBalance" SET "usdValue" = 20 WHERE "walletId" = 'w-bob' AND "tokenId" = 'tok-aero'""")
                conn.execute("""INSERT INTO "GovernanceLock" (id, "protocolId", "walletId", "lockAmount", "votingPower",
                                "updatedAt") VALUES ('g3', 'p-velo', 'w-bob', 7, 7, now())""")
                conn.execute("""DELETE FROM "Wallet" WHERE id = 'w-carol'""")
            outcome = invalidate_wallets(client, database, ["w-bob", "w-carol", "w-bob"])
            with db.connect("read") as replica:  # the replica has not replayed the change
                assert replica.execute("""SELECT count(*) FROM "Wallet" WHERE id = 'w-carol'""").fetchone()[0] == 1
        finally:
            with db.connect("read") as replica:
                replica.execute("SELECT pg_wal_replay_resume()")
    assert outcome["status"] == "refreshed" and outcome["wallets"] == 2
    assert (outcome["portfolio_written"], outcome["governance_written"]) == (1, 1)
    assert (outcome["portfolio_deleted"], outcome["governance_deleted"]) == (1, 1)
    since = q.window_start(7)
    with db.connect() as conn:
        assert cached(client, "portfolio:w-bob").data == expected_portfolio(conn, "w-bob", since)
        assert cached(client, "governance:w-bob").data == expected_governance(conn, "w-bob")
    assert cached(client, "portfolio:w-bob").data["totals"]["usdValue"] == "40"
    assert client.get("portfolio:w-carol") is None and client.get("governance:w-carol") is None
    assert 290 <= client.ttl("portfolio:w-bob") <= 300 and 1790 <= client.ttl("governance:w-bob") <= 1800


def test_invalidation_is_skipped_and_logged_when_redis_is_unset_or_down(db, seeded, client, redis_server, caplog,
                                                                        monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with db.database(make_settings()) as database:
        with caplog.at_level(logging.WARNING):
            assert invalidate_wallets(None, database, ["w-bob"])["status"] == "skipped"
            unset = CacheResource()
            unset.setup_for_execution(dg.build_init_resource_context())
            skipped = invalidate_wallets(unset, database, ["w-bob"])
            assert skipped["status"] == "skipped" and "REDIS_URL is not set" in skipped["reason"]
            redis_server.stop()
            down = invalidate_wallets(client, database, ["w-bob"], families=["governance"])
            redis_server.start()
        assert down["status"] == "skipped" and f"127.0.0.1:{redis_server.port}" in down["reason"]
        assert invalidate_wallets(client, database, [])["status"] == "nothing to do"
        with pytest.raises(ValueError, match="wallet families"):
            invalidate_wallets(client, database, ["w-bob"], families=["price"])
    messages = [r.getMessage() for r in caplog.records if r.name == "wedefi_pipelines.cache.invalidation"]
    assert len(messages) == 3 and all(m.startswith("cache invalidation skipped for 1 wallets") for m in messages)


def test_a_manager_built_from_the_environment_reads_the_database_alone_without_redis_url(db, seeded, client):
    env = dict(db.env)
    with CacheManager.from_env(env, settings=make_settings()) as manager:
        assert manager.get_latest_price("tok-eth").source == "database"
        assert manager.get_latest_price("tok-eth").source == "cache"
    del env["REDIS_URL"]
    with CacheManager.from_env(env, settings=make_settings()) as manager:
        assert manager.store is None
        assert [manager.get_latest_price("tok-eth").source for _ in range(2)] == ["database", "database"]


def test_keep_refreshing_survives_a_redis_outage_and_stops_when_asked(db, seeded, client, redis_server):
    """What `demo --keep` runs so its keys outlive their TTLs."""
    stop, outcomes = threading.Event(), []

    def after_each(outcome):
        outcomes.append(outcome)
        if len(outcomes) == 1:
            redis_server.stop()
        elif len(outcomes) == 2:
            redis_server.start()
        else:
            stop.set()

    with db.database(make_settings()) as database:
        runs = keep_refreshing(database, client, 0, stop, make_settings(), on_refresh=after_each)
    assert runs == 3
    assert [type(o).__name__ for o in outcomes] == ["RefreshReport", "CacheUnavailable", "RefreshReport"]
    assert count_keys(client) == {"price": 4, "portfolio": 3, "governance": 3}
