"""The target layout, taken from the project's own `sql/` (never a hand-copied DDL).

Every file of `sql/` is executed, in order, inside a schema of its own with
`search_path` set to that schema alone: the result is a complete copy of the project's
schema in which the four converted tables are the shadow tables adoption fills. Rolled
back, the same replay is the model the app's database is compared against (`shape.py`)
and `--plan` reads, so neither changes anything. A migration added later (a nullable
column, a trigger) reaches the shadow tables with no change here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from wedefi_pipelines import migrations
from wedefi_pipelines.adoption import layout as L

# A file naming `public.` explicitly would reach past the staging schema into the live one.
_QUALIFIED = re.compile(r"\bpublic\s*\.", re.IGNORECASE)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): 'numeric(36,18)', 'timestamp(3) without time zone', ...
    not_null: bool
    has_default: bool


@dataclass
class Table:
    name: str
    kind: str  # 'r' plain, 'p' partitioned
    columns: dict[str, Column] = field(default_factory=dict)
    index_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # index name -> its columns

    @property
    def indexes(self) -> set[str]:
        return set(self.index_columns)

    @property
    def index_keys(self) -> list[tuple[str, ...]]:
        return list(self.index_columns.values())
    foreign_keys: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)  # name -> (columns, referenced table)
    triggers: set[str] = field(default_factory=set)  # user triggers (not the internal ones of foreign keys)


@dataclass
class Model:
    tables: dict[str, Table]
    files: list[tuple[str, str]]  # (file name, sha256), in order


class ModelError(RuntimeError):
    """sql/ cannot be replayed into a staging schema; the message names the file."""


def sql_files() -> list[migrations.Migration]:
    files = migrations.discover()
    for migration in files:
        if _QUALIFIED.search(migration.path.read_text()):
            raise ModelError(f"{migration.path.name} names the public schema explicitly: adoption replays sql/ "
                             "in a staging schema and cannot follow it; leave names unqualified")
    return files


def replay(conn: psycopg.Connection, schema: str, files: list[migrations.Migration]) -> None:
    """Execute every file in `schema` (created here), inside the caller's transaction.
    A schema a file creates by name (0011's iceberg_catalog) belongs to the real database,
    not to the model: it is dropped again, so an abort leaves nothing behind and the swap's
    `migrate` creates it for real."""
    existing = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    previous = conn.execute("SELECT current_setting('search_path')").fetchone()[0]
    conn.execute(sql.SQL("SELECT set_config('search_path', {}, true)").format(
        sql.Literal(sql.Identifier(schema).as_string(conn))))
    for migration in files:
        try:
            with conn.transaction():
                conn.execute(migration.path.read_text())
        except psycopg.Error as exc:
            raise ModelError(f"{migration.path.name} could not be replayed in schema {schema}: {exc}") from exc
    conn.execute("SELECT set_config('search_path', %s, true)", (previous,))
    for (created,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname <> ALL(%s) AND nspname <> %s "
                                   "AND nspname NOT LIKE 'pg\\_%%'",
                                   (list(existing), schema)).fetchall():
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(created)))


_TABLES = """
SELECT c.relname, c.relkind FROM pg_class c
 WHERE c.relnamespace = %s::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""
_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = %s::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY c.relname, a.attnum
"""
_INDEXES = """
SELECT t.relname, i.relname, array(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY u(n, o)
                                   JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = u.n ORDER BY u.o)
  FROM pg_index x
  JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
 WHERE t.relnamespace = %s::regnamespace AND NOT t.relispartition
"""
_FOREIGN_KEYS = """
SELECT t.relname, k.conname, r.relname,
       array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o)
  FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_class r ON r.oid = k.confrelid
 WHERE k.contype = 'f' AND t.relnamespace = %s::regnamespace AND NOT t.relispartition
"""

_TRIGGERS = """
SELECT t.relname, g.tgname FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
 WHERE NOT g.tgisinternal AND t.relnamespace = %s::regnamespace AND NOT t.relispartition
"""


def read_tables(conn: psycopg.Connection, schema: str) -> dict[str, Table]:
    """Top-level tables of `schema` (partitions left out) with columns, index names and FKs."""
    tables = {name: Table(name, kind) for name, kind in conn.execute(_TABLES, (schema,))}
    for table, column, type_, not_null, has_default in conn.execute(_COLUMNS, (schema,)):
        tables[table].columns[column] = Column(column, type_, not_null, has_default)
    for table, index, columns in conn.execute(_INDEXES, (schema,)):
        tables[table].index_columns[index] = tuple(columns)
    for table, name, referenced, columns in conn.execute(_FOREIGN_KEYS, (schema,)):
        tables[table].foreign_keys[name] = (tuple(columns), referenced)
    for table, trigger in conn.execute(_TRIGGERS, (schema,)):
        tables[table].triggers.add(trigger)
    return tables


def read_model(conn: psycopg.Connection) -> Model:
    """The project's schema as sql/ builds it, read from a replay that is rolled back."""
    files = sql_files()
    with conn.transaction(force_rollback=True):
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(L.MODEL)))
        replay(conn, L.MODEL, files)
        tables = read_tables(conn, L.MODEL)
    missing = [t for t in L.MANAGED_TABLES if t not in tables]
    if missing:
        raise ModelError(f"sql/ does not create the managed table(s) {missing}: the adoption layout is out of date")
    return Model(tables, [(m.path.name, m.checksum) for m in files])
