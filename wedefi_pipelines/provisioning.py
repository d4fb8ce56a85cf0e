"""Monthly partition provisioning over a psycopg connection (no Dagster): ensure months,
keep the horizon ahead, drain the default partition, and inspect coverage, gaps and
default rows for the asset checks.

Where pg_partman's users get hurt, and what this module does instead:

* Data stuck in the default partition. A month with rows in the default is created as a
  bare table, the rows are copied into it and deleted from the default (the two counts
  must agree), its indexes are built, and it is ATTACHed, all in one transaction per
  month: the rows are either in the default or in the new child, never in both or neither.
* Gaps after an outage. The horizon fills every missing month between the oldest child
  and the newest month it needs (archived months count as covered), and never creates
  months nobody asked for: no child far outside the data.
* Lock trouble. Each unit of work is a short transaction that takes its locks up front
  in a fixed order (referenced tables, parent, default partition) under a short
  `lock_timeout`, and retries with backoff instead of queueing readers behind a pending
  ACCESS EXCLUSIVE request; a unit that gives up names the sessions that blocked it.
  Tables are never locked together, so provisioning cannot close a cycle across tables.
* Concurrency. A per-table transaction-level advisory lock serialises every writer of
  months (horizon, backfill, ingestion's `ensure_month`, restores); a session-level
  advisory lock makes whole provisioning runs take turns. Each child is created once.
* Hash partitions. "PortfolioSnapshot" months get their 4 hash sub-partitions;
  "TokenBalance"'s 8 hash partitions are verified and a missing one is recreated.

Empty months are created with `CREATE TABLE ... PARTITION OF`, which briefly takes ACCESS
EXCLUSIVE on the parent: measured, a bare table plus ATTACH (SHARE UPDATE EXCLUSIVE on
the parent) costs 1.3-1.9x as much per empty month, against a 1.2x budget. Months that
hold rows use the ATTACH path, where it is also the fastest (docs/partitioning.md).
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p

MIN_MONTHS_AHEAD = 1
MAX_MONTHS_AHEAD = 60


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# Session-level: one provisioning run (horizon or backfill) at a time.
RUN_LOCK_KEY = _lock_key("wedefi_pipelines.provisioning")


def table_lock_key(table: p.RangeTable | str) -> int:
    """The transaction-level advisory lock every unit of provisioning holds while it creates
    or drains a month of the table; whatever detaches, drops or re-attaches one (the cold
    archive, a restore) should hold it in that transaction too."""
    name = table if isinstance(table, str) else table.name
    return _lock_key(f"wedefi_pipelines.provisioning:{name}")


class ProvisioningError(RuntimeError):
    """A month could not be ensured; the message names the table, the month and why."""

    def __init__(self, message: str, outcomes: Sequence["MonthOutcome"] = ()) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)


@dataclass(frozen=True)
class LockPolicy:
    """How long provisioning waits for locks, and how often it tries again.

    `lock_timeout_ms` bounds every wait for a table lock, so a pending ACCESS EXCLUSIVE
    request never holds the readers queued behind it for longer; it is below PostgreSQL's
    default deadlock_timeout (1 s), so provisioning backs off before a deadlock is even
    looked for. The advisory waits are for other provisioners only and can be long.
    """

    lock_timeout_ms: int = 500
    retries: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    advisory_wait_s: float = 300.0
    months_per_transaction: int = 12

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base / 2 + random.uniform(0, base / 2)


DEFAULT_POLICY = LockPolicy()


@dataclass(frozen=True)
class MonthOutcome:
    """What ensuring one month of one table did.

    action: created | exists | archived (skipped: only a restore recreates it) |
    detached (skipped: a relation with the child's name exists but is not attached,
    a cold archive in progress) | failed.
    moved: rows moved out of the default partition into the month.
    """

    table: str
    month: date
    action: str
    moved: int = 0
    attempts: int = 1
    detail: str = ""


_RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)


# -- catalog and data reads ---------------------------------------------------------------

def _as_table(table: p.RangeTable | str) -> p.RangeTable:
    return table if isinstance(table, p.RangeTable) else p.range_table(table)


def _regclass(conn: psycopg.Connection, name: str) -> str:
    return sql.Identifier(name).as_string(conn)


def archived_months(conn: psycopg.Connection, table: p.RangeTable | str) -> set[date]:
    """Months whose rows live in the cold tier: status 'archived' in the archive metadata
    of the table or of any table archived with it (PortfolioSnapshot and PositionSnapshot
    move together). A restored month ('restored') is an ordinary month again."""
    table = _as_table(table)
    query = sql.SQL(" UNION ").join(
        sql.SQL("SELECT month_year FROM {} WHERE status = 'archived'").format(
            sql.Identifier(f"{member.name}_archive_metadata"))
        for member in p.RANGE_TABLES if member.group == table.group
    )
    return {p.parse_month(r[0]) for r in conn.execute(query)}


def default_rows_by_month(
    conn: psycopg.Connection, table: p.RangeTable | str, start: date | None = None, end: date | None = None
) -> dict[date, int]:
    """Row counts in the table's default partition, by UTC month; `start`/`end` (months,
    end exclusive) narrow the read to an index range of the default's time index."""
    table = _as_table(table)
    col = sql.Identifier(table.time_column)
    where = sql.SQL("")
    params: list[datetime] = []
    if start is not None:
        where = sql.SQL(" WHERE {col} >= %s AND {col} < %s").format(col=col)
        params = [p.month_bounds(start)[0], p.month_bounds(end or p.add_months(start, 1))[0]]
    query = sql.SQL(
        "SELECT date_trunc('month', {col})::date, count(*) FROM {default}{where} GROUP BY 1 ORDER BY 1"
    ).format(col=col, default=sql.Identifier(p.default_name(table)), where=where)
    return {m: n for m, n in conn.execute(query, params)}


def months_with_default_rows(
    conn: psycopg.Connection, table: p.RangeTable | str, start: date, end: date
) -> list[date]:
    """The months of [start, end) that have rows in the default partition, found by
    probing the default's time index for the next row (one probe per month found, plus
    one), not by reading its rows: cheap even when an outage left millions there."""
    table = _as_table(table)
    query = sql.SQL("SELECT min({col}) FROM {default} WHERE {col} >= %s AND {col} < %s").format(
        col=sql.Identifier(table.time_column), default=sql.Identifier(p.default_name(table)))
    found: list[date] = []
    cursor, stop = p.month_bounds(start)[0], p.month_bounds(end)[0]
    while cursor < stop:
        first = conn.execute(query, (cursor, stop)).fetchone()[0]
        if first is None:
            break
        found.append(p.month_of(first))
        cursor = p.month_bounds(found[-1])[1]
    return found


def has_default_partition(conn: psycopg.Connection, table: p.RangeTable | str) -> bool:
    table = _as_table(table)
    row = conn.execute(
        "SELECT partdefid <> 0 FROM pg_partitioned_table WHERE partrelid = %s::regclass",
        (_regclass(conn, table.name),),
    ).fetchone()
    return bool(row and row[0])


def _existing_relations(conn: psycopg.Connection, names: Sequence[str]) -> set[str]:
    rows = conn.execute(
        "SELECT n FROM unnest(%s::text[]) AS n WHERE to_regclass(quote_ident(n)) IS NOT NULL", (list(names),)
    )
    return {r[0] for r in rows}


def _referenced_tables(conn: psycopg.Connection, table: p.RangeTable) -> list[str]:
    """Tables the parent's foreign keys point at: creating a child adds triggers there."""
    rows = conn.execute(
        "SELECT DISTINCT c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid"
        " WHERE k.conrelid = %s::regclass AND k.contype = 'f' ORDER BY 1",
        (_regclass(conn, table.name),),
    )
    return [r[0] for r in rows]


_BLOCKERS = """
SELECT DISTINCT a.pid, a.state, coalesce(a.application_name, ''),
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120),
       coalesce(round(extract(epoch FROM now() - a.xact_start))::int, 0)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.pid <> pg_backend_pid()
   AND (l.relation = ANY (SELECT to_regclass(n) FROM unnest(%s::text[]) AS n)
        OR (l.locktype = 'advisory' AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid))
 ORDER BY 1
"""


def _table_blockers(conn: psycopg.Connection, table: p.RangeTable) -> str:
    try:
        with conn.transaction():
            relations = [table.name, p.default_name(table), *_referenced_tables(conn, table)]
    except psycopg.Error as exc:
        return f"(could not read the catalog: {exc})"
    return _blockers(conn, relations, table_lock_key(table))


def _blockers(conn: psycopg.Connection, relations: Sequence[str], advisory_key: int | None = None) -> str:
    """Who holds locks on these relations (or the advisory key) right now, for an error
    message; read in a transaction (or savepoint) of its own, best effort."""
    keys = (None, None) if advisory_key is None else ((advisory_key >> 32) & 0xFFFFFFFF, advisory_key & 0xFFFFFFFF)
    try:
        with conn.transaction():
            rows = conn.execute(_BLOCKERS, ([_regclass(conn, r) for r in relations], *keys)).fetchall()
    except psycopg.Error as exc:  # the evidence is best effort; the original error stays
        return f"(could not read pg_locks: {exc})"
    if not rows:
        return "no session holds a conflicting lock any more"
    return "; ".join(f"pid {pid} ({app or 'no application_name'}, {state}, transaction open {age}s): {query}"
                     for pid, state, app, query, age in rows)


# -- locks and transactions ---------------------------------------------------------------

def _set_lock_timeout(ms: float) -> sql.Composed:
    return sql.SQL("SELECT set_config('lock_timeout', {}, true)").format(sql.Literal(f"{int(ms)}ms"))


def _lock_for_ddl(conn: psycopg.Connection, table: p.RangeTable, referenced: Sequence[str], parent_mode: str) -> None:
    """Every lock the unit needs, up front and in one order: the tables our foreign keys
    reference (creating a child adds triggers there), the parent, then the default
    partition (scanned by CREATE ... PARTITION OF and ATTACH, emptied by a drain). The
    order is the app's own (a token row before its prices; parent before partition)."""
    statements = []
    if referenced:
        statements.append(sql.SQL("LOCK TABLE ONLY {} IN SHARE ROW EXCLUSIVE MODE").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in referenced)))
    statements.append(sql.SQL("LOCK TABLE ONLY {} IN {} MODE").format(sql.Identifier(table.name), sql.SQL(parent_mode)))
    statements.append(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(
        sql.Identifier(p.default_name(table))))
    conn.execute(sql.SQL("; ").join(statements))


def _check_usable(conn: psycopg.Connection) -> bool:
    """True when the caller has a transaction open (work then joins it, under savepoints)."""
    status = conn.info.transaction_status
    if status == TransactionStatus.INTRANS:
        return True
    if status == TransactionStatus.IDLE:
        return False
    raise ProvisioningError(f"the connection is not usable for provisioning (transaction status {status.name})")


@contextmanager
def run_lock(conn: psycopg.Connection, policy: LockPolicy = DEFAULT_POLICY) -> Iterator[None]:
    """Hold the session-level provisioning lock: runs take turns; a run waiting longer than
    `policy.advisory_wait_s` fails naming the session that holds it."""
    if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("run_lock needs an autocommit connection outside a transaction")
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(policy.advisory_wait_s * 1000)}ms")))
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise ProvisioningError(
            f"another provisioning run held the provisioning lock for more than {policy.advisory_wait_s:g}s: "
            f"{_blockers(conn, [], RUN_LOCK_KEY)}"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK_KEY,))


# -- ensuring months ----------------------------------------------------------------------

def ensure_month(
    conn: psycopg.Connection,
    table: p.RangeTable | str,
    month: date | datetime,
    *,
    allow_archived: bool = False,
    policy: LockPolicy = DEFAULT_POLICY,
) -> MonthOutcome:
    """Make sure the month's child exists with its indexes (and hash sub-partitions), with
    any of its rows waiting in the default partition moved in. Idempotent.

    An archived month is skipped unless `allow_archived` (the restore path). On an idle
    connection the work commits in its own transaction; inside the caller's transaction
    it runs under a savepoint and the advisory lock is held until the caller commits, so
    a concurrent provisioner never sees a half-made month; call it there before the
    transaction touches the table (locks the caller already holds, say RowExclusive from
    an insert, would make two such callers wait on each other until lock_timeout).
    Raises ProvisioningError.
    """
    return ensure_months(conn, table, [month], allow_archived=allow_archived, policy=policy)[0]


def ensure_months(
    conn: psycopg.Connection,
    table: p.RangeTable | str,
    months: Iterable[date | datetime],
    *,
    allow_archived: bool = False,
    policy: LockPolicy = DEFAULT_POLICY,
    raise_on_failure: bool = True,
) -> list[MonthOutcome]:
    """`ensure_month` for many months of one table, oldest first.

    Empty months are created up to `policy.months_per_transaction` per transaction; a
    month with rows in the default gets a transaction of its own. With
    `raise_on_failure=False` a month that fails is reported as action 'failed' and the
    other months still proceed.
    """
    table = _as_table(table)
    wanted = sorted({p.month_of(m) for m in months})
    if not wanted:
        return []
    in_caller_tx = _check_usable(conn)
    with_rows: set[date] = set()
    with conn.transaction():
        if not in_caller_tx:
            # Inside the caller's transaction this read would keep a lock on the default
            # until the caller commits, and block whoever holds the advisory lock: there,
            # each unit finds its rows under the advisory lock instead.
            with_rows = set(months_with_default_rows(conn, table, wanted[0], p.add_months(wanted[-1], 1)))
        referenced = _referenced_tables(conn, table)
    outcomes: list[MonthOutcome] = []
    for unit in _units(wanted, with_rows, policy.months_per_transaction):
        try:
            outcomes.extend(_run_unit(conn, table, unit, allow_archived, policy, referenced))
        except ProvisioningError as exc:
            failed = [MonthOutcome(table.name, m, "failed", detail=str(exc)) for m in unit]
            if raise_on_failure:
                raise ProvisioningError(str(exc), outcomes + failed) from exc.__cause__
            outcomes.extend(failed)
    return outcomes


def _units(months: list[date], with_rows: set[date], per_transaction: int) -> list[list[date]]:
    """Runs of months without default rows, chunked; each month with rows on its own."""
    units: list[list[date]] = []
    run: list[date] = []
    for month in months:
        if month in with_rows:
            if run:
                units.append(run)
                run = []
            units.append([month])
            continue
        run.append(month)
        if len(run) >= per_transaction:
            units.append(run)
            run = []
    if run:
        units.append(run)
    return units


def _run_unit(
    conn: psycopg.Connection, table: p.RangeTable, months: list[date], allow_archived: bool, policy: LockPolicy,
    referenced: Sequence[str],
) -> list[MonthOutcome]:
    span = p.month_year(months[0]) if len(months) == 1 else f"{p.month_year(months[0])}..{p.month_year(months[-1])}"
    attempt = 0
    while True:
        attempt += 1
        in_caller_tx = _check_usable(conn)
        previous_timeout = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0] if in_caller_tx else None
        try:
            with conn.transaction():
                outcomes = _unit(conn, table, months, allow_archived, policy, referenced, attempt)
                if previous_timeout is not None:
                    conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous_timeout,))
                return outcomes
        except _RETRYABLE as exc:
            if attempt > policy.retries:
                raise ProvisioningError(
                    f"{table.name} {span}: gave up after {attempt} attempts "
                    f"(lock_timeout {policy.lock_timeout_ms} ms): {str(exc).strip()}; "
                    f"held by: {_table_blockers(conn, table)}"
                ) from exc
            time.sleep(policy.backoff(attempt))
        except (psycopg.Error, month_ops.MoveError) as exc:
            raise ProvisioningError(
                f"{table.name} {span}: {type(exc).__name__}: {str(exc).strip()} "
                f"(rolled back: rows waiting in {p.default_name(table)} stay there)"
            ) from exc


def _unit(
    conn: psycopg.Connection, table: p.RangeTable, months: list[date], allow_archived: bool,
    policy: LockPolicy, referenced: Sequence[str], attempt: int,
) -> list[MonthOutcome]:
    """One unit of work, inside a transaction (or savepoint): read the state under the
    table's advisory lock, then lock and act only if something is to be done."""
    conn.execute(sql.SQL("; ").join([
        _set_lock_timeout(policy.advisory_wait_s * 1000),
        sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.Literal(table_lock_key(table))),
        _set_lock_timeout(policy.lock_timeout_ms),
    ]))

    start, end = months[0], p.add_months(months[-1], 1)
    attached = set(month_ops.attached_months(conn, table))
    archived = archived_months(conn, table)
    existing = _existing_relations(conn, [p.child_name(table, m) for m in months])
    with_rows = set(months_with_default_rows(conn, table, start, end))

    done: dict[date, MonthOutcome] = {}
    todo: list[date] = []
    for month in months:
        if month in attached:
            if month in with_rows:
                todo.append(month)
            else:
                done[month] = MonthOutcome(table.name, month, "exists", attempts=attempt)
        elif month in archived and not allow_archived:
            note = ""
            if month in with_rows:
                waiting = default_rows_by_month(conn, table, month, p.add_months(month, 1)).get(month, 0)
                note = f"; {waiting} late row(s) wait in {p.default_name(table)} for the cold archive"
            done[month] = MonthOutcome(table.name, month, "archived", attempts=attempt,
                                       detail=f"archived to the cold tier: only a restore recreates it{note}")
        elif p.child_name(table, month) in existing:
            done[month] = MonthOutcome(
                table.name, month, "detached", attempts=attempt,
                detail=f"{p.child_name(table, month)} exists but is not attached (a cold archive in progress?): "
                       "left to the tiering job",
            )
        else:
            todo.append(month)
    if not todo:
        return [done[m] for m in months]

    # CREATE ... PARTITION OF needs ACCESS EXCLUSIVE on the parent; moving rows in uses
    # ATTACH, for which SHARE UPDATE EXCLUSIVE (not blocking readers or writers) is enough.
    creates_empty = any(m not in attached and m not in with_rows for m in todo)
    _lock_for_ddl(conn, table, referenced, "ACCESS EXCLUSIVE" if creates_empty else "SHARE UPDATE EXCLUSIVE")
    with_rows = set(months_with_default_rows(conn, table, start, end))  # stable now: nobody writes the default
    for month in todo:
        waiting = month in with_rows
        if month in attached and not waiting:
            done[month] = MonthOutcome(table.name, month, "exists", attempts=attempt)
        elif month in attached:
            moved = month_ops.move_from_default(conn, table, month, p.child_name(table, month))
            done[month] = MonthOutcome(
                table.name, month, "exists", moved=moved, attempts=attempt,
                detail=f"{moved} row(s) were in {p.default_name(table)} although the child existed: moved in",
            )
        elif waiting or not creates_empty:
            with month_ops.staged_month(conn, table, month) as child:
                moved = month_ops.move_from_default(conn, table, month, child) if waiting else 0
            done[month] = MonthOutcome(table.name, month, "created", moved=moved, attempts=attempt)
        else:
            conn.execute(sql.SQL(";\n").join(p.create_child_sql(table, month)))
            done[month] = MonthOutcome(table.name, month, "created", attempts=attempt)
    return [done[m] for m in months]


# -- the horizon --------------------------------------------------------------------------

@dataclass(frozen=True)
class HorizonPlan:
    horizon: tuple[date, ...]
    ensure: tuple[date, ...]
    left_in_default: dict[date, str]


def validate_months_ahead(months_ahead: object) -> int:
    if isinstance(months_ahead, bool) or not isinstance(months_ahead, int) or not (
        MIN_MONTHS_AHEAD <= months_ahead <= MAX_MONTHS_AHEAD
    ):
        raise ValueError(
            f"months_ahead must be an integer from {MIN_MONTHS_AHEAD} to {MAX_MONTHS_AHEAD}, got {months_ahead!r}"
        )
    return months_ahead


def plan_horizon(
    today: date | datetime,
    months_ahead: int,
    attached: Iterable[date],
    archived: Iterable[date],
    default_months: Iterable[date],
    earliest: date,
) -> HorizonPlan:
    """Which months the horizon must ensure, and which default rows it must leave alone.

    Ensured: the current month and the next `months_ahead`; every month holding rows in
    the default partition, unless archived (the cold archive takes late rows) or outside
    [min(earliest, oldest child), current + MAX_MONTHS_AHEAD] (a bad timestamp must not
    conjure decades of children); and every missing month between the oldest and the
    newest of all these, so no gap remains. Archived months count as covered.
    """
    months_ahead = validate_months_ahead(months_ahead)
    horizon = p.horizon_months(today, months_ahead)
    attached, archived = set(attached), set(archived)
    covered = attached | archived
    lowest = min([p.month_of(earliest), *covered])
    highest = p.add_months(horizon[0], MAX_MONTHS_AHEAD)
    drain: set[date] = set()
    left: dict[date, str] = {}
    for month in default_months:
        if month in archived:
            left[month] = "archived month: its late rows wait for the cold archive job"
        elif month < lowest:
            left[month] = (f"older than partitions.start ({p.month_year(earliest)}) and every child: "
                           "set partitions.start earlier to drain them, or correct the rows")
        elif month > highest:
            left[month] = (f"more than {MAX_MONTHS_AHEAD} months ahead: most likely a bad timestamp; "
                           "correct the rows (they are kept in the default partition)")
        else:
            drain.add(month)
    span = covered | set(horizon) | drain
    every = set(p.months_between(min(span), max(span)))
    ensure = (every - covered) | (drain & attached)
    return HorizonPlan(tuple(horizon), tuple(sorted(ensure)), left)


@dataclass
class TableReport:
    table: str
    outcomes: list[MonthOutcome] = field(default_factory=list)
    oldest: date | None = None
    newest: date | None = None
    left_in_default: dict[date, tuple[int, str]] = field(default_factory=dict)

    @property
    def created(self) -> list[date]:
        return [o.month for o in self.outcomes if o.action == "created"]

    @property
    def moved(self) -> dict[date, int]:
        return {o.month: o.moved for o in self.outcomes if o.moved}

    @property
    def failed(self) -> list[MonthOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    @property
    def skipped(self) -> list[MonthOutcome]:
        return [o for o in self.outcomes if o.action in ("archived", "detached")]

    def summary(self) -> dict:
        return {
            "oldest": p.month_year(self.oldest) if self.oldest else None,
            "newest": p.month_year(self.newest) if self.newest else None,
            "created": [p.month_year(m) for m in self.created],
            "rows_moved_from_default": {p.month_year(m): n for m, n in self.moved.items()},
            "rows_left_in_default": {p.month_year(m): {"rows": n, "reason": why}
                                     for m, (n, why) in self.left_in_default.items()},
            "skipped": {p.month_year(o.month): o.detail for o in self.skipped},
            "failed": {p.month_year(o.month): o.detail for o in self.failed},
        }


@dataclass(frozen=True)
class HashReport:
    table: str
    modulus: int
    present: tuple[int, ...]
    created: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    def summary(self) -> dict:
        return {"modulus": self.modulus, "present": list(self.present), "created": list(self.created),
                "problems": list(self.problems)}


@dataclass
class HorizonReport:
    horizon: tuple[date, ...]
    tables: dict[str, TableReport]
    token_balance: HashReport

    @property
    def problems(self) -> list[str]:
        # a failed unit's details name its table and months; a unit of several months fails once
        found = list(dict.fromkeys(o.detail for t in self.tables.values() for o in t.failed))
        return found + list(self.token_balance.problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def created_count(self) -> int:
        return sum(len(t.created) for t in self.tables.values())

    @property
    def moved_count(self) -> int:
        return sum(sum(t.moved.values()) for t in self.tables.values())

    @property
    def left_count(self) -> int:
        return sum(n for t in self.tables.values() for n, _ in t.left_in_default.values())

    def rows(self) -> list[tuple[str, str, str, str, int, int]]:
        """Per table: name, oldest child, newest child, months created, rows moved, rows left."""
        return [
            (name, p.month_year(t.oldest) if t.oldest else "-", p.month_year(t.newest) if t.newest else "-",
             ", ".join(p.month_year(m) for m in t.created) or "-", sum(t.moved.values()),
             sum(n for n, _ in t.left_in_default.values()))
            for name, t in self.tables.items()
        ]

    def as_text(self) -> str:
        """A plain-text table of what the run left, for the CLI and the demo."""
        header = ("table", "oldest", "newest", "created", "rows moved", "rows left in default")
        rows = [header, *[tuple(str(v) for v in r) for r in self.rows()]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        tb = self.token_balance
        lines.append(f"{tb.table}: {len(tb.present)}/{tb.modulus} hash partitions"
                     + (f", recreated {list(tb.created)}" if tb.created else "")
                     + (f"; problems: {'; '.join(tb.problems)}" if tb.problems else ""))
        return "\n".join(lines)


def run_horizon(
    conn: psycopg.Connection,
    months_ahead: int,
    *,
    today: date | datetime | None = None,
    earliest: date | None = None,
    policy: LockPolicy = DEFAULT_POLICY,
) -> HorizonReport:
    """Ensure current + `months_ahead` months for every range table, drain the default
    partitions, fill gaps, verify TokenBalance's hash partitions.

    Needs an autocommit connection (session lock; one transaction per unit of work).
    Failures of single months do not stop the others; they are in the report's
    `problems`, and the caller decides to fail.
    """
    months_ahead = validate_months_ahead(months_ahead)
    today = today or datetime.now(timezone.utc)
    if earliest is None:
        from wedefi_pipelines.settings import current_settings
        earliest = current_settings().partitions.start
    tables: dict[str, TableReport] = {}
    horizon: tuple[date, ...] = ()
    with run_lock(conn, policy):
        for table in p.RANGE_TABLES:
            with conn.transaction():
                attached = month_ops.attached_months(conn, table)
                archived = archived_months(conn, table)
                waiting = default_rows_by_month(conn, table)
            plan = plan_horizon(today, months_ahead, attached, archived, waiting, earliest)
            horizon = plan.horizon
            report = TableReport(table.name)
            report.outcomes = ensure_months(conn, table, plan.ensure, policy=policy, raise_on_failure=False)
            with conn.transaction():
                after = month_ops.attached_months(conn, table)
                remaining = default_rows_by_month(conn, table)
            report.oldest, report.newest = (after[0], after[-1]) if after else (None, None)
            failed = {o.month: o.detail for o in report.failed}
            for month, count in remaining.items():
                reason = plan.left_in_default.get(month) or failed.get(month) or "arrived during the run"
                report.left_in_default[month] = (count, reason)
            tables[table.name] = report
        token_balance = verify_hash_partitions(conn, p.TOKEN_BALANCE, policy=policy)
    return HorizonReport(horizon, tables, token_balance)


def provision_months(
    conn: psycopg.Connection,
    months: Iterable[date],
    *,
    tables: Sequence[p.RangeTable] = p.RANGE_TABLES,
    policy: LockPolicy = DEFAULT_POLICY,
) -> dict[str, list[MonthOutcome]]:
    """Ensure the given months for every range table under the run lock (the backfill
    path of `table_partitions`); failures are reported as outcomes, not raised."""
    months = sorted({p.month_of(m) for m in months})
    with run_lock(conn, policy):
        return {t.name: ensure_months(conn, t, months, policy=policy, raise_on_failure=False) for t in tables}


# -- hash-partitioned tables --------------------------------------------------------------

_HASH_BOUND = re.compile(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)", re.IGNORECASE)


def hash_partitions(conn: psycopg.Connection, table: p.HashTable) -> dict[str, tuple[int, int]]:
    """name -> (modulus, remainder) of every partition attached to a hash-partitioned table."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        (_regclass(conn, table.name),),
    )
    found = {}
    for name, bound in rows:
        match = _HASH_BOUND.search(bound or "")
        found[name] = (int(match.group(1)), int(match.group(2))) if match else (0, -1)
    return found


def verify_hash_partitions(
    conn: psycopg.Connection, table: p.HashTable = p.TOKEN_BALANCE, *, policy: LockPolicy = DEFAULT_POLICY,
) -> HashReport:
    """Check the table has exactly its `modulus` hash partitions; recreate a missing one
    (an INSERT whose hash lands in a hole fails, so the app would lose writes), unless its
    name is taken by a detached table or the layout is not ours, which are reported."""
    with conn.transaction():
        found = hash_partitions(conn, table)
    problems = [f"{table.name}: partition {name} has bound modulus {mod} remainder {rem}, expected modulus {table.modulus}"
                for name, (mod, rem) in sorted(found.items()) if mod != table.modulus]
    present = sorted(rem for mod, rem in found.values() if mod == table.modulus)
    missing = [r for r in range(table.modulus) if r not in present]
    created: list[int] = []
    if problems:
        return HashReport(table.name, table.modulus, tuple(present), (), tuple(problems))
    for remainder in missing:
        name = f"{table.name}_part_{remainder}"
        try:
            for attempt in range(policy.retries + 1):
                try:
                    with conn.transaction():
                        conn.execute(_set_lock_timeout(policy.lock_timeout_ms))
                        if _existing_relations(conn, [name]):
                            problems.append(f"{table.name}: no partition for remainder {remainder}, and {name} "
                                            "exists unattached: attach or rename it by hand")
                            break
                        conn.execute(sql.SQL(
                            "CREATE TABLE {sub} PARTITION OF {parent} FOR VALUES WITH (MODULUS {m}, REMAINDER {r})"
                        ).format(sub=sql.Identifier(name), parent=sql.Identifier(table.name),
                                 m=sql.Literal(table.modulus), r=sql.Literal(remainder)))
                        created.append(remainder)
                        break
                except _RETRYABLE:
                    if attempt == policy.retries:
                        raise
                    time.sleep(policy.backoff(attempt + 1))
        except psycopg.Error as exc:
            problems.append(f"{table.name}: could not create {name}: {str(exc).strip()}")
    return HashReport(table.name, table.modulus, tuple(sorted(present + created)), tuple(created), tuple(problems))


# -- inspection for the asset checks ------------------------------------------------------

@dataclass(frozen=True)
class TableInspection:
    table: str
    attached: tuple[date, ...]
    archived: frozenset[date]
    default_rows: dict[date, int]
    has_default: bool

    @property
    def covered(self) -> set[date]:
        return set(self.attached) | set(self.archived)


def inspect_table(conn: psycopg.Connection, table: p.RangeTable | str) -> TableInspection:
    table = _as_table(table)
    exists = has_default_partition(conn, table)
    return TableInspection(
        table=table.name,
        attached=tuple(month_ops.attached_months(conn, table)),
        archived=frozenset(archived_months(conn, table)),
        default_rows=default_rows_by_month(conn, table) if exists else {},
        has_default=exists,
    )


def inspect_partitions(conn: psycopg.Connection) -> list[TableInspection]:
    return [inspect_table(conn, t) for t in p.RANGE_TABLES]


def missing_horizon_months(covered: Iterable[date], today: date | datetime, months_ahead: int) -> list[date]:
    """Months of [current, current + months_ahead] that are neither attached nor archived."""
    covered = set(covered)
    return [m for m in p.horizon_months(today, months_ahead) if m not in covered]


def gap_months(covered: Iterable[date]) -> list[date]:
    """Months missing between the oldest and the newest covered month."""
    covered = set(covered)
    if not covered:
        return []
    return [m for m in p.months_between(min(covered), max(covered)) if m not in covered]
