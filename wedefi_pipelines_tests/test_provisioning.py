"""Provisioning on real PostgreSQL (18 and 15): the horizon, default-partition drains,
archived months, concurrency, lock timeouts, failures and re-runs, TokenBalance."""

import re
import threading
import time
from datetime import date

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning as pv

START = date(2024, 1, 1)
FAST = pv.LockPolicy(lock_timeout_ms=100, retries=2, backoff_s=0.05, max_backoff_s=0.1, advisory_wait_s=30)
TABLES = [t.name for t in p.RANGE_TABLES]


def seed_reference(conn) -> None:
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
    conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    VALUES ('tok-1', 1, '0x1', 'ONE', 'One', 18, now()), ('tok-2', 1, '0x2', 'TWO', 'Two', 18, now())""")
    conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "updatedAt")
                    VALUES ('w-1', '0xa', 1, now()), ('w-2', '0xb', 1, now())""")


def insert_prices(conn, *moments: str, token: str = "tok-1") -> None:
    for moment in moments:
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        VALUES (%s, 1.5, 'synthetic', %s::timestamp)""", (token, moment))


def insert_portfolio(conn, wallet: str | None, moment: str) -> str:
    return conn.execute("""INSERT INTO "PortfolioSnapshot" ("walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                           VALUES (%s, 10, 1, %s::timestamp) RETURNING id""", (wallet, moment)).fetchone()[0]


def insert_position(conn, portfolio_id: str, moment: str) -> None:
    conn.execute("""INSERT INTO "PositionSnapshot" ("portfolioSnapshotId", "tokenId", "walletId", quantity,
                        "usdValue", "priceUsd", "positionType", "capturedAt")
                    VALUES (%s, 'tok-1', 'w-1', 1, 10, 10, 'spot', %s::timestamp)""", (portfolio_id, moment))


def catalog(conn) -> list[tuple]:
    """Every relation of the public schema with its partition bound and indexes."""
    return conn.execute("""
        SELECT c.relname, c.relkind, coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
               coalesce((SELECT string_agg(i.indexrelid::regclass::text, ',' ORDER BY i.indexrelid::regclass::text)
                           FROM pg_index i WHERE i.indrelid = c.oid), '')
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
         ORDER BY 1""").fetchall()


def attached(conn, table: str) -> list[date]:
    return month_ops.attached_months(conn, p.range_table(table))


def ids(conn, table: str) -> list[tuple]:
    col = p.range_table(table).time_column
    return conn.execute(sql.SQL("SELECT id, {c} FROM {t} ORDER BY 1").format(
        c=sql.Identifier(col), t=sql.Identifier(table))).fetchall()


def count(conn, relation: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(relation))).fetchone()[0]


def archive(conn, table: str, month: str, status: str = "archived") -> None:
    conn.execute(sql.SQL("""INSERT INTO {} (month_year, record_count, file_path, compressed_size, sha256,
                                            content_hash, status)
                            VALUES (%s, 0, 's3://b/p', 0, 'e3b0c442', 0, %s)""").format(
        sql.Identifier(f"{table}_archive_metadata")), (month, status))


def test_horizon_creates_the_next_months_for_every_table_and_a_second_run_changes_nothing(db):
    with db.connect() as conn:
        report = pv.run_horizon(conn, 6, today=date(2025, 11, 15), earliest=START, policy=FAST)
        assert report.ok, report.problems
        expected = p.months_between(date(2025, 11, 1), date(2026, 5, 1))
        for table in TABLES:
            assert attached(conn, table) == expected
            assert report.tables[table].created == expected
            assert (report.tables[table].oldest, report.tables[table].newest) == (expected[0], expected[-1])
        assert count(conn, "PortfolioSnapshot_2026_01_part_3") == 0  # hash sub-partitions exist
        indexes = {r[3] for r in catalog(conn) if r[0] == "PriceSnapshot_2026_02"}
        assert indexes == {'"PriceSnapshot_2026_02_pkey","PriceSnapshot_2026_02_tokenId_recordedAt_source_key"'}
        assert report.token_balance.present == tuple(range(8)) and report.token_balance.created == ()
        assert re.search(r"PortfolioSnapshot\s+2025-11\s+2026-05\s+2025-11, 2025-12, .*, 2026-05\s+0\s+0",
                         report.as_text())
        assert "TokenBalance: 8/8 hash partitions" in report.as_text()

        before = catalog(conn)
        again = pv.run_horizon(conn, 6, today=date(2025, 11, 15), earliest=START, policy=FAST)
        assert again.ok and again.created_count == 0 and again.moved_count == 0
        assert catalog(conn) == before


def test_rows_written_before_their_month_existed_are_drained_into_the_right_child(db):
    with db.connect() as conn:
        seed_reference(conn)
        insert_prices(conn, "2024-02-28 23:59:59.999", "2024-02-29 12:00", "2024-02-29 23:59:59.999",
                      "2024-03-01 00:00:00", "2024-12-31 23:59:59.999", "2025-01-01 00:00:00")
        insert_prices(conn, "2024-02-29 12:00", token="tok-2")
        jan = insert_portfolio(conn, "w-1", "2025-01-01 00:00:00")
        insert_portfolio(conn, None, "2025-01-01 00:00:00")  # the all-wallets row
        insert_portfolio(conn, "w-2", "2024-12-31 23:59:59.999")
        insert_position(conn, jan, "2025-01-01 00:00:00")
        assert count(conn, "PriceSnapshot_default") == 7
        before = {t: ids(conn, t) for t in TABLES}

        report = pv.run_horizon(conn, 6, today=date(2025, 1, 10), earliest=START, policy=FAST)

        assert report.ok, report.problems
        assert report.tables["PriceSnapshot"].moved == {
            date(2024, 2, 1): 4, date(2024, 3, 1): 1, date(2024, 12, 1): 1, date(2025, 1, 1): 1}
        assert report.tables["PortfolioSnapshot"].moved == {date(2024, 12, 1): 1, date(2025, 1, 1): 2}
        assert report.tables["PositionSnapshot"].moved == {date(2025, 1, 1): 1}
        assert report.moved_count == 11 and report.left_count == 0
        assert {t: ids(conn, t) for t in TABLES} == before  # no row lost, none duplicated
        for table in TABLES:
            assert count(conn, f"{table}_default") == 0
        assert (count(conn, "PriceSnapshot_2024_02"), count(conn, "PriceSnapshot_2024_03"),
                count(conn, "PriceSnapshot_2024_12"), count(conn, "PriceSnapshot_2025_01")) == (4, 1, 1, 1)
        assert conn.execute("""SELECT count(*) FROM "PortfolioSnapshot_2025_01_part_0"
                               WHERE "walletId" IS NULL""").fetchone()[0] == 1
        # every month from the oldest drained one to the horizon, no gap
        assert attached(conn, "PriceSnapshot") == p.months_between(date(2024, 2, 1), date(2025, 7, 1))
        assert attached(conn, "PortfolioSnapshot") == p.months_between(date(2024, 12, 1), date(2025, 7, 1))
        # drained children got their per-child indexes too
        assert ('"PriceSnapshot_2024_02_pkey","PriceSnapshot_2024_02_tokenId_recordedAt_source_key"'
                in {r[3] for r in catalog(conn)})


def test_archived_months_are_never_recreated_and_their_late_rows_stay_reported(db):
    with db.connect() as conn:
        seed_reference(conn)
        for table in ("PortfolioSnapshot", "PositionSnapshot"):
            pv.ensure_months(conn, table, [date(2024, 9, 1), date(2024, 11, 1)], policy=FAST)
        archive(conn, "PortfolioSnapshot", "2024-10")  # the pair archives together
        late = insert_portfolio(conn, "w-1", "2024-10-15")
        insert_position(conn, late, "2024-10-15")

        report = pv.run_horizon(conn, 1, today=date(2024, 11, 2), earliest=START, policy=FAST)

        assert report.ok, report.problems
        for table in ("PortfolioSnapshot", "PositionSnapshot"):
            assert date(2024, 10, 1) not in attached(conn, table)
            count_, reason = report.tables[table].left_in_default[date(2024, 10, 1)]
            assert count_ == 1 and "archived" in reason
            assert pv.gap_months(pv.inspect_table(conn, table).covered) == []
        assert pv.archived_months(conn, "PositionSnapshot") == {date(2024, 10, 1)}
        outcome = pv.ensure_month(conn, "PortfolioSnapshot", date(2024, 10, 1), policy=FAST)
        assert outcome.action == "archived" and "1 late row(s)" in outcome.detail

        # the restore path asks for it explicitly: created, and the late rows move in
        restored = pv.ensure_month(conn, "PortfolioSnapshot", date(2024, 10, 1), allow_archived=True, policy=FAST)
        assert (restored.action, restored.moved) == ("created", 1)
        conn.execute("""UPDATE "PortfolioSnapshot_archive_metadata" SET status = 'restored'""")
        assert pv.archived_months(conn, "PositionSnapshot") == set()
        assert pv.ensure_month(conn, "PositionSnapshot", date(2024, 10, 1), policy=FAST).moved == 1


def test_two_concurrent_horizon_runs_create_each_child_once_beside_readers_and_writers(db):
    with db.connect() as conn:
        seed_reference(conn)
        pv.ensure_month(conn, "PriceSnapshot", date(2025, 3, 1), policy=FAST)
    reports, errors, written = [], [], [0]
    stop = threading.Event()
    barrier = threading.Barrier(2)

    def horizon():
        try:
            with db.connect() as conn:
                barrier.wait()
                reports.append(pv.run_horizon(conn, 12, today=date(2025, 3, 20), earliest=START))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    def writer():  # ingestion of the current month keeps going
        with db.connect() as conn:
            while not stop.is_set():
                try:
                    insert_prices(conn, f"2025-03-20 00:00:{written[0] % 60:02d}.{written[0] // 60:03d}")
                    written[0] += 1
                except Exception as exc:
                    errors.append(exc)
                    return

    def reader():  # a dashboard query bounded to the hot month
        with db.connect() as conn:
            while not stop.is_set():
                try:
                    conn.execute("""SELECT count(*) FROM "PriceSnapshot" WHERE "recordedAt" >= '2025-03-01'
                                    AND "recordedAt" < '2025-04-01'""").fetchone()
                except Exception as exc:
                    errors.append(exc)
                    return

    side = [threading.Thread(target=writer), threading.Thread(target=reader)]
    runs = [threading.Thread(target=horizon) for _ in range(2)]
    for t in side + runs:
        t.start()
    for t in runs:
        t.join(120)
    stop.set()
    for t in side:
        t.join(30)

    assert errors == []
    assert len(reports) == 2 and all(r.ok for r in reports)
    expected = p.months_between(date(2025, 3, 1), date(2026, 3, 1))
    for table in TABLES:
        created = [m for r in reports for m in r.tables[table].created]
        wanted = [m for m in expected if not (table == "PriceSnapshot" and m == date(2025, 3, 1))]
        assert sorted(created) == wanted  # each child created exactly once, by one run or the other
    with db.connect() as conn:
        for table in TABLES:
            assert attached(conn, table) == expected
        assert count(conn, "PriceSnapshot") == written[0] > 0
        assert count(conn, "PriceSnapshot_default") == 0


def test_ensure_month_from_two_ingestion_transactions_creates_the_month_once(db):
    outcomes, errors = [], []
    barrier = threading.Barrier(2)

    def ingest():
        try:
            with psycopg.connect(db.url) as conn:  # not autocommit: ingestion's own transaction
                conn.execute("SET lock_timeout = '7s'")
                conn.commit()
                barrier.wait()
                conn.execute("SELECT 1")  # ingestion's transaction is open: ensure_month joins it
                outcomes.append(pv.ensure_month(conn, "PriceSnapshot", date(2025, 5, 1), policy=FAST))
                assert conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0] == "7s"
                time.sleep(0.2)  # loading the day, holding the month's advisory lock
                conn.commit()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(o.action for o in outcomes) == ["created", "exists"]


def test_ensure_month_inside_a_rolled_back_transaction_leaves_nothing(db):
    with psycopg.connect(db.url) as conn:
        conn.execute("SELECT 1")
        assert pv.ensure_month(conn, "PortfolioSnapshot", date(2025, 6, 1), policy=FAST).action == "created"
        assert date(2025, 6, 1) in attached(conn, "PortfolioSnapshot")
        conn.rollback()
        assert attached(conn, "PortfolioSnapshot") == []
        assert not month_ops.relation_exists(conn, "PortfolioSnapshot_2025_06_part_0")


def test_a_long_reader_makes_the_horizon_retry_then_fail_naming_it_and_nothing_is_half_made(db):
    with db.connect() as conn, db.connect(autocommit=False) as reader:
        reader.execute("""SELECT count(*) FROM "PriceSnapshot" WHERE "recordedAt" >= '2025-01-01'
                          AND "recordedAt" < '2025-01-02'""")  # holds ACCESS SHARE on the parent
        reader_pid = reader.info.backend_pid
        report = pv.run_horizon(conn, 2, today=date(2025, 1, 5), earliest=START, policy=FAST)
        assert not report.ok
        failed = report.tables["PriceSnapshot"].failed
        assert [o.month for o in failed] == p.months_between(date(2025, 1, 1), date(2025, 3, 1))
        assert "gave up after 3 attempts" in failed[0].detail and f"pid {reader_pid}" in failed[0].detail
        assert attached(conn, "PriceSnapshot") == []
        assert not month_ops.relation_exists(conn, "PriceSnapshot_2025_01")
        assert attached(conn, "PortfolioSnapshot") == p.months_between(date(2025, 1, 1), date(2025, 3, 1))
        reader.rollback()
        again = pv.run_horizon(conn, 2, today=date(2025, 1, 5), earliest=START, policy=FAST)
        assert again.ok and again.tables["PriceSnapshot"].created == p.months_between(date(2025, 1, 1), date(2025, 3, 1))


def test_draining_a_month_does_not_wait_for_readers_of_a_hot_month(db):
    with db.connect() as conn, db.connect(autocommit=False) as reader:
        seed_reference(conn)
        pv.ensure_month(conn, "PriceSnapshot", date(2025, 1, 1), policy=FAST)
        insert_prices(conn, "2025-02-03 10:00", "2025-02-04 10:00")  # no child yet: default partition
        reader.execute("""SELECT count(*) FROM "PriceSnapshot" WHERE "recordedAt" >= '2025-01-01'
                          AND "recordedAt" < '2025-01-02'""")
        no_retry = pv.LockPolicy(lock_timeout_ms=100, retries=0)
        outcome = pv.ensure_month(conn, "PriceSnapshot", date(2025, 2, 1), policy=no_retry)
        assert (outcome.action, outcome.moved, outcome.attempts) == ("created", 2, 1)
        reader.rollback()


def test_a_failed_move_rolls_back_keeping_every_row_and_a_rerun_drains_after_the_fix(db):
    with db.connect() as conn:
        seed_reference(conn)
        insert_prices(conn, "2025-02-10 10:00", "2025-02-10 10:00", "2025-02-11 10:00")  # a duplicate tick
        before = ids(conn, "PriceSnapshot")
        with pytest.raises(pv.ProvisioningError, match=r"(?s)PriceSnapshot 2025-02: UniqueViolation.*duplicated.*stay there") as err:
            pv.ensure_month(conn, "PriceSnapshot", date(2025, 2, 1), policy=FAST)
        assert err.value.outcomes[-1].action == "failed"
        assert ids(conn, "PriceSnapshot") == before and count(conn, "PriceSnapshot_default") == 3
        assert not month_ops.relation_exists(conn, "PriceSnapshot_2025_02")

        report = pv.run_horizon(conn, 1, today=date(2025, 2, 12), earliest=START, policy=FAST)
        assert not report.ok and "UniqueViolation" in report.problems[0]
        left, reason = report.tables["PriceSnapshot"].left_in_default[date(2025, 2, 1)]
        assert left == 3 and "UniqueViolation" in reason
        assert attached(conn, "PriceSnapshot") == [date(2025, 3, 1)]  # the other month still came

        conn.execute("""DELETE FROM "PriceSnapshot" WHERE id = (SELECT min(id) FROM "PriceSnapshot"
                        WHERE "recordedAt" = '2025-02-10 10:00')""")  # the operator's fix: one tick of the two
        again = pv.run_horizon(conn, 1, today=date(2025, 2, 12), earliest=START, policy=FAST)
        assert again.ok, again.problems
        assert again.tables["PriceSnapshot"].moved == {date(2025, 2, 1): 2}
        assert count(conn, "PriceSnapshot_2025_02") == 2 and count(conn, "PriceSnapshot_default") == 0


def test_rows_stuck_in_the_default_although_their_child_exists_are_moved_in(db):
    """PostgreSQL never routes rows there; only catalog damage can. Simulate it: a valid-
    marked CHECK on the default lets CREATE ... PARTITION OF skip its scan of the default."""
    with db.connect() as conn:
        seed_reference(conn)
        insert_prices(conn, "2025-04-02 10:00", "2025-04-03 10:00")
        conn.execute("""ALTER TABLE "PriceSnapshot_default" ADD CONSTRAINT damage
                        CHECK (NOT ("recordedAt" >= '2025-04-01' AND "recordedAt" < '2025-05-01')) NOT VALID""")
        conn.execute("UPDATE pg_constraint SET convalidated = true WHERE conname = 'damage'")
        conn.execute("""CREATE TABLE "PriceSnapshot_2025_04" PARTITION OF "PriceSnapshot"
                        FOR VALUES FROM ('2025-04-01') TO ('2025-05-01')""")
        conn.execute("""ALTER TABLE "PriceSnapshot_default" DROP CONSTRAINT damage""")
        before = ids(conn, "PriceSnapshot")

        report = pv.run_horizon(conn, 1, today=date(2025, 4, 5), earliest=START, policy=FAST)

        assert report.ok, report.problems
        stuck = next(o for o in report.tables["PriceSnapshot"].outcomes if o.month == date(2025, 4, 1))
        assert (stuck.action, stuck.moved) == ("exists", 2) and "although the child existed" in stuck.detail
        assert count(conn, "PriceSnapshot_default") == 0 and count(conn, "PriceSnapshot_2025_04") == 2
        assert ids(conn, "PriceSnapshot") == before


def test_a_missing_token_balance_hash_partition_is_recreated_and_a_foreign_layout_fails(db):
    with db.connect() as conn:
        conn.execute('DROP TABLE "TokenBalance_part_5"')
        report = pv.run_horizon(conn, 1, today=date(2025, 1, 1), earliest=START, policy=FAST)
        assert report.ok and report.token_balance.created == (5,)
        assert set(pv.hash_partitions(conn, p.TOKEN_BALANCE).values()) == {(8, r) for r in range(8)}

        conn.execute('ALTER TABLE "TokenBalance" DETACH PARTITION "TokenBalance_part_3"')
        report = pv.run_horizon(conn, 1, today=date(2025, 1, 1), earliest=START, policy=FAST)
        assert not report.ok
        assert any("TokenBalance_part_3 exists unattached" in msg for msg in report.problems)


def test_a_second_run_waiting_too_long_for_the_run_lock_names_the_holder(db):
    with db.connect() as first, db.connect() as second:
        with pv.run_lock(first):
            impatient = pv.LockPolicy(advisory_wait_s=0.2)
            with pytest.raises(pv.ProvisioningError, match=rf"pid {first.info.backend_pid}"):
                pv.run_horizon(second, 1, today=date(2025, 1, 1), earliest=START, policy=impatient)
        assert attached(second, "PriceSnapshot") == []
        with pytest.raises(ValueError, match="autocommit"):
            with psycopg.connect(db.url) as conn, pv.run_lock(conn):
                pass


def test_checks_inspection_sees_gaps_missing_horizon_and_default_rows(db):
    with db.connect() as conn:
        seed_reference(conn)
        pv.ensure_months(conn, "PriceSnapshot", [date(2025, 1, 1), date(2025, 3, 1)], policy=FAST)
        insert_prices(conn, "2025-02-01 00:00", "2025-02-28 23:59:59.999", "2024-06-01")
        table = pv.inspect_table(conn, "PriceSnapshot")
        assert table.has_default and table.attached == (date(2025, 1, 1), date(2025, 3, 1))
        assert table.default_rows == {date(2024, 6, 1): 1, date(2025, 2, 1): 2}
        assert pv.months_with_default_rows(conn, "PriceSnapshot", date(2020, 1, 1), date(2030, 1, 1)) == [
            date(2024, 6, 1), date(2025, 2, 1)]
        assert pv.months_with_default_rows(conn, "PriceSnapshot", date(2025, 2, 1), date(2025, 3, 1)) == [
            date(2025, 2, 1)]
        assert pv.months_with_default_rows(conn, "PriceSnapshot", date(2024, 7, 1), date(2025, 2, 1)) == []
        assert pv.gap_months(table.covered) == [date(2025, 2, 1)]
        assert pv.missing_horizon_months(table.covered, date(2025, 3, 1), 1) == [date(2025, 4, 1)]
        conn.execute('DROP TABLE "PositionSnapshot_default"')
        assert not pv.inspect_table(conn, "PositionSnapshot").has_default
