"""The bare-table-then-attach primitive and catalog reads, on real PostgreSQL."""

from datetime import date

import psycopg
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p


def _seed_reference(conn):
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
    conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    VALUES ('tok-1', 1, '0x1', 'ONE', 'One', 18, now())""")
    conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "updatedAt") VALUES ('w-1', '0xa', 1, now()),
                    ('w-2', '0xb', 1, now())""")


def test_staged_month_attaches_a_loaded_child_with_its_indexes(db):
    jan = date(2025, 1, 1)
    with psycopg.connect(db.url) as conn:
        _seed_reference(conn)
        with month_ops.staged_month(conn, p.PRICE_SNAPSHOT, jan) as child:
            conn.execute(psycopg.sql.SQL(
                """INSERT INTO {} ("tokenId", "priceUsd", source, "recordedAt")
                   SELECT 'tok-1', 1.5, 'synthetic', '2025-01-01'::timestamp + g * interval '5 minutes'
                     FROM generate_series(0, 8927) g""").format(psycopg.sql.Identifier(child)))
        with month_ops.staged_month(conn, p.PORTFOLIO_SNAPSHOT, jan) as child:
            conn.execute(psycopg.sql.SQL(
                """INSERT INTO {} ("walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                   VALUES ('w-1', 1, 1, '2025-01-02'), ('w-2', 2, 1, '2025-01-02'), (NULL, 3, 2, '2025-01-02')"""
            ).format(psycopg.sql.Identifier(child)))
        conn.commit()
        assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == [jan]
        assert month_ops.attached_months(conn, p.PORTFOLIO_SNAPSHOT) == [jan]
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0] == 8928
        indexes = {r[0] for r in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = '\"PriceSnapshot_2025_01\"'::regclass")}
        assert indexes == {'"PriceSnapshot_2025_01_pkey"', '"PriceSnapshot_2025_01_tokenId_recordedAt_source_key"'}
        constraints = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%bounds'").fetchone()[0]
        assert constraints == 0
        assert conn.execute('SELECT count(*) FROM "PortfolioSnapshot_2025_01_part_0" WHERE "walletId" IS NULL').fetchone()[0] == 1


def test_a_failed_load_leaves_nothing_behind(db):
    feb = date(2025, 2, 1)
    with psycopg.connect(db.url) as conn:
        _seed_reference(conn)
        with pytest.raises(psycopg.errors.CheckViolation):
            with month_ops.staged_month(conn, p.PRICE_SNAPSHOT, feb) as child:
                # a row outside the month: the bounds CHECK refuses it before anything is attached
                conn.execute(psycopg.sql.SQL(
                    """INSERT INTO {} ("tokenId", "priceUsd", source, "recordedAt")
                       VALUES ('tok-1', 1, 's', '2025-03-01 00:00:00')""").format(psycopg.sql.Identifier(child)))
        conn.rollback()
        assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == []
        assert not month_ops.relation_exists(conn, p.child_name(p.PRICE_SNAPSHOT, feb))


def test_staged_month_refuses_autocommit(db):
    with psycopg.connect(db.url, autocommit=True) as conn:
        with pytest.raises(ValueError, match="needs a transaction"):
            with month_ops.staged_month(conn, p.PRICE_SNAPSHOT, date(2025, 1, 1)):
                pass
