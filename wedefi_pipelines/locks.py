"""Every lock the pipelines take, in one place: named advisory locks, lock timeouts, retries.

Advisory-lock keys come from one function, `advisory_key(name, *args)`, over the registry
`LOCKS` below (docs/architecture.md has it as a table: which lock guards what, who takes
it, in which order). Each lock keeps the numeric key it had before the registry existed,
so an old and a new process (a CLI run during a rolling deploy) still exclude each other;
`wedefi_pipelines_tests/test_locks.py` pins them. New locks use `_named_bigint`.

Table locks (DETACH, CLUSTER, CREATE ... PARTITION OF) are taken under a short
`lock_timeout` and retried with backoff by `with_lock_retries`, so a pending ACCESS
EXCLUSIVE request never queues the app's queries for long. `statement_timeout` and
`lock_timeout` are set by `set_timeout`, transaction-locally unless asked otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence, TypeVar

import psycopg
from psycopg import sql

from wedefi_pipelines.pghash import hashtextextended

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)


# -- key derivations (the four historical forms; new locks use _named_bigint) -----------------

def _named_bigint(template: str) -> Callable[..., tuple[int]]:
    """One bigint key: the first 8 bytes of sha256(template.format(*args)), signed."""
    def derive(*args: object) -> tuple[int]:
        digest = hashlib.sha256(template.format(*args).encode()).digest()
        return (int.from_bytes(digest[:8], "big", signed=True),)
    return derive


def _namespace_pair(namespace: str) -> Callable[..., tuple[int, ...]]:
    """(int4 namespace from sha256, the caller's int4) or the namespace alone."""
    space = int.from_bytes(hashlib.sha256(namespace.encode()).digest()[:4], "big", signed=True)

    def derive(*args: int) -> tuple[int, ...]:
        return (space, *(int(a) for a in args))
    return derive


def _crc32_pair(space: int, template: str) -> Callable[..., tuple[int, int]]:
    def derive(*args: object) -> tuple[int, int]:
        value = zlib.crc32(template.format(*args).encode())
        return space, value - (1 << 32) if value >= 1 << 31 else value
    return derive


def _hashtext(template: str) -> Callable[..., tuple[int]]:
    """PostgreSQL's `hashtextextended(text, 0)`, computed here (pghash)."""
    def derive(*args: object) -> tuple[int]:
        return (hashtextextended(template.format(*args)),)
    return derive


# -- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AdvisoryLock:
    """A named advisory lock: what it guards, who takes it, and how its key is made."""

    name: str
    scope: Literal["session", "transaction"]
    guards: str
    taken_by: str
    derive: Callable[..., tuple[int, ...]]
    order: int  # locks are taken in ascending order when one holder needs several


LOCKS: dict[str, AdvisoryLock] = {lock.name: lock for lock in (
    AdvisoryLock("migrations", "session", "applying sql/ (one runner at a time)",
                 "migrations.migrate, adoption's final step", _named_bigint("wedefi_pipelines.migrations"), 0),
    AdvisoryLock("adoption", "session", "one adoption of the database at a time",
                 "adoption", _named_bigint("wedefi_pipelines.adoption"), 5),
    AdvisoryLock("provisioning.run", "session", "whole provisioning runs take turns",
                 "provisioning.run_horizon / provision_months",
                 _named_bigint("wedefi_pipelines.provisioning"), 10),
    AdvisoryLock("tiering.month", "session",
                 "one warm, archive or restore run per (archive group, month); args: group, 'YYYY-MM'",
                 "tiering.warm_month, tiering.archive.Archiver, tiering.restore.restore_month",
                 _crc32_pair(0x57544945, "{}:{}"), 20),
    AdvisoryLock("positions.complete", "session", "one complete_positions run at a time",
                 "positions.complete_positions", _named_bigint("wedefi_pipelines.positions.complete"), 25),
    AdvisoryLock("provisioning.table", "transaction",
                 "creating, draining, detaching, dropping or attaching any month of one range table; arg: table",
                 "provisioning units, the archive's freeze and record steps, restore, complete_positions",
                 _named_bigint("wedefi_pipelines.provisioning:{}"), 30),
    AdvisoryLock("iceberg.table", "transaction",
                 "changing one archived table's Iceberg table (its metadata_location swap); arg: table",
                 "tiering.iceberg (the archive's record step, restore, upgrade, snapshot expiry)",
                 _named_bigint("wedefi_pipelines.iceberg:{}"), 35),
    AdvisoryLock("ingest.price_day", "transaction", "price loads of one UTC day; arg: days since 1970-01-01",
                 "ingest.prices", _namespace_pair("wedefi.ingest.PriceSnapshot.day"), 40),
    AdvisoryLock("ingest.portfolio_tick", "transaction", "one portfolio tick; arg: minutes since 1970-01-01",
                 "ingest.portfolio", _namespace_pair("wedefi.ingest.PortfolioSnapshot.tick"), 40),
    AdvisoryLock("ingest.balances", "transaction", "balance syncs take turns",
                 "ingest.balances", _namespace_pair("wedefi.ingest.TokenBalance"), 40),
    AdvisoryLock("ingest.governance", "transaction", "governance syncs take turns",
                 "ingest.governance", _namespace_pair("wedefi.ingest.GovernanceLock"), 40),
    AdvisoryLock("rollups.family", "transaction", "refreshes of one rollup family take turns; arg: 'price' or 'portfolio'",
                 "rollups.refresh", _named_bigint("wedefi_pipelines.rollups:{}"), 45),
    AdvisoryLock("alerting.incident", "transaction", "writers of one incident's \"Alert\" row; arg: source:incident",
                 "health.alerting (run-failure and health sensors)", _hashtext("{}"), 50),
)}


def advisory_key(name: str, *args: object) -> tuple[int, ...]:
    """The key of the named lock for these arguments: one bigint, or two int4s."""
    try:
        lock = LOCKS[name]
    except KeyError:
        raise ValueError(f"unknown advisory lock {name!r}; registered: {sorted(LOCKS)}") from None
    return lock.derive(*args)


def _placeholders(key: tuple[int, ...]) -> sql.SQL:
    return sql.SQL(", ").join(sql.SQL("%s") for _ in key)


def xact_lock(conn: psycopg.Connection, name: str, *args: object) -> None:
    """Take the named transaction-level lock (released at commit or rollback)."""
    key = advisory_key(name, *args)
    conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(_placeholders(key)), key)


def try_session_lock(conn: psycopg.Connection, name: str, *args: object) -> bool:
    key = advisory_key(name, *args)
    return conn.execute(sql.SQL("SELECT pg_try_advisory_lock({})").format(_placeholders(key)), key).fetchone()[0]


def session_unlock(conn: psycopg.Connection, name: str, *args: object) -> None:
    if not conn.closed:
        key = advisory_key(name, *args)
        conn.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(_placeholders(key)), key)


class LockBusy(RuntimeError):
    """A session-level lock stayed held by another session for longer than we may wait."""


@contextmanager
def session_lock(conn: psycopg.Connection, name: str, *args: object, wait_s: float, what: str = "",
                 logger: logging.Logger | None = None) -> Iterator[None]:
    """Hold the named session-level lock on `conn` (autocommit, outside a transaction),
    polling up to `wait_s` for the session that holds it; LockBusy names that session."""
    logger = logger or log
    deadline = time.monotonic() + wait_s
    announced = False
    while not try_session_lock(conn, name, *args):
        if time.monotonic() >= deadline:
            raise LockBusy(f"{what or name} is locked by {holders(conn, name, *args)} (waited {wait_s:.0f}s)")
        if not announced:
            logger.info("%s: waiting for %s to finish", what or name, holders(conn, name, *args))
            announced = True
        time.sleep(0.2)
    try:
        yield
    finally:
        session_unlock(conn, name, *args)


@contextmanager
def tier_month_lock(db, group: str, month_year: str, policy: "LockPolicy", logger: logging.Logger | None = None
                    ) -> Iterator[psycopg.Connection]:
    """Hold the (archive group, month) lock of the tier operations on a dedicated primary
    connection (autocommit; a killed run releases it with its connection): a second warm,
    archive or restore run of the month waits for the first, then finds the work done."""
    with db.autocommit("primary") as conn, session_lock(
            conn, "tiering.month", group, month_year, wait_s=policy.advisory_wait_s, logger=logger,
            what=f"{group} {month_year} (another warm, archive or restore run of that month)"):
        yield conn


def _lock_ids(key: tuple[int, ...]) -> tuple[int, int, int]:
    """pg_locks' (classid, objid, objsubid) of an advisory key."""
    if len(key) == 1:
        return (key[0] >> 32) & 0xFFFFFFFF, key[0] & 0xFFFFFFFF, 1
    return key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF, 2


_BLOCKERS = """
SELECT DISTINCT a.pid, a.state, coalesce(a.application_name, ''),
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120),
       coalesce(round(extract(epoch FROM now() - a.xact_start))::int, 0)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.pid <> pg_backend_pid()
   AND (l.relation = ANY (SELECT to_regclass(n) FROM unnest(%s::text[]) AS n)
        OR (l.locktype = 'advisory' AND (l.classid, l.objid, l.objsubid) IN
            (SELECT c::oid, o::oid, s::int2 FROM unnest(%s::bigint[], %s::bigint[], %s::int[]) AS k(c, o, s))))
 ORDER BY 1
"""


def blockers(conn: psycopg.Connection, relations: Sequence[str] = (),
             advisory: Sequence[tuple[int, ...]] = ()) -> str:
    """Who holds locks on these relations (or advisory keys) right now, for an error
    message; read in a transaction (or savepoint) of its own, best effort."""
    ids = [_lock_ids(k) for k in advisory]
    try:
        with conn.transaction():
            rows = conn.execute(_BLOCKERS, ([sql.Identifier(r).as_string(conn) for r in relations],
                                            [i[0] for i in ids], [i[1] for i in ids], [i[2] for i in ids])).fetchall()
    except psycopg.Error as exc:  # the evidence is best effort; the original error stays
        return f"(could not read pg_locks: {exc})"
    if not rows:
        return "no session holds a conflicting lock any more"
    return "; ".join(f"pid {pid} ({app or 'no application_name'}, {state}, transaction open {age}s): {query}"
                     for pid, state, app, query, age in rows)


def is_held(conn: psycopg.Connection, name: str, *args: object) -> bool:
    """Whether some session (this one included) holds the named advisory lock now."""
    classid, objid, objsubid = _lock_ids(advisory_key(name, *args))
    return conn.execute("""SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                              AND classid = %s::oid AND objid = %s::oid AND objsubid = %s)""",
                        (classid, objid, objsubid)).fetchone()[0]


def holders(conn: psycopg.Connection, name: str, *args: object) -> str:
    """The session holding the named advisory lock, in words."""
    classid, objid, objsubid = _lock_ids(advisory_key(name, *args))
    row = conn.execute(
        """SELECT a.pid, a.application_name, a.state, now() - a.backend_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objid = %s::oid AND l.objsubid = %s
              AND l.granted LIMIT 1""", (classid, objid, objsubid)).fetchone()
    return f"pid {row[0]} ({row[1] or 'no application_name'}, {row[2]}, connected {row[3]})" if row else "another session"


# -- timeouts and retries --------------------------------------------------------------------

def set_timeout(conn: psycopg.Connection, setting: Literal["lock_timeout", "statement_timeout"], ms: float,
                *, local: bool = True) -> None:
    """Set lock_timeout or statement_timeout, for the transaction (`local`) or the session."""
    conn.execute("SELECT set_config(%s, %s, %s)", (setting, f"{int(ms)}ms", local))


def timeout_sql(setting: Literal["lock_timeout", "statement_timeout"], ms: float) -> sql.Composed:
    """The same as set_timeout (transaction-local), as a statement to batch with others."""
    return sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(setting), sql.Literal(f"{int(ms)}ms"))


@dataclass(frozen=True)
class LockPolicy:
    """How long table locks are waited for, and how often a unit of work tries again.

    `lock_timeout_ms` bounds every wait for a table lock, so a pending ACCESS EXCLUSIVE
    request never holds the readers queued behind it for longer; `retries` more attempts
    follow the first, after `backoff_s * 2**(n-1)` (capped at `max_backoff_s`, jittered
    into its upper half when `jitter`). `advisory_wait_s` bounds waits for our own
    advisory locks, which are other runs of ours and may be long.
    """

    lock_timeout_ms: int = 500
    retries: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    advisory_wait_s: float = 300.0
    jitter: bool = True

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base / 2 + random.uniform(0, base / 2) if self.jitter else base


# Provisioning: below PostgreSQL's default deadlock_timeout (1 s), so it backs off before a
# deadlock is even looked for.
PROVISIONING_POLICY = LockPolicy()


def tier_policy(tiers) -> LockPolicy:
    """The tier operations' policy, from settings.tiers (lock_timeout_ms, lock_attempts, lock_wait_s)."""
    return LockPolicy(lock_timeout_ms=tiers.lock_timeout_ms, retries=tiers.lock_attempts - 1, backoff_s=0.2,
                      max_backoff_s=30.0, advisory_wait_s=tiers.lock_wait_s, jitter=False)


class LockContention(RuntimeError):
    """A table lock could not be had within every attempt; says what blocked it."""

    def __init__(self, what: str, policy: LockPolicy, cause: psycopg.Error, held_by: str = "") -> None:
        self.what, self.policy, self.cause, self.held_by = what, policy, cause, held_by
        self.cause_text = (cause.diag.message_primary or str(cause)).strip()
        super().__init__(f"{what}: no lock after {policy.attempts} attempts of {policy.lock_timeout_ms} ms "
                         f"({self.cause_text}); the tables are busy, retry later"
                         + (f"; held by: {held_by}" if held_by else ""))


def with_lock_retries(policy: LockPolicy, what: str, attempt: Callable[[int], T],
                      logger: logging.Logger | None = None, held_by: Callable[[], str] | None = None) -> T:
    """Run `attempt(n)` (one whole transaction that sets lock_timeout) until it gets its
    locks; after the last attempt raise LockContention naming the holders (`held_by`)."""
    logger = logger or log
    for number in range(1, policy.attempts + 1):
        try:
            return attempt(number)
        except RETRYABLE as exc:
            if number == policy.attempts:
                raise LockContention(what, policy, exc, held_by() if held_by else "") from exc
            pause = policy.backoff(number)
            logger.warning("%s: lock not available (%s), attempt %d/%d, retrying in %.1fs",
                           what, exc.diag.message_primary, number, policy.attempts, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")
