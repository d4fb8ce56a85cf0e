"""Every DDL statement on a month, and every row move between relations, in one place.

Used by provisioning (create, drain the default), ingestion's whole-month loads, the cold
archive (detach, freeze late rows, drop) and the restore (reload, attach), so each of
these is written once:

* `create_months`: empty months with `CREATE TABLE ... PARTITION OF` (hash sub-partitions
  and per-child indexes included), sent in one round trip;
* `staged_month`: a month that holds rows is built as a bare table named like the child,
  loaded, indexed, given a CHECK matching its bounds (so ATTACH skips its validation
  scan) and ATTACHed, in the caller's transaction: the month appears complete or not at
  all (loading a bare table and indexing after beats loading an indexed child: docs/
  partitioning.md);
* `detach_child` / `drop_relation`;
* `move_rows`: INSERT the rows into the target with named columns, then DELETE them from
  the source, under a lock that keeps writers out of the source in between; the two
  counts must agree or the caller's transaction rolls back. The transaction-local
  setting `wedefi.row_move` is on meanwhile, so the app-compatibility triggers (the
  "PortfolioSnapshot" -> "PositionSnapshot" cascade) know a row is moving, not going.
* `locked_transaction`: a transaction under `lock_timeout` holding provisioning's table
  locks of the given tables, retried with backoff: what detaching, dropping and
  re-attaching months run in.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import date
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import psycopg
from psycopg import sql

from wedefi_pipelines import locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import (attached_months, is_attached, relation_exists,  # noqa: F401 (re-exported)
                                      table_columns)

log = logging.getLogger(__name__)
T = TypeVar("T")
ROW_MOVE_SETTING = "wedefi.row_move"


class MoveError(RuntimeError):
    """Rows copied into the target and rows deleted from the source differ."""


# -- children --------------------------------------------------------------------------------

def create_months(conn: psycopg.Connection, table: p.RangeTable, months: Iterable[date]) -> None:
    """Empty months as partitions of the parent (ACCESS EXCLUSIVE on it, briefly), one round trip."""
    statements = [s for month in months for s in p.create_child_sql(table, month)]
    if statements:
        conn.execute(sql.SQL(";\n").join(statements))


def create_bare_child(conn: psycopg.Connection, table: p.RangeTable, month: date) -> str:
    """A standalone table shaped like the parent and named like the month's child (hash
    sub-partitions included), with no index yet. Fails if the name is taken."""
    conn.execute(sql.SQL(";\n").join(p.create_bare_child_sql(table, month)))
    return p.child_name(table, month)


def index_and_attach(conn: psycopg.Connection, table: p.RangeTable, month: date) -> None:
    """Build the per-child indexes on the loaded bare child, prove its bounds, attach it.

    The parent's own keys (PK / unique) are built by ATTACH itself. The CHECK lets ATTACH
    skip scanning the child; it is dropped afterwards because the partition bound then
    enforces the same thing.
    """
    child = p.child_name(table, month)
    for statement in p.create_child_indexes_sql(table, month):
        conn.execute(statement)
    leaves = p.leaf_names(table, month) if table.hash_column else [child]
    for leaf in leaves:  # ATTACH checks the leaves of a partitioned child: prove the bounds there
        conn.execute(p.bounds_check_sql(table, month, leaf))
    conn.execute(p.attach_child_sql(table, month))
    for leaf in leaves:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(leaf), sql.Identifier(p.bounds_check_name(leaf))))


@contextmanager
def staged_month(conn: psycopg.Connection, table: p.RangeTable, month: date) -> Iterator[str]:
    """Create the month's child bare, let the caller load it, then index and attach it.

    Run inside a transaction: if the caller or the attach fails, the rollback removes the
    bare table and nothing is half-attached.
    """
    # an autocommit connection inside `with conn.transaction():` is in a transaction block too
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("staged_month needs a transaction: a failure must roll the bare table back")
    child = create_bare_child(conn, table, month)
    yield child
    index_and_attach(conn, table, month)


def create_hash_partition(conn: psycopg.Connection, table: p.HashTable, remainder: int) -> None:
    """One partition of a hash-partitioned table (a missing one: its rows would fail to insert)."""
    conn.execute(p.hash_partition_sql(p.hash_partition_name(table, remainder), table.name, table.modulus, remainder))


def detach_child(conn: psycopg.Connection, table: p.RangeTable, month: date) -> None:
    """Plain DETACH (CONCURRENTLY is refused while a default partition exists): ACCESS
    EXCLUSIVE on the parent, so run it in a `locked_transaction` (lock_timeout, retries)."""
    conn.execute(p.detach_child_sql(table, month))


def drop_relation(conn: psycopg.Connection, name: str) -> None:
    conn.execute(p.drop_table_sql(name))


def create_late_table(conn: psycopg.Connection, table: p.RangeTable, month: date) -> str:
    """The standalone table an archive run freezes a month's late rows in."""
    name = p.late_name(table, month)
    conn.execute(p.create_like_sql(name, table))
    return name


# -- row moves -------------------------------------------------------------------------------

def move_rows(conn: psycopg.Connection, table: p.RangeTable, source: str, target: str,
              where: sql.Composable) -> int:
    """Move the rows of `source` matching `where` into `target`, in the caller's
    transaction; returns the count.

    The source is locked against writers first (SHARE ROW EXCLUSIVE; readers go on), so
    the copy and the delete see the same rows; they must count the same, or MoveError and
    the caller's rollback leave every row where it was. Two statements beat one
    `DELETE ... RETURNING` feeding an INSERT (its tuplestore spills to disk). Columns are
    named, so relations whose physical column order differs still line up.
    """
    src, dst = sql.Identifier(source), sql.Identifier(target)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in table_columns(conn, table.name))
    previous = conn.execute("SELECT current_setting(%s, true)", (ROW_MOVE_SETTING,)).fetchone()[0]
    conn.execute("SELECT set_config(%s, 'on', true)", (ROW_MOVE_SETTING,))
    conn.execute(sql.SQL("LOCK TABLE ONLY {} IN SHARE ROW EXCLUSIVE MODE").format(src))
    copied = conn.execute(sql.SQL("INSERT INTO {dst} ({cols}) SELECT {cols} FROM {src} WHERE {where}").format(
        dst=dst, cols=columns, src=src, where=where)).rowcount
    deleted = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(src, where)).rowcount
    if copied != deleted:
        raise MoveError(f"{table.name}: copied {copied} row(s) into {target} but deleted {deleted} from {source}: "
                        "roll back")
    conn.execute("SELECT set_config(%s, %s, true)", (ROW_MOVE_SETTING, previous or "off"))
    return copied


def move_from_default(conn: psycopg.Connection, table: p.RangeTable, month: date, target: str) -> int:
    """Move the month's rows out of the default partition into `target` (a staged bare
    child, an attached one, or a late-row table)."""
    return move_rows(conn, table, p.default_name(table), target, p.time_window_sql(table, month))


# -- locked transactions ---------------------------------------------------------------------

def locked_transaction(db, tables: Sequence[p.RangeTable], policy: locks.LockPolicy, what: str,
                       body: Callable[[psycopg.Connection], T], logger: logging.Logger | None = None) -> T:
    """Run `body(conn)` in one primary transaction under `policy.lock_timeout_ms`, holding
    provisioning's table lock of each of `tables` (in name order, as provisioning takes
    them one at a time: the two never deadlock), retried until it gets its locks.

    Holding the table locks keeps provisioning from creating a child for a month whose
    archive (or restore) is committing: it reads "is this month archived?" under them.
    """
    ordered = sorted(tables, key=lambda t: t.name)

    def attempt(_: int) -> T:
        with db.connect("primary") as conn:
            locks.set_timeout(conn, "lock_timeout", policy.lock_timeout_ms)
            for table in ordered:
                locks.xact_lock(conn, "provisioning.table", table.name)
            return body(conn)

    def held_by() -> str:
        with db.connect("primary") as conn:
            return locks.blockers(conn, [t.name for t in ordered],
                                  [locks.advisory_key("provisioning.table", t.name) for t in ordered])

    return locks.with_lock_retries(policy, what, attempt, logger or log, held_by)
