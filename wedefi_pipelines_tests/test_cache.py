"""The Redis cache on the real stack: the stack's own Redis, a real primary and streaming
replicas. Every expected value is computed here, in Python, from the raw rows, in the app's
format (contract v2: what Prisma's findMany returns, as JSON.stringify writes it)."""

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal

import dagster as dg
import orjson
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
TTL_MS = {"price": 60_000, "portfolio": 300_000, "governance": 1_800_000}


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
        INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "isNative", metadata, "updatedAt") VALUES
          ('tok-eth', 8453, '0x01', 'ETH', 'Ether', 18, true, '{"coingecko": "ethereum"}', now()),
          ('tok-usdc', 8453, '0x02', 'USDC', 'USD Coin', 6, false, NULL, now()),
          ('tok-aero', 8453, '0x03', 'AERO', 'Aerodrome', 18, false, NULL, now()),
          ('tok-degen', 8453, '0x04', 'DEGEN', 'Degen', 18, false, NULL, now()),
          ('tok-old', 8453, '0x05', 'OLD', 'Only old prices', 18, false, NULL, now())""")
    for i, wallet in enumerate(WALLETS):
        conn.execute(
            """INSERT INTO "Wallet" (id, address, "chainId", label, metadata, "createdAt", "updatedAt")
               VALUES (%s, %s, 8453, %s, %s, %s, now())""",
            (wallet, f"0x{i:040x}", None if wallet == "w-carol" else wallet[2:].title(),
             '{"tags": ["main"], "risk": 0.25, "big": 123456789012345678901234567890}' if wallet == "w-alice" else None,
             now - timedelta(days=3 - i)),
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
    balances = [("w-alice", "tok-eth", "1.5", "4500.123456789012345678", 19_000_000),
                ("w-alice", "tok-usdc", HUGE_QTY, BIG_USD, 9_007_199_254_740_993),  # beyond a double's integers
                ("w-alice", "tok-aero", "10", None, None),
                ("w-alice", "tok-degen", "5", "0", None),
                ("w-bob", "tok-usdc", "10", "10", None),
                ("w-bob", "tok-eth", "0.0033", "10.000", None),
                ("w-bob", "tok-aero", "4", "5.5", None),
                ("w-carol", "tok-degen", "0.0000005", "0.000000000000000001", 1)]  # decimal.js prints 5e-7, 1e-18
    conn.cursor().executemany(
        """INSERT INTO "TokenBalance" ("walletId", "tokenId", "rawBalance", quantity, "usdValue", "blockNumber",
                                       "updatedAt") VALUES (%s, %s, %s, %s, %s, %s, now())""",
        [(w, t, str(int(Decimal(qty) * 10**6)), qty, usd, block) for w, t, qty, usd, block in balances])
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
                                         "lockEndsAt", metadata, "updatedAt") VALUES
             ('g1', 'p-velo', 'w-alice', 1000, 250.5, NULL, NULL, NULL, now()),
             ('g2', 'p-aero', 'w-alice', 5000.000000000000000001, 4999.9, 1.5, %s, '{"source": "veAERO"}', now())""",
        (now + timedelta(days=365),))
    return now


def dec(value):
    """Exact plain decimal text, computed independently of PostgreSQL's trim_scale."""
    if value is None:
        return None
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def js_dec(value):
    """What JSON.stringify writes for a Prisma Decimal (decimal.js toString), computed here
    from Python's Decimal, independently of the contract's text rewriting."""
    if value is None:
        return None
    value = Decimal(value).normalize(Context(prec=200))
    if value == 0:
        return "0"
    if -7 < value.adjusted() < 21:
        return format(value, "f")
    sign, digits, _ = value.as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{'+' if value.adjusted() >= 0 else '-'}{abs(value.adjusted())}"


def iso(moment):
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


def multiset(value):
    """Arrays compared as multisets, as the app's reader must (Prisma's findMany has no order)."""
    if isinstance(value, list):
        return sorted((multiset(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {k: multiset(v) for k, v in value.items()}
    return value


def expected_price(conn, token_id, since):
    rows = conn.execute("""SELECT "priceUsd", source, "recordedAt" FROM "PriceSnapshot" WHERE "tokenId" = %s""",
                        (token_id,)).fetchall()
    recent = [r for r in rows if r[2] >= since]
    if not recent:
        return None
    return dec(max(recent, key=lambda r: (r[2], r[1]))[0])


def _row(cur, query, params):
    names = [d.name for d in cur.execute(query, params).description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def expected_portfolio(conn, wallet_id):
    """getPortfolioSummary(walletId): `wallet.findMany({ where: { id }, include: { balances: {
    include: { token: true }, where: { usdValue: { gt: 0 } } } } })`; None for an unknown id."""
    cur = conn.cursor()
    wallets = _row(cur, 'SELECT id, address, "chainId", label, metadata, "createdAt", "updatedAt" FROM "Wallet" WHERE id = %s',
                   (wallet_id,))
    if not wallets:
        return None
    wallet = wallets[0] | {"createdAt": iso(wallets[0]["createdAt"]), "updatedAt": iso(wallets[0]["updatedAt"])}
    balances = []
    for b in _row(cur, """SELECT id, "walletId", "tokenId", "rawBalance", quantity, "usdValue", "blockNumber", "fetchedAt",
                                 "createdAt", "updatedAt" FROM "TokenBalance" WHERE "walletId" = %s""", (wallet_id,)):
        if b["usdValue"] is None or b["usdValue"] <= 0:
            continue
        token = _row(cur, """SELECT id, "chainId", address, symbol, name, decimals, "isNative", metadata, "createdAt",
                                    "updatedAt" FROM "Token" WHERE id = %s""", (b["tokenId"],))[0]
        token |= {"createdAt": iso(token["createdAt"]), "updatedAt": iso(token["updatedAt"])}
        balances.append(b | {"quantity": js_dec(b["quantity"]), "usdValue": js_dec(b["usdValue"]),
                             "blockNumber": None if b["blockNumber"] is None else str(b["blockNumber"]),
                             "fetchedAt": iso(b["fetchedAt"]), "createdAt": iso(b["createdAt"]),
                             "updatedAt": iso(b["updatedAt"]), "token": token})
    return multiset([wallet | {"balances": balances}])


def expected_governance(conn, wallet_id):
    """`governanceLock.findMany({ where: { walletId } })`; None for an unknown wallet."""
    if conn.execute("""SELECT 1 FROM "Wallet" WHERE id = %s""", (wallet_id,)).fetchone() is None:
        return None
    rows = _row(conn.cursor(), """SELECT id, "protocolId", "walletId", "lockAmount", "votingPower", "boostMultiplier",
                                         "lockEndsAt", "lastRefreshedAt", metadata, "createdAt", "updatedAt"
                                    FROM "GovernanceLock" WHERE "walletId" = %s""", (wallet_id,))
    return multiset([r | {k: js_dec(r[k]) for k in ("lockAmount", "votingPower", "boostMultiplier")}
                     | {k: iso(r[k]) for k in ("lockEndsAt", "lastRefreshedAt", "createdAt", "updatedAt")} for r in rows])


def app_view(value):
    """What a JSON reader (JSON.parse, orjson) makes of a value: a Json integer beyond a
    double's precision comes back as a float. The CacheManager returns this view."""
    return multiset(orjson.loads(json.dumps(value)))


def cached(client, key):
    """The value the app's reader gets: parseFloat's input for a price, JSON.parse's result otherwise."""
    raw = client.get(key)
    if raw is None:
        return None
    if key.startswith(c.PRICE.prefix):
        return raw.decode()
    return multiset(json.loads(raw))  # the standard library: Json integers beyond 64 bits too


def computed_at(client, key):
    """A value's computedAt: its expiry minus its family's TTL (contract v2)."""
    ttl_ms = next(ms for name, ms in TTL_MS.items() if key.startswith(c.FAMILIES[name].prefix))
    return datetime.now(timezone.utc) + timedelta(milliseconds=client.pttl(key) - ttl_ms)


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
            assert cached(client, key) == expected_price(conn, c.PRICE.entity_id(key), since)
        for wallet in WALLETS:
            assert cached(client, c.PORTFOLIO.key(wallet)) == expected_portfolio(conn, wallet)
            assert cached(client, c.GOVERNANCE.key(wallet)) == expected_governance(conn, wallet)
    alice = cached(client, "portfolio:w-alice")[0]
    usdc = next(b for b in alice["balances"] if b["tokenId"] == "tok-usdc")
    assert (usdc["usdValue"], usdc["quantity"], usdc["blockNumber"]) == (BIG_USD, HUGE_QTY, "9007199254740993")
    assert len(alice["balances"]) == 2  # NULL and 0 are not worth more than 0
    assert alice["metadata"]["big"] == 123456789012345678901234567890  # a Json column's integer beyond 64 bits
    assert cached(client, "price:latest:tok-usdc") == "1.0001"  # same instant: the greatest source's
    assert cached(client, "price:latest:tok-degen") == "0.000000000000000001"  # plain: parseFloat reads it exactly
    # read on the replica: dated back by the lag it may have, so it never outranks a primary read
    assert computed_at(client, "portfolio:w-alice") <= datetime.now(timezone.utc) - timedelta(milliseconds=50)


def test_values_are_exactly_what_json_stringify_writes_for_the_prisma_result(db, seeded, client):
    """Byte for byte: Prisma's field order, decimal.js's exponents, Date.toJSON, the BigInt rule."""
    settings = make_settings(top_holdings=1)  # contract v2 lists every balance: the setting no longer cuts
    with db.database(settings) as database:
        refresh_cache(database, client, settings, families=["portfolio", "governance"])
    with db.connect() as conn:
        created, updated, fetched = conn.execute(
            """SELECT b."createdAt", b."updatedAt", b."fetchedAt" FROM "TokenBalance" b WHERE b."walletId" = 'w-carol'""").fetchone()
        w_created, w_updated = conn.execute("""SELECT "createdAt", "updatedAt" FROM "Wallet" WHERE id = 'w-carol'""").fetchone()
        t_created, t_updated = conn.execute("""SELECT "createdAt", "updatedAt" FROM "Token" WHERE id = 'tok-degen'""").fetchone()
        balance_id = conn.execute("""SELECT id FROM "TokenBalance" WHERE "walletId" = 'w-carol'""").fetchone()[0]
    assert client.get("portfolio:w-carol").decode() == (
        f'[{{"id":"w-carol","address":"0x{2:040x}","chainId":8453,"label":null,"metadata":null,'
        f'"createdAt":"{iso(w_created)}","updatedAt":"{iso(w_updated)}","balances":[{{"id":"{balance_id}",'
        f'"walletId":"w-carol","tokenId":"tok-degen","rawBalance":"0","quantity":"5e-7","usdValue":"1e-18",'
        f'"blockNumber":"1","fetchedAt":"{iso(fetched)}","createdAt":"{iso(created)}","updatedAt":"{iso(updated)}",'
        f'"token":{{"id":"tok-degen","chainId":8453,"address":"0x04","symbol":"DEGEN","name":"Degen","decimals":18,'
        f'"isNative":false,"metadata":null,"createdAt":"{iso(t_created)}","updatedAt":"{iso(t_updated)}"}}}}]}}]')
    assert client.get("governance:w-carol") == b"[]"
    assert len(cached(client, "portfolio:w-bob")[0]["balances"]) == 3


def test_a_second_refresh_resends_only_what_changed_and_renews_every_ttl(db, seeded, client):
    settings = make_settings()
    with db.database(settings) as database:
        refresh_cache(database, client, settings)
        first, first_at = cached(client, "portfolio:w-bob"), computed_at(client, "portfolio:w-bob")
        for key in keys_of(client, c.PORTFOLIO):
            client.expire(key, 10)
        again = refresh_cache(database, client, settings)
        assert again.families["portfolio"].writes.as_dict() | {"keys": 3} == {
            "written": 0, "unchanged": 3, "kept_newer": 0, "compared": 3, "expired": 0, "keys": 3}
        for key in keys_of(client, c.PORTFOLIO):
            assert client.ttl(key) > 290, key  # renewed although not resent
        assert cached(client, "portfolio:w-bob") == first and computed_at(client, "portfolio:w-bob") > first_at
        with db.connect() as conn:
            conn.execute("""UPDATE "TokenBalance" SET "usdValue" = 11 WHERE "walletId" = 'w-bob' AND "tokenId" = 'tok-eth'""")
        db.wait_replicas()
        third = refresh_cache(database, client, settings, families=["portfolio"])
    assert third.families["portfolio"].writes.written == 1 and third.families["portfolio"].writes.unchanged == 2
    bob = cached(client, "portfolio:w-bob")[0]
    assert next(b["usdValue"] for b in bob["balances"] if b["tokenId"] == "tok-eth") == "11"


def test_a_refresh_never_overwrites_a_value_computed_after_its_read(db, seeded, client):
    """An invalidation that ran after the refresh read the replica wins, whatever the write order."""
    settings = make_settings()
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    newer = c.encode(c.PORTFOLIO, "w-bob", [{"written": "by a later invalidation"}], later)
    assert CacheStore(client).put_many([newer], ttl=300).written == 1
    with db.database(settings) as database:
        report = refresh_cache(database, client, settings, families=["portfolio"])
    assert report.families["portfolio"].writes.kept_newer == 1
    assert client.get("portfolio:w-bob") == newer.value
    stale = c.encode(c.PORTFOLIO, "w-bob", [{"written": "by an older read"}], datetime.now(timezone.utc) - timedelta(seconds=5))
    counts = CacheStore(client).put_many([stale], ttl=300, compare=True)
    assert (counts.written, counts.kept_newer) == (0, 1) and client.get("portfolio:w-bob") == newer.value
    # a value older than its TTL is never stored, whatever the key holds
    ancient = c.encode(c.PORTFOLIO, "w-nobody", [], datetime.now(timezone.utc) - timedelta(seconds=301))
    assert CacheStore(client).put_many([ancient], ttl=300).expired == 1 and client.get("portfolio:w-nobody") is None


def test_a_value_the_app_stored_with_setex_is_dated_by_its_ttl_and_newest_wins(client):
    """The app's CacheManager writes `SETEX key 300 value`: its write time is its expiry minus 300 s."""
    store = CacheStore(client)
    client.setex("portfolio:w-app", 300, b"[]")
    before = c.encode(c.PORTFOLIO, "w-app", [{"id": "w-app"}], datetime.now(timezone.utc) - timedelta(seconds=2))
    assert store.put_many([before], ttl=300).kept_newer == 1 and client.get("portfolio:w-app") == b"[]"
    same = c.encode(c.PORTFOLIO, "w-app", [], datetime.now(timezone.utc) + timedelta(seconds=1))
    assert store.put_many([same], ttl=300, compare=True).unchanged == 1  # same bytes: only the expiry moves
    assert 300_500 < client.pttl("portfolio:w-app") <= 301_000
    after = c.encode(c.PORTFOLIO, "w-app", [{"id": "w-app"}], datetime.now(timezone.utc) + timedelta(seconds=2))
    assert store.put_many([after], ttl=300, compare=True).written == 1 and client.get("portfolio:w-app") == after.value
    client.set("portfolio:w-forever", b"[]")  # no expiry: outside the contract, its age is unknown: replaced
    assert store.put_many([c.encode(c.PORTFOLIO, "w-forever", [{"id": 1}], datetime.now(timezone.utc))], 300).written == 1


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
    with db.connect() as conn:
        for wallet in WALLETS:
            assert cached(client, c.PORTFOLIO.key(wallet)) == expected_portfolio(conn, wallet)
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
        assert again.source == "cache" and again.data == first.data
        assert abs(again.computed_at - first.computed_at) <= timedelta(milliseconds=2)  # from its expiry, to the ms
        price = manager.get_latest_price("tok-eth")
        locks = manager.get_governance_locks("w-carol")
        assert 55 <= client.ttl("price:latest:tok-eth") <= 60 and 1795 <= client.ttl("governance:w-carol") <= 1800
        assert manager.get_latest_price("tok-old") is None and manager.get_portfolio_summary("w-nobody") is None
        assert manager.stats.hits == 1 and manager.stats.queries == {"portfolio": 2, "price": 2, "governance": 1}
    with db.connect() as conn:
        assert multiset(first.data) == app_view(expected_portfolio(conn, "w-alice"))
        assert price.data == expected_price(conn, "tok-eth", since) == "3001.25"
        assert locks.data == []
        assert multiset(manager.get_governance_locks("w-alice").data) == expected_governance(conn, "w-alice")
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
                assert served.source == "database" and served.data[0]["id"] == "w-alice"
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
                assert abs(served.computed_at - warm.computed_at) <= timedelta(milliseconds=2) and served.age_s() >= 0
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
    client.setex("portfolio:w-ghost", 300, b"[]")  # what the app's reader caches for an unknown id
    with CacheManager(db.database(make_settings()), client) as manager:
        manager.get_portfolio_summary("w-bob")
        batch = manager.get_batched_portfolio_data(["w-carol", "w-bob", "w-nobody", "w-alice", "w-bob", "w-ghost"])
        assert list(batch) == ["w-carol", "w-bob", "w-alice"] and batch.unavailable == []
        assert batch["w-bob"].source == "cache" and batch["w-alice"].source == "database"
        assert manager.stats.queries["portfolio"] == 2  # one for w-bob's miss, one for the batch's misses
        assert manager.get_portfolio_summary("w-ghost") is None and manager.stats.queries["portfolio"] == 2
        assert manager.get_portfolio_summary("w-carol").source == "cache"  # the batch stored its loads
    with db.connect() as conn:
        for wallet, value in batch.items():
            assert multiset(value.data) == app_view(expected_portfolio(conn, wallet))


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
            seen += [v.data[0]["id"] for v in result.data]
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
        assert [v.data[0]["id"] for v in rich.data] == ["w-alice", "w-bob"]  # by "createdAt"
        assert (rich.total, rich.pages, rich.next_cursor) == (2, 1, None)
        assert [v.data[0]["id"] for v in manager.get_paged_portfolio_data(min_value=Decimal("10.5")).data] == ["w-alice"]
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
    with db.connect() as conn:
        assert cached(client, "portfolio:w-bob") == expected_portfolio(conn, "w-bob")
        assert cached(client, "governance:w-bob") == expected_governance(conn, "w-bob")
    bob = cached(client, "portfolio:w-bob")[0]
    assert next(b["usdValue"] for b in bob["balances"] if b["tokenId"] == "tok-aero") == "20"
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
