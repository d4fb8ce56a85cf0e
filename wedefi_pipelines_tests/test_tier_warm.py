"""The warm tier on real PostgreSQL: rewritten in place, still attached, every row kept."""

import psycopg
import pytest

from wedefi_pipelines import catalog, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.tiering.policy import WARM_LAYOUTS
from wedefi_pipelines.tiering.warm import rewrite, warm_month
from wedefi_pipelines_tests.test_tiering_support import (insert_prices, load_portfolio, load_prices, months_ago,
                                                         rows_of, seed_reference)


def _index_names(conn, relation: str) -> set[str]:
    rows = conn.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                        " WHERE i.indrelid = %s::regclass", (f'"{relation}"',))
    return {r[0] for r in rows}


def _warm_layout(conn, table: p.RangeTable, month) -> tuple[bool, bool]:
    """(rewritten, vacuumed), as the month catalog reads them."""
    state = catalog.month_state(conn, table, month, default_rows="skip")
    return state.rewritten, state.vacuumed


def _index_methods(conn, relation: str) -> set[tuple[str, tuple[str, ...]]]:
    """(access method, columns) of every index on the relation."""
    rows = conn.execute("""SELECT am.amname, array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                                                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                                                 ORDER BY k.o)::text[]
                             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
                            WHERE i.indrelid = %s::regclass""", (f'"{relation}"',))
    return {(m, tuple(cols)) for m, cols in rows}


def _physical_order(conn, relation: str, columns: tuple[str, ...]) -> list[tuple]:
    cols = ", ".join(f'"{c}"' for c in columns)
    return conn.execute(f'SELECT {cols} FROM "{relation}" ORDER BY ctid').fetchall()


def test_a_warm_month_is_rewritten_in_place_and_keeps_every_row(db):
    month = months_ago(3)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        rows = load_prices(conn, month, step="1 hour")
        before = rows_of(conn, "PriceSnapshot")
    child = p.child_name(p.PRICE_SNAPSHOT, month)
    with db.database() as database:
        outcome = warm_month(database, "PriceSnapshot", month)
    assert outcome.action == "converted"
    meta = outcome.metadata()
    assert meta["rows"] == rows and meta["bytes_after"] < meta["bytes_before"]
    assert meta["warm_query_ms_before"] > 0 and meta["warm_query_ms_after"] > 0
    with db.connect() as conn:
        assert month_ops.is_attached(conn, p.PRICE_SNAPSHOT, month)
        assert rows_of(conn, "PriceSnapshot") == before
        indexes = _index_names(conn, child)
        assert indexes == {f"{child}_pkey", WARM_LAYOUTS["PriceSnapshot"].brin_name(p.PRICE_SNAPSHOT, month)}
        order = _physical_order(conn, child, ("tokenId", "recordedAt"))
        assert order == sorted(order)  # rewritten in the order a token's history reads
        pages, visible = conn.execute("SELECT relpages, relallvisible FROM pg_class WHERE relname = %s",
                                      (child,)).fetchone()
        assert pages > 0 and visible == pages  # VACUUM (FREEZE, ANALYZE) ran
        assert _warm_layout(conn, p.PRICE_SNAPSHOT, month) == (True, True)
        plan = conn.execute(f"""EXPLAIN SELECT * FROM "PriceSnapshot" WHERE "tokenId" = 'tok-2'
                                AND "recordedAt" >= '{p.month_bounds(month)[0]}' AND "recordedAt" <
                                '{p.month_bounds(month)[0].replace(day=8)}'""").fetchall()
        assert "_brin" in " ".join(r[0] for r in plan)
    # a late row still lands in the warm child, and the second run changes nothing
    insert_prices(psycopg.connect(db.url), [p.month_bounds(month)[0].replace(day=5, minute=1)])
    with db.database() as database:
        again = warm_month(database, "PriceSnapshot", month)
    assert again.action == "skipped" and again.reason.startswith("already warm")
    with db.connect() as conn:
        assert len(rows_of(conn, "PriceSnapshot")) == rows + 1


def test_hot_cold_and_absent_months_are_skipped_with_the_reason(db):
    hot, cold = months_ago(0), months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, cold)
        for statement in p.create_child_sql(p.PRICE_SNAPSHOT, hot):
            conn.execute(statement)
        conn.commit()
        before = rows_of(conn, "PriceSnapshot")
    with db.database() as database:
        reasons = {m: warm_month(database, "PriceSnapshot", m) for m in (hot, cold, months_ago(5))}
    assert all(o.action == "skipped" for o in reasons.values())
    assert reasons[hot].reason.startswith("not warm yet")
    assert reasons[cold].reason.startswith("cold, not warm")
    assert reasons[months_ago(5)].reason == "no child for this month"
    with db.connect() as conn:
        assert rows_of(conn, "PriceSnapshot") == before
        child = p.child_name(p.PRICE_SNAPSHOT, cold)
        assert f"{child}_tokenId_recordedAt_source_key" in _index_names(conn, child)


def test_portfolio_and_position_leaves_go_warm(db):
    month = months_ago(4)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_portfolio(conn, month, every="6 hours")
        before = {t: rows_of(conn, t) for t in ("PortfolioSnapshot", "PositionSnapshot")}
    with db.database() as database:
        outcomes = [warm_month(database, t, month) for t in ("PortfolioSnapshot", "PositionSnapshot")]
    assert [o.action for o in outcomes] == ["converted", "converted"]
    with db.connect() as conn:
        assert {t: rows_of(conn, t) for t in before} == before
        for leaf in p.leaf_names(p.PORTFOLIO_SNAPSHOT, month):
            methods = _index_methods(conn, leaf)
            assert ("brin", ("walletId", "capturedAt")) in methods
            assert ("btree", ("walletId", "capturedAt")) not in methods  # replaced
            assert ("btree", ("capturedAt",)) in methods  # not made redundant by the order: kept
            order = _physical_order(conn, leaf, ("walletId", "capturedAt"))
            assert order == sorted(order, key=lambda r: (r[0] is None, r[0] or "", r[1]))
        position = p.child_name(p.POSITION_SNAPSHOT, month)
        names = _index_names(conn, position)
        assert f"{position}_walletId_idx" not in names and f"{position}_warm_order" not in names
        assert f"{position}_portfolioSnapshotId_idx" in names  # not made redundant by the order: kept
        assert _warm_layout(conn, p.POSITION_SNAPSHOT, month) == (True, True)


def test_a_conversion_interrupted_before_its_vacuum_is_finished_by_the_next_run(db):
    month = months_ago(6)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month)
        with conn.transaction():
            rewrite(conn, p.PRICE_SNAPSHOT, month)  # as if the process died right after this commit
        assert _warm_layout(conn, p.PRICE_SNAPSHOT, month) == (True, False)
    with db.database() as database:
        outcome = warm_month(database, "PriceSnapshot", month)
    assert outcome.action == "finished" and "VACUUM" in outcome.reason
    with db.connect() as conn:
        assert _warm_layout(conn, p.PRICE_SNAPSHOT, month) == (True, True)


@pytest.mark.parametrize("table", ["PriceSnapshot"])
def test_the_warm_rewrite_waits_at_most_lock_timeout_per_attempt(db, table):
    """A reader holding the child keeps CLUSTER out: bounded attempts, then a clear error, hot layout intact."""
    from wedefi_pipelines.settings import Settings
    from wedefi_pipelines.locks import LockContention

    month = months_ago(3)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month)
    settings = Settings.model_validate({"tiers": {"lock_timeout_ms": 50, "lock_attempts": 2}})
    child = p.child_name(p.PRICE_SNAPSHOT, month)
    with psycopg.connect(db.url) as reader:
        reader.execute(f'SELECT count(*) FROM "{child}"')  # holds ACCESS SHARE until rollback
        with db.database(settings) as database, pytest.raises(LockContention, match="no lock after 2 attempts"):
            warm_month(database, table, month, measure=False)
        reader.rollback()
    with db.connect() as conn:
        assert _warm_layout(conn, p.PRICE_SNAPSHOT, month) == (False, False)
        assert f"{child}_tokenId_recordedAt_source_key" in _index_names(conn, child)
