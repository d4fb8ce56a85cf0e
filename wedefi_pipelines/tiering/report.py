"""Run every tier move that is due, and describe each month's tier (the demo prints it).

`apply_due` does in one call what the daily schedule requests as runs: warm conversion of
the months that turned warm, cold archive of the months that turned cold (or were left
frozen, or have late rows). `month_tiers` reads back, from the catalog, the metadata and
the archive tables (never from what the moves claimed), where every month now lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import psycopg
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering import state
from wedefi_pipelines.tiering.archive import ArchiveOutcome, Archiver
from wedefi_pipelines.tiering.policy import Tier, classify, due_months, groups
from wedefi_pipelines.tiering.warm import WarmOutcome, warm_month


@dataclass
class DueRun:
    warmed: list[WarmOutcome] = field(default_factory=list)
    archived: list[ArchiveOutcome] = field(default_factory=list)


def apply_due(db: Database, store: ArchiveStore, now: datetime | None = None,
              logger: logging.Logger | None = None) -> DueRun:
    """Warm and archive every month that is due now, oldest first."""
    now = now or datetime.now(timezone.utc)
    settings = db.settings
    with db.connect("primary") as conn:
        states = state.month_states(conn, now, settings)
    due = due_months(states, now, {t.name: settings.tiers.for_table(t.name) for t in p.RANGE_TABLES})
    run = DueRun()
    for month in due.warm:
        for table in p.RANGE_TABLES:
            run.warmed.append(warm_month(db, table, month, now=now, logger=logger))
    archiver = Archiver(db, store, logger=logger)
    for month in due.cold:
        for group in groups():
            run.archived.append(archiver.archive_month(group, month, now=now))
    return run


@dataclass
class MonthTier:
    table: str
    month: date
    tier: str  # hot | warm | warm (not converted) | cold | frozen | restored ...
    rows: int
    objects: list[tuple[str, int]] = field(default_factory=list)  # (s3 uri, bytes)


def month_tiers(db: Database, store: ArchiveStore, now: datetime | None = None) -> list[MonthTier]:
    """Where each month of each range table lives now, read back from the database."""
    now = now or datetime.now(timezone.utc)
    out: list[MonthTier] = []
    with db.connect("primary") as conn:
        for table in p.RANGE_TABLES:
            ages = db.settings.tiers.for_table(table.name)
            status = state.metadata_status(conn, table)
            frozen = state.all_frozen(conn, table)
            for month in month_ops.attached_months(conn, table):
                rows = conn.execute(sql.SQL("SELECT count(*), max({}) FROM {}").format(
                    sql.Identifier(table.time_column), sql.Identifier(p.child_name(table, month)))).fetchone()
                tier = classify(month, rows[1], now, ages).tier
                converted = state.warm_layout_state(conn, table, month)[1]
                if tier is Tier.HOT:
                    label = "hot"
                elif tier is Tier.WARM:
                    label = "warm (rewritten, BRIN, frozen)" if converted else "warm (not converted yet)"
                else:
                    label = "cold, still in PostgreSQL (archive due)"
                if status.get(month) == "restored":
                    label += ", restored from the archive"
                out.append(MonthTier(table.name, month, label, rows[0]))
            for month, names in frozen.items():
                out.append(MonthTier(table.name, month, f"frozen by an unfinished archive run ({', '.join(names)})", 0))
            for month, month_status in status.items():
                if month_status != "archived":
                    continue
                objects = _objects(conn, table, month)
                rows = conn.execute(sql.SQL("SELECT record_count FROM {} WHERE month_year = %s").format(
                    sql.Identifier(f"{table.name}_archive_metadata")), (p.month_year(month),)).fetchone()[0]
                out.append(MonthTier(table.name, month, "cold (Parquet on S3)", rows,
                                     [(store.uri(k), size) for k, size in objects]))
    return sorted(out, key=lambda m: (m.table, m.month))


def _objects(conn: psycopg.Connection, table: p.RangeTable, month: date) -> list[tuple[str, int]]:
    return conn.execute(sql.SQL("SELECT object_key, size_bytes FROM {} WHERE month_year = %s ORDER BY part").format(
        sql.Identifier(f"{table.name}_archive_objects")), (p.month_year(month),)).fetchall()


def format_tiers(tiers: list[MonthTier]) -> str:
    lines = []
    for m in tiers:
        lines.append(f"{m.table:<18} {p.month_year(m.month)}  {m.rows:>10,} rows  {m.tier}")
        lines.extend(f"{'':<28}{uri}  {size:,} B" for uri, size in m.objects)
    return "\n".join(lines)
