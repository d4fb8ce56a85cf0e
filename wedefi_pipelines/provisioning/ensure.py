"""Ensuring months: a month's child exists with its indexes, its default-partition rows moved in.

A unit of work is one month with rows waiting in the default partition, or up to
`months_per_transaction` empty months, in one short transaction that takes its locks up
front in a fixed order (the tables our foreign keys reference, the parent, the default
partition) under a short `lock_timeout` and retries with backoff (locks.with_lock_retries)
instead of queueing readers behind a pending ACCESS EXCLUSIVE request; a unit that gives up
names the sessions that blocked it. Provisioning's per-table advisory lock serialises every
writer of months (horizon, backfill, ingestion, the tier operations). The DDL and row moves
themselves are month_ops'.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Iterable, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from wedefi_pipelines import catalog, locks, month_ops
from wedefi_pipelines import partitioning as p

RUN_LOCK_KEY = locks.advisory_key("provisioning.run")[0]


def table_lock_key(table: p.RangeTable | str) -> int:
    """The transaction-level advisory lock every unit of provisioning holds while it creates
    or drains a month of the table; whatever detaches, drops or re-attaches one (the cold
    archive, a restore) holds it in that transaction too (month_ops.locked_transaction)."""
    return locks.advisory_key("provisioning.table", table if isinstance(table, str) else table.name)[0]


class ProvisioningError(RuntimeError):
    """A month could not be ensured; the message names the table, the month and why."""

    def __init__(self, message: str, outcomes: Sequence["MonthOutcome"] = ()) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)


@dataclass(frozen=True)
class LockPolicy(locks.LockPolicy):
    """locks.LockPolicy (500 ms lock_timeout, 6 retries with jittered backoff 0.2..5 s,
    300 s for our own advisory locks), plus how many empty months one transaction creates."""

    months_per_transaction: int = 12


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



def _table_blockers(conn: psycopg.Connection, table: p.RangeTable) -> str:
    try:
        with conn.transaction():
            relations = [table.name, p.default_name(table), *catalog.referenced_tables(conn, table)]
    except psycopg.Error as exc:
        return f"(could not read the catalog: {exc})"
    return locks.blockers(conn, relations, [locks.advisory_key("provisioning.table", table.name)])


# -- locks and transactions ---------------------------------------------------------------

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
    locks.set_timeout(conn, "lock_timeout", policy.advisory_wait_s * 1000, local=False)
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise ProvisioningError(
            f"another provisioning run held the provisioning lock for more than {policy.advisory_wait_s:g}s: "
            f"{locks.blockers(conn, [], [locks.advisory_key('provisioning.run')])}"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")
    try:
        yield
    finally:
        locks.session_unlock(conn, "provisioning.run")


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
    table = p.range_table(table)
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
            with_rows = set(catalog.months_with_default_rows(conn, table, wanted[0], p.add_months(wanted[-1], 1)))
        referenced = catalog.referenced_tables(conn, table)
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

    def attempt(number: int) -> list[MonthOutcome]:
        in_caller_tx = _check_usable(conn)
        previous_timeout = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0] if in_caller_tx else None
        with conn.transaction():
            outcomes = _unit(conn, table, months, allow_archived, policy, referenced, number)
            if previous_timeout is not None:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous_timeout,))
            return outcomes

    try:
        return locks.with_lock_retries(policy, f"{table.name} {span}", attempt,
                                       held_by=lambda: _table_blockers(conn, table))
    except locks.LockContention as exc:
        raise ProvisioningError(
            f"{table.name} {span}: gave up after {policy.attempts} attempts (lock_timeout {policy.lock_timeout_ms} ms): "
            f"{exc.cause_text}; held by: {exc.held_by}") from exc.cause
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
        locks.timeout_sql("lock_timeout", policy.advisory_wait_s * 1000),
        sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.Literal(table_lock_key(table))),
        locks.timeout_sql("lock_timeout", policy.lock_timeout_ms),
    ]))

    start, end = months[0], p.add_months(months[-1], 1)
    attached = set(catalog.attached_months(conn, table))
    archived = catalog.archived_months(conn, table)
    existing = catalog.existing_relations(conn, [p.child_name(table, m) for m in months])
    with_rows = set(catalog.months_with_default_rows(conn, table, start, end))

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
                waiting = catalog.default_rows_by_month(conn, table, month, p.add_months(month, 1)).get(month, 0)
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
    with_rows = set(catalog.months_with_default_rows(conn, table, start, end))  # stable now: nobody writes the default
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
            month_ops.create_months(conn, table, [month])
            done[month] = MonthOutcome(table.name, month, "created", attempts=attempt)
    return [done[m] for m in months]
