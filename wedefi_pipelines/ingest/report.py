"""Row counts of the ingested tables, per table and per monthly child (demo, docs, checks)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p

FLAT_TABLES = ("TokenBalance", "GovernanceLock", "AssetCorrelation", "PriceSnapshot_rejects")


def _count(conn: psycopg.Connection, relation: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(relation))).fetchone()[0]


def rows_per_child(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """(table, child, rows) for every monthly child and default partition of the range tables."""
    rows = []
    for table in p.RANGE_TABLES:
        for month in catalog.attached_months(conn, table):
            child = p.child_name(table, month)
            rows.append((table.name, child, _count(conn, child)))
        rows.append((table.name, p.default_name(table), _count(conn, p.default_name(table))))
    return rows


def rows_per_table(conn: psycopg.Connection) -> dict[str, int]:
    """Rows of every table ingestion writes."""
    return {name: _count(conn, name) for name in (*(t.name for t in p.RANGE_TABLES), *FLAT_TABLES)}


def format_rows(conn: psycopg.Connection) -> str:
    """A printable summary: rows per table, then per monthly child (children with rows only)."""
    lines = [f"{name:<28} {count:>12,}" for name, count in rows_per_table(conn).items()]
    lines += [f"  {child:<40} {count:>12,}" for _table, child, count in rows_per_child(conn) if count]
    return "\n".join(lines)
