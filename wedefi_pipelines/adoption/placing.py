"""Rows of an old table, shaped for the new one, placed in it or kept aside: never dropped.

The new layout adds constraints the app's tables never had: a unique key per month
("PriceSnapshot": "tokenId", "recordedAt", source), a time column a position takes from
its portfolio row. A row that cannot satisfy them (a duplicate tick, a position whose
portfolio row is missing while "capturedAt" is NOT NULL) is kept whole, as jsonb, in
`public.wedefi_adopt_unplaced` with the reason, counted and reported.
`jsonb_populate_record(NULL::"PriceSnapshot", "row")` gives it back.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.session import old, stage

CONFLICT_REASON = "conflicts with a unique key of the partitioned layout (a duplicate row)"


def columns_of(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, bool]]:
    """(name, NOT NULL) of the relation's live columns in physical order."""
    return [(n, nn) for n, nn in conn.execute(
        "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum", (sql.Identifier(schema, table).as_string(conn),))]


class Shaping:
    """How rows of the old table become rows of the new one (columns in the new order)."""

    def __init__(self, conn: psycopg.Connection, table: L.Converted, new_schema: str = L.STAGE):
        self.table = table
        self.new = columns_of(conn, new_schema, table.name)
        self.old = [n for n, _ in columns_of(conn, L.APP_SCHEMA, table.name)]
        derived = table.derived.column if table.derived else None
        self.columns = [n for n, _ in self.new if n in self.old or n == derived]
        self.time_not_null = dict(self.new).get(table.time_column or "", False)

    def select(self, where: sql.Composable, alias: str = "s") -> sql.Composed:
        """SELECT the new columns from the old table (and the derived column from its
        source row, LEFT JOINed so a missing source gives NULL) WHERE `where`."""
        a = sql.Identifier(alias)
        exprs = []
        d = self.table.derived
        for name in self.columns:
            if d is not None and name == d.column and name not in self.old:
                exprs.append(sql.SQL("d.{} AS {}").format(sql.Identifier(d.source_column), sql.Identifier(name)))
            else:
                exprs.append(sql.SQL("{}.{}").format(a, sql.Identifier(name)))
        query = sql.SQL("SELECT {} FROM {} {}").format(sql.SQL(", ").join(exprs), old(self.table.name), a)
        if d is not None and d.column not in self.old:
            query += sql.SQL(" LEFT JOIN {} d ON d.id = {}.{}").format(old(d.source_table), a, sql.Identifier(d.via))
        return query + sql.SQL(" WHERE ") + where

    @property
    def null_time_reason(self) -> str:
        d = self.table.derived
        if d is not None:
            return (f'its "{d.source_table}" row is missing, so it has no "{d.column}" '
                    f'(NOT NULL in the partitioned layout)')
        return f'no "{self.table.time_column}"'

    def column_list(self) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)


def place(conn: psycopg.Connection, shaping: Shaping, source: sql.Composable, params=None,
          target: sql.Identifier | None = None) -> tuple[int, int]:
    """Insert `source` (rows in `shaping.columns` order) into the new table; keep the rows it
    refuses in the unplaced table. Returns (placed, kept aside)."""
    table = shaping.table
    target = target or stage(table.name)
    cols = shaping.column_list()
    time = sql.Identifier(table.time_column) if table.time_column else None
    placeable = sql.SQL("{} IS NOT NULL").format(time) if (time is not None and shaping.time_not_null) else sql.SQL("true")
    reason = (sql.SQL("CASE WHEN s.{} IS NULL THEN {} ELSE {} END").format(
        time, sql.Literal(shaping.null_time_reason), sql.Literal(CONFLICT_REASON))
        if time is not None and shaping.time_not_null else sql.Literal(CONFLICT_REASON))
    query = sql.SQL("""
WITH src AS MATERIALIZED ({source}),
ins AS (INSERT INTO {target} ({cols}) SELECT {cols} FROM src WHERE {placeable} ON CONFLICT DO NOTHING RETURNING id),
kept AS (INSERT INTO {unplaced} (tbl, id, reason, "row")
         SELECT {name}, s.id, {reason}, to_jsonb(s) FROM src s WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = s.id)
         ON CONFLICT (tbl, id) DO UPDATE SET reason = EXCLUDED.reason, "row" = EXCLUDED."row", placed_at = now()
         RETURNING 1)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM kept)""").format(
        source=source, target=target, cols=cols, placeable=placeable, unplaced=sql.Identifier(L.APP_SCHEMA, L.UNPLACED),
        name=sql.Literal(table.name), reason=reason)
    placed, kept = conn.execute(query, params).fetchone()
    return placed, kept


def set_aside(conn: psycopg.Connection, table: L.Converted, relation: sql.Identifier, where: sql.Composable,
              reason: str, params=None) -> int:
    """Move the rows of `relation` matching `where` into the unplaced table (one statement)."""
    query = sql.SQL("""
WITH moved AS (DELETE FROM {rel} m WHERE {where} RETURNING m.*)
INSERT INTO {unplaced} (tbl, id, reason, "row") SELECT {name}, moved.id, {reason}, to_jsonb(moved) FROM moved
ON CONFLICT (tbl, id) DO UPDATE SET reason = EXCLUDED.reason, "row" = EXCLUDED."row", placed_at = now()""").format(
        rel=relation, where=where, unplaced=sql.Identifier(L.APP_SCHEMA, L.UNPLACED), name=sql.Literal(table.name),
        reason=sql.Literal(reason))
    return conn.execute(query, params).rowcount
