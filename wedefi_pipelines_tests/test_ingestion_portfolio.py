"""Balances, portfolio and position ticks, governance locks, correlations and seed_history
on the real stack (PostgreSQL 18 and 15)."""

import json
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import dagster as dg
import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.ingestion.assets import asset_correlations, governance_locks, portfolio_tick, token_balances
from wedefi_pipelines.defs.ingestion.checks import positions_have_portfolio_rows
from wedefi_pipelines.defs.ingestion.jobs import seed_history_job
from wedefi_pipelines.defs.ingestion.schedules import portfolio_tick_schedule, price_snapshots_schedule
from wedefi_pipelines.ingest import correlations, price_sources
from wedefi_pipelines.ingest.balances import sync_balances
from wedefi_pipelines.ingest.governance import sync_governance_locks
from wedefi_pipelines.ingest.portfolio import TickError, capture_tick, orphan_positions, provision_tick
from wedefi_pipelines.ingest.prices import load_prices
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.resources.cache import CacheResource, connect_redis
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.sources.resources import MarketResource
from wedefi_pipelines.sources.synthetic import SyntheticMarket

TICK = datetime(2025, 3, 10, 12, 0)
MARKET = dict(tokens=12, wallets=40, max_tokens_per_wallet=6, tick_minutes=60)
LOOKBACK = timedelta(hours=48)


@pytest.fixture
def market() -> SyntheticMarket:
    return SyntheticMarket(**MARKET)


@pytest.fixture
def conn(db, market):
    """Reference rows and three days of hourly prices up to the tick."""
    with psycopg.connect(db.url, autocommit=True) as connection:
        register_market(connection, market)
        start = TICK - timedelta(days=2, hours=12)
        plan = price_sources.synthetic_plan(market, start, TICK + timedelta(days=2), TICK + timedelta(days=1))
        load_prices(connection, plan.chunks, window=(start, TICK + timedelta(days=2)), origin=plan.origin,
                    now=TICK + timedelta(days=1))
        yield connection


def _expected_totals(conn, tick: datetime) -> dict[str, tuple[Decimal, int]]:
    """Per-wallet totals computed in Python from the raw rows, independently of the SQL."""
    prices = pd.DataFrame(conn.execute(
        'SELECT "tokenId", "recordedAt", "priceUsd" FROM "PriceSnapshot" WHERE "recordedAt" <= %s',
        (tick,)).fetchall(), columns=["token", "at", "price"])
    latest = {token: group.sort_values("at").iloc[-1] for token, group in prices.groupby("token")}
    latest = {t: row["price"] for t, row in latest.items() if row["at"] > tick - LOOKBACK}
    totals: dict[str, tuple[Decimal, int]] = {}
    for wallet, token, quantity in conn.execute('SELECT "walletId", "tokenId", quantity FROM "TokenBalance"'):
        value, count = totals.get(wallet, (Decimal(0), 0))
        if quantity > 0 and token in latest:
            value, count = value + quantity * latest[token], count + 1
        totals[wallet] = (value, count)
    for (wallet,) in conn.execute('SELECT id FROM "Wallet"'):
        totals.setdefault(wallet, (Decimal(0), 0))
    return {w: (v.quantize(Decimal("1e-18"), rounding=ROUND_HALF_UP), n) for w, (v, n) in totals.items()}


def test_portfolio_totals_equal_a_per_wallet_sum_computed_in_python(conn, market):
    sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    provision_tick(conn, TICK)
    result = capture_tick(conn, TICK, defi_positions=market.positions(TICK), lookback=LOOKBACK)
    expected = _expected_totals(conn, TICK)
    got = {w: (v, n) for w, v, n in conn.execute(
        'SELECT "walletId", "totalUsdValue", "tokensTracked" FROM "PortfolioSnapshot" '
        'WHERE "capturedAt" = %s AND "walletId" IS NOT NULL', (TICK,))}
    assert got == expected
    assert result.wallet_rows == MARKET["wallets"] and result.all_wallets_row
    combined = conn.execute('SELECT "totalUsdValue", "tokensTracked", metadata FROM "PortfolioSnapshot" '
                            'WHERE "capturedAt" = %s AND "walletId" IS NULL', (TICK,)).fetchone()
    assert combined[0] == sum(v for v, _ in expected.values())
    assert combined[1] == sum(n for _, n in expected.values())
    assert combined[2] == {"walletsCount": MARKET["wallets"], "captureType": "combined"}
    assert conn.execute('SELECT count(*) FROM "PortfolioSnapshot_2025_03_part_0" WHERE "walletId" IS NULL'
                        ).fetchone()[0] == 1


def test_a_tick_rerun_writes_nothing_and_positions_point_at_their_portfolio_rows(conn, market):
    sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    provision_tick(conn, TICK)
    first = capture_tick(conn, TICK, defi_positions=market.positions(TICK), lookback=LOOKBACK)
    assert first.positions > first.defi_positions > 0
    snapshot = ('SELECT * FROM "PortfolioSnapshot" ORDER BY id', 'SELECT * FROM "PositionSnapshot" ORDER BY id')
    before = [conn.execute(q).fetchall() for q in snapshot]
    again = capture_tick(conn, TICK, defi_positions=market.positions(TICK), lookback=LOOKBACK)
    assert (again.wallet_rows, again.positions, again.all_wallets_row) == (0, 0, False)
    assert [conn.execute(q).fetchall() for q in snapshot] == before
    assert orphan_positions(conn, TICK - timedelta(days=1))[0] == 0
    liquid = conn.execute(
        'SELECT count(*) FROM "PositionSnapshot" pos JOIN "PortfolioSnapshot" ps ON ps.id = pos."portfolioSnapshotId" '
        'AND ps."capturedAt" = pos."capturedAt" AND ps."walletId" = pos."walletId" '
        'WHERE pos."positionType" = \'liquid\'').fetchone()[0]
    assert liquid == sum(n for _, n in _expected_totals(conn, TICK).values())


def test_changes_compare_with_the_tick_a_day_earlier(conn, market):
    provision_tick(conn, TICK)
    earlier = TICK - timedelta(hours=24)
    sync_balances(conn, market.balances(earlier), earlier, LOOKBACK)
    capture_tick(conn, earlier, lookback=LOOKBACK)
    sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    result = capture_tick(conn, TICK, lookback=LOOKBACK)
    assert result.reference_ticks == {"24h": earlier, "7d": None, "30d": None}
    rows = conn.execute(
        'SELECT now."totalUsdValueChange24h", now."totalUsdValue" - before."totalUsdValue", now."totalUsdValueChange7d" '
        'FROM "PortfolioSnapshot" now JOIN "PortfolioSnapshot" before '
        '  ON before."walletId" IS NOT DISTINCT FROM now."walletId" AND before."capturedAt" = %s '
        'WHERE now."capturedAt" = %s', (earlier, TICK)).fetchall()
    assert len(rows) == MARKET["wallets"] + 1
    assert all(change == diff and week is None for change, diff, week in rows)


def test_positions_alone_need_their_portfolio_rows(conn, market):
    provision_tick(conn, TICK)
    with pytest.raises(TickError, match="materialize portfolio_snapshots"):
        capture_tick(conn, TICK, portfolio=False, positions=True, lookback=LOOKBACK)
    assert conn.execute('SELECT count(*) FROM "PositionSnapshot"').fetchone()[0] == 0


def test_balance_sync_skips_unchanged_rows_and_reports_changed_wallets(conn, market):
    first = sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    assert first.changed == first.received > 0 and len(first.changed_wallet_ids) == MARKET["wallets"]
    xmins = conn.execute('SELECT id, xmin::text FROM "TokenBalance" ORDER BY id').fetchall()
    same = sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    assert (same.changed, same.unchanged, same.changed_wallet_ids) == (0, first.received, [])
    assert conn.execute('SELECT id, xmin::text FROM "TokenBalance" ORDER BY id').fetchall() == xmins
    later = TICK + timedelta(hours=1)  # prices moved: usdValue refreshes for every priced balance
    moved = sync_balances(conn, market.balances(later), later, LOOKBACK)
    assert moved.changed > 0
    value = conn.execute(
        'SELECT b."usdValue", b.quantity * p."priceUsd" FROM "TokenBalance" b JOIN "PriceSnapshot" p '
        'ON p."tokenId" = b."tokenId" AND p."recordedAt" = %s LIMIT 1', (later,)).fetchone()
    assert value[0] == value[1].quantize(Decimal("1e-18"), rounding=ROUND_HALF_UP)
    bad = market.balances(TICK).slice(0, 2).to_pydict()
    bad["walletId"][0] = "no-such-wallet"
    bad["quantity"][1] = "-1"
    skipped = sync_balances(conn, pa.table(bad), TICK, LOOKBACK)
    assert skipped.skipped == {"unknown wallet": 1, "negative quantity": 1}


def test_governance_sync_is_idempotent_and_reports_changes(conn, market):
    first = sync_governance_locks(conn, market.governance_locks(TICK), TICK)
    assert first.changed == first.received > 0
    same = sync_governance_locks(conn, market.governance_locks(TICK + timedelta(hours=1)), TICK + timedelta(hours=1))
    assert same.changed == 0  # voting power decays by the day
    later = sync_governance_locks(conn, market.governance_locks(TICK + timedelta(days=3)), TICK + timedelta(days=3))
    assert later.changed > 0 and set(later.changed_wallet_ids) <= set(first.changed_wallet_ids)
    assert conn.execute('SELECT count(*) FROM "GovernanceLock"').fetchone()[0] == first.received


# -- correlations -------------------------------------------------------------------------------

def test_correlation_pairs_are_ordered_and_sound():
    rng = np.random.default_rng(7)
    base = np.exp(np.cumsum(rng.normal(0, 0.01, 200)))
    noise = np.exp(np.cumsum(rng.normal(0, 0.01, 200)))
    frame = pd.DataFrame({"b": base, "a": base * 2.0, "c": noise})
    frame.loc[5:9, "c"] = np.nan
    pairs = {(x.token1, x.token2): x for x in correlations.correlation_pairs(frame)}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert pairs[("a", "b")].correlation == pytest.approx(1.0) and pairs[("a", "b")].p_value == 0.0
    assert pairs[("a", "c")].samples == 199 - 6  # returns touching the gap are missing
    assert abs(pairs[("a", "c")].correlation) < 0.3 and pairs[("a", "c")].p_value > 0.001
    assert correlations.p_value(0.5, 10) == pytest.approx(0.1411, abs=1e-4)


def test_asset_correlations_are_read_back_by_the_seeds_risk_query(db_env, market):
    with psycopg.connect(db_env.url, autocommit=True) as conn:
        register_market(conn, market)
        start = TICK - timedelta(days=8)
        plan = price_sources.synthetic_plan(market, start, TICK + timedelta(hours=1), TICK)
        load_prices(conn, plan.chunks, window=(start, TICK + timedelta(hours=1)), origin=plan.origin, now=TICK)
        sync_balances(conn, market.balances(TICK), TICK, LOOKBACK)
    db_env.wait_replicas()
    config = {"ops": {"asset_correlations": {"config": {"as_of": TICK.isoformat(), "top_k": 5}}}}
    result = dg.materialize([asset_correlations], resources={"database": DatabaseResource()}, run_config=config)
    metadata = result.asset_materializations_for_node("asset_correlations")[0].metadata
    assert metadata["pairs_by_timeframe"].value == {"7d": 10, "30d": 10}
    db_env.wait_replicas()
    with db_env.connect("analytics") as replica:
        rows = correlations.risk_metrics(replica, "7d", TICK + timedelta(hours=1))
    assert len(rows) == 10
    assert all(r["token1Id"] < r["token2Id"] and -1 <= r["correlation"] <= 1 and r["sampleSize"] == 7 * 24 - 1
               for r in rows)
    again = dg.materialize([asset_correlations], resources={"database": DatabaseResource()}, run_config=config)
    assert again.success
    with db_env.connect() as conn:
        assert conn.execute('SELECT count(*) FROM "AssetCorrelation"').fetchone()[0] == 20


# -- the assets, schedules and seed_history -----------------------------------------------------

def _resources():
    return {"database": DatabaseResource(), "market": MarketResource(**MARKET), "cache": CacheResource()}


def test_the_tick_assets_and_their_check(db_env, conn):
    config = {"ops": {"token_balances": {"config": {"tick": "2025-03-10T12:03:00Z"}},
                      "portfolio_tick": {"config": {"tick": "2025-03-10T12:03:00Z"}},
                      "governance_locks": {"config": {"tick": "2025-03-10T12:03:00Z"}}}}
    assets = [token_balances, portfolio_tick, governance_locks, positions_have_portfolio_rows]
    result = dg.materialize(assets, resources=_resources(), run_config=config)
    meta = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert meta["portfolio_snapshots"]["capturedAt"].value == "2025-03-10 12:00:00"
    assert meta["position_snapshots"]["positions"].value > 0
    assert meta["token_balances"]["changed_wallets"].value == MARKET["wallets"]
    # invalidation in the same run: every changed wallet's key holds the database's new answer
    balances_cache = meta["token_balances"]["cache_invalidation"].value
    governance_cache = meta["governance_locks"]["cache_invalidation"].value
    assert (balances_cache["status"], balances_cache["portfolio_written"]) == ("refreshed", MARKET["wallets"])
    assert governance_cache["status"] == "refreshed"
    assert governance_cache["governance_written"] == meta["governance_locks"]["changed_wallets"].value > 0
    client = connect_redis(db_env.env["REDIS_URL"])
    wallet, held = conn.execute("""SELECT "walletId", array_agg(trim_scale("usdValue")::text) FILTER (WHERE "usdValue" > 0)
                                     FROM "TokenBalance" GROUP BY 1 ORDER BY 1 LIMIT 1""").fetchone()
    [summary] = json.loads(client.get(f"portfolio:{wallet}"))  # cache contract v2: getPortfolioSummary's result
    assert summary["id"] == wallet
    assert sorted(Decimal(b["usdValue"]) for b in summary["balances"]) == sorted(Decimal(v) for v in held or [])
    assert 0 < client.ttl(f"portfolio:{wallet}") <= 300
    [locked] = conn.execute('SELECT "walletId" FROM "GovernanceLock" ORDER BY 1 LIMIT 1').fetchone()
    assert 300 < client.ttl(f"governance:{locked}") <= 1800
    check = result.get_asset_check_evaluations()[0]
    assert check.passed
    conn.execute("""INSERT INTO "PositionSnapshot" ("portfolioSnapshotId", "tokenId", "walletId", quantity,
                    "usdValue", "priceUsd", "positionType", "capturedAt")
                    SELECT 'no-such-portfolio-row', "tokenId", "walletId", 1, 1, 1, 'liquid', "capturedAt"
                      FROM "PositionSnapshot" LIMIT 1""")
    broken = dg.materialize([positions_have_portfolio_rows, portfolio_tick], resources=_resources(),
                            selection=dg.AssetSelection.checks(positions_have_portfolio_rows), raise_on_error=False)
    evaluation = broken.get_asset_check_evaluations()[0]
    assert not evaluation.passed and evaluation.metadata["orphan_positions"].value == 1


def test_schedules_pass_their_tick():
    when = datetime(2025, 3, 10, 12, 5)
    price = price_snapshots_schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert price.partition_key == "2025-03-10"
    tick = portfolio_tick_schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert tick.run_config["ops"]["portfolio_tick"]["config"]["tick"].startswith("2025-03-10T12:05:00")
    assert set(tick.run_config["ops"]) == {"token_balances", "portfolio_tick"}


def test_seed_history_writes_every_snapshot_table_and_resumes(db_env):
    end = datetime(2025, 3, 3, 6)
    config = {"ops": {"synthesize_history": {"config": {
        "months": 2, "scale": 0.004, "price_tick_minutes": 240, "portfolio_tick_minutes": 720,
        "end": end.isoformat()}}}}
    result = seed_history_job.execute_in_process(run_config=config, resources={"database": DatabaseResource()})
    assert result.success
    with db_env.connect() as conn:
        assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == [datetime(2025, 2, 1).date(),
                                                                     datetime(2025, 3, 1).date()]
        counts = {t: conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(t))
                                  ).fetchone()[0]
                  for t in ("PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot", "TokenBalance", "GovernanceLock")}
        tokens, wallets = 2, 40  # 500 and 10,000 at scale 0.004
        assert counts["PriceSnapshot"] == tokens * 6 * (28 + 2) + tokens * 2  # ..., then 03-03 00:00 and 04:00
        ticks = 2 * (28 + 2) + 1  # every 12 h from 02-01 00:00 to 03-03 00:00
        assert counts["PortfolioSnapshot"] == ticks * (wallets + 1)
        assert counts["PositionSnapshot"] > 0 and counts["TokenBalance"] > 0
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 0
        assert orphan_positions(conn, datetime(2025, 1, 1))[0] == 0
        again = seed_history_job.execute_in_process(run_config=config, resources={"database": DatabaseResource()})
        assert again.success
        assert {t: conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(t))
                                ).fetchone()[0] for t in counts} == counts
    days = {e.materialization.partition for e in result.get_asset_materialization_events()
            if e.materialization.asset_key == dg.AssetKey("price_snapshots")}
    assert "2025-02-01" in days and "2025-03-03" in days


def test_the_demo_walkthrough_ingests_through_the_assets(db_env):
    from wedefi_pipelines.demo import ingestion as walkthrough
    from wedefi_pipelines.ingest.report import rows_per_table

    lines = []
    now = datetime(2025, 3, 10, 12, 7)
    out = walkthrough.recent_ingestion(days=2, ticks=2, scale=0.004, now=now, progress=lines.append)
    assert out["price_snapshots"]["inserted"] == 2 * 2 * 24  # 2 tokens, hourly, 2025-03-09 and 2025-03-10
    assert len(lines) == 4 and "positions_have_portfolio_rows passed" in lines[2]
    with db_env.connect() as conn:
        counts = rows_per_table(conn)
    assert counts["PortfolioSnapshot"] == 2 * (40 + 1)
    assert counts["AssetCorrelation"] == 2  # one pair, two timeframes
