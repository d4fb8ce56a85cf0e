"""Positions the app writes without "capturedAt" (sql/0007): kept in the default partition,
completed by complete_positions into their month, never lost, never counted as stuck rows;
the PortfolioSnapshot -> PositionSnapshot cascade never fires for the pipeline's own moves."""

from datetime import date, datetime

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import catalog, positions
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning as pv
from wedefi_pipelines.defs.ingestion.checks import positions_completed
from wedefi_pipelines.defs.ingestion.completion import complete_positions, complete_positions_sensor
from wedefi_pipelines.defs.provisioning.checks import default_partitions_empty
from wedefi_pipelines.provisioning import safety
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines_tests.test_tiering_support import (load_portfolio, metadata_rows, months_ago, seed_reference,
                                                         store_for)

JAN, FEB, MAR = date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)


def _portfolio(conn, id_: str, wallet: str | None, at: datetime) -> None:
    conn.execute("""INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                    VALUES (%s, %s, 10, 1, %s)""", (id_, wallet, at))


def _app_position(conn, id_: str, portfolio_id: str, wallet: str = "w-1") -> None:
    """As the app's sync-performance.ts writes it: no "capturedAt"."""
    conn.execute("""INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity,
                                                    "usdValue", "priceUsd", "positionType")
                    VALUES (%s, %s, 'tok-1', %s, 1, 2, 2, 'wallet')""", (id_, portfolio_id, wallet))


def _where(conn, id_: str) -> tuple[str, datetime | None]:
    return conn.execute('SELECT tableoid::regclass::text, "capturedAt" FROM "PositionSnapshot" WHERE id = %s',
                        (id_,)).fetchone()


@pytest.fixture
def waiting_positions(db):
    """Portfolio rows in January and March (March has no PositionSnapshot child yet), five
    app positions for them, one position whose portfolio row does not exist."""
    with db.connect() as conn:
        seed_reference(conn)
        pv.ensure_months(conn, p.PORTFOLIO_SNAPSHOT, [JAN, MAR])
        pv.ensure_months(conn, p.POSITION_SNAPSHOT, [JAN])
        _portfolio(conn, "pf-jan", "w-1", datetime(2025, 1, 10, 12, 0, 0, 123000))
        _portfolio(conn, "pf-mar", "w-2", datetime(2025, 3, 2, 8, 30))
        for i in range(3):
            _app_position(conn, f"pos-jan-{i}", "pf-jan")
        for i in range(2):
            _app_position(conn, f"pos-mar-{i}", "pf-mar", "w-2")
        _app_position(conn, "pos-orphan", "pf-missing")
    return db


def test_app_positions_wait_in_the_default_without_tripping_the_partition_checks(waiting_positions):
    db = waiting_positions
    with db.connect() as conn:
        assert _where(conn, "pos-jan-0") == ('"PositionSnapshot_default"', None)
        state = catalog.read_table(conn, p.POSITION_SNAPSHOT)
        assert state.null_key_rows == 6 and state.default_rows == {}  # no month's rows: nothing to drain
        assert positions.waiting(conn) == positions.Waiting(5, 1, "pos-jan-0", "pos-mar-1")
        work = safety.pending_work(conn, date(2025, 1, 15), 1, JAN)
        assert [w.drain for w in work] == [(), (), ()]
    result = default_partitions_empty(DatabaseResource(**_urls(db)))
    assert result.passed and result.metadata["rows_waiting_for_complete_positions"].value == {"PositionSnapshot": 6}


def _urls(db) -> dict:
    env = db.env
    return {"primary_url": env["DATABASE_URL_PRIMARY"], "read_url": env["DATABASE_URL_READ"],
            "analytics_url": env["DATABASE_URL_ANALYTICS"]}


def test_complete_positions_moves_each_row_into_its_month_and_keeps_the_orphan(waiting_positions):
    db = waiting_positions
    with db.connect() as conn:
        before = sorted(r[0] for r in conn.execute('SELECT id FROM "PositionSnapshot"'))
    settings = Settings.model_validate({"ingestion": {"complete_positions_batch": 2}})
    with db.database(settings) as database:
        report = positions.complete_positions(database, settings)
    assert report.rows == 5 and report.batches == 3
    assert report.completed == {JAN: 3, MAR: 2}
    assert (report.left.placeable, report.left.orphaned) == (0, 1)
    with db.connect() as conn:
        assert _where(conn, "pos-jan-2") == ('"PositionSnapshot_2025_01"', datetime(2025, 1, 10, 12, 0, 0, 123000))
        assert _where(conn, "pos-mar-0") == ('"PositionSnapshot_2025_03"', datetime(2025, 3, 2, 8, 30))
        assert _where(conn, "pos-orphan") == ('"PositionSnapshot_default"', None)
        assert sorted(r[0] for r in conn.execute('SELECT id FROM "PositionSnapshot"')) == before  # once each
        assert MAR in catalog.attached_months(conn, p.POSITION_SNAPSHOT)
    with db.database(settings) as database:
        again = positions.complete_positions(database, settings)
    assert again.rows == 0 and again.left.orphaned == 1
    # the orphan's portfolio row arrives: the next run places it
    with db.connect() as conn:
        _portfolio(conn, "pf-missing", "w-1", datetime(2025, 1, 20))
    with db.database(settings) as database:
        assert positions.complete_positions(database, settings).completed == {JAN: 1}


def test_the_sensor_requests_the_job_for_new_rows_and_the_check_names_orphans(waiting_positions):
    db = waiting_positions
    resources = {"database": DatabaseResource(**_urls(db))}

    def evaluate(instance):
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return complete_positions_sensor(context)

    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate(instance)
        assert isinstance(first, dg.RunRequest) and first.run_key.startswith("complete_positions:")
        result = complete_positions.execute_in_process(instance=instance, resources=resources)
        assert result.success and result.output_for_node("complete_waiting_positions")["completed"] == 5
        idle = evaluate(instance)
        assert isinstance(idle, dg.SkipReason) and "1 wait without their PortfolioSnapshot row" in idle.skip_message
        with db.connect() as conn:
            _app_position(conn, "pos-new", "pf-jan")
        second = evaluate(instance)
        assert isinstance(second, dg.RunRequest) and second.run_key != first.run_key
    check = positions_completed(DatabaseResource(**_urls(db)))
    assert not check.passed and check.metadata["waiting_without_portfolio_row"].value == 1


def test_the_archive_moves_late_portfolio_rows_without_cascading_into_their_positions(db, tmp_path):
    """Freezing late PortfolioSnapshot rows deletes them from the default partition (their rows
    leave "PortfolioSnapshot" for a frozen table): with 0007's cascade trigger installed, the
    late position must still be archived, not deleted."""
    month = months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_portfolio(conn, month, every="7 days")
    store = store_for(db)
    with db.database() as database:
        assert Archiver(database, store).archive_month("PortfolioSnapshot", month).action == "archived"
    late_at = p.month_bounds(month)[0].replace(day=20)
    with db.connect() as conn:
        _portfolio(conn, "pf-late", "w-1", late_at)
        conn.execute("""INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity,
                                                        "usdValue", "priceUsd", "positionType", "capturedAt")
                        VALUES ('pos-late', 'pf-late', 'tok-1', 'w-1', 1, 1, 1, 'wallet', %s)""", (late_at,))
        counts = {t: r[1] for t in ("PortfolioSnapshot", "PositionSnapshot")
                  for r in metadata_rows(conn, t) if r[0] == p.month_year(month)}
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PortfolioSnapshot", month)
    assert outcome.action == "archived" and outcome.reason == "late rows of an archived month"
    with db.connect() as conn:
        after = {t: r[1] for t in ("PortfolioSnapshot", "PositionSnapshot")
                 for r in metadata_rows(conn, t) if r[0] == p.month_year(month)}
    assert after == {t: n + 1 for t, n in counts.items()}  # the late position was archived, not deleted


def test_deleting_a_portfolio_row_still_cascades_for_the_app(waiting_positions):
    db = waiting_positions
    with db.connect() as conn:
        conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE id = 'pf-mar'""")
        assert conn.execute("""SELECT count(*) FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = 'pf-mar'"""
                            ).fetchone()[0] == 0
        assert conn.execute("""SELECT count(*) FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = 'pf-jan'"""
                            ).fetchone()[0] == 3
