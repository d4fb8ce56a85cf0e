"""The price load path and the price_snapshots asset on the real stack (PostgreSQL 18 and 15)."""

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.ingestion.assets import REJECT_CHECK, price_snapshots
from wedefi_pipelines.ingest import price_sources
from wedefi_pipelines.ingest import validation as v
from wedefi_pipelines.ingest.prices import (
    MonthNotStageable,
    PriceChunk,
    load_prices,
    load_whole_month,
    month_blocker,
    rejects_for,
)
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.sources.resources import MarketResource, PriceSourceResource
from wedefi_pipelines.sources.synthetic import SyntheticMarket
from wedefi_pipelines_tests.test_sources import PriceApi

REPO = Path(__file__).resolve().parent.parent
DAY = datetime(2025, 3, 10)
NOW = datetime(2026, 1, 1)
TOKENS, TICK = 8, 60
ROWS_PER_DAY = TOKENS * 24
SNAPSHOT = 'SELECT id, "tokenId", "priceUsd", source, "recordedAt", "createdAt" FROM "PriceSnapshot" ORDER BY 2, 4, 5'


@pytest.fixture
def market() -> SyntheticMarket:
    return SyntheticMarket(tokens=TOKENS, wallets=5, max_tokens_per_wallet=3, tick_minutes=TICK)


@pytest.fixture
def conn(db, market):
    with psycopg.connect(db.url, autocommit=True) as connection:
        register_market(connection, market)
        yield connection


def _load_synthetic(conn, market, start, end, now=NOW):
    plan = price_sources.synthetic_plan(market, start, end, now)
    return load_prices(conn, plan.chunks, window=(start, end), origin=plan.origin, now=now)


def _duplicate_keys(conn) -> int:
    return conn.execute('SELECT count(*) - count(DISTINCT ("tokenId", source, "recordedAt")) FROM "PriceSnapshot"'
                        ).fetchone()[0]


def test_reloading_a_day_changes_nothing(conn, market):
    first = _load_synthetic(conn, market, DAY, DAY + timedelta(days=1))
    assert (first.inserted, first.direct_chunks, first.staged_chunks) == (ROWS_PER_DAY, 1, 0)
    assert first.inserted_by_month == {"2025-03": ROWS_PER_DAY}
    before = conn.execute(SNAPSHOT).fetchall()
    again = _load_synthetic(conn, market, DAY, DAY + timedelta(days=1))
    assert (again.inserted, again.already_present, again.staged_chunks) == (0, ROWS_PER_DAY, 1)
    assert conn.execute(SNAPSHOT).fetchall() == before
    assert conn.execute('SELECT count(*) FROM "PriceSnapshot_2025_03"').fetchone()[0] == ROWS_PER_DAY


def test_a_live_day_adds_its_new_ticks_and_keeps_the_earlier_ones(conn, market):
    morning = _load_synthetic(conn, market, DAY, DAY + timedelta(days=1), now=DAY + timedelta(hours=12, minutes=30))
    assert morning.inserted == TOKENS * 13  # 00:00 .. 12:00, nothing from the future
    earlier = conn.execute(SNAPSHOT).fetchall()
    evening = _load_synthetic(conn, market, DAY, DAY + timedelta(days=1), now=DAY + timedelta(hours=18, minutes=5))
    assert (evening.inserted, evening.already_present) == (TOKENS * 6, TOKENS * 13)
    rows = conn.execute(SNAPSHOT).fetchall()
    assert len(rows) == TOKENS * 19
    assert set(earlier) <= set(rows)


def test_without_the_unique_index_the_load_still_never_duplicates(conn, market):
    """A warm child has lost its per-child UNIQUE index: the anti-join under the day lock
    is what keeps re-runs (and a second source's overlapping rows) out."""
    _load_synthetic(conn, market, DAY, DAY + timedelta(days=1))
    index = p.index_name(p.PRICE_SNAPSHOT, DAY, p.PRICE_SNAPSHOT.child_indexes[0])
    conn.execute(psycopg.sql.SQL("DROP INDEX {}").format(psycopg.sql.Identifier(index)))
    again = _load_synthetic(conn, market, DAY, DAY + timedelta(days=1))
    doubled = market.prices(DAY, DAY + timedelta(days=1))
    mixed = load_prices(conn, [PriceChunk(DAY, DAY + timedelta(days=1), [doubled, doubled])],
                        window=(DAY, DAY + timedelta(days=1)), origin="test", now=NOW)
    assert again.inserted == mixed.inserted == 0
    assert mixed.rejects_by_reason == {v.DUPLICATE_IN_INPUT: ROWS_PER_DAY}
    assert _duplicate_keys(conn) == 0
    assert conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0] == ROWS_PER_DAY


def test_concurrent_loads_of_one_day_serialize_on_the_day_lock(db, conn, market):
    index = p.index_name(p.PRICE_SNAPSHOT, DAY, p.PRICE_SNAPSHOT.child_indexes[0])
    _load_synthetic(conn, market, DAY - timedelta(days=1), DAY)  # creates the month's child
    conn.execute(psycopg.sql.SQL("DROP INDEX {}").format(psycopg.sql.Identifier(index)))
    results, errors = [], []

    def run():
        try:
            with psycopg.connect(db.url, autocommit=True) as own:
                results.append(_load_synthetic(own, market, DAY, DAY + timedelta(days=1)))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.inserted for r in results) == [0, 0, ROWS_PER_DAY]
    assert _duplicate_keys(conn) == 0


def _write_bad_file(path: Path, market: SyntheticMarket) -> list[str]:
    t0, t1 = market.token_ids[0], market.token_ids[1]
    good = [f"{t0},1.25,import,2025-03-10T01:00:00Z", f"{t1},0.000123456789,import,2025-03-10T02:00:00+00:00",
            f"{t0},2.5,other-source,2025-03-10T01:00:00Z"]
    bad = [f"{t0},NaN,import,2025-03-10T03:00:00Z", f"{t0},-4,import,2025-03-10T04:00:00Z",
           f"{t0},0,import,2025-03-10T05:00:00Z", f"tok-unknown,1,import,2025-03-10T06:00:00Z",
           f"{t0},1,import,2099-01-01T00:00:00Z", f"{t0},1,import,2025-03-11T00:00:00Z",
           f"{t0},9.99,import,2025-03-10T01:00:00Z", f"{t1},1,import,yesterday"]
    path.write_text("tokenId,priceUsd,source,recordedAt\n" + "\n".join(good + bad) + "\n")
    return good


def test_bad_rows_are_rejected_with_reasons_and_nothing_valid_is_lost(conn, market, tmp_path):
    file = tmp_path / "history.csv"
    _write_bad_file(file, market)
    plan = price_sources.file_plan(str(file), DAY, DAY + timedelta(days=1))
    result = load_prices(conn, plan.chunks, window=(DAY, DAY + timedelta(days=1)), origin=plan.origin, now=NOW)
    assert (result.received, result.inserted, result.rejected) == (11, 3, 8)
    assert conn.execute('SELECT "tokenId", "priceUsd"::text, source, "recordedAt" FROM "PriceSnapshot" '
                        'ORDER BY "recordedAt", source').fetchall() == [
        (market.token_ids[0], "1.250000000000000000", "import", datetime(2025, 3, 10, 1)),
        (market.token_ids[0], "2.500000000000000000", "other-source", datetime(2025, 3, 10, 1)),
        (market.token_ids[1], "0.000123456789000000", "import", datetime(2025, 3, 10, 2)),
    ]
    stored = {(r["priceUsd"], r["recordedAt"]): r["reason"] for r in rejects_for(conn, plan.origin)}
    assert stored == {
        ("NaN", "2025-03-10T03:00:00Z"): v.PRICE_NAN,
        ("-4", "2025-03-10T04:00:00Z"): v.PRICE_NOT_POSITIVE,
        ("0", "2025-03-10T05:00:00Z"): v.PRICE_NOT_POSITIVE,
        ("1", "2025-03-10T06:00:00Z"): v.UNKNOWN_TOKEN,
        ("1", "2099-01-01T00:00:00Z"): v.TIME_IN_FUTURE,
        ("1", "2025-03-11T00:00:00Z"): v.outside_window_reason(DAY, DAY + timedelta(days=1)),
        ("9.990000000000000000", "2025-03-10T01:00:00.000"): v.DUPLICATE_IN_INPUT,
        ("1", "yesterday"): v.TIME_NOT_ISO,
    }
    before = conn.execute(SNAPSHOT).fetchall()
    again = load_prices(conn, price_sources.file_plan(str(file), DAY, DAY + timedelta(days=1)).chunks,
                        window=(DAY, DAY + timedelta(days=1)), origin=plan.origin, now=NOW)
    assert (again.inserted, again.rejected) == (0, 8)
    assert conn.execute(SNAPSHOT).fetchall() == before
    assert {r["seenCount"] for r in rejects_for(conn, plan.origin)} == {2}  # no second copy of any reject


def test_a_whole_month_loads_bare_then_attaches(conn, market):
    feb = datetime(2025, 2, 1)
    result = load_whole_month(conn, feb, market.iter_price_days(feb, datetime(2025, 3, 1)), origin="synthetic",
                              now=NOW)
    assert result.inserted == ROWS_PER_DAY * 28
    assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == [feb.date()]
    indexes = {r[0] for r in conn.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = '\"PriceSnapshot_2025_02\"'::regclass")}
    assert indexes == {'"PriceSnapshot_2025_02_pkey"', '"PriceSnapshot_2025_02_tokenId_recordedAt_source_key"'}
    assert conn.execute('SELECT count(*) FROM "PriceSnapshot_2025_02"').fetchone()[0] == ROWS_PER_DAY * 28
    assert month_blocker(conn, feb.date()) == "PriceSnapshot_2025_02 already exists"
    with pytest.raises(MonthNotStageable, match="already exists"):
        load_whole_month(conn, feb, market.iter_price_days(feb, datetime(2025, 3, 1)), origin="synthetic", now=NOW)
    assert _load_synthetic(conn, market, datetime(2025, 2, 14), datetime(2025, 2, 15)).inserted == 0


# -- the asset ---------------------------------------------------------------------------------------

def _resources(price_source=None):
    return {"database": DatabaseResource(), "market": MarketResource(tokens=TOKENS, wallets=5, max_tokens_per_wallet=3,
                                                                      tick_minutes=TICK),
            "price_source": price_source or PriceSourceResource(kind="synthetic")}


def _range_tags(first: str, last: str) -> dict:
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


def test_a_backfill_of_three_days_loads_exactly_those_days_once(db_env):
    result = dg.materialize([price_snapshots], resources=_resources(), tags=_range_tags("2025-03-09", "2025-03-11"))
    assert result.success
    metadata = result.asset_materializations_for_node("price_snapshots")[0].metadata
    assert metadata["inserted"].value == 3 * ROWS_PER_DAY
    assert metadata["inserted_by_child"].value == {"PriceSnapshot_2025_03": 3 * ROWS_PER_DAY}
    with db_env.connect() as conn:
        days = conn.execute('SELECT "recordedAt"::date, count(*) FROM "PriceSnapshot_2025_03" GROUP BY 1 ORDER BY 1'
                            ).fetchall()
        assert days == [(datetime(2025, 3, d).date(), ROWS_PER_DAY) for d in (9, 10, 11)]
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 0
        before = conn.execute(SNAPSHOT).fetchall()
        again = dg.materialize([price_snapshots], resources=_resources(), tags=_range_tags("2025-03-09", "2025-03-11"))
        assert again.asset_materializations_for_node("price_snapshots")[0].metadata["inserted"].value == 0
        assert conn.execute(SNAPSHOT).fetchall() == before
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [(REJECT_CHECK, True)]


def test_a_file_with_too_many_bad_rows_loads_the_good_ones_and_warns(db_env, tmp_path):
    market = SyntheticMarket(tokens=TOKENS, wallets=5, max_tokens_per_wallet=3, tick_minutes=TICK)
    file = tmp_path / "history.csv"
    good = _write_bad_file(file, market)
    config = {"ops": {"price_snapshots": {"config": {"file_path": str(file)}}}}
    with db_env.connect() as conn:
        register_market(conn, market)
    result = dg.materialize([price_snapshots], resources=_resources(), partition_key="2025-03-10", run_config=config)
    assert result.success  # a warning, not a failure
    check = result.get_asset_check_evaluations()[0]
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert check.metadata["rejected"].value == 8
    with db_env.connect() as conn:
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0] == len(good)
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_rejects"').fetchone()[0] == 8


def test_the_http_source_adds_todays_quotes_once(db_env):
    api = PriceApi()
    try:
        with db_env.connect() as conn:
            conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
            for coin in ("bitcoin", "ethereum"):
                conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, metadata, "updatedAt")
                                VALUES (%s, 1, %s, %s, %s, 18, jsonb_build_object('coingeckoId', %s::text), now())""",
                             (f"tok-{coin}", f"0x{coin}", coin[:3], coin, coin))
        now = datetime.now(timezone.utc)
        api.prices = {"bitcoin": 67187.33, "ethereum": 3456.789}
        stamp = int(now.timestamp()) - 60
        api.script = [(200, f'{{"bitcoin": {{"usd": 67187.33, "last_updated_at": {stamp}}}, '
                            f'"ethereum": {{"usd": 3456.789, "last_updated_at": {stamp}}}}}', {}, 0)] * 2
        source = PriceSourceResource(kind="http", base_url=api.base_url)
        today = now.date().isoformat()
        if now.hour == 0 and now.minute < 2:
            pytest.skip("too close to midnight UTC: the quote's time would fall in yesterday's partition")
        first = dg.materialize([price_snapshots], resources=_resources(source), partition_key=today)
        second = dg.materialize([price_snapshots], resources=_resources(source), partition_key=today)
        inserted = [r.asset_materializations_for_node("price_snapshots")[0].metadata["inserted"].value
                    for r in (first, second)]
        assert inserted == [2, 0]
        past = dg.materialize([price_snapshots], resources=_resources(source), partition_key="2025-03-10")
        notes = past.asset_materializations_for_node("price_snapshots")[0].metadata["notes"].value
        assert "serves current prices only" in notes[0]
        with db_env.connect() as conn:
            assert conn.execute('SELECT "tokenId", "priceUsd"::float8, source FROM "PriceSnapshot" ORDER BY 1'
                                ).fetchall() == [("tok-bitcoin", 67187.33, "coingecko"),
                                                 ("tok-ethereum", 3456.789, "coingecko")]
        assert len(api.requests) == 2
    finally:
        api.close()


def test_the_cli_materializes_a_day_into_its_child_and_a_second_run_changes_nothing(db, tmp_path, monkeypatch):
    """The documented command, as CI runs it; the second run goes in-process through the
    same definitions and settings (a second CLI start would only add ~30 s of imports)."""
    settings = tmp_path / "wedefi.yaml"
    settings.write_text(f"sources:\n  synthetic:\n    tokens: {TOKENS}\n    wallets: 5\n    tick_minutes: {TICK}\n")
    env = {k: val for k, val in os.environ.items() if k not in ("DAGSTER_HOME", "DAGSTER_PG_URL")}
    env.update({k: val for k, val in db.env.items() if k.startswith("DATABASE_URL")})
    env["WEDEFI_SETTINGS"] = str(settings)
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "wedefi_pipelines.definitions",
               "--select", "price_snapshots", "--partition", "2025-03-10"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with db.connect() as conn:
        first = conn.execute(SNAPSHOT).fetchall()
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_2025_03"').fetchone()[0] == ROWS_PER_DAY == len(first)
    for key, value in env.items():
        if key.startswith("DATABASE_URL"):
            monkeypatch.setenv(key, value)
    again = dg.materialize([price_snapshots], resources=_resources(), partition_key="2025-03-10")
    assert again.asset_materializations_for_node("price_snapshots")[0].metadata["inserted"].value == 0
    with db.connect() as conn:
        assert conn.execute(SNAPSHOT).fetchall() == first
