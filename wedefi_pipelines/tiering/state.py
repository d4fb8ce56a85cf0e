"""What the catalog says about each month's tier state: cheap reads for the schedule,
the checks and the tier operations themselves.

A month of a range table is in one of these states:
  attached (hot or warm)  the child is a partition of the parent
  frozen                  an archive run detached the child (same name, standalone) and/or
                          moved the month's late rows out of the default partition into
                          "<child>_late"; both stay until the month is recorded as archived
  archived / restored     "<Table>_archive_metadata".status
A warm child carries the layout's BRIN index and none of the btrees it replaces; its
table comment records that VACUUM (FREEZE) finished, the last step of the conversion.
"""

from __future__ import annotations

from datetime import date, datetime

import psycopg
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning import default_rows_by_month
from wedefi_pipelines.tiering.policy import WARM_LAYOUTS, MonthState, bounds_decide, group_tables
from wedefi_pipelines.settings import Settings

WARM_COMMENT = "wedefi warm tier"
VACUUMED = "vacuumed"


def late_name(table: p.RangeTable, month: date) -> str:
    return f"{p.child_name(table, month)}_late"


def standalone_tables(conn: psycopg.Connection, names: list[str]) -> set[str]:
    """Which of `names` exist as tables that are not partitions of anything."""
    rows = conn.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition""", (names,))
    return {r[0] for r in rows}


def frozen_relations(conn: psycopg.Connection, table: p.RangeTable, month: date) -> list[str]:
    """The month's frozen tables, child first: what an unfinished archive run left."""
    names = [p.child_name(table, month), late_name(table, month)]
    found = standalone_tables(conn, names)
    return [n for n in names if n in found]


def all_frozen(conn: psycopg.Connection, table: p.RangeTable) -> dict[date, list[str]]:
    rows = conn.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND c.relname LIKE %s""", (table.name + "\\_%",))
    frozen: dict[date, list[str]] = {}
    for (name,) in rows:
        base = name[:-len("_late")] if name.endswith("_late") else name
        month = p.parse_child_name(table, base)
        if month is not None:
            frozen.setdefault(month, []).append(name)
    return {m: sorted(v, key=lambda n: n.endswith("_late")) for m, v in frozen.items()}


def metadata_status(conn: psycopg.Connection, table: p.RangeTable) -> dict[date, str]:
    rows = conn.execute(sql.SQL("SELECT month_year, status FROM {}").format(
        sql.Identifier(f"{table.name}_archive_metadata")))
    return {p.parse_month(m): s for m, s in rows}


def index_names(conn: psycopg.Connection, relation: str) -> set[str]:
    rows = conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
                        (sql.Identifier(relation).as_string(conn),))
    return {r[0].strip('"') for r in rows}


def warm_layout_state(conn: psycopg.Connection, table: p.RangeTable, month: date) -> tuple[bool, bool]:
    """(rewritten: the warm indexes are in place, vacuumed: the conversion finished)."""
    layout = WARM_LAYOUTS[table.name]
    child = p.child_name(table, month)
    present = index_names(conn, child)
    replaced = {p.index_name(table, month, i) for i in table.child_indexes if i.suffix in layout.replaces}
    rewritten = layout.brin_name(table, month) in present and not (replaced & present)
    comment = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')",
                           (sql.Identifier(child).as_string(conn),)).fetchone()[0] or ""
    return rewritten, rewritten and comment.startswith(WARM_COMMENT) and VACUUMED in comment


def newest_row(conn: psycopg.Connection, table: p.RangeTable, relation: str) -> datetime | None:
    return conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
        sql.Identifier(table.time_column), sql.Identifier(relation))).fetchone()[0]


def month_states(conn: psycopg.Connection, now: datetime, settings: Settings) -> list[MonthState]:
    """Every month each range table has a child, a frozen table, an archive row or late
    rows for. Reads the catalog, the metadata and the default partitions; scans a child
    for its newest row only when its bounds straddle a tier threshold."""
    states: list[MonthState] = []
    for table in p.RANGE_TABLES:
        ages = settings.tiers.for_table(table.name)
        attached = set(month_ops.attached_months(conn, table))
        frozen = all_frozen(conn, table)
        status = metadata_status(conn, table)
        late = default_rows_by_month(conn, table)
        for month in sorted(attached | set(frozen) | set(status) | set(late)):
            is_attached = month in attached and month not in frozen
            warm = newest = None
            has_rows = True
            if is_attached:
                warm = warm_layout_state(conn, table, month)[1]
                if bounds_decide(month, now, ages) is None:
                    newest = newest_row(conn, table, p.child_name(table, month))
                    has_rows = newest is not None
            states.append(MonthState(
                table=table.name, month=month, attached=is_attached, warm=bool(warm), frozen=month in frozen,
                status=status.get(month), late_rows=late.get(month, 0) if month not in attached else 0,
                newest=newest, has_rows=has_rows))
    return states


def group_newest(conn: psycopg.Connection, month: date, table: p.RangeTable) -> tuple[datetime | None, bool]:
    """The newest row of the month over its archive group's attached children, and
    whether any of them is attached."""
    newest, any_attached = None, False
    for member in group_tables(table):
        if month_ops.is_attached(conn, member, month):
            any_attached = True
            value = newest_row(conn, member, p.child_name(member, month))
            if value is not None and (newest is None or value > newest):
                newest = value
    return newest, any_attached
