"""`adopt --plan`: what adoption would do to this database, table by table; changes nothing.

It reads the app's tables (one scan of each: rows per month), replays sql/ in a
transaction it rolls back (the target layout), and prints: whether the database is in
WeDefiDaily's shape (or every difference that blocks adoption), per table the rows,
months, sizes and rows that will be set aside, what is carried over and what is not,
the disk headroom to have free, and every strong lock adoption takes, on what, for how
long. During an adoption it prints the steps done and what is left instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import psycopg
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.adoption import carry, copy, model, shape, state
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.session import connect, old
from wedefi_pipelines.settings import Settings, current_settings


@dataclass
class TablePlan:
    name: str
    rows: int
    heap_bytes: int
    total_bytes: int
    months: dict[date, int]
    layout: str
    set_aside: dict[str, int] = field(default_factory=dict)
    carried: dict = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass
class Plan:
    database: str
    server: str
    shape: shape.Shape | None = None
    tables: list[TablePlan] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    pending_changes: int = 0
    settings: Settings = field(default_factory=Settings)

    @property
    def headroom_bytes(self) -> int:
        """The new tables (about the old ones' size) plus the WAL written building them
        (about as much again, recycled at checkpoints unless archiving or a slot keeps it)."""
        return 2 * sum(t.total_bytes for t in self.tables)

    def as_text(self) -> str:
        out = [f"wedefi-pipelines adopt --plan: database {self.database} on PostgreSQL {self.server}"]
        if self.in_progress:
            out.append(f"an adoption is in progress; done so far: {', '.join(self.in_progress)}")
            out.append(f"changes logged and not replayed yet: {self.pending_changes:,}")
            out.append("run `wedefi-pipelines adopt` to resume it, or `wedefi-pipelines adopt --abort` (before any swap)")
            return "\n".join(out) + "\nnothing was changed."
        s = self.shape
        if s.state == "adopted":
            return "\n".join(out + ["already adopted: the four tables are partitioned; nothing to do"])
        if not s.ok:
            return "\n".join(out + ["REFUSED: " + s.refusal()])
        out.append(f"shape: WeDefiDaily's, as Prisma builds it (12 managed tables found; {len(s.other_tables)} other "
                   f"table(s) will not be touched: {', '.join(s.other_tables) or '-'})")
        out.append("")
        header = ("table", "rows", "size (heap / with indexes)", "months", "new layout", "set aside")
        rows = [header]
        for t in self.tables:
            months = f"{p.month_year(min(t.months))}..{p.month_year(max(t.months))} ({len(t.months)})" if t.months else "-"
            rows.append((f'"{t.name}"', f"{t.rows:,}", f"{_size(t.heap_bytes)} / {_size(t.total_bytes)}", months,
                         t.layout, f"{sum(t.set_aside.values()):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        for t in self.tables:
            out.append("")
            out.append(f'"{t.name}":')
            for reason, n in t.set_aside.items():
                out.append(f"  set aside (kept in public.{L.UNPLACED}, reported): {n:,} {reason}")
            c = t.carried
            out.append(f"  kept: owner {c['owner']}, {c['grants']} grant(s), {c['comments']} comment(s), triggers "
                       f"{c['triggers'] or 'none'}, policies {c['policies'] or 'none'} (RLS {c['rls']}), publications "
                       f"{c['publications'] or 'none'}, replica identity {c['replica_identity']}")
            out += [f"  names: {n}" for n in t.names]
            out += [f"  not carried: {n}" for n in t.not_carried]
            out += [f"  warning: {w}" for w in t.warnings]
        out += [f"note: {n}" for n in s.notes]
        a = self.settings.adoption
        out.append("")
        out.append(f"disk headroom needed: about {_size(self.headroom_bytes)} free (the new tables, about the old ones' "
                   f"size {_size(sum(t.total_bytes for t in self.tables))}, plus the WAL written meanwhile); the old "
                   "tables are dropped at the end")
        out.append(f"strong locks (each step waits at most {a.lock_timeout_ms} ms in all, then rolls back and retries "
                   f"with backoff, up to {a.lock_attempts} times; none is held while rows are copied):")
        out += [f"  {i}. {line}" for i, line in enumerate(lock_lines(self.tables, a), 1)]
        out.append("nothing was changed.")
        return "\n".join(out)


def lock_lines(tables: list[TablePlan], a) -> list[str]:
    ranged = ", ".join(f'"{t.name}"' for t in tables if t.months is not None and t.layout.startswith("RANGE"))
    return [
        'SHARE ROW EXCLUSIVE on "Token", "Wallet", "Protocol" (blocks their writes): the empty new tables\' foreign '
        "keys are added; milliseconds",
        'SHARE ROW EXCLUSIVE on "PriceSnapshot", "TokenBalance", "PortfolioSnapshot", "PositionSnapshot" (blocks '
        "writes): the capture triggers are installed, all four in one transaction; milliseconds",
        'SHARE ROW EXCLUSIVE on "Token"/"Wallet"/"Protocol", once per copied month: its foreign keys are added NOT '
        "VALID (the VALIDATE after it blocks nobody); milliseconds",
        f'ACCESS EXCLUSIVE on "Token"/"Wallet"/"Protocol" (blocks reads) once per table ({ranged}): every month is '
        "ATTACHed with keys, foreign keys and bounds already proven, a catalog update; milliseconds",
        'SHARE ROW EXCLUSIVE on "Token"/"Wallet"/"Protocol" while the empty months up to the horizon are created '
        "(provisioning, each wait a share of the bound); milliseconds",
        'ACCESS EXCLUSIVE on the old "PriceSnapshot"; on "TokenBalance"; on "PortfolioSnapshot" with '
        f'"PositionSnapshot" (blocks reads and writes): each swap, at most {a.swap_max_pending} changes replayed '
        f"and the names swapped, every statement cut at {a.swap_statement_timeout_ms} ms; tens of milliseconds",
        'SHARE on the new parents (blocks writes) while sql/ is recorded: its CREATE ... IF NOT EXISTS find '
        "everything there; milliseconds",
        'ACCESS EXCLUSIVE on "Token", "Wallet", "Protocol" as each old foreign key is dropped (its triggers '
        "there go), one at a time, before the old tables; milliseconds",
    ]


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duplicates(conn: psycopg.Connection, table: str, columns: tuple[str, ...]) -> int:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return conn.execute(sql.SQL("SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {} GROUP BY {} "
                                "HAVING count(*) > 1) d").format(old(table), cols)).fetchone()[0]


def _table_plan(conn: psycopg.Connection, target: model.Model, table: L.Converted, settings: Settings) -> TablePlan:
    rows, heap, total = conn.execute(sql.SQL("SELECT count(*), pg_relation_size(%(t)s::regclass), "
                                             "pg_total_relation_size(%(t)s::regclass) FROM {}").format(old(table.name)),
                                     {"t": old(table.name).as_string(conn)}).fetchone()
    model_table = target.tables[table.name]
    app_table = model.read_tables(conn, L.APP_SCHEMA)[table.name]
    if table.range is not None:
        months = copy.months_with_rows(conn, table)
        layout = f'RANGE ("{table.time_column}") monthly'
        if table.range.hash_column:
            layout += f', each month HASH ("{table.range.hash_column}") x {table.range.hash_modulus}'
        layout += f", + default, + {settings.partitions.horizon_months} months ahead"
    else:
        months = {}
        layout = f'HASH ("{table.hash.hash_column}") x {table.hash.modulus}'
    plan = TablePlan(table.name, rows, heap, total, months, layout)
    time_not_null = table.time_column is not None and model_table.columns[table.time_column].not_null
    if table.derived is not None:
        missing = rows - sum(months.values())
        if missing and time_not_null:
            plan.set_aside[f'whose "{table.derived.source_table}" row is missing (no "{table.derived.column}")'] = missing
        elif missing:
            plan.warnings.append(f'{missing:,} row(s) have no "{table.derived.source_table}" row: they go to the '
                                 f'default partition with a NULL "{table.derived.column}"')
    keys = []
    if table.range is not None:
        keys += [(p.index_name(table.range, date(2000, 1, 1), i).replace("2000_01", "YYYY_MM"), i.columns)
                 for i in table.range.child_indexes if i.unique]
    for key_name, columns in keys:
        if any(set(k) <= set(columns) for k in _unique_keys(conn, table.name)):
            continue
        dupes = _duplicates(conn, table.name, columns)
        if dupes:
            plan.set_aside[f"duplicate(s) of the new unique key {key_name} ({', '.join(columns)})"] = dupes
    keys_model = model_table.index_keys + ([i.columns for i in table.range.child_indexes] if table.range else [])
    c = carry.read(conn, L.APP_SCHEMA, table.name, keys_model, model_table.indexes)
    plan.carried, plan.not_carried, plan.warnings = c.summary(), c.not_carried, plan.warnings + c.warnings
    kept = sorted(app_table.indexes & model_table.indexes)
    same = [n for n in kept if app_table.index_columns[n] == model_table.index_columns[n]]
    if same:
        plan.names.append("kept: " + ", ".join(f'"{n}"' for n in same))
    for name in kept:
        if name not in same:
            plan.names.append(f'"{name}" kept, now ({", ".join(model_table.index_columns[name])}), was '
                              f'({", ".join(app_table.index_columns[name])})')
    for name in sorted(app_table.indexes - model_table.indexes):
        columns = app_table.index_columns[name]
        parent = [n for n, cols in model_table.index_columns.items() if cols[:len(columns)] == columns]
        child = [i for i in (table.range.child_indexes if table.range else ()) if i.columns[:len(columns)] == columns]
        if parent:
            plan.names.append(f'"{name}" ({", ".join(columns)}) -> "{parent[0]}" '
                              f'({", ".join(model_table.index_columns[parent[0]])})')
        elif child:
            plan.names.append(f'"{name}" ({", ".join(columns)}) -> per month "{table.name}_YYYY_MM_{child[0].suffix}" '
                              f'({", ".join(child[0].columns)})')
    fks = sorted(model_table.foreign_keys)
    if fks:
        plan.names.append("foreign keys: " + ", ".join(f'"{n}"' for n in fks))
    return plan


def _unique_keys(conn: psycopg.Connection, table: str) -> list[tuple[str, ...]]:
    return [tuple(r[0]) for r in conn.execute(
        "SELECT array(SELECT a.attname FROM unnest(x.indkey::int2[]) u(n) JOIN pg_attribute a"
        " ON a.attrelid = x.indrelid AND a.attnum = u.n) FROM pg_index x WHERE x.indrelid = %s::regclass"
        " AND x.indisunique", (old(table).as_string(conn),))]


def make_plan(url: str, settings: Settings | None = None) -> Plan:
    settings = settings or current_settings()
    with connect(url) as conn:
        database, server = conn.execute("SELECT current_database(), current_setting('server_version')").fetchone()
        plan = Plan(database, server, settings=settings)
        if state.in_progress(conn):
            plan.in_progress = [s for s, _ in state.steps(conn)]
            plan.pending_changes = state.pending(conn, [t.name for t in L.CONVERTED])
            return plan
        target = model.read_model(conn)
        plan.shape = shape.check(conn, target)
        if plan.shape.ok:
            plan.tables = [_table_plan(conn, target, t, settings) for t in L.CONVERTED]
    return plan
