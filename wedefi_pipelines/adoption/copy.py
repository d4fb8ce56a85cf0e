"""Copying the app's history into the new tables: one pass, whole months, no lock on the app.

Range tables go through a *loader*: a private partitioned table whose partitions are
bare tables already named like the final monthly children (`month_ops.create_bare_child`).
The old table is read once, in ctid ranges (one transaction per range, its progress
recorded with it), and PostgreSQL routes each row to its month with no index to maintain
(docs/adoption.md has the rates). Each month is then finished off the live path:

1. detached from the loader; the new parent's keys built on it *as constraints* (an
   equivalent index alone would be rebuilt inside ATTACH) and the per-month indexes of
   `partitioning` built (a duplicate of a unique key the app never had is set aside,
   then the build is retried);
2. the parent's foreign keys added NOT VALID (SHARE ROW EXCLUSIVE on "Token" for ms)
   and VALIDATEd (ROW SHARE only: the app's writers go on);
3. a CHECK matching the month's bounds (`partitioning.bounds_check_sql`);

and all the table's months are ATTACHed in one short transaction: with keys, foreign
keys and bounds proven, ATTACH only updates the catalog (ACCESS EXCLUSIVE on "Token" for
a few ms, under `lock_timeout`). Rows the loader could not route (no month: a NULL time,
or a month beyond the horizon) wait in its default partition and are placed last.
TokenBalance has no months: its ranges go straight into its hash partitions.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import date, datetime, timezone

import psycopg
from psycopg import sql

from wedefi_pipelines import month_ops, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption import state
from wedefi_pipelines.adoption.placing import Shaping, place, set_aside
from wedefi_pipelines.adoption.session import (
    AdoptionError,
    catalog_path,
    crash_point,
    old,
    stage,
    with_lock_retries,
)
from wedefi_pipelines.adoption.shadow import lock_up_front
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)


def months_with_rows(conn: psycopg.Connection, table: L.Converted) -> dict[date, int]:
    """Rows of the old table per UTC month (a position by its portfolio's month); one scan."""
    if table.derived is not None:
        d = table.derived
        query = sql.SQL("SELECT date_trunc('month', d.{src})::date, count(*) FROM {t} s JOIN {source} d ON d.id = s.{via}"
                        " GROUP BY 1").format(src=sql.Identifier(d.source_column), t=old(table.name),
                                              source=old(d.source_table), via=sql.Identifier(d.via))
    else:
        query = sql.SQL("SELECT date_trunc('month', {col})::date, count(*) FROM {t} WHERE {col} IS NOT NULL GROUP BY 1"
                        ).format(col=sql.Identifier(table.time_column), t=old(table.name))
    return {m: n for m, n in conn.execute(query)}


def _loader_range(table: L.Converted) -> p.RangeTable:
    return dataclasses.replace(table.range, name=table.loader)


def create_loader(conn: psycopg.Connection, table: L.Converted, today: date) -> list[date]:
    """The loader and one bare month table per month holding rows (up to the horizon's
    limit: a row dated decades ahead is a bad timestamp and waits in a default partition)."""
    months = sorted(m for m in months_with_rows(conn, table)
                    if m <= p.add_months(p.month_of(today), provisioning.MAX_MONTHS_AHEAD))
    time = sql.Identifier(table.time_column)
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TABLE {loader} (LIKE {parent} INCLUDING DEFAULTS) PARTITION BY RANGE ({time})"
                             ).format(loader=stage(table.loader), parent=stage(table.name), time=time))
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(stage(table.loader), time))
        for month in months:
            month_ops.create_bare_child(conn, table.range, month)
            conn.execute(p.attach_child_sql(_loader_range(table), month, p.child_name(table.range, month)))
        conn.execute(sql.SQL("CREATE TABLE {d} (LIKE {loader} INCLUDING DEFAULTS)").format(
            d=stage(table.loader_default), loader=stage(table.loader)))
        conn.execute(sql.SQL("ALTER TABLE {loader} ATTACH PARTITION {d} DEFAULT").format(
            d=stage(table.loader_default), loader=stage(table.loader)))
        conn.execute(sql.SQL("UPDATE {} SET first_month = %s, last_month = %s WHERE tbl = %s").format(
            stage(L.PROGRESS)), (months[0] if months else None, months[-1] if months else None, table.name))
        state.mark(conn, f"loader:{table.name}", {"months": [p.month_year(m) for m in months]})
    return months


def loader_months(conn: psycopg.Connection, table: L.Converted) -> list[date]:
    return [p.parse_month(m) for m in (state.detail(conn, f"loader:{table.name}") or {}).get("months", [])]


def copy_ranges(conn: psycopg.Connection, table: L.Converted, settings: Settings) -> int:
    """Copy the old table's heap, a range of pages per transaction, resuming where the last
    run stopped. Rows of pages the app wrote after capture began are copied or not: they
    are in the change log either way, and the replay sets them right."""
    shaping = Shaping(conn, table)
    chunk = settings.adoption.copy_chunk_pages
    total = 0
    first = True
    while True:
        progress = state.progress(conn, table.name)
        if progress.finished:
            break
        start, end = progress.next_block, min(progress.end_block, progress.next_block + chunk)
        where = sql.SQL("s.ctid >= {}::tid AND s.ctid < {}::tid").format(
            sql.Literal(f"({start},0)"), sql.Literal(f"({end},0)"))
        with conn.transaction():
            if table.range is not None:
                copied = conn.execute(sql.SQL("INSERT INTO {} ({}) ").format(stage(table.loader), shaping.column_list())
                                      + shaping.select(where)).rowcount
            else:
                placed, kept = place(conn, shaping, shaping.select(where))
                copied = placed + kept
            conn.execute(sql.SQL("UPDATE {} SET next_block = %s, copied = copied + %s WHERE tbl = %s").format(
                stage(L.PROGRESS)), (end, copied, table.name))
        total += copied
        if first:
            crash_point("mid_copy")
            first = False
    return total


# -- finishing months ---------------------------------------------------------------------

def _leaves(table: L.Converted, month: date) -> list[str]:
    return p.leaf_names(table.range, month) if table.range.hash_column else [p.child_name(table.range, month)]


def _parent_keys(conn: psycopg.Connection, table: L.Converted) -> list[tuple[str, str, str, list[str], bool]]:
    """(name, contype, definition, columns, nulls_not_distinct) of the new parent's PRIMARY
    KEY / UNIQUE / CHECK constraints, definitions printed fully qualified."""
    with conn.transaction(), catalog_path(conn):
        return [(n, t, d, list(c), bool(nnd)) for n, t, d, c, nnd in conn.execute(
            "SELECT k.conname, k.contype::text, pg_get_constraintdef(k.oid),"
            " array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o) JOIN pg_attribute a"
            "       ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o),"
            " coalesce((SELECT x.indnullsnotdistinct FROM pg_index x WHERE x.indexrelid = k.conindid), false)"
            " FROM pg_constraint k WHERE k.conrelid = %s::regclass AND k.contype IN ('p', 'u', 'c')"
            " AND k.conparentid = 0 ORDER BY k.conname", (stage(table.name).as_string(conn),))]


def _parent_indexes(conn: psycopg.Connection, table: L.Converted) -> list[tuple[bool, str]]:
    """(unique, what follows `USING` in its definition) of the parent's indexes that back no constraint."""
    with conn.transaction(), catalog_path(conn):
        defs = [r[0] for r in conn.execute(
            "SELECT pg_get_indexdef(x.indexrelid) FROM pg_index x WHERE x.indrelid = %s::regclass"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid) ORDER BY 1",
            (stage(table.name).as_string(conn),))]
    return [(d.startswith("CREATE UNIQUE"), d.split(" USING ", 1)[1]) for d in defs]


def _parent_fks(conn: psycopg.Connection, table: L.Converted) -> list[tuple[str, str, list[str], list[str], str]]:
    """(name, definition, columns, referenced columns, referenced table) of the new parent's foreign keys."""
    with conn.transaction(), catalog_path(conn):
        return [(n, d, list(c), list(rc), r) for n, d, c, rc, r in conn.execute(
            "SELECT k.conname, pg_get_constraintdef(k.oid),"
            " array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o) JOIN pg_attribute a"
            "       ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o),"
            " array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, o) JOIN pg_attribute a"
            "       ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.o),"
            " k.confrelid::regclass::text"
            " FROM pg_constraint k WHERE k.conrelid = %s::regclass AND k.contype = 'f' AND k.conparentid = 0"
            " ORDER BY k.conname", (stage(table.name).as_string(conn),))]


def _move_duplicates(conn: psycopg.Connection, table: L.Converted, leaf: str, columns: list[str],
                     nulls_not_distinct: bool, key_name: str) -> int:
    """Keep the row with the smallest id of each duplicate group on `columns`; set the others aside."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    not_null = sql.SQL("true") if nulls_not_distinct else sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in columns)
    where = sql.SQL("m.ctid IN (SELECT c FROM (SELECT ctid AS c, row_number() OVER (PARTITION BY {cols} ORDER BY id) AS rn"
                    " FROM {leaf} WHERE {nn}) r WHERE r.rn > 1)").format(cols=cols, leaf=stage(leaf), nn=not_null)
    return set_aside(conn, table, stage(leaf), where,
                     f"duplicate of another row on ({', '.join(columns)}), the partitioned layout's unique key {key_name}")


def _build_keys(conn: psycopg.Connection, table: L.Converted, month: date) -> None:
    child = p.child_name(table.range, month)
    for name, kind, definition, _, _ in _parent_keys(conn, table):
        if kind in ("p", "u"):
            conn.execute(sql.SQL("ALTER TABLE {} ADD ").format(stage(child)) + sql.SQL(definition))
        else:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(stage(child), sql.Identifier(name))
                         + sql.SQL(definition))
    for unique, rest in _parent_indexes(conn, table):
        conn.execute(sql.SQL("CREATE {}INDEX ON {} USING ").format(sql.SQL("UNIQUE " if unique else ""), stage(child))
                     + sql.SQL(rest))
    for statement in p.create_child_indexes_sql(table.range, month):
        conn.execute(statement)


def finish_keys(conn: psycopg.Connection, table: L.Converted, month: date) -> int:
    """Detach the month from the loader and build its keys and indexes; returns rows set aside."""
    step = f"keys:{table.name}:{p.month_year(month)}"
    if state.done(conn, step):
        return 0
    child = p.child_name(table.range, month)
    unique_keys = [(name, cols, nnd) for name, kind, _, cols, nnd in _parent_keys(conn, table) if kind in ("p", "u")]
    unique_keys += [(p.index_name(table.range, month, i), list(i.columns), False)
                    for i in table.range.child_indexes if i.unique]
    set_aside_count = 0
    for attempt in (1, 2):
        try:
            with conn.transaction():
                attached = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = %s::regclass"
                                        " AND inhparent = %s::regclass)",
                                        (stage(child).as_string(conn), stage(table.loader).as_string(conn))).fetchone()[0]
                if attached:
                    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(stage(table.loader), stage(child)))
                if attempt == 2:
                    for leaf in _leaves(table, month):
                        for name, cols, nnd in unique_keys:
                            set_aside_count += _move_duplicates(conn, table, leaf, cols, nnd, name)
                _build_keys(conn, table, month)
                state.mark(conn, step, {"set_aside": set_aside_count})
            return set_aside_count
        except psycopg.errors.UniqueViolation as exc:
            if attempt == 2:
                raise AdoptionError(f"{table.name} {p.month_year(month)}: a unique key still fails after setting "
                                    f"duplicates aside: {exc}") from exc
            log.info("%s %s: duplicates of a unique key of the new layout; setting them aside", table.name,
                     p.month_year(month))
    return set_aside_count


def finish_foreign_keys(conn: psycopg.Connection, table: L.Converted, month: date, settings: Settings) -> int:
    """The parent's foreign keys on each leaf: NOT VALID, then VALIDATE; then the bounds CHECK."""
    step = f"fks:{table.name}:{p.month_year(month)}"
    if state.done(conn, step):
        return 0
    fks = _parent_fks(conn, table)
    leaves = _leaves(table, month)
    referenced = sorted({r for *_, r in fks})

    def add_not_valid() -> None:
        if referenced:
            lock_up_front(conn, [sql.SQL(r) for r in referenced], "SHARE ROW EXCLUSIVE", settings.adoption)
        for leaf in leaves:
            existing = {r[0] for r in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass",
                                                   (stage(leaf).as_string(conn),))}
            for name, definition, *_ in fks:
                if name not in existing:
                    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(stage(leaf), sql.Identifier(name))
                                 + sql.SQL(definition) + sql.SQL(" NOT VALID"))

    with_lock_retries(conn, settings.adoption, f"{table.name} {p.month_year(month)}: foreign keys (NOT VALID)",
                      add_not_valid, referenced)
    moved = 0
    for attempt in (1, 2):
        try:
            with conn.transaction():
                if attempt == 2:
                    for leaf in leaves:
                        for name, _, cols, ref_cols, ref in fks:
                            match = sql.SQL(" AND ").join(sql.SQL("r.{} = m.{}").format(sql.Identifier(rc), sql.Identifier(c))
                                                         for c, rc in zip(cols, ref_cols))
                            present = sql.SQL(" AND ").join(sql.SQL("m.{} IS NOT NULL").format(sql.Identifier(c))
                                                           for c in cols)
                            moved += set_aside(conn, table, stage(leaf), sql.SQL(
                                "{} AND NOT EXISTS (SELECT 1 FROM {} r WHERE {})").format(present, sql.SQL(ref), match),
                                f"references a {ref} row that no longer exists ({name})")
                for leaf in leaves:
                    for name, *_ in fks:
                        conn.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                            stage(leaf), sql.Identifier(name)))
                    conn.execute(p.bounds_check_sql(table.range, month, leaf))
                state.mark(conn, step, {"set_aside": moved})
            return moved
        except psycopg.errors.ForeignKeyViolation as exc:
            if attempt == 2:
                raise AdoptionError(f"{table.name} {p.month_year(month)}: {exc}") from exc
            log.info("%s %s: rows reference deleted rows (the app deleted them during the copy); setting them aside",
                     table.name, p.month_year(month))
    return moved


def attach_months(conn: psycopg.Connection, table: L.Converted, months: list[date], settings: Settings) -> None:
    """ATTACH every finished month to the new parent, in one short transaction."""
    step = f"attached:{table.name}"
    if state.done(conn, step):
        return
    referenced = sorted({r for *_, r in _parent_fks(conn, table)})

    def work() -> None:
        attached = set(month_ops.attached_months(conn, table.range))
        if referenced:
            lock_up_front(conn, [sql.SQL(r) for r in referenced], "ACCESS EXCLUSIVE", settings.adoption)
        for month in months:
            if month in attached:
                continue
            conn.execute(p.attach_child_sql(table.range, month))
            for leaf in _leaves(table, month):
                conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    stage(leaf), sql.Identifier(p.bounds_check_name(leaf))))
        state.mark(conn, step, {"months": len(months)})

    with_lock_retries(conn, settings.adoption, f"{table.name}: attaching {len(months)} month(s)", work, referenced)


def place_loader_default(conn: psycopg.Connection, table: L.Converted) -> tuple[int, int]:
    """Place the rows the loader could not route (they go to the months now attached, to the
    new default partition, or aside), then drop the loader."""
    step = f"loaded:{table.name}"
    if state.done(conn, step):
        return 0, 0
    shaping = Shaping(conn, table)
    with conn.transaction():
        conn.execute("SELECT set_config(%s, 'on', true)", (L.ROW_MOVE_SETTING,))
        source = sql.SQL("SELECT {} FROM {}").format(shaping.column_list(), stage(table.loader_default))
        placed, kept = place(conn, shaping, source)
        conn.execute(sql.SQL("DROP TABLE {}").format(stage(table.loader)))
        state.mark(conn, step, {"placed": placed, "set_aside": kept})
    return placed, kept


def provision(conn: psycopg.Connection, table: L.Converted, settings: Settings, today: date | None = None) -> None:
    """Every month from the oldest copied one to the horizon (gaps included), by
    `provisioning.ensure_months` on the shadow table (names resolve in the staging
    schema): empty months are created, rows waiting in the new default partition moved in."""
    today = today or datetime.now(timezone.utc).date()
    months = loader_months(conn, table)
    current = p.month_of(today)
    first = min(months[0], current) if months else current
    wanted = p.months_between(first, p.add_months(current, settings.partitions.horizon_months))
    # provisioning locks the referenced tables, the parent and its default in one statement,
    # each wait bounded by lock_timeout: divided, the waits cannot add up past the bound
    referenced = len({r for *_, r in _parent_fks(conn, table)})
    policy = provisioning.LockPolicy(lock_timeout_ms=max(10, settings.adoption.lock_timeout_ms // max(1, referenced)),
                                     retries=settings.adoption.lock_attempts)
    try:
        provisioning.ensure_months(conn, table.range, wanted, policy=policy)
    except provisioning.ProvisioningError as exc:
        raise AdoptionError(f"{table.name}: creating the months up to the horizon failed: {exc}") from exc
