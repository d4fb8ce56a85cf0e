"""Where an adoption stands, kept in the database it converts (so a re-run resumes).

Every step records itself in the same transaction that does its work: a step is either
done and recorded, or neither. The records live in the staging schema and go with it at
the end; a finished adoption is recognised by its result (the four tables partitioned,
no staging schema), not by a record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from wedefi_pipelines.adoption import layout as L


def create_bookkeeping(conn: psycopg.Connection) -> None:
    """The staging schema's own tables (in the caller's transaction) and the kept table of unplaced rows."""
    conn.execute(sql.SQL("""
        CREATE TABLE {state} (step TEXT PRIMARY KEY, detail JSONB, done_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
        CREATE TABLE {progress} (tbl TEXT PRIMARY KEY, next_block BIGINT NOT NULL, end_block BIGINT NOT NULL,
                                 first_month DATE, last_month DATE, copied BIGINT NOT NULL DEFAULT 0);
        CREATE TABLE {log} (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tbl TEXT NOT NULL, id TEXT);
        CREATE INDEX ON {log} (tbl, seq);
        CREATE TABLE IF NOT EXISTS {unplaced} (
            tbl TEXT NOT NULL, id TEXT NOT NULL, reason TEXT NOT NULL, "row" JSONB NOT NULL,
            placed_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (tbl, id));
        COMMENT ON TABLE {unplaced} IS 'Rows of the app''s tables that wedefi-pipelines adopt could not place in the '
            'partitioned layout (a duplicate of a unique key it adds, a position whose portfolio row is missing), '
            'kept whole in "row" (jsonb_populate_record restores them); see docs/adoption.md';
    """).format(state=sql.Identifier(L.STAGE, L.STATE), progress=sql.Identifier(L.STAGE, L.PROGRESS),
                log=sql.Identifier(L.STAGE, L.LOG), unplaced=sql.Identifier(L.APP_SCHEMA, L.UNPLACED)))


def schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    return conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,)).fetchone()[0]


def in_progress(conn: psycopg.Connection) -> bool:
    """An adoption has staged its work and not finished."""
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (sql.Identifier(L.STAGE, L.STATE).as_string(conn),)).fetchone()[0]


def done(conn: psycopg.Connection, step: str) -> bool:
    return conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE step = %s)").format(
        sql.Identifier(L.STAGE, L.STATE)), (step,)).fetchone()[0]


def detail(conn: psycopg.Connection, step: str):
    row = conn.execute(sql.SQL("SELECT detail FROM {} WHERE step = %s").format(sql.Identifier(L.STAGE, L.STATE)),
                       (step,)).fetchone()
    return row[0] if row else None


def mark(conn: psycopg.Connection, step: str, detail_value=None) -> None:
    """Record `step` as done, in the caller's transaction (so with the step's own work)."""
    conn.execute(sql.SQL("INSERT INTO {} (step, detail) VALUES (%s, %s)").format(sql.Identifier(L.STAGE, L.STATE)),
                 (step, Jsonb(detail_value) if detail_value is not None else None))


def steps(conn: psycopg.Connection) -> list[tuple[str, object]]:
    return [(s, d) for s, d in conn.execute(
        sql.SQL("SELECT step, detail FROM {} ORDER BY done_at, step").format(sql.Identifier(L.STAGE, L.STATE)))]


@dataclass
class CopyProgress:
    table: str
    next_block: int
    end_block: int
    first_month: object
    last_month: object
    copied: int

    @property
    def finished(self) -> bool:
        return self.next_block >= self.end_block


def progress(conn: psycopg.Connection, table: str) -> CopyProgress | None:
    row = conn.execute(sql.SQL("SELECT tbl, next_block, end_block, first_month, last_month, copied FROM {} "
                               "WHERE tbl = %s").format(sql.Identifier(L.STAGE, L.PROGRESS)), (table,)).fetchone()
    return CopyProgress(*row) if row else None


def pending(conn: psycopg.Connection, tables: tuple[str, ...] | list[str]) -> int:
    """Changes logged for these tables and not replayed yet."""
    return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE tbl = ANY(%s)").format(
        sql.Identifier(L.STAGE, L.LOG)), (list(tables),)).fetchone()[0]


def unplaced_counts(conn: psycopg.Connection) -> dict[str, dict[str, int]]:
    """Rows kept outside the new tables, by table and reason."""
    if not conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (sql.Identifier(L.APP_SCHEMA, L.UNPLACED).as_string(conn),)).fetchone()[0]:
        return {}
    found: dict[str, dict[str, int]] = {}
    for table, reason, count in conn.execute(sql.SQL(
            "SELECT tbl, reason, count(*) FROM {} GROUP BY 1, 2 ORDER BY 1, 2").format(
            sql.Identifier(L.APP_SCHEMA, L.UNPLACED))):
        found.setdefault(table, {})[reason] = count
    return found


def as_json(value) -> str:
    return json.dumps(value, default=str)
