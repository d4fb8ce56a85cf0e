"""Proof, before any swap, that the new tables hold exactly the old tables' rows.

At one REPEATABLE READ snapshot, for each table: the row count and the sum of per-row
64-bit hashes (of the old table's columns, as text) over the old table, against the same
over the new table plus the rows set aside, leaving out the ids still waiting in the
change log (the swap replays those under its lock). A sum of hashes is order-independent
and, unlike an XOR, counts a duplicate twice; with the counts it proves "each row
exactly once". For positions it also proves each row's "capturedAt" is its portfolio's.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.placing import columns_of
from wedefi_pipelines.adoption.session import AdoptionError, old, stage


class VerificationFailed(AdoptionError):
    """The new tables do not hold the old tables' rows; nothing was swapped."""


@dataclass(frozen=True)
class Verified:
    table: str
    old_rows: int
    new_rows: int
    set_aside: int
    waiting: int  # ids left out because they wait in the change log
    old_hash: int
    new_hash: int
    derived_mismatches: int = 0

    @property
    def ok(self) -> bool:
        return (self.old_rows == self.new_rows + self.set_aside and self.old_hash == self.new_hash
                and self.derived_mismatches == 0)

    def describe(self) -> str:
        text = (f"{self.table}: {self.old_rows:,} rows in the old table, {self.new_rows:,} in the new one + "
                f"{self.set_aside:,} set aside ({self.waiting:,} still in the change log, left out)")
        if self.old_hash != self.new_hash:
            text += "; the row contents differ"
        if self.derived_mismatches:
            text += f"; {self.derived_mismatches:,} row(s) do not carry their source row's time"
        return text


def _digest(conn: psycopg.Connection, relation: sql.Composable, columns: list[str], table: str) -> tuple[int, int]:
    row = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns))
    query = sql.SQL("SELECT count(*), coalesce(sum(hashtextextended({row}, 0)::numeric), 0) FROM {rel} r "
                    "WHERE r.id NOT IN (SELECT id FROM {log} WHERE tbl = %s AND id IS NOT NULL)").format(
        row=row, rel=relation, log=stage(L.LOG))
    count, total = conn.execute(query, (table,)).fetchone()
    return count, int(total)


def verify(conn: psycopg.Connection, tables: list[L.Converted]) -> list[Verified]:
    results = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SET LOCAL work_mem = '64MB'")
        for table in tables:
            columns = [n for n, _ in columns_of(conn, L.APP_SCHEMA, table.name)]
            waiting = conn.execute(sql.SQL("SELECT count(DISTINCT id) FROM {} WHERE tbl = %s").format(stage(L.LOG)),
                                   (table.name,)).fetchone()[0]
            truncated = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE tbl = %s AND id IS NULL)").format(
                stage(L.LOG)), (table.name,)).fetchone()[0]
            old_rows, old_hash = _digest(conn, old(table.name), columns, table.name)
            new_rows, new_hash = _digest(conn, stage(table.name), columns, table.name)
            aside = sql.SQL("(SELECT (jsonb_populate_record(NULL::{}, u.\"row\")).* FROM {} u WHERE u.tbl = {})").format(
                old(table.name), sql.Identifier(L.APP_SCHEMA, L.UNPLACED), sql.Literal(table.name))
            aside_rows, aside_hash = _digest(conn, aside, columns, table.name)
            mismatches = 0
            if table.derived is not None:
                d = table.derived
                mismatches = conn.execute(sql.SQL(
                    "SELECT count(*) FROM {new} n LEFT JOIN {source} s ON s.id = n.{via} "
                    "WHERE n.{col} IS DISTINCT FROM s.{src} "
                    "AND n.id NOT IN (SELECT id FROM {log} WHERE tbl = %s AND id IS NOT NULL)").format(
                    new=stage(table.name), source=old(d.source_table), via=sql.Identifier(d.via),
                    col=sql.Identifier(d.column), src=sql.Identifier(d.source_column), log=stage(L.LOG)),
                    (table.name,)).fetchone()[0]
            result = Verified(table.name, old_rows, new_rows, aside_rows, waiting, old_hash, new_hash + aside_hash,
                              mismatches)
            if truncated:  # the app truncated the table: not comparable until the replay reconciles it
                result = Verified(table.name, old_rows, new_rows, aside_rows, waiting, old_hash, old_hash + 1, 0)
            results.append(result)
    return results
