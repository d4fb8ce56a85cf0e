"""The month catalog: everything PostgreSQL says about a (table, month), read in few round trips.

One immutable `MonthState` per month of a range table: its child (attached, frozen as a
standalone table by an unfinished archive run, or absent) and whether it has the warm
layout; a late-row table an archive run froze; the archive metadata and its objects; the
month's rows waiting in the default partition; and, when a tier decision needs it, the
newest row of the child. `TableState` adds what belongs to the table rather than a month:
whether it has a default partition and how many rows wait there with a NULL partition key
(an app write without "capturedAt", completed later by complete_positions).

Every question about a month ("is it archived? frozen? warm? covered?") is answered from
these objects; the decisions themselves are pure (`tiering.policy.decide`). Reading a
whole table costs four statements, plus one per month whose newest row is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Callable, Iterable, Literal, Mapping, Sequence

import psycopg
from psycopg import sql

from wedefi_pipelines import partitioning as p

ChildStatus = Literal["attached", "detached", "absent"]
DefaultMode = Literal["count", "probe", "skip"]

# The Parquet layout the archive writes (docs/tiering.md, "Type policy"): 2 = ids as text,
# timestamps in microseconds without time-zone adjustment; 1 = before issue 14 (Parquet
# UUID ids, UTC-adjusted milliseconds), rewritten by tiering/upgrade.py.
ARCHIVE_FORMAT = 2


@dataclass(frozen=True)
class ArchiveObject:
    """One verified Parquet object of an archived month ("<Table>_archive_objects")."""

    key: str
    part: int
    rows: int
    size_bytes: int
    sha256: str
    crc64nvme: str
    content_hash: int = 0
    min_time: datetime | None = None
    max_time: datetime | None = None
    format_version: int = ARCHIVE_FORMAT
    iceberg_snapshot_id: int | None = None  # the Iceberg snapshot that added it; None: not in the table

    @property
    def legacy(self) -> bool:
        """Written in an older Parquet layout: to be rewritten before it can join the Iceberg table."""
        return self.format_version < ARCHIVE_FORMAT

    @property
    def registered(self) -> bool:
        return self.iceberg_snapshot_id is not None

    @property
    def to_register(self) -> bool:
        """Belongs in the Iceberg table and is not there yet (an empty object has nothing to add)."""
        return not self.legacy and not self.registered and self.rows > 0


@dataclass(frozen=True)
class MonthState:
    """One table's month, as the catalog, the archive tables and the default partition say.

    `default_rows` is None when the rows were found but not counted (the cheap probe);
    `newest` is the newest row of the attached child when `newest_read`.
    """

    table: str
    month: date
    child: ChildStatus = "absent"
    late_table: bool = False  # "<child>_late": late rows frozen by an unfinished archive run
    rewritten: bool = False  # the warm layout's BRIN is in place and the btrees it replaces are gone
    vacuumed: bool = False  # ... and the warm conversion's VACUUM (FREEZE) finished
    archive_status: str | None = None  # 'archived', 'restored' or None
    archived_rows: int = 0
    archived_hash: int = 0  # the content hash the archive recorded over those rows
    archived_at: datetime | None = None
    objects: tuple[ArchiveObject, ...] = ()
    default_rows: int | None = 0
    default_newest: datetime | None = None
    newest: datetime | None = None
    newest_read: bool = False

    @property
    def attached(self) -> bool:
        return self.child == "attached"

    @property
    def frozen(self) -> bool:
        """An archive run stopped after freezing the month: its tables wait to be exported."""
        return self.child == "detached" or self.late_table

    @property
    def frozen_relations(self) -> list[str]:
        """The frozen tables, child first (each becomes one archive object)."""
        names = [p.child_name(self.table, self.month)] if self.child == "detached" else []
        return names + ([p.late_name(self.table, self.month)] if self.late_table else [])

    @property
    def archived(self) -> bool:
        return self.archive_status == "archived"

    @property
    def restored(self) -> bool:
        return self.archive_status == "restored"

    @property
    def warm(self) -> bool:
        return self.vacuumed

    @property
    def has_default_rows(self) -> bool:
        return self.default_rows is None or self.default_rows > 0

    @property
    def covered(self) -> bool:
        """Provisioning's rule: an attached or archived month needs no new child."""
        return self.attached or self.archived

    @property
    def next_part(self) -> int:
        return max((o.part for o in self.objects), default=-1) + 1

    @property
    def legacy_objects(self) -> list[ArchiveObject]:
        """Objects of an archived month still in an older Parquet layout (to upgrade)."""
        return [o for o in self.objects if o.legacy] if self.archived else []

    @property
    def unregistered_objects(self) -> list[ArchiveObject]:
        """Objects of an archived month that belong in its Iceberg table and are not there."""
        return [o for o in self.objects if o.to_register] if self.archived else []


@dataclass(frozen=True)
class TableState:
    table: p.RangeTable
    months: Mapping[date, MonthState]
    has_default: bool = True
    null_key_rows: int | None = 0  # rows in the default whose time column is NULL (None: some, not counted)

    def month(self, month: date) -> MonthState:
        return self.months.get(month) or MonthState(self.table.name, month)

    def where(self, test: Callable[[MonthState], bool]) -> list[date]:
        return sorted(m for m, s in self.months.items() if test(s))

    @property
    def attached(self) -> list[date]:
        return self.where(lambda s: s.attached)

    @property
    def archived(self) -> set[date]:
        return set(self.where(lambda s: s.archived))

    @property
    def covered(self) -> set[date]:
        return set(self.where(lambda s: s.covered))

    @property
    def default_rows(self) -> dict[date, int | None]:
        return {m: s.default_rows for m, s in sorted(self.months.items()) if s.has_default_rows}


# -- reads ---------------------------------------------------------------------------------------

def _regclass(conn: psycopg.Connection, name: str) -> str:
    return sql.Identifier(name).as_string(conn)


_RELATIONS = """
SELECT c.relname, coalesce(i.inhparent = to_regclass(%(parent)s), false),
       coalesce(obj_description(c.oid, 'pg_class'), ''),
       ARRAY(SELECT ic.relname::text FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
              WHERE x.indrelid = c.oid)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND {names}
"""


def _warm_layout(table: p.RangeTable, month: date, comment: str, indexes: Sequence[str]) -> tuple[bool, bool]:
    present = set(indexes)
    replaced = {p.index_name(table, month, i) for i in table.child_indexes if i.suffix in table.warm.replaces}
    rewritten = table.warm.brin_name(table, month) in present and not (replaced & present)
    return rewritten, rewritten and comment.startswith(p.WARM_COMMENT) and p.VACUUMED in comment


def _relations(conn: psycopg.Connection, table: p.RangeTable, months: Sequence[date] | None) -> dict[date, dict]:
    params: dict = {"parent": _regclass(conn, table.name)}
    if months is None:
        names, params["pattern"] = sql.SQL("c.relname LIKE %(pattern)s"), table.name.replace("_", "\\_") + "\\_%"
    else:
        names = sql.SQL("c.relname = ANY(%(names)s)")
        params["names"] = [n for m in months for n in (p.child_name(table, m), p.late_name(table, m))]
    found: dict[date, dict] = {}
    for name, attached, comment, indexes in conn.execute(sql.SQL(_RELATIONS).format(names=names), params):
        late = name.endswith("_late")
        month = p.parse_child_name(table, name[:-len("_late")] if late else name)
        if month is None:
            continue
        entry = found.setdefault(month, {})
        if late:
            entry["late_table"] = True
        elif attached:
            entry["child"] = "attached"
            entry["rewritten"], entry["vacuumed"] = _warm_layout(table, month, comment, indexes)
        else:
            entry["child"] = "detached"
    return found


def _archive(conn: psycopg.Connection, table: p.RangeTable, months: Sequence[date] | None
             ) -> tuple[dict[date, tuple[str, int, int, datetime]], dict[date, list[ArchiveObject]]]:
    where, params = sql.SQL(""), ()
    if months is not None:
        where, params = sql.SQL(" WHERE month_year = ANY(%s)"), ([p.month_year(m) for m in months],)
    meta = {p.parse_month(m): (status, int(rows or 0), int(content or 0), at) for m, status, rows, content, at in conn.execute(
        sql.SQL("SELECT month_year, status, record_count, content_hash, archived_at FROM {}").format(
            sql.Identifier(p.archive_metadata_name(table))) + where, params)}
    objects: dict[date, list[ArchiveObject]] = {}
    for m, *fields in conn.execute(sql.SQL(
            "SELECT month_year, object_key, part, record_count, size_bytes, sha256, crc64nvme, content_hash, min_time,"
            " max_time, format_version, iceberg_snapshot_id FROM {}").format(
            sql.Identifier(p.archive_objects_name(table))) + where + sql.SQL(" ORDER BY month_year, part"), params):
        key, part, rows, size, sha, crc, content, low, high, version, snapshot = fields
        objects.setdefault(p.parse_month(m), []).append(ArchiveObject(
            key, part, int(rows), int(size), sha, crc, int(content), low, high, int(version), snapshot))
    return meta, objects


def _window(table: p.RangeTable, months: Sequence[date] | None) -> tuple[sql.Composable, list[datetime]]:
    if not months:
        return sql.SQL(""), []
    col = sql.Identifier(table.time_column)
    return (sql.SQL(" WHERE {c} >= %s AND {c} < %s").format(c=col),
            [p.month_bounds(min(months))[0], p.month_bounds(max(months))[1]])


def default_rows_by_month(conn: psycopg.Connection, table: p.RangeTable | str, start: date | None = None,
                          end: date | None = None) -> dict[date, int]:
    """Row counts in the table's default partition, by UTC month (rows whose time is NULL
    are not a month's: see null_key_rows); `start`/`end` (months, end exclusive) narrow
    the read to an index range of the default's time index."""
    table = p.range_table(table)
    months = None if start is None else [start, p.add_months(end or p.add_months(start, 1), -1)]
    return {m: n for m, (n, _) in _default_counts(conn, table, months).items() if m is not None}


def _default_counts(conn: psycopg.Connection, table: p.RangeTable, months: Sequence[date] | None
                    ) -> dict[date | None, tuple[int, datetime | None]]:
    col = sql.Identifier(table.time_column)
    where, params = _window(table, months)
    query = sql.SQL("SELECT date_trunc('month', {col})::date, count(*), max({col}) FROM {default}{where} "
                    "GROUP BY 1 ORDER BY 1").format(col=col, default=sql.Identifier(p.default_name(table)), where=where)
    return {m: (n, newest) for m, n, newest in conn.execute(query, params)}


def months_with_default_rows(conn: psycopg.Connection, table: p.RangeTable | str, start: date | None = None,
                             end: date | None = None) -> list[date]:
    """The months of [start, end) (unbounded where None) that have rows in the default
    partition, found by probing the default's time index for the next row (one probe per
    month found, plus one), not by reading its rows: cheap even when an outage left
    millions there."""
    table = p.range_table(table)
    stop = p.month_bounds(end)[0] if end else None
    query = sql.SQL("SELECT min({col}) FROM {default} WHERE {col} >= %s" + (" AND {col} < %s" if stop else "")).format(
        col=sql.Identifier(table.time_column), default=sql.Identifier(p.default_name(table)))
    found: list[date] = []
    cursor = p.month_bounds(start)[0] if start else datetime.min
    while stop is None or cursor < stop:
        first = conn.execute(query, (cursor, stop) if stop else (cursor,)).fetchone()[0]
        if first is None:
            break
        found.append(p.month_of(first))
        cursor = p.month_bounds(found[-1])[1]
    return found


def _defaults(conn: psycopg.Connection, table: p.RangeTable, months: Sequence[date] | None, mode: DefaultMode
              ) -> tuple[dict[date, tuple[int | None, datetime | None]], int | None]:
    if mode == "skip":
        return {}, 0
    if mode == "count":
        counts = _default_counts(conn, table, months)
        nulls = counts.pop(None, (0, None))[0] if months is None else _null_key_rows(conn, table, exact=True)
        return counts, nulls
    start, end = (min(months), p.add_months(max(months), 1)) if months else (None, None)
    return ({m: (None, None) for m in months_with_default_rows(conn, table, start, end)},
            _null_key_rows(conn, table, exact=False))


def _null_key_rows(conn: psycopg.Connection, table: p.RangeTable, exact: bool) -> int | None:
    query = sql.SQL("SELECT count(*) FROM {d} WHERE {c} IS NULL" if exact else
                    "SELECT EXISTS (SELECT 1 FROM {d} WHERE {c} IS NULL)").format(
        d=sql.Identifier(p.default_name(table)), c=sql.Identifier(table.time_column))
    value = conn.execute(query).fetchone()[0]
    return int(value) if exact else (None if value else 0)


def newest_row(conn: psycopg.Connection, table: p.RangeTable, relation: str) -> datetime | None:
    return conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
        sql.Identifier(table.time_column), sql.Identifier(relation))).fetchone()[0]


NewestWanted = Callable[[p.RangeTable, date], bool]


def read_table(conn: psycopg.Connection, table: p.RangeTable | str, *, months: Iterable[date] | None = None,
               default_rows: DefaultMode = "count", newest: NewestWanted | None = None) -> TableState:
    """The table's months (all that leave a trace, or exactly `months`).

    `default_rows`: 'count' reads the default partition's rows per month (all of them);
    'probe' only finds which months have some (an index probe per month found); 'skip'.
    `newest(table, month)` says for which attached months to read the newest row.
    """
    table = p.range_table(table)
    wanted = None if months is None else sorted({p.month_of(m) for m in months})
    relations = _relations(conn, table, wanted)
    has_default = has_default_partition(conn, table)
    meta, objects = _archive(conn, table, wanted)
    defaults, nulls = _defaults(conn, table, wanted, default_rows) if has_default else ({}, 0)
    states: dict[date, MonthState] = {}
    for month in sorted(set(relations) | set(meta) | set(defaults) | set(wanted or ())):
        if month is None:
            continue
        status, archived_rows, archived_hash, archived_at = meta.get(month, (None, 0, 0, None))
        waiting, default_newest = defaults.get(month, (0, None))
        state = MonthState(table.name, month, **relations.get(month, {}), archive_status=status,
                           archived_rows=archived_rows, archived_hash=archived_hash, archived_at=archived_at, objects=tuple(objects.get(month, ())),
                           default_rows=waiting, default_newest=default_newest)
        if state.attached and newest is not None and newest(table, month):
            state = replace(state, newest=newest_row(conn, table, p.child_name(table, month)), newest_read=True)
        states[month] = state
    return TableState(table, states, has_default, nulls)


def read_catalog(conn: psycopg.Connection, tables: Iterable[p.RangeTable] = p.RANGE_TABLES, **options
                 ) -> dict[str, TableState]:
    """`read_table` for every range table (same options)."""
    return {t.name: read_table(conn, t, **options) for t in tables}


def month_states(conn: psycopg.Connection, **options) -> list[MonthState]:
    """Every month of every range table that leaves a trace, as one list (same options)."""
    return [s for t in read_catalog(conn, **options).values() for s in t.months.values()]


def month_state(conn: psycopg.Connection, table: p.RangeTable | str, month: date, **options) -> MonthState:
    return read_table(conn, table, months=[month], **options).month(p.month_of(month))


def group_states(conn: psycopg.Connection, table: p.RangeTable | str, month: date, **options) -> list[MonthState]:
    """The month of every table of `table`'s archive group (archived and restored together)."""
    group = p.range_table(table).group
    return [month_state(conn, t, month, **options) for t in p.TIERED_TABLES if t.group == group]


# -- the questions other modules ask, answered from the catalog ---------------------------------

def attached_months(conn: psycopg.Connection, table: p.RangeTable | str) -> list[date]:
    """Months that have a monthly child attached to the table's parent, oldest first (one
    statement: what the provisioning units ask, many times per run)."""
    table = p.range_table(table)
    rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                        " WHERE i.inhparent = to_regclass(%s)", (_regclass(conn, table.name),))
    return sorted(m for (name,) in rows if (m := p.parse_child_name(table, name)) is not None)


def is_attached(conn: psycopg.Connection, table: p.RangeTable | str, month: date) -> bool:
    return p.month_of(month) in attached_months(conn, table)


def archived_months(conn: psycopg.Connection, table: p.RangeTable | str) -> set[date]:
    """Months whose rows live in the cold tier: 'archived' in the archive metadata of the
    table or of any table archived with it (PortfolioSnapshot and PositionSnapshot move
    together). A restored month ('restored') is an ordinary month again."""
    group = p.range_table(table).group
    months: set[date] = set()
    for member in (t for t in p.TIERED_TABLES if t.group == group):
        months |= set(_archive_status(conn, member, "archived"))
    return months


def _archive_status(conn: psycopg.Connection, table: p.RangeTable, status: str) -> list[date]:
    return [p.parse_month(m) for (m,) in conn.execute(sql.SQL("SELECT month_year FROM {} WHERE status = %s").format(
        sql.Identifier(p.archive_metadata_name(table))), (status,))]


def has_default_partition(conn: psycopg.Connection, table: p.RangeTable | str) -> bool:
    row = conn.execute("SELECT partdefid <> 0 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)",
                       (_regclass(conn, p.range_table(table).name),)).fetchone()
    return bool(row and row[0])


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_regclass(conn, name),)).fetchone()[0]


def existing_relations(conn: psycopg.Connection, names: Sequence[str]) -> set[str]:
    rows = conn.execute("SELECT n FROM unnest(%s::text[]) AS n WHERE to_regclass(quote_ident(n)) IS NOT NULL",
                        (list(names),))
    return {r[0] for r in rows}


def table_columns(conn: psycopg.Connection, name: str) -> list[str]:
    """The relation's live columns in their physical order."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (_regclass(conn, name),))
    return [r[0] for r in rows]


def referenced_tables(conn: psycopg.Connection, table: p.RangeTable) -> list[str]:
    """Tables the parent's foreign keys point at: creating a child adds triggers there."""
    rows = conn.execute(
        "SELECT DISTINCT c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid"
        " WHERE k.conrelid = %s::regclass AND k.contype = 'f' ORDER BY 1", (_regclass(conn, table.name),))
    return [r[0] for r in rows]
