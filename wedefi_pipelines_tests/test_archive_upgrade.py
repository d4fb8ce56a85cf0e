"""Archives written before issue 14 (format 1) are rewritten in the current format by a
resumable, verified step, swapped in place (no glob reader ever sees two copies), and
registered in the Iceberg tables; a kill -9 after any of its steps loses nothing."""

import os
import subprocess
from datetime import datetime, timezone
import sys
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.tiering.checks import iceberg_tables_match_archive
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.archive import UPGRADE_STEPS, Archiver, read_back
from wedefi_pipelines.tiering.columns import archive_columns
from wedefi_pipelines.tiering.content_hash import ContentHash
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines.tiering.policy import decide_group
from wedefi_pipelines.tiering.restore import pg_content_hash, restore_month
from wedefi_pipelines_tests.iceberg_support import NAMESPACE, month_files, plain_catalog
from wedefi_pipelines_tests.legacy_archive import archive_in_format_1
from wedefi_pipelines_tests.test_archive_faults import RUNNER
from wedefi_pipelines_tests.test_tiering_support import (load_portfolio, load_prices, months_ago, rows_of,
                                                         seed_reference, store_for)

REPO = Path(__file__).resolve().parent.parent
TABLES = ("PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot")


@pytest.fixture
def legacy(db, tmp_path):
    """A price month and a portfolio month archived by the previous release (format 1)."""
    prices, portfolios = months_ago(15), months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, prices)
        load_portfolio(conn, portfolios)
        before = {t: rows_of(conn, t) for t in TABLES}
        months = {"PriceSnapshot": prices, "PortfolioSnapshot": portfolios, "PositionSnapshot": portfolios}
        hashes = {t: pg_content_hash(conn, p.child_name(p.range_table(t), m), t) for t, m in months.items()}
    store = store_for(db)
    for table, month in months.items():
        archive_in_format_1(db, store, table, month, tmp_path)
    key = store.object_key("PriceSnapshot", prices, 0)
    store.download(key, tmp_path / "old.parquet")
    old = pq.read_schema(tmp_path / "old.parquet")
    assert old.field("id").type == pa.uuid() and old.field("recordedAt").type == pa.timestamp("ms", tz="UTC")
    return months, before, hashes, store


def _object_holds(db, store, table, month, expected: ContentHash, workdir) -> None:
    """The month's folder holds exactly its recorded keys, and the object at each holds the
    recorded rows (whichever format it is in at this moment)."""
    with psycopg.connect(db.url) as conn:
        state = catalog.month_state(conn, table, month, default_rows="skip")
        columns = archive_columns(conn, table)
    assert store.list_keys(store.month_prefix(table, month)) == [o.key for o in state.objects]
    total = ContentHash()
    for obj in state.objects:
        local = Path(workdir) / f"check-{table}.parquet"
        store.download(obj.key, local)
        total = total + read_back(local, p.range_table(table), columns)[1]
    assert total == expected


def test_a_format_1_archive_is_rewritten_in_place_verified_and_registered(db, legacy, tmp_path):
    months, before, hashes, store = legacy
    prices = months["PriceSnapshot"]
    with psycopg.connect(db.url) as conn:
        states = catalog.group_states(conn, "PriceSnapshot", prices)
    decision = decide_group(states, datetime.now(timezone.utc), Settings())
    assert decision.action.value == "archive" and "format-1" in decision.reason
    db.wait_replicas()
    start, end = p.month_bounds(prices)[0].replace(day=20), p.month_bounds(prices)[1]
    with db.database() as database:
        legacy_history = price_history(database, store, "tok-2", start, end)  # read directly, UUIDs printed back
        assert legacy_history.iceberg == "" and legacy_history.from_archive > 0
        outcomes = [Archiver(database, store).archive_month(g, months[g]) for g in ("PriceSnapshot", "PortfolioSnapshot")]
        assert [o.action for o in outcomes] == ["upgraded", "upgraded"]
        assert sorted(u.table for o in outcomes for u in o.upgraded) == sorted(TABLES)
        db.wait_replicas()
        through_iceberg = price_history(database, store, "tok-2", start, end)
        assert through_iceberg.iceberg.startswith("wedefi.PriceSnapshot snapshot ")
        assert through_iceberg.rows.equals(legacy_history.rows)
        assert iceberg_tables_match_archive(database, store).passed
        assert Archiver(database, store).archive_month("PriceSnapshot", prices).action == "skipped"
    for table in TABLES:
        month = months[table]
        _object_holds(db, store, table, month, hashes[table], tmp_path)
        key = store.object_key(table, month, 0)
        store.download(key, tmp_path / "new.parquet")
        new = pq.read_schema(tmp_path / "new.parquet")
        assert new.field("id").type == pa.string()
        assert new.field(p.range_table(table).time_column).type == pa.timestamp("us")
        with psycopg.connect(db.url) as conn:
            [obj] = catalog.month_state(conn, table, month, default_rows="skip").objects
        assert (obj.format_version, obj.registered) == (2, True)
        assert store.head(key).size == obj.size_bytes
        files = month_files(plain_catalog(db, store).load_table((NAMESPACE, table)))
        assert files == {month: {store.uri(key): hashes[table].count}}
    assert store.list_keys(f"{store.prefix}/_staging/") == []
    with db.database() as database:
        restore_month(database, store, "PriceSnapshot", prices)
        restore_month(database, store, "PortfolioSnapshot", months["PortfolioSnapshot"])
    with psycopg.connect(db.url) as conn:
        assert {t: rows_of(conn, t) for t in TABLES} == before  # every column, byte for byte


@pytest.mark.parametrize("step", UPGRADE_STEPS)
def test_an_upgrade_killed_after_any_step_loses_nothing_and_a_rerun_completes_it(db, legacy, tmp_path, step):
    """`staged`: the verified replacement sits under _staging/, the original untouched;
    `swapped`: the key holds the replacement, the metadata still describes the original;
    `upgraded`: recorded and registered inside the transaction the kill rolls back."""
    months, _, hashes, store = legacy
    prices = months["PriceSnapshot"]
    env = {**os.environ, **db.env, "ARCHIVE_PREFIX": f"t/{db.name}"}
    killed = subprocess.run([sys.executable, "-c", RUNNER, "PriceSnapshot", prices.isoformat(), step], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    _object_holds(db, store, "PriceSnapshot", prices, hashes["PriceSnapshot"], tmp_path)
    staged = store.list_keys(f"{store.prefix}/_staging/")
    assert staged == [store.staging_key(store.object_key("PriceSnapshot", prices, 0))]
    with psycopg.connect(db.url) as conn:
        [obj] = catalog.month_state(conn, "PriceSnapshot", prices, default_rows="skip").objects
    assert obj.format_version == 1 and not obj.registered
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PriceSnapshot", prices)
        assert outcome.action == "upgraded" and [u.resumed for u in outcome.upgraded] == [step != "staged"]
        assert iceberg_tables_match_archive(database, store).metadata["pending"].value == [
            f"PortfolioSnapshot {p.month_year(months['PortfolioSnapshot'])}: 1 object(s) ({hashes['PortfolioSnapshot'].count}"
            " rows) not in the Iceberg table yet (format-1 upgrade or registration pending: re-run its cold_archive "
            "partition)",
            f"PositionSnapshot {p.month_year(months['PositionSnapshot'])}: 1 object(s) ({hashes['PositionSnapshot'].count}"
            " rows) not in the Iceberg table yet (format-1 upgrade or registration pending: re-run its cold_archive "
            "partition)"]
    _object_holds(db, store, "PriceSnapshot", prices, hashes["PriceSnapshot"], tmp_path)
    assert store.list_keys(f"{store.prefix}/_staging/") == []
    files = month_files(plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot")))
    assert files == {prices: {store.uri(obj.key): hashes["PriceSnapshot"].count}}
