"""The warm tier: an old month rewritten in place, still attached, for how it is read now.

A hot month is loaded in time order and indexed for writes and "latest" reads. Once warm
(30 days to a year), it is read as one token's or one wallet's history. So, per leaf
(DESIGN.md section 4; TOAST compression does nothing for these narrow rows):
  1. CLUSTER the leaf in the warm order (the table's `warm` layout), using the hot btree that
     starts with that order, or a temporary one: one rewrite, which also rebuilds the
     bloated time-ordered indexes compactly;
  2. BRIN on the order's columns (a page range then holds one key's consecutive times, so
     a key + time-range query reads a few ranges) replaces the btrees the order made
     redundant; the parent's keys (PK / unique) stay on every child;
  3. VACUUM (FREEZE, ANALYZE) every leaf, then mark the child's comment: the conversion
     is done only when that mark is there.
Steps 1-2 are one transaction (a crash leaves the hot layout untouched); CLUSTER takes
ACCESS EXCLUSIVE on one leaf for the rewrite, acquired under lock_timeout with retries.
Whether a month is due is the catalog's state and `policy.decide`'s answer; a month that
is not warm (hot, cold, archived, absent) is skipped with the reason.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog, locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.policy import Action, Decision, decide, needs_newest

log = logging.getLogger(__name__)

REWRITE_WORK_MEM = "256MB"


@dataclass
class Footprint:
    rows: int
    bytes: int
    query_ms: float | None  # the representative warm query: one key's first week of the month

    @property
    def bytes_per_row(self) -> float | None:
        return self.bytes / self.rows if self.rows else None


@dataclass
class WarmOutcome:
    table: str
    month: date
    action: str  # converted | finished | skipped
    reason: str
    before: Footprint | None = None
    after: Footprint | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict:
        meta: dict = {"table": self.table, "month": p.month_year(self.month), "action": self.action,
                      "reason": self.reason}
        for label, fp in (("before", self.before), ("after", self.after)):
            if fp is not None:
                meta["rows"] = fp.rows
                meta[f"bytes_{label}"] = fp.bytes
                if fp.bytes_per_row is not None:
                    meta[f"bytes_per_row_{label}"] = round(fp.bytes_per_row, 1)
                if fp.query_ms is not None:
                    meta[f"warm_query_ms_{label}"] = round(fp.query_ms, 3)
        if self.seconds:
            meta["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return meta


def footprint(conn: psycopg.Connection, table: p.RangeTable, month: date, repeat: int = 5) -> Footprint:
    """Rows, total bytes (heap, TOAST and every index of the leaves) and the warm query's time."""
    child = p.child_name(table, month)
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(child))).fetchone()[0]
    size = sum(conn.execute("SELECT pg_total_relation_size(%s::regclass)", (sql.Identifier(leaf).as_string(conn),)
                            ).fetchone()[0] for leaf in p.leaf_names(table, month))
    return Footprint(rows, size, warm_query_ms(conn, table, month, repeat))


def warm_query(conn: psycopg.Connection, table: p.RangeTable, month: date) -> sql.Composed | None:
    """One key's history for the first week of the month, through the parent (as the app reads it)."""
    key = table.warm.sample_key
    child = sql.Identifier(p.child_name(table, month))
    value = conn.execute(sql.SQL("SELECT {k} FROM {c} WHERE {k} IS NOT NULL LIMIT 1").format(
        k=sql.Identifier(key), c=child)).fetchone()
    if value is None:
        return None
    start = p.month_bounds(month)[0]
    return sql.SQL("SELECT * FROM {parent} WHERE {k} = {v} AND {t} >= {a} AND {t} < {b} ORDER BY {t}").format(
        parent=sql.Identifier(table.name), k=sql.Identifier(key), v=sql.Literal(value[0]),
        t=sql.Identifier(table.time_column), a=sql.Literal(start), b=sql.Literal(start + timedelta(days=7)))


def warm_query_ms(conn: psycopg.Connection, table: p.RangeTable, month: date, repeat: int = 5) -> float | None:
    """Median server-side execution time of the warm query (after one warm-up run)."""
    query = warm_query(conn, table, month)
    if query is None:
        return None
    explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + query
    times = []
    for i in range(repeat + 1):
        plan = conn.execute(explain).fetchone()[0]
        if i:
            times.append(plan[0]["Execution Time"])
    return statistics.median(times)


def _order_index(conn: psycopg.Connection, table: p.RangeTable, month: date, leaf: str) -> tuple[str, bool]:
    """An index on `leaf` whose leading columns are the warm order: (name, temporary?)."""
    order = list(table.warm.order)
    rows = conn.execute(
        """SELECT i.indexrelid::regclass::text,
                  array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n)::text[]
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
            WHERE i.indrelid = %s::regclass AND am.amname = 'btree' AND i.indpred IS NULL""",
        (sql.Identifier(leaf).as_string(conn),)).fetchall()
    for name, columns in rows:
        if list(columns[:len(order)]) == order:
            return name, False
    temp = f"{leaf}_warm_order"
    conn.execute(sql.SQL("CREATE INDEX {} ON {} ({})").format(
        sql.Identifier(temp), sql.Identifier(leaf), sql.SQL(", ").join(sql.Identifier(c) for c in order)))
    return sql.Identifier(temp).as_string(conn), True


def rewrite(conn: psycopg.Connection, table: p.RangeTable, month: date) -> None:
    """Steps 1-2 in the caller's transaction: BRIN, CLUSTER each leaf, drop the replaced btrees."""
    layout = table.warm
    child = p.child_name(table, month)
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(REWRITE_WORK_MEM)))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {child} USING brin ({cols}) WITH (pages_per_range = {ppr})"
                         ).format(name=sql.Identifier(layout.brin_name(table, month)), child=sql.Identifier(child),
                                  cols=sql.SQL(", ").join(sql.Identifier(c) for c in layout.brin),
                                  ppr=sql.Literal(layout.pages_per_range)))
    for leaf in p.leaf_names(table, month):
        index, temporary = _order_index(conn, table, month, leaf)
        conn.execute(sql.SQL("CLUSTER {} USING {}").format(sql.Identifier(leaf), sql.SQL(index)))
        if temporary:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
    for index in table.child_indexes:
        if index.suffix in layout.replaces:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(p.index_name(table, month, index))))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
        sql.Identifier(child), sql.Literal(f"{p.WARM_COMMENT}: rewritten {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")))


def vacuum_freeze(db: Database, table: p.RangeTable, month: date) -> None:
    child = p.child_name(table, month)
    with db.autocommit("primary") as conn:
        for leaf in p.leaf_names(table, month):
            conn.execute(sql.SQL("VACUUM (FREEZE, ANALYZE) {}").format(sql.Identifier(leaf)))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            sql.Identifier(child),
            sql.Literal(f"{p.WARM_COMMENT}: {p.VACUUMED} {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")))


def skip_reason(state: catalog.MonthState, decision: Decision) -> str | None:
    """None when the month is due for (the rest of) its warm conversion, else why not."""
    if decision.action is Action.WARM:
        return None
    if decision.action is Action.ARCHIVE:
        if state.attached:
            return f"cold, not warm: {decision.why}; the cold archive takes it"
        if state.frozen:
            return "frozen by an unfinished cold archive run"
        if state.archived:
            return "archived to the cold tier"
        return "no child for this month"
    if state.archived:
        return "archived to the cold tier"
    return decision.reason


def warm_month(db: Database, table: p.RangeTable | str, month: date, now: datetime | None = None,
               settings: Settings | None = None, logger: logging.Logger | None = None,
               measure: bool = True) -> WarmOutcome:
    """Convert one table's month to the warm layout if it is warm (idempotent)."""
    table = p.range_table(table) if isinstance(table, str) else table
    settings = settings or db.settings
    logger = logger or log
    month = p.month_of(month)
    now = now or datetime.now(timezone.utc)
    policy = locks.tier_policy(settings.tiers)
    with locks.tier_month_lock(db, table.group, p.month_year(month), policy, logger):
        with db.connect("primary") as conn:
            state = catalog.month_state(conn, table, month, default_rows="skip", newest=needs_newest(now, settings))
        decision = decide(state, now, settings)
        skip = skip_reason(state, decision)
        if skip is not None:
            return WarmOutcome(table.name, month, "skipped", skip)
        rewritten = state.rewritten
        seconds: dict[str, float] = {}
        before = after = None
        if measure:
            with db.connect("primary") as conn:
                before = footprint(conn, table, month)
        started = time.monotonic()
        if not rewritten:
            def attempt(_: int) -> None:
                with db.connect("primary") as conn:
                    locks.set_timeout(conn, "lock_timeout", policy.lock_timeout_ms)
                    rewrite(conn, table, month)

            locks.with_lock_retries(policy, f"warm rewrite of {p.child_name(table, month)}", attempt, logger)
            seconds["rewrite"] = time.monotonic() - started
        mark = time.monotonic()
        vacuum_freeze(db, table, month)
        seconds["vacuum_freeze"] = time.monotonic() - mark
        if measure:
            with db.connect("primary") as conn:
                after = footprint(conn, table, month)
            if after.rows != before.rows:
                logger.warning("%s: %d rows before, %d after (rows written meanwhile?)",
                               p.child_name(table, month), before.rows, after.rows)
        action = "converted" if not rewritten else "finished"
        reason = "warm" if not rewritten else "warm; the rewrite was done, the VACUUM (FREEZE) was not"
        logger.info("%s %s warm: %s", table.name, p.month_year(month),
                    f"{before.bytes} -> {after.bytes} bytes" if measure else action)
        return WarmOutcome(table.name, month, action, reason, before, after, seconds)
