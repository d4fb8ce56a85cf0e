"""Refresh the rollups of the days that changed, whoever changed them.

"Changed" is judged by a watermark per (family, UTC day): the greatest "createdAt" and
the raw row count the last refresh folded in. A day is stale when its raw rows show a
greater "createdAt" or more rows than that: the pipeline's loads, the app's own inserts,
late rows, drains of the default partition and restores all show up, whichever Dagster
partition ran. A day whose raw rows are fewer than its watermark (rows deleted, or a
month archived) is never recomputed from them: rollups outlive raw rows.

A day of a month whose rows are archived is recomputed from the archive: the month's
verified objects loaded into a temporary table with the month's rows still in
PostgreSQL (late rows), so the same statements run over every source. Months archived
before rollups existed are found by comparing their archived row count with their
watermarks, months still in PostgreSQL that were never rolled up by having no watermark.
A write into a month older than the sweep's window that is neither (the app's insert
into a months-old day) is found by cold_archive's gate; `price_rollups` for those days or
`portfolio_rollups` with `months` in its config folds it. Each window of days is one
transaction on the primary, under the family's advisory lock: a crash leaves the
previous rollups and watermarks, and a re-run redoes the window (the statements are upserts; nothing is ever added twice). A month whose
hourly price rollups are themselves archived (the cold tier, after tiers.PriceRollupHourly)
is not refreshed: its daily rows are made from those hours.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Iterable

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog, locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.rollups import statements as st
from wedefi_pipelines.rollups.tables import Family, ensure_months

log = logging.getLogger(__name__)
STAGED = "wedefi_rollup_source"  # the temporary table an archived month is loaded into


@dataclass(frozen=True)
class DayStat:
    day: date
    newest: datetime
    rows: int


@dataclass
class RefreshResult:
    family: str
    refreshed: list[date] = field(default_factory=list)
    from_archive: list[date] = field(default_factory=list)
    rows_written: dict[str, int] = field(default_factory=dict)  # rollup rows inserted or changed, per table
    rows_deleted: int = 0
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        days = sorted(self.refreshed)
        return {"days_refreshed": len(days), "first_day": days[0].isoformat() if days else "",
                "last_day": days[-1].isoformat() if days else "", "days_from_archive": len(self.from_archive),
                "rows_written": dict(self.rows_written), "rows_deleted": self.rows_deleted, "notes": self.notes}


# -- what is stale ------------------------------------------------------------------------------

def watermarks(conn: psycopg.Connection, fam: Family, start: date, end: date) -> dict[date, DayStat]:
    """The watermarks of days in [start, end)."""
    rows = conn.execute(sql.SQL("SELECT day, max_created_at, raw_rows FROM {} WHERE family = %s AND day >= %s "
                                "AND day < %s").format(sql.Identifier(st.WATERMARK)), (fam.name, start, end))
    return {d: DayStat(d, n, r) for d, n, r in rows}


def day_stats(conn: psycopg.Connection, source: str, time_column: str, start: datetime, end: datetime
              ) -> dict[date, DayStat]:
    return {d: DayStat(d, n, r) for d, n, r in conn.execute(st.day_stats(source, time_column, start, end))}


def in_use(conn: psycopg.Connection, family: str) -> bool:
    """Whether the family's rollups have ever been refreshed (0012 applied and a watermark)."""
    if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (st.WATERMARK,)).fetchone()[0]:
        return False
    return conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE family = %s)").format(
        sql.Identifier(st.WATERMARK)), (family,)).fetchone()[0]


def is_behind(raw: DayStat, mark: DayStat | None) -> bool:
    """Raw rows the watermark has not folded in (fewer rows is not behind: see the module)."""
    return mark is None or raw.newest > mark.newest or raw.rows > mark.rows


def stale_days(conn: psycopg.Connection, fam: Family, since: date) -> list[date]:
    """Days from `since` on with raw rows in PostgreSQL that are behind their watermark,
    plus any day of a row waiting in the default partition (late rows, however old)."""
    table, t = fam.source, fam.source.time_column
    start = datetime(since.year, since.month, since.day)
    raw = day_stats(conn, table.name, t, start, datetime.max.replace(microsecond=0))
    if catalog.has_default_partition(conn, table):
        for day, stat in day_stats(conn, p.default_name(table), t, datetime(1, 1, 1), start).items():
            raw[day] = stat
    if not raw:
        return []
    marks = watermarks(conn, fam, min(raw), max(raw) + timedelta(days=1))
    return sorted(d for d, stat in raw.items() if is_behind(stat, marks.get(d)))


def months_never_folded(conn: psycopg.Connection, fam: Family, before: date) -> list[date]:
    """Months before `before` still in PostgreSQL, holding rows, with no watermark at all:
    history loaded before rollups existed (newer months are the stale-day scan's)."""
    folded = {m for (m,) in conn.execute(sql.SQL(
        "SELECT DISTINCT date_trunc('month', day)::date FROM {} WHERE family = %s").format(
        sql.Identifier(st.WATERMARK)), (fam.name,))}
    never = []
    for month in catalog.attached_months(conn, fam.source):
        if month >= p.month_of(before) or month in folded:
            continue
        start, end = p.month_bounds(month)
        if conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {t} >= %s AND {t} < %s)").format(
                sql.Identifier(fam.source.name), t=sql.Identifier(fam.source.time_column)), (start, end)).fetchone()[0]:
            never.append(month)
    return never


def archived_months_behind(conn: psycopg.Connection, fam: Family) -> list[date]:
    """Archived months whose archived rows outnumber the rows their watermarks folded in
    (archived before rollups existed, or before their last late rows were folded)."""
    table = catalog.read_table(conn, fam.source, default_rows="skip")
    behind = []
    for month, state in sorted(table.months.items()):
        if not state.archived:
            continue
        start, end = p.month_bounds(month)
        folded = sum(m.rows for m in watermarks(conn, fam, start.date(), end.date()).values())
        if folded < sum(o.rows for o in state.objects):
            behind.append(month)
    return behind


def month_days(month: date) -> list[date]:
    start, end = (b.date() for b in p.month_bounds(month))
    return [start + timedelta(days=i) for i in range((end - start).days)]


# -- refreshing ---------------------------------------------------------------------------------

def refresh(db: Database, fam: Family, *, days: Iterable[date] = (), sweep_since: date | None = None,
            store: ArchiveStore | None = None, logger: logging.Logger | None = None) -> RefreshResult:
    """Recompute `days` and, with `sweep_since`, every stale day from then on, every day
    waiting in the default partition, every archived month behind its watermarks and every
    older month in PostgreSQL never rolled up."""
    logger = logger or log
    result = RefreshResult(fam.name)
    wanted = set(days)
    whole_months: list[date] = []
    with db.connect("primary") as conn:
        if sweep_since is not None:
            wanted |= set(stale_days(conn, fam, sweep_since))
            whole_months = archived_months_behind(conn, fam) + months_never_folded(conn, fam, sweep_since)
        archived = catalog.archived_months(conn, fam.source)
    for month in whole_months:
        wanted |= set(month_days(month))
    if not wanted:
        return result
    for month, group in groupby(sorted(wanted), key=p.month_of):
        month_wanted = list(group)
        if month in archived:
            if store is None:
                result.notes.append(f"{p.month_year(month)} is archived: its rollups are computed from the archive, "
                                    "which is not configured (ARCHIVE_BUCKET, ARCHIVE_PREFIX)")
                continue
            _refresh_archived(db, fam, store, month, month_wanted, result)
        else:
            with db.connect("primary") as conn:
                _fold(conn, fam, fam.source.name, month_wanted, "postgres", result)
    for note in result.notes:
        logger.warning(note)
    logger.info("%s rollups: %d day(s) refreshed (%d from the archive), rows written %s", fam.name,
                len(result.refreshed), len(result.from_archive), result.rows_written)
    return result


def _refresh_archived(db: Database, fam: Family, store: ArchiveStore, month: date, days: list[date],
                      result: RefreshResult) -> None:
    """The month's archive objects and its rows still in PostgreSQL, as one temporary source."""
    from wedefi_pipelines.tiering.restore import load_object  # pyarrow: only when an archived month is refreshed

    with db.connect("primary") as conn, tempfile.TemporaryDirectory(prefix="wedefi-rollups-") as tmp:
        state = catalog.month_state(conn, fam.source, month, default_rows="skip")
        conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {}) ON COMMIT DROP").format(
            sql.Identifier(STAGED), sql.Identifier(fam.source.name)))
        for obj in (o for o in state.objects if o.rows > 0):
            load_object(conn, store, STAGED, obj, Path(tmp))
        start, end = p.month_bounds(month)
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE {t} >= %s AND {t} < %s").format(
            sql.Identifier(STAGED), sql.Identifier(fam.source.name), t=sql.Identifier(fam.source.time_column)),
            (start, end))
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(STAGED)))
        before = len(result.refreshed)
        _fold(conn, fam, STAGED, days, "archive", result)
        result.from_archive.extend(result.refreshed[before:])


def _fold(conn: psycopg.Connection, fam: Family, source: str, days: list[date], kind: str,
          result: RefreshResult) -> None:
    """Recompute `days` (one month's) from `source` in the caller's transaction. The tiered
    rollup's table lock (the one its archive and restore take, in lock order) makes the
    check that its month is neither archived nor being archived hold until commit."""
    month = p.month_of(days[0])
    tiered = [t for t in fam.tables if t in p.TIERED_TABLES]
    for table in tiered:
        locks.xact_lock(conn, "provisioning.table", table.name)
    locks.xact_lock(conn, "rollups.family", fam.name)
    for table in tiered:
        state = catalog.month_state(conn, table, month, default_rows="skip")
        if state.archived or state.frozen:  # its rollups are in (or going to) the cold tier themselves
            why = "is archived: restore that month of it first" if state.archived else "is being archived"
            result.notes.append(f"{p.month_year(month)}: {fam.name} rollups archived, not refreshed "
                                f"({table.name} {why})")
            return
    ensure_months(conn, fam, [month])  # DDL only for a month not created yet
    conn.execute("SET LOCAL work_mem = '64MB'")  # a month's rows sort in memory (4 MB spills a day to disk)
    first, last = min(days), max(days)
    start = datetime(first.year, first.month, first.day)
    end = datetime(last.year, last.month, last.day) + timedelta(days=1)
    raw = day_stats(conn, source, fam.source.time_column, start, end)
    marks = watermarks(conn, fam, first, last + timedelta(days=1))
    todo = []
    for day in days:
        stat, mark = raw.get(day), marks.get(day)
        if mark is not None and (stat is None or stat.rows < mark.rows):
            if stat is not None or kind == "archive":
                result.notes.append(f"{fam.source.name} {day}: {stat.rows if stat else 0} raw row(s), fewer than the "
                                    f"{mark.rows} its rollups hold; kept as they are")
            continue
        todo.append(day)
    if not todo:
        return
    statements = ({p.PRICE_ROLLUP_HOURLY.name: st.price_hourly(source, start, end, todo),
                   p.PRICE_ROLLUP_DAILY.name: st.price_daily(start, end, todo)} if fam.name == "price"
                  else {p.PORTFOLIO_ROLLUP_DAILY.name: st.portfolio_daily(source, start, end, todo)})
    for table, statement in statements.items():  # in order: the daily prices are made from the hours
        written, deleted = conn.execute(statement).fetchone()
        result.rows_written[table] = result.rows_written.get(table, 0) + written
        result.rows_deleted += deleted
    folded = [raw[d] for d in todo if d in raw]
    if folded:
        conn.execute(st.save_watermarks(fam.name, kind), ([s.day for s in folded], [s.newest for s in folded],
                                                         [s.rows for s in folded]))
    result.refreshed.extend(todo)
