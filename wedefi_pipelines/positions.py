"""Completing the app's positions: rows written without "capturedAt" get it and move into their month.

WeDefiDaily writes "PositionSnapshot" rows without "capturedAt" (its
sync-performance.ts); a NULL range key routes them to "PositionSnapshot_default"
(sql/0007). A BEFORE ROW trigger cannot fill the key on the way in (PostgreSQL refuses to
move a row to another partition from one), so `complete_positions` does it afterwards, in
batches: each batch's rows (those whose "PortfolioSnapshot" row exists) are moved out of
the default into a staging table, given their portfolio row's "capturedAt", and moved
into the parent, which routes them to their month; both moves are month_ops.move_rows
(counts verified), in one transaction under provisioning's "PositionSnapshot" lock, so
no row is ever in two places or none. Rows whose portfolio row is missing stay in the
default partition, counted and reported, never dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date

import psycopg
from psycopg import sql

from wedefi_pipelines import locks, month_ops, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)

TABLE = p.POSITION_SNAPSHOT
_STAGE = "wedefi_positions_completing"
_BATCH = "wedefi_positions_batch"

# The portfolio row a waiting position belongs to, and its time (ids are unique in practice;
# the earliest wins if an id was ever written twice).
_PORTFOLIO_TIME = """(SELECT s."capturedAt" FROM "PortfolioSnapshot" s WHERE s.id = {pos}."portfolioSnapshotId"
                      ORDER BY s."capturedAt" LIMIT 1)"""


@dataclass
class Waiting:
    """Rows of the default partition with no "capturedAt" yet."""

    placeable: int  # their "PortfolioSnapshot" row exists: complete_positions completes them
    orphaned: int  # no "PortfolioSnapshot" row with their "portfolioSnapshotId": kept, reported
    first_id: str | None = None  # the placeable rows' smallest and largest ids (new rows change them)
    last_id: str | None = None

    @property
    def total(self) -> int:
        return self.placeable + self.orphaned


def waiting(conn: psycopg.Connection) -> Waiting:
    row = conn.execute(sql.SQL(
        """SELECT count(*) FILTER (WHERE at IS NOT NULL), count(*) FILTER (WHERE at IS NULL),
                  min(id) FILTER (WHERE at IS NOT NULL), max(id) FILTER (WHERE at IS NOT NULL)
             FROM (SELECT d.id, {t} AS at FROM {default} d WHERE d."capturedAt" IS NULL) w""").format(
        t=sql.SQL(_PORTFOLIO_TIME).format(pos=sql.SQL("d")), default=sql.Identifier(p.default_name(TABLE)))).fetchone()
    return Waiting(int(row[0]), int(row[1]), row[2], row[3])


@dataclass
class CompletionReport:
    completed: Counter = field(default_factory=Counter)  # rows moved into each month
    batches: int = 0
    left: Waiting = field(default_factory=lambda: Waiting(0, 0))

    @property
    def rows(self) -> int:
        return sum(self.completed.values())

    def metadata(self) -> dict:
        return {"completed": self.rows, "batches": self.batches,
                "completed_by_month": {p.month_year(m): n for m, n in sorted(self.completed.items())},
                "still_waiting": self.left.placeable, "without_portfolio_row": self.left.orphaned}


def _batch_months(conn: psycopg.Connection, limit: int) -> list[date]:
    """Stage the ids of the next batch (oldest ids first) and return the months they go to."""
    conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (id text PRIMARY KEY, at timestamp(3)) ON COMMIT DROP"
                         ).format(sql.Identifier(_BATCH)))
    conn.execute(sql.SQL(
        """INSERT INTO {batch} (id, at)
           SELECT d.id, {t} FROM {default} d WHERE d."capturedAt" IS NULL AND {t} IS NOT NULL ORDER BY d.id LIMIT %s
        """).format(batch=sql.Identifier(_BATCH), t=sql.SQL(_PORTFOLIO_TIME).format(pos=sql.SQL("d")),
                    default=sql.Identifier(p.default_name(TABLE))), (limit,))
    return [m for (m,) in conn.execute(sql.SQL("SELECT DISTINCT date_trunc('month', at)::date FROM {} ORDER BY 1").format(
        sql.Identifier(_BATCH)))]


def _complete_batch(conn: psycopg.Connection) -> Counter:
    """Move the staged batch: default -> staging (filled) -> parent. Returns rows per month."""
    batch = sql.Identifier(_BATCH)
    conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
        sql.Identifier(_STAGE), sql.Identifier(TABLE.name)))
    taken = sql.SQL('"capturedAt" IS NULL AND id IN (SELECT id FROM {})').format(batch)
    month_ops.move_rows(conn, TABLE, p.default_name(TABLE), _STAGE, taken)
    conn.execute(sql.SQL('UPDATE {stage} s SET "capturedAt" = b.at FROM {batch} b WHERE b.id = s.id').format(
        stage=sql.Identifier(_STAGE), batch=batch))
    months = Counter({m: n for m, n in conn.execute(sql.SQL(
        """SELECT date_trunc('month', "capturedAt")::date, count(*) FROM {} GROUP BY 1""").format(
        sql.Identifier(_STAGE)))})
    month_ops.move_rows(conn, TABLE, _STAGE, TABLE.name, sql.SQL("true"))
    return months


def complete_positions(db: Database, settings: Settings, logger: logging.Logger | None = None,
                       max_batches: int | None = None) -> CompletionReport:
    """Complete every waiting position whose portfolio row exists, one batch per transaction
    (`ingestion.complete_positions_batch` rows), under the `positions.complete` lock."""
    logger = logger or log
    cfg = settings.ingestion
    policy = provisioning.DEFAULT_POLICY  # it holds provisioning's table lock, as a drain does
    report = CompletionReport()
    with db.autocommit("primary") as lock_conn, locks.session_lock(
            lock_conn, "positions.complete", wait_s=policy.advisory_wait_s, what="complete_positions", logger=logger):
        while max_batches is None or report.batches < max_batches:
            with db.connect("primary") as conn:
                months = _batch_months(conn, cfg.complete_positions_batch)
            if not months:
                break
            with db.autocommit("primary") as conn:  # the months exist before the batch moves
                provisioning.ensure_months(conn, TABLE, months)

            def batch(conn: psycopg.Connection) -> Counter:
                if not _batch_months(conn, cfg.complete_positions_batch):
                    return Counter()
                return _complete_batch(conn)

            moved = month_ops.locked_transaction(db, [TABLE], policy, "completing positions", batch, logger)
            if not moved:
                break
            report.completed.update(moved)
            report.batches += 1
            logger.info("complete_positions: %d row(s) moved into %s", sum(moved.values()),
                        ", ".join(p.month_year(m) for m in sorted(moved)))
        with db.connect("primary") as conn:
            report.left = waiting(conn)
    if report.left.orphaned:
        logger.warning("complete_positions: %d position(s) wait in %s without their PortfolioSnapshot row",
                       report.left.orphaned, p.default_name(TABLE))
    return report
