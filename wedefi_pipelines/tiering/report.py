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

from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering.archive import ArchiveOutcome, Archiver
from wedefi_pipelines.tiering.policy import Tier, decide, due_months, groups, needs_newest
from wedefi_pipelines.tiering.warm import WarmOutcome, warm_month


@dataclass
class DueRun:
    warmed: list[WarmOutcome] = field(default_factory=list)
    archived: list[ArchiveOutcome] = field(default_factory=list)


def apply_due(db: Database, store: ArchiveStore, now: datetime | None = None,
              logger: logging.Logger | None = None) -> DueRun:
    """Warm and archive every month that is due now, oldest first."""
    now = now or datetime.now(timezone.utc)
    with db.connect("primary") as conn:
        states = catalog.month_states(conn, tables=p.TIERED_TABLES, newest=needs_newest(now, db.settings))
    due = due_months(states, now, db.settings)
    run = DueRun()
    for month in due.warm:
        for table in p.TIERED_TABLES:
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


def _label(state: catalog.MonthState, now: datetime, settings) -> str:
    tier = decide(state, now, settings).tier
    if tier is Tier.HOT:
        label = "hot"
    elif tier is Tier.WARM:
        label = "warm (rewritten, BRIN, frozen)" if state.warm else "warm (not converted yet)"
    else:
        label = "cold, still in PostgreSQL (archive due)"
    return label + (", restored from the archive" if state.restored else "")


def month_tiers(db: Database, store: ArchiveStore, now: datetime | None = None) -> list[MonthTier]:
    """Where each month of each range table lives now, read back from the database."""
    now = now or datetime.now(timezone.utc)
    out: list[MonthTier] = []
    with db.connect("primary") as conn:
        for table in catalog.read_catalog(conn, p.TIERED_TABLES, default_rows="skip", newest=lambda t, m: True).values():
            for month, state in table.months.items():
                if state.attached:
                    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                        sql.Identifier(p.child_name(table.table, month)))).fetchone()[0]
                    out.append(MonthTier(table.table.name, month, _label(state, now, db.settings), rows))
                if state.frozen:
                    out.append(MonthTier(table.table.name, month, "frozen by an unfinished archive run "
                                                                  f"({', '.join(state.frozen_relations)})", 0))
                if state.archived:
                    out.append(MonthTier(table.table.name, month, "cold (Parquet on S3)", state.archived_rows,
                                         [(store.uri(o.key), o.size_bytes) for o in state.objects]))
    return sorted(out, key=lambda m: (m.table, m.month))


def format_tiers(tiers: list[MonthTier]) -> str:
    lines = []
    for m in tiers:
        lines.append(f"{m.table:<18} {p.month_year(m.month)}  {m.rows:>10,} rows  {m.tier}")
        lines.extend(f"{'':<28}{uri}  {size:,} B" for uri, size in m.objects)
    return "\n".join(lines)


def iceberg_lines(db: Database, store: ArchiveStore) -> list[str]:
    """Each archived table's Iceberg table as its catalog in PostgreSQL points to it now:
    rows and files per month, its current snapshot and metadata file."""
    from wedefi_pipelines.tiering.iceberg import ArchiveTables

    lines = []
    with ArchiveTables(db, store) as tables, db.connect("primary") as conn:
        for table in p.TIERED_TABLES:
            tbl = tables.table_in(conn, table)
            name = ".".join(tables.identifier(table))
            if tbl is None:
                lines.append(f"{name:<26} (not created yet: nothing archived)")
                continue
            months = tables.month_files(tbl, table)
            snapshot = tbl.current_snapshot()
            held = ", ".join(f"{p.month_year(m)} {sum(f.rows for f in files):,} rows in {len(files)} file(s)"
                             for m, files in sorted(months.items())) or "no rows"
            lines.append(f"{name:<26} partitioned by month({table.time_column}): {held}; snapshot "
                         f"{snapshot.snapshot_id if snapshot else '-'}")
            lines.append(f"{'':<26} {tbl.metadata_location}")
    return lines
