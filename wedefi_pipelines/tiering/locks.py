"""Month locks and lock-timeout retries for the tier operations.

Dagster's `wedefi_archive` pool keeps archive runs one at a time, but `dagster asset
materialize` and the Python API bypass the run queue. So every tier operation on a month
(warm conversion, archive, restore) also holds a session-level PostgreSQL advisory lock
for (archive group, month) on a dedicated connection: a second run for the same month
waits for the first (then finds the work done), and a killed run releases it with its
connection. DDL that needs a lock on a busy parent (DETACH, CLUSTER) waits at most
`tiers.lock_timeout_ms` per attempt, so it never stalls the queries queued behind it,
and retries with backoff.
"""

from __future__ import annotations

import logging
import time
import zlib
from contextlib import contextmanager
from datetime import date
from typing import Callable, Iterator, TypeVar

import psycopg

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning import table_lock_key
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)

LOCK_CLASS = 0x57544945  # 'WTIE': tiering's namespace for the two-key advisory locks
T = TypeVar("T")


class MonthBusy(RuntimeError):
    """Another run holds the month's lock for longer than we may wait."""


class LockContention(RuntimeError):
    """A DDL lock could not be had within every attempt; the message says what blocked it."""


def month_lock_key(group: str, month: date) -> int:
    """A stable signed 32-bit key for (group, month)."""
    value = zlib.crc32(f"{group}:{p.month_year(month)}".encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def _holder(conn: psycopg.Connection, key: int) -> str:
    row = conn.execute(
        """SELECT a.pid, a.application_name, a.state, now() - a.backend_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objid = %s::oid AND l.granted LIMIT 1""",
        (LOCK_CLASS & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
    return f"pid {row[0]} ({row[1] or 'no application_name'}, {row[2]}, connected {row[3]})" if row else "another session"


@contextmanager
def month_lock(db: Database, group: str, month: date, wait_s: float, logger: logging.Logger | None = None
               ) -> Iterator[psycopg.Connection]:
    """Hold the (group, month) advisory lock on a dedicated primary connection, waiting up
    to `wait_s` for a run that holds it. Yields that connection (autocommit)."""
    logger = logger or log
    key = month_lock_key(group, month)
    with db.autocommit("primary") as conn:
        deadline = time.monotonic() + wait_s
        announced = False
        while not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
            if time.monotonic() >= deadline:
                raise MonthBusy(f"{group} {p.month_year(month)} is locked by {_holder(conn, key)}: another warm, "
                                f"archive or restore run of that month is still running (waited {wait_s:.0f}s)")
            if not announced:
                logger.info("%s %s: waiting for %s to finish", group, p.month_year(month), _holder(conn, key))
                announced = True
            time.sleep(0.2)
        try:
            yield conn
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))


def with_lock_retries(settings: Settings, what: str, attempt: Callable[[], T], logger: logging.Logger | None = None) -> T:
    """Run `attempt` (one whole transaction that sets lock_timeout) until it gets its locks."""
    logger = logger or log
    tries = settings.tiers.lock_attempts
    for number in range(1, tries + 1):
        try:
            return attempt()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            if number == tries:
                raise LockContention(f"{what}: no lock after {tries} attempts of {settings.tiers.lock_timeout_ms} ms "
                                     f"({exc.diag.message_primary}); the tables are busy, retry later") from exc
            pause = min(30.0, 0.2 * 2 ** (number - 1))
            logger.warning("%s: lock not available (%s), attempt %d/%d, retrying in %.1fs",
                           what, exc.diag.message_primary, number, tries, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def set_lock_timeout(conn: psycopg.Connection, settings: Settings) -> None:
    conn.execute(psycopg.sql.SQL("SET LOCAL lock_timeout = {}").format(
        psycopg.sql.Literal(f"{settings.tiers.lock_timeout_ms}ms")))


def hold_provisioning_locks(conn: psycopg.Connection, members: list[p.RangeTable]) -> None:
    """Take provisioning's per-table transaction lock for every table of the group.

    Detaching, dropping and re-attaching a month must not interleave with provisioning,
    which reads "is this month archived?" and creates children under the same lock: without
    it, a horizon run could create an empty child for a month whose archive just committed.
    Provisioning holds one table's lock per transaction, and these are taken in name order,
    so the two never deadlock.
    """
    for member in sorted(members, key=lambda m: m.name):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (table_lock_key(member),))

