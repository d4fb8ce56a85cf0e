"""Is this database WeDefiDaily's, as Prisma builds it? Compared with the model of `sql/`.

A database that differs in a way adoption cannot carry (a missing table, a column of
another type, a column the new layout would drop, a view or foreign key that would keep
pointing at the old table) is refused before anything changes, with every difference
named. Pure comparison over catalog snapshots read by `model.read_tables`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.model import Model, Table, read_tables
from wedefi_pipelines.adoption.session import AdoptionError


class AdoptionRefused(AdoptionError):
    """The database is not in the shape adoption converts; nothing was changed."""


@dataclass
class Shape:
    """`state`: 'prisma' (the four tables are plain: adoption can start), 'adopted' (all
    four are partitioned), 'mixed' or 'missing'. `differences` block adoption."""

    state: str
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    other_tables: list[str] = field(default_factory=list)  # the app's tables adoption never touches

    @property
    def ok(self) -> bool:
        return self.state == "prisma" and not self.differences

    def refusal(self) -> str:
        if all(d.startswith("missing table") for d in self.differences) and len(self.differences) == len(L.MANAGED_TABLES):
            return ("no WeDefiDaily tables in this database; nothing was changed (a new database needs "
                    "`wedefi-pipelines migrate`, not adoption)")
        lines = ["this database is not in WeDefiDaily's shape as Prisma builds it; nothing was changed:"]
        lines += [f"  - {d}" for d in self.differences]
        return "\n".join(lines)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def compare(model: Model, app: dict[str, Table], dependents: list[str], foreign_refs: list[str],
            taken_names: list[str]) -> Shape:
    """The differences between the app's tables and the model, for the managed tables."""
    differences: list[str] = []
    notes: list[str] = []
    missing = [t for t in L.MANAGED_TABLES if t not in app]
    differences += [f"missing table {_q(t)}" for t in missing]
    kinds = {c.name: app[c.name].kind for c in L.CONVERTED if c.name in app}
    if kinds and all(k == "p" for k in kinds.values()) and len(kinds) == len(L.CONVERTED):
        state = "adopted"
    elif missing:
        state = "missing"
    elif all(k == "r" for k in kinds.values()):
        state = "prisma"
    else:
        state = "mixed"
        differences.append("some of the converted tables are partitioned and some are not ("
                           + ", ".join(f"{_q(t)}: {'partitioned' if k == 'p' else 'plain'}" for t, k in kinds.items())
                           + ") and no adoption is in progress")
    for name in L.MANAGED_TABLES:
        if name in missing:
            continue
        target, actual = model.tables[name], app[name]
        converted = L.BY_NAME.get(name)
        derived = converted.derived.column if converted and converted.derived else None
        for column in target.columns.values():
            have = actual.columns.get(column.name)
            where = f"{_q(name)}.{_q(column.name)}"
            if have is None:
                if converted and state != "adopted" and (column.name == derived or not column.not_null or column.has_default):
                    continue  # filled by the copy, or NULL/default in the new layout
                differences.append(f"column {where} ({column.type}) is missing")
            elif have.type != column.type:
                differences.append(f"column {where} is {have.type}, expected {column.type}")
            elif converted and state == "prisma" and column.not_null and not have.not_null \
                    and column.name != converted.time_column:
                differences.append(f"column {where} allows NULL, but the partitioned layout requires a value")
        if converted and state == "prisma":
            for column in actual.columns.values():
                if column.name not in target.columns:
                    differences.append(f"column {_q(name)}.{_q(column.name)} ({column.type}) is not in the partitioned "
                                       "layout: its values would be lost (add it to sql/ first)")
            for fk, (columns, referenced) in target.foreign_keys.items():
                if referenced in L.BY_NAME:
                    continue
                if (columns, referenced) not in actual.foreign_keys.values():
                    differences.append(f"{_q(name)} has no foreign key ({', '.join(columns)}) -> {_q(referenced)} "
                                       f"(sql/ has {_q(fk)}): rows could reference missing {_q(referenced)} rows")
        elif not converted:
            for index in sorted(target.indexes - actual.indexes):
                differences.append(f"index {_q(index)} on {_q(name)} is missing (sql/ creates it; `migrate` would build "
                                   "it with a lock that blocks the app's writes)")
    differences += dependents + foreign_refs + taken_names
    if state == "prisma":
        for table in L.CONVERTED:
            for fk, (columns, referenced) in app[table.name].foreign_keys.items():
                if referenced in L.BY_NAME and not any(
                        (columns, referenced) == v for v in model.tables[table.name].foreign_keys.values()):
                    notes.append(f"foreign key {_q(fk)} {_q(table.name)}({', '.join(columns)}) -> {_q(referenced)} "
                                 "cannot reference a partitioned table by id alone: "
                                 + _replacement(model, referenced, table.name))
    return Shape(state, differences, notes)


def _replacement(model: Model, referenced: str, table: str) -> str:
    """What stands in for a foreign key the partitioned layout drops: a trigger sql/ defines, if any."""
    triggers = sorted(model.tables[referenced].triggers)
    if triggers:
        return f"sql/ defines trigger(s) {', '.join(_q(t) for t in triggers)} on {_q(referenced)} in its place"
    return (f"this version of sql/ has no replacement: deleting a {_q(referenced)} row will no longer delete its "
            f"{_q(table)} rows")


_DEPENDENTS = """
SELECT DISTINCT format('%%s %%I.%%I depends on %%I', CASE v.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END,
                       vn.nspname, v.relname, t.relname)
  FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
  JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
  JOIN pg_class t ON t.oid = d.refobjid
 WHERE d.refclassid = 'pg_class'::regclass AND t.relnamespace = %s::regnamespace AND t.relname = ANY(%s)
   AND v.oid <> t.oid
"""
_FOREIGN_REFS = """
SELECT format('foreign key %%I on %%I.%%I references %%I: a partitioned table can only be referenced through a key '
              'holding its partition columns (drop or change it first)', k.conname, n.nspname, s.relname, t.relname)
  FROM pg_constraint k JOIN pg_class t ON t.oid = k.confrelid JOIN pg_class s ON s.oid = k.conrelid
  JOIN pg_namespace n ON n.oid = s.relnamespace
 WHERE k.contype = 'f' AND t.relnamespace = %s::regnamespace AND t.relname = ANY(%s)
   AND NOT (s.relnamespace = t.relnamespace AND s.relname = ANY(%s))
"""
_RELATIONS = "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace"


def taken_names(conn: psycopg.Connection) -> list[str]:
    """Relations in public (tables, indexes) named as the new tables' partitions or their indexes would be."""
    pattern = re.compile("^(" + "|".join(re.escape(t.name) for t in L.CONVERTED) + r")_(\d{4}_\d{2}|default|part_\d+)")
    names = [r[0] for r in conn.execute(_RELATIONS, (L.APP_SCHEMA,)) if pattern.match(r[0])]
    return [f"{_q(n)} already exists in {L.APP_SCHEMA}: the partitioned layout needs that name" for n in sorted(names)]


def check(conn: psycopg.Connection, model: Model) -> Shape:
    names = [t.name for t in L.CONVERTED]
    app = read_tables(conn, L.APP_SCHEMA)
    dependents = [r[0] + " (drop it before adopting, re-create it after)" for r in conn.execute(_DEPENDENTS, (L.APP_SCHEMA, names))]
    foreign = [r[0] for r in conn.execute(_FOREIGN_REFS, (L.APP_SCHEMA, names, names))]
    shape = compare(model, app, dependents, foreign, taken_names(conn) if all(
        app.get(n) is not None and app[n].kind == "r" for n in names) else [])
    shape.other_tables = sorted(t for t in app if t not in L.MANAGED_TABLES)
    return shape
