"""sql/0007_app_compat.sql: positions without "capturedAt", and the PortfolioSnapshot ->
PositionSnapshot cascades the app's schema declares, on PostgreSQL 18 and 15."""

from __future__ import annotations

import shutil
from datetime import date

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.migrations import default_sql_dir, migrate

JAN, FEB = date(2025, 1, 1), date(2025, 2, 1)


def provision(conn, *months):
    for table in (p.PORTFOLIO_SNAPSHOT, p.POSITION_SNAPSHOT):
        for month in months:
            for statement in p.create_child_sql(table, month):
                conn.execute(statement)


def reference_rows(conn):
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'c', now());
                    INSERT INTO "Wallet" (id, address, "chainId", "updatedAt") VALUES ('w1', '0x1', 1, now());
                    INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    VALUES ('t1', 1, '0x1', 'T', 'T', 18, now())""")


def portfolio(conn, id_, captured_at, wallet="w1"):
    conn.execute("""INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                    VALUES (%s, %s, 1, 1, %s)""", (id_, wallet, captured_at))


def position(conn, id_, portfolio_id, captured_at=None):
    """As the app writes it (no "capturedAt"), or as the pipeline writes it (with its portfolio's)."""
    conn.execute("""INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity,
                    "usdValue", "priceUsd", "positionType", "capturedAt") VALUES (%s, %s, 't1', 'w1', 1, 1, 1, 'liquid', %s)""",
                 (id_, portfolio_id, captured_at))


def positions(conn):
    return conn.execute("""SELECT id, "portfolioSnapshotId", tableoid::regclass::text FROM "PositionSnapshot"
                           ORDER BY id""").fetchall()


@pytest.fixture
def conn(db):
    with db.connect() as connection:
        reference_rows(connection)
        yield connection


def test_0007_applies_over_existing_children_and_rows_and_keeps_them(stack, tmp_path):
    """An existing database: monthly children and default rows made under 0002's primary key."""
    before, through = tmp_path / "before", tmp_path / "through"
    for folder, last in ((before, "0006"), (through, "0007")):
        folder.mkdir()
        for path in default_sql_dir().glob("*.sql"):
            if path.name[:4] <= last:
                shutil.copy(path, folder)
    name = "t_before_0007"
    stack.create_database(name)
    url = stack.primary.url(name)
    try:
        migrate(url, before)
        with psycopg.connect(url, autocommit=True) as conn:
            reference_rows(conn)
            provision(conn, JAN)
            portfolio(conn, "p1", "2025-01-05")
            position(conn, "x1", "p1", "2025-01-05")
            position(conn, "x2", "p1", "2025-03-05")  # no March child: in the default partition
            assert migrate(url, through).applied == ["0007_app_compat.sql"]
            assert migrate(url, through).applied == []
            keys = dict(conn.execute("""SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
                                         WHERE contype IN ('p', 'u') AND conrelid::regclass::text LIKE '"PositionSnapshot%'
                                           AND conrelid::regclass::text NOT LIKE '%archive%'""").fetchall())
            assert keys == {rel: 'UNIQUE NULLS NOT DISTINCT (id, "capturedAt")' for rel in (
                '"PositionSnapshot"', '"PositionSnapshot_2025_01"', '"PositionSnapshot_default"')}
            assert positions(conn) == [("x1", "p1", '"PositionSnapshot_2025_01"'), ("x2", "p1", '"PositionSnapshot_default"')]
            provision(conn, FEB)  # a child made after 0007 gets the key too
            assert conn.execute("""SELECT count(*) FROM pg_constraint WHERE conrelid = '"PositionSnapshot_2025_02"'::regclass
                                   AND contype = 'u'""").fetchone()[0] == 1
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_position_without_captured_at_waits_in_the_default_partition(conn):
    provision(conn, JAN)
    portfolio(conn, "p1", "2025-01-05")
    position(conn, "x1", "p1")
    assert conn.execute("""SELECT tableoid::regclass::text, "capturedAt" FROM "PositionSnapshot" """).fetchall() == [
        ('"PositionSnapshot_default"', None)]
    with pytest.raises(psycopg.errors.UniqueViolation, match="PositionSnapshot_default_id_capturedAt_key"):
        position(conn, "x1", "p1")  # NULLS NOT DISTINCT: two waiting rows cannot share an id
    with pytest.raises(psycopg.errors.CheckViolation):  # a month's child still refuses NULL
        conn.execute("""INSERT INTO "PositionSnapshot_2025_01" (id, "portfolioSnapshotId", "tokenId", "walletId",
                        quantity, "usdValue", "priceUsd", "positionType") VALUES ('x9', 'p1', 't1', 'w1', 1, 1, 1, 'l')""")


def test_deleting_a_portfolio_snapshot_deletes_its_positions_in_every_partition(conn):
    provision(conn, JAN)
    portfolio(conn, "p1", "2025-01-05")
    portfolio(conn, "p2", "2025-01-06")
    position(conn, "x1", "p1", "2025-01-05")
    position(conn, "x2", "p1")  # waiting in the default partition
    position(conn, "x3", "p2", "2025-01-06")
    assert conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE id = 'p1'""").rowcount == 1
    assert positions(conn) == [("x3", "p2", '"PositionSnapshot_2025_01"')]


def test_a_move_across_partitions_is_not_a_delete(conn):
    """INSERT-then-DELETE (the pipeline's row mover) and an UPDATE of "capturedAt" keep the positions."""
    provision(conn, JAN, FEB)
    portfolio(conn, "p1", "2025-01-05")
    position(conn, "x1", "p1")
    with conn.transaction():  # the row mover's shape, without its setting: the id still exists, so no cascade
        portfolio(conn, "p1", "2025-02-05")
        conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE id = 'p1' AND "capturedAt" = '2025-01-05'""")
    conn.execute("""UPDATE "PortfolioSnapshot" SET "capturedAt" = '2025-01-07' WHERE id = 'p1'""")
    assert positions(conn) == [("x1", "p1", '"PositionSnapshot_default"')]
    [(where,)] = conn.execute("""SELECT tableoid::regclass::text FROM "PortfolioSnapshot" """).fetchall()
    assert where.startswith('"PortfolioSnapshot_2025_01_part_')


def test_the_row_move_setting_turns_both_triggers_off_for_its_transaction_only(conn):
    provision(conn, JAN)
    portfolio(conn, "p1", "2025-01-05")
    portfolio(conn, "p2", "2025-01-06")
    position(conn, "x1", "p1")
    position(conn, "x2", "p2")
    with conn.transaction():
        conn.execute("SELECT set_config('wedefi.row_move', 'on', true)")
        conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE id = 'p1'""")
        conn.execute("""UPDATE "PortfolioSnapshot" SET id = 'p2b' WHERE id = 'p2'""")
    assert positions(conn) == [("x1", "p1", '"PositionSnapshot_default"'), ("x2", "p2", '"PositionSnapshot_default"')]
    conn.execute("""UPDATE "PortfolioSnapshot" SET id = 'p2' WHERE id = 'p2b'""")  # the setting ended with its transaction
    conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE id = 'p2'""")
    assert positions(conn) == [("x1", "p1", '"PositionSnapshot_default"')]


def test_changing_a_portfolio_snapshot_id_repoints_its_positions(conn):
    """onUpdate: Cascade, also when the same UPDATE moves the row to another month."""
    provision(conn, JAN, FEB)
    portfolio(conn, "p1", "2025-01-05")
    position(conn, "x1", "p1", "2025-01-05")
    position(conn, "x2", "p1")
    conn.execute("""UPDATE "PortfolioSnapshot" SET id = 'p1b' WHERE id = 'p1'""")
    assert {r[1] for r in positions(conn)} == {"p1b"}
    conn.execute("""UPDATE "PortfolioSnapshot" SET id = 'p1c', "capturedAt" = '2025-02-01' WHERE id = 'p1b'""")
    assert {r[1] for r in positions(conn)} == {"p1c"}
    portfolio(conn, "q1", "2025-01-08")
    position(conn, "y1", "q1")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="changed 2 ids into 2 new ids"):
        conn.execute("""UPDATE "PortfolioSnapshot" SET id = id || '-renamed'""")
    assert {r[1] for r in positions(conn)} == {"p1c", "q1"}  # the failed statement changed nothing


def test_a_delete_aimed_at_one_partition_does_not_cascade(conn):
    """The statement trigger lives on the parent: the app (and Prisma) always delete through it;
    only this project's own row movers address a partition directly."""
    provision(conn, JAN)
    portfolio(conn, "p1", "2025-03-05")  # no March child: the default partition
    position(conn, "x1", "p1")
    conn.execute("""DELETE FROM "PortfolioSnapshot_default" WHERE id = 'p1'""")
    assert positions(conn) == [("x1", "p1", '"PositionSnapshot_default"')]


def test_a_bulk_delete_cascades_in_one_statement(conn):
    """Statement-level triggers with transition tables: one set-based delete per statement."""
    levels = dict(conn.execute("""SELECT tgname, (tgtype & 1) = 1 FROM pg_trigger
                                   WHERE tgrelid = '"PortfolioSnapshot"'::regclass AND NOT tgisinternal""").fetchall())
    assert levels == {"PortfolioSnapshot_delete_positions": False, "PortfolioSnapshot_update_positions": False}
    provision(conn, JAN)
    conn.execute("""INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                    SELECT 'p' || i, 'w1', 1, 1, timestamp '2025-01-01' + i * interval '1 minute'
                      FROM generate_series(1, 2000) i""")
    conn.execute("""INSERT INTO "PositionSnapshot" ("portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue",
                    "priceUsd", "positionType", "capturedAt")
                    SELECT 'p' || i, 't1', 'w1', 1, 1, 1, 'liquid', CASE WHEN j = 1 THEN NULL
                           ELSE timestamp '2025-01-01' + i * interval '1 minute' END
                      FROM generate_series(1, 2000) i, generate_series(1, 3) j""")
    deleted = conn.execute("""DELETE FROM "PortfolioSnapshot" WHERE "capturedAt" < '2025-01-01 20:00'""").rowcount
    remaining = conn.execute("""SELECT count(*), count(DISTINCT "portfolioSnapshotId") FROM "PositionSnapshot" """).fetchone()
    assert deleted == 1199 and remaining == (3 * (2000 - 1199), 2000 - 1199)


def test_every_relation_of_the_partitioned_tables_keeps_the_apps_actions(db):
    """The app's schema: every relation into or out of the four partitioned tables, with its
    onDelete/onUpdate (Prisma's default onUpdate is Cascade). All are database FKs but one,
    PositionSnapshot.portfolioSnapshot, whose two actions are 0007's triggers."""
    with db.connect() as conn:
        fks = set(conn.execute("""
            SELECT conrelid::regclass::text, confrelid::regclass::text, confdeltype, confupdtype
              FROM pg_constraint
             WHERE contype = 'f' AND conparentid = 0
               AND (conrelid IN ('"TokenBalance"'::regclass, '"PriceSnapshot"'::regclass,
                                 '"PortfolioSnapshot"'::regclass, '"PositionSnapshot"'::regclass)
                    OR confrelid IN ('"TokenBalance"'::regclass, '"PriceSnapshot"'::regclass,
                                     '"PortfolioSnapshot"'::regclass, '"PositionSnapshot"'::regclass))""").fetchall())
        triggers = {r[0] for r in conn.execute("""SELECT tgname FROM pg_trigger
                                                   WHERE tgrelid = '"PortfolioSnapshot"'::regclass AND NOT tgisinternal""")}
    cascade, set_null = "c", "n"
    assert fks == {
        ('"TokenBalance"', '"Wallet"', cascade, cascade), ('"TokenBalance"', '"Token"', cascade, cascade),
        ('"PriceSnapshot"', '"Token"', cascade, cascade),
        ('"PortfolioSnapshot"', '"Wallet"', cascade, cascade),
        ('"PositionSnapshot"', '"Token"', cascade, cascade), ('"PositionSnapshot"', '"Wallet"', cascade, cascade),
        ('"PositionSnapshot"', '"Protocol"', set_null, cascade),
    }
    assert triggers == {"PortfolioSnapshot_delete_positions", "PortfolioSnapshot_update_positions"}
