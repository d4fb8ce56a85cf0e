"""The schema: WeDefiDaily's tables with the declared partitioning, applied by a safe runner."""

import shutil
import threading

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines.migrations import MigrationError, default_sql_dir, migrate

CATALOG = """
SELECT c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid),
       (SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                         || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '') ORDER BY a.attnum)
          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT array_agg(conname || ' ' || pg_get_constraintdef(oid) ORDER BY conname) FROM pg_constraint WHERE conrelid = c.oid),
       (SELECT array_agg(pg_get_indexdef(indexrelid) ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indrelid = c.oid)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
 ORDER BY c.relname
"""

PARTITIONING = """
SELECT c.relname, p.partstrat,
       (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(p.partattrs) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum),
       (SELECT array_agg(ch.relname ORDER BY ch.relname) FROM pg_inherits i JOIN pg_class ch ON ch.oid = i.inhrelid
         WHERE i.inhparent = c.oid)
  FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid
 ORDER BY c.relname
"""

APP_TABLES = {
    "Chain", "Wallet", "Protocol", "Token", "TokenBalance", "PriceSnapshot", "PortfolioSnapshot",
    "PositionSnapshot", "GovernanceLock", "AssetCorrelation", "Alert", "AlertDelivery",
    "PriceSnapshot_archive_metadata", "PortfolioSnapshot_archive_metadata", "PositionSnapshot_archive_metadata",
}


def test_schema_applies_twice_with_no_change(db):
    with db.connect() as conn:
        before = conn.execute(CATALOG).fetchall()
    result = migrate(db.url)
    assert result.applied == []
    assert result.already_applied == sorted(p.name for p in default_sql_dir().glob("*.sql"))
    with db.connect() as conn:
        assert conn.execute(CATALOG).fetchall() == before


def test_every_table_exists_with_its_partitioning(db):
    with db.connect() as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND relkind IN ('r','p') AND NOT relispartition")}
        partitioning = {r[0]: r[1:] for r in conn.execute(PARTITIONING)}
        assert APP_TABLES <= tables
        assert partitioning["PriceSnapshot"] == ("r", ["recordedAt"], ["PriceSnapshot_default"])
        assert partitioning["PortfolioSnapshot"] == ("r", ["capturedAt"], ["PortfolioSnapshot_default"])
        assert partitioning["PositionSnapshot"] == ("r", ["capturedAt"], ["PositionSnapshot_default"])
        assert partitioning["TokenBalance"] == ("h", ["walletId"], [f"TokenBalance_part_{i}" for i in range(8)])
        bounds = dict(conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = '\"TokenBalance\"'::regclass").fetchall())
        assert bounds["TokenBalance_part_3"] == "FOR VALUES WITH (modulus 8, remainder 3)"
        # keys include every partition column; the app's names are kept
        keys = dict(conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype IN ('p','u') "
            "AND conrelid IN ('\"PriceSnapshot\"'::regclass, '\"PortfolioSnapshot\"'::regclass, "
            "'\"PositionSnapshot\"'::regclass, '\"TokenBalance\"'::regclass)").fetchall())
        assert keys["PriceSnapshot_pkey"] == 'PRIMARY KEY (id, "recordedAt")'
        assert keys["PositionSnapshot_id_capturedAt_key"] == 'UNIQUE NULLS NOT DISTINCT (id, "capturedAt")'  # 0007
        assert keys["TokenBalance_pkey"] == 'PRIMARY KEY (id, "walletId")'
        assert keys["PortfolioSnapshot_id_capturedAt_walletId_key"] == 'UNIQUE NULLS NOT DISTINCT (id, "capturedAt", "walletId")'
        # Prisma's column types
        types = dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = '\"PriceSnapshot\"'::regclass AND attnum > 0").fetchall())
        assert types == {"id": "text", "tokenId": "text", "priceUsd": "numeric(36,18)", "source": "character varying(32)",
                         "recordedAt": "timestamp(3) without time zone", "createdAt": "timestamp(3) without time zone"}
        assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                            "'\"TokenBalance\"'::regclass AND attname = 'quantity'").fetchone()[0] == "numeric(65,30)"
        # no secondary index on the range-partitioned parents: provisioning makes them per child
        parent_indexes = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid IN ('\"PriceSnapshot\"'::regclass, "
            "'\"PortfolioSnapshot\"'::regclass, '\"PositionSnapshot\"'::regclass) AND NOT indisunique").fetchall()
        assert parent_indexes == []


def _insert_all_wallets_row(conn, id_):
    conn.execute(
        'INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt") '
        "VALUES (%s, NULL, 123.45, 3, '2025-01-05 10:00:00')", (id_,))


def test_all_wallets_portfolio_row_is_stored_once(db):
    with db.connect() as conn:
        _insert_all_wallets_row(conn, "all-1")
        with pytest.raises(psycopg.errors.UniqueViolation):
            _insert_all_wallets_row(conn, "all-1")
        rows = conn.execute('SELECT id, "walletId", tableoid::regclass::text FROM "PortfolioSnapshot"').fetchall()
    # no monthly child yet: the row is kept in the default partition, never rejected
    assert rows == [("all-1", None, '"PortfolioSnapshot_default"')]


def test_edited_migration_is_refused_naming_the_file(db, tmp_path):
    sql_dir = tmp_path / "sql"
    shutil.copytree(default_sql_dir(), sql_dir)
    (sql_dir / "0999_test_extra.sql").write_text('CREATE TABLE IF NOT EXISTS "Extra" (id int);\n')
    assert migrate(db.url, sql_dir).applied == ["0999_test_extra.sql"]
    (sql_dir / "0999_test_extra.sql").write_text('CREATE TABLE IF NOT EXISTS "Extra" (id bigint);\n')
    with pytest.raises(MigrationError, match="0999_test_extra.sql was changed after it was applied"):
        migrate(db.url, sql_dir)


def test_failing_migration_names_the_file_and_applies_nothing_of_it(db, tmp_path):
    sql_dir = tmp_path / "sql"
    shutil.copytree(default_sql_dir(), sql_dir)
    (sql_dir / "0998_test_broken.sql").write_text('CREATE TABLE "Half" (id int);\nCREATE TABLE oops oops;\n')
    with pytest.raises(MigrationError, match="0998_test_broken.sql failed"):
        migrate(db.url, sql_dir)
    with db.connect() as conn:
        assert conn.execute("SELECT to_regclass('\"Half\"')").fetchone()[0] is None


def test_two_concurrent_runners_apply_each_file_once(stack):
    name = "t_concurrent_migrate"
    stack.create_database(name)
    url = stack.primary.url(name)
    results, errors = [], []

    def run():
        try:
            results.append(migrate(url))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        applied = sorted(sum((r.applied for r in results), []))
        assert applied == sorted(p.name for p in default_sql_dir().glob("*.sql"))
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM wedefi_schema_migrations").fetchone()[0] == len(applied)
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
