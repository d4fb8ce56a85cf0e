"""cold_archive's question: may this month's raw rows leave PostgreSQL?

Once a family has any watermark (its rollups are in use), a month with a day whose raw
rows are behind their watermark, or never rolled up, is not archived: its rollups would
then have to be computed from S3. Before rollups ever ran, archiving goes on as before and
the refresh later computes those months from the archive (refresh.archived_months_behind).
"""

from __future__ import annotations

from datetime import date

import psycopg

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.rollups.refresh import day_stats, in_use, is_behind, watermarks
from wedefi_pipelines.rollups.tables import FAMILY_OF_GROUP

FIX = {"price": "materialize price_rollups for those days (a range backfill from the UI)",
       "portfolio": "materialize portfolio_rollups with config months: ['{month}']"}


def archive_blocker(conn: psycopg.Connection, group: str, month: date) -> str | None:
    """Why the group's month may not be archived yet, or None."""
    fam = FAMILY_OF_GROUP.get(group)
    if fam is None or not in_use(conn, fam.name):
        return None
    start, end = p.month_bounds(month)
    raw = day_stats(conn, fam.source.name, fam.source.time_column, start, end)
    marks = watermarks(conn, fam, start.date(), end.date())
    behind = sorted(d for d, stat in raw.items() if is_behind(stat, marks.get(d)))
    if not behind:
        return None
    never = sum(1 for d in behind if d not in marks)
    tables = ", ".join(t.name for t in fam.tables)
    return (f"rollups behind: {len(behind)} day(s) of {p.month_year(month)} not folded into {tables} "
            f"({never} never rolled up; first {behind[0].isoformat()}); "
            f"{FIX[fam.name].format(month=p.month_year(month))}, then archive")
