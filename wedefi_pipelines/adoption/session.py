"""Adoption's database sessions: how they are marked, where they look, and how a strong
lock is waited for (briefly, then again later) so the app is never held up for long."""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence, TypeVar

import psycopg
from psycopg import sql

from wedefi_pipelines import locks
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.settings import AdoptionSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Called with the name of each point adoption passes (after_stage, mid_copy, in_swap, ...):
# tests crash or stall a run there (`adopt(..., on_point=...)`).
ON_POINT: ContextVar[Callable[[str], None] | None] = ContextVar("wedefi_adopt_on_point", default=None)
# QueryCanceled: the statement_timeout that bounds the total wait of a multi-table LOCK
RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected, psycopg.errors.QueryCanceled)


class AdoptionError(RuntimeError):
    """Adoption stopped; the message says why and what to do. Re-running `adopt` resumes."""


class LockContention(AdoptionError):
    """A strong lock could not be had within every attempt; the message names who held it."""


def connect(url: str) -> psycopg.Connection:
    """An autocommit session marked `wedefi-pipelines:adopt`, resolving names in the staging
    schema first (so `partitioning`'s unqualified DDL builds the shadow tables there) and
    noticing a vanished client within a second (a killed `adopt` releases its locks fast)."""
    conn = psycopg.connect(url, autocommit=True, application_name=L.APPLICATION_NAME,
                           options=f"-c search_path={L.STAGE},{L.APP_SCHEMA}")
    try:
        conn.execute("SET client_connection_check_interval = '1s'")
    except psycopg.errors.InvalidParameterValue:  # a platform without the kernel support: the default 0
        pass
    return conn


def ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


def old(table: str) -> sql.Identifier:
    """The app's table while it is still the live one."""
    return sql.Identifier(L.APP_SCHEMA, table)


def stage(name: str) -> sql.Identifier:
    return sql.Identifier(L.STAGE, name)


@contextmanager
def catalog_path(conn: psycopg.Connection) -> Iterator[None]:
    """Inside a transaction (or savepoint): search_path = pg_catalog, so catalog functions
    (pg_get_constraintdef, pg_get_triggerdef, ...) print every name qualified; restored after."""
    previous = conn.execute("SELECT current_setting('search_path')").fetchone()[0]
    conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
    try:
        yield
    finally:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            conn.execute("SELECT set_config('search_path', %s, true)", (previous,))


def set_local_lock_timeout(conn: psycopg.Connection, ms: int) -> None:
    locks.set_timeout(conn, "lock_timeout", ms)


def backoff(attempt: int) -> float:
    base = min(5.0, 0.2 * 2 ** (attempt - 1))
    return base / 2 + random.uniform(0, base / 2)


_BLOCKERS = """
SELECT DISTINCT a.pid, coalesce(a.application_name, ''), a.state,
       coalesce(round(extract(epoch FROM now() - a.xact_start))::int, 0),
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 100)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.pid <> pg_backend_pid()
   AND l.relation = ANY (SELECT to_regclass(n) FROM unnest(%s::text[]) AS n)
 ORDER BY 1
"""


def blockers(conn: psycopg.Connection, relations: Sequence[str]) -> str:
    """Sessions holding locks on these (qualified, quoted) relations right now: best effort."""
    try:
        with conn.transaction():
            rows = conn.execute(_BLOCKERS, (list(relations),)).fetchall()
    except psycopg.Error as exc:
        return f"(could not read pg_locks: {exc})"
    if not rows:
        return "no session holds a lock on them any more"
    return "; ".join(f"pid {pid} ({app or 'no application_name'}, {state}, transaction open {age}s): {query}"
                     for pid, app, state, age, query in rows)


# (step, attempts, ms from the first lock request to the commit) of every strong-lock step of
# this process's adoption: the report prints them, so an operator sees what the app waited for.
LOCK_JOURNAL: list[tuple[str, int, float]] = []


def with_lock_retries(conn: psycopg.Connection, settings: AdoptionSettings, what: str,
                      work: Callable[[], T], relations: Sequence[str] = (),
                      on_retry: Callable[[], None] | None = None) -> T:
    """Run `work` in one transaction whose every lock wait is cut at `lock_timeout_ms`;
    on a timeout (or a deadlock) roll back, wait with jittered backoff, and try again, up to
    `lock_attempts` times. A pending strong lock queues the app's queries behind it, so a
    short wait repeated beats one long one."""
    for attempt in range(1, settings.lock_attempts + 1):
        try:
            started = time.monotonic()
            with conn.transaction():
                set_local_lock_timeout(conn, settings.lock_timeout_ms)
                result = work()
            LOCK_JOURNAL.append((what, attempt, round((time.monotonic() - started) * 1000, 1)))
            return result
        except RETRYABLE as exc:
            if attempt == settings.lock_attempts:
                raise LockContention(
                    f"{what}: no lock after {attempt} attempts of {settings.lock_timeout_ms} ms "
                    f"({exc.diag.message_primary}); held by: {blockers(conn, relations)}. "
                    "Nothing was changed by this step; run `wedefi-pipelines adopt` again later.") from exc
            pause = backoff(attempt)
            log.info("%s: lock not available (%s), attempt %d/%d, retrying in %.1fs",
                     what, exc.diag.message_primary, attempt, settings.lock_attempts, pause)
            time.sleep(pause)
            if on_retry is not None:
                on_retry()
    raise AssertionError("unreachable")


def crash_point(name: str) -> None:
    """A named point of the run: the hook in ON_POINT (tests) may crash or stall it there, to
    prove a re-run ends as an uninterrupted run would."""
    hook = ON_POINT.get()
    if hook is not None:
        hook(name)
