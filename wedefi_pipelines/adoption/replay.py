"""Bringing the new tables up to date with what the app changed since capture began.

The log holds ids, not changes. Replaying an id re-reads that row from the old table:
delete it from the new table (and from the rows set aside), then place the current row
(or nothing, if the app deleted it). Replaying an id twice, or out of order, gives the
same result, so the log needs no ordering guarantees and a killed replay is simply
replayed again. A NULL id (the app truncated the table) reconciles the whole table.

Correctness rests on one rule: the copy and the replay run one after the other in one
session. Any copy that read a row before the app changed it finished before the replay
that re-reads the row began, so the last word on every row is the replay's.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption import state
from wedefi_pipelines.adoption.placing import Shaping, place
from wedefi_pipelines.adoption.session import old, stage


class Replayer:
    """Replays the log of the given tables on one connection (their shadows in the staging schema)."""

    def __init__(self, conn: psycopg.Connection, tables: list[L.Converted] | tuple[L.Converted, ...]):
        self.conn = conn
        self.tables = list(tables)
        self.shapings = {t.name: Shaping(conn, t) for t in self.tables}
        self.replayed = 0
        self.set_aside = 0

    def batch(self, table: L.Converted, limit: int) -> int:
        """Replay up to `limit` logged changes of `table` in one transaction (a savepoint when
        the caller's transaction is open, as in the swap). Returns how many were consumed."""
        conn = self.conn
        with conn.transaction():
            conn.execute("SELECT set_config(%s, 'on', true)", (L.ROW_MOVE_SETTING,))
            ids = [r[0] for r in conn.execute(sql.SQL(
                "DELETE FROM {log} WHERE seq IN (SELECT seq FROM {log} WHERE tbl = %s ORDER BY seq LIMIT %s) RETURNING id"
            ).format(log=stage(L.LOG)), (table.name, limit))]
            if not ids:
                return 0
            if None in ids:
                self._reconcile(table)
            keys = sorted({i for i in ids if i is not None})
            if keys:
                conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(stage(table.name)), (keys,))
                conn.execute(sql.SQL("DELETE FROM {} WHERE tbl = %s AND id = ANY(%s)").format(
                    sql.Identifier(L.APP_SCHEMA, L.UNPLACED)), (table.name, keys))
                shaping = self.shapings[table.name]
                _, kept = place(conn, shaping, shaping.select(sql.SQL("s.id = ANY(%s)")), (keys,))
                self.set_aside += kept
        self.replayed += len(ids)
        return len(ids)

    def _reconcile(self, table: L.Converted) -> None:
        """After a TRUNCATE of the old table: drop every new row whose id is gone from it."""
        for target in (stage(table.name),):
            self.conn.execute(sql.SQL("DELETE FROM {} n WHERE NOT EXISTS (SELECT 1 FROM {} o WHERE o.id = n.id)").format(
                target, old(table.name)))
        self.conn.execute(sql.SQL("DELETE FROM {} u WHERE u.tbl = %s AND NOT EXISTS (SELECT 1 FROM {} o "
                                  "WHERE o.id = u.id)").format(sql.Identifier(L.APP_SCHEMA, L.UNPLACED),
                                                               old(table.name)), (table.name,))

    def drain(self, batch: int, until: int = 0) -> int:
        """Replay until at most `until` changes of these tables wait in the log."""
        names = [t.name for t in self.tables]
        done = 0
        while state.pending(self.conn, names) > until:
            for table in self.tables:
                done += self.batch(table, batch)
        return done
