"""Health probes: one cheap read of PostgreSQL's statistics each, over a given connection.

Every probe runs inside its own transaction with a local `statement_timeout`, so a
sensor never hangs on a busy server and the caller's session settings are untouched.
Statistics are per server: call each probe on the primary and on every replica
(replica scans and queries never show in the primary's views). The seed's four alerts'
probes are here; the maintenance probes of issue 15 in maintenance_probes.py. Figures from
pg_stat_statements and pg_statio_* are cumulative; the callers (rules.py) turn them into
deltas against the previous evaluation. Correct on PostgreSQL 15 to 18: the only column
that differs (pg_stat_statements' block read time, renamed in 1.11 / PG17) is chosen
from the installed extension's version.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Sequence

import psycopg
from psycopg import sql

from wedefi_pipelines import locks
from wedefi_pipelines.replication import ReplicaLag, replica_name, replication_lag

DEFAULT_TIMEOUT_MS = 2000


class ProbeError(RuntimeError):
    """A probe cannot run on this server; the message says what to fix."""


@contextmanager
def bounded(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Iterator[psycopg.Connection]:
    """A transaction whose statements stop after `timeout_ms` (set_config(..., true) is
    transaction-local, so the session's own statement_timeout comes back afterwards).
    (psycopg's pipeline mode, tried to save the round trips, measured slower here.)"""
    with conn.transaction():
        locks.set_timeout(conn, "statement_timeout", timeout_ms)
        yield conn


# -- replication ------------------------------------------------------------------------------

def replica_lags(primary: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> dict[str, ReplicaLag]:
    """Every standby streaming from this primary, by application_name (replication.py's
    measure, the one the read routing uses: byte lag 0 means lag 0)."""
    with bounded(primary, timeout_ms):
        return replication_lag(primary)


def replica_identity(replica: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> str:
    """The application_name this replica streams under, as it reports it itself."""
    with bounded(replica, timeout_ms):
        return replica_name(replica)


# -- statements (pg_stat_statements) ----------------------------------------------------------

@dataclass(frozen=True)
class StatementStat:
    """One normalized statement's cumulative figures in this database (summed over users)."""

    queryid: int
    calls: int
    total_exec_ms: float
    max_exec_ms: float
    rows: int
    shared_blks_hit: int
    shared_blks_read: int
    read_time_ms: float = 0.0  # shared block read time (track_io_timing); only when asked for

    @property
    def mean_exec_ms(self) -> float:
        return self.total_exec_ms / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class StatementSnapshot:
    stats_reset: datetime | None
    statements: dict[int, StatementStat]


_MISSING_PGSS = (
    "pg_stat_statements is not available in database {db!r}: add it to shared_preload_libraries "
    "and run CREATE EXTENSION pg_stat_statements (sql/0006_alerting.sql does when allowed); {error}"
)

# showtext => false: the texts live in a file the server would read for every call.
_STATEMENTS = """
SELECT i.stats_reset, s.queryid, s.calls, s.total_exec_time, s.max_exec_time, s.rows,
       s.shared_blks_hit, s.shared_blks_read, s.read_time
  FROM pg_stat_statements_info i
  LEFT JOIN LATERAL (
        SELECT queryid, sum(calls)::bigint AS calls, sum(total_exec_time) AS total_exec_time,
               max(max_exec_time) AS max_exec_time, sum(rows)::bigint AS rows,
               sum(shared_blks_hit)::bigint AS shared_blks_hit, sum(shared_blks_read)::bigint AS shared_blks_read,
               {read_time} AS read_time
          FROM pg_stat_statements(false)
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND queryid IS NOT NULL AND max_exec_time > %s
         GROUP BY queryid
       ) s ON true
"""


def block_read_time_column(conn: psycopg.Connection) -> str:
    """'shared_blk_read_time' from pg_stat_statements 1.11 (PostgreSQL 17), else 'blk_read_time'."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
    if row is None:
        raise ProbeError(_MISSING_PGSS.format(db=conn.info.dbname, error="the extension is not installed"))
    version = tuple(int(part) for part in row[0].split("."))
    return "shared_blk_read_time" if version >= (1, 11) else "blk_read_time"


def statement_snapshot(
    conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS, with_read_time: bool = False,
    min_max_exec_ms: float = -1.0,
) -> StatementSnapshot:
    """pg_stat_statements for the current database only (Dagster's own database and others
    may share the server), one row per queryid (summed over the roles that ran it), without
    the query texts. With `min_max_exec_ms`, only the entries whose slowest execution took
    longer (all the slow-query sensor needs; filtered before grouping, which measured 3x
    cheaper at 1,000 statements). The block read time costs one more round trip (its
    column's name depends on the extension's version)."""
    try:
        with bounded(conn, timeout_ms):
            read_time = sql.SQL("0::float8")
            if with_read_time:
                read_time = sql.SQL("sum({})").format(sql.Identifier(block_read_time_column(conn)))
            rows = conn.execute(sql.SQL(_STATEMENTS).format(read_time=read_time), (min_max_exec_ms,)).fetchall()
    except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable,
            psycopg.errors.ObjectNotInPrerequisiteState) as exc:
        raise ProbeError(_MISSING_PGSS.format(db=conn.info.dbname, error=" ".join(str(exc).split()))) from None
    stats_reset = rows[0][0] if rows else None
    statements = {
        r[1]: StatementStat(r[1], r[2], float(r[3]), float(r[4]), r[5], r[6], r[7], float(r[8] or 0.0))
        for r in rows if r[1] is not None
    }
    return StatementSnapshot(stats_reset, statements)


def statement_texts(
    conn: psycopg.Connection, queryids: Sequence[int], timeout_ms: int = DEFAULT_TIMEOUT_MS
) -> dict[int, str]:
    """Normalized texts of a few statements (reads the server's text file: call sparingly)."""
    if not queryids:
        return {}
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT DISTINCT ON (queryid) queryid, query FROM pg_stat_statements(true)
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND queryid = ANY(%s)""",
            (list(queryids),),
        ).fetchall()
    return {qid: text for qid, text in rows}


@dataclass(frozen=True)
class RunningQuery:
    pid: int
    user: str | None
    application_name: str | None
    duration_ms: float
    query: str


def running_queries(
    conn: psycopg.Connection, min_duration_ms: float, timeout_ms: int = DEFAULT_TIMEOUT_MS
) -> list[RunningQuery]:
    """Client queries in this database that have been executing for at least `min_duration_ms`
    (pg_stat_statements only sees a statement once it finishes)."""
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT pid, usename, application_name,
                      EXTRACT(EPOCH FROM clock_timestamp() - query_start) * 1000.0, left(query, 1000)
                 FROM pg_stat_activity
                WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
                  AND datname = current_database()
                  AND query_start <= clock_timestamp() - make_interval(secs => %s / 1000.0)
                ORDER BY query_start""",
            (float(min_duration_ms),),
        ).fetchall()
    return [RunningQuery(pid, user, app, float(ms), text) for pid, user, app, ms, text in rows]


# -- indexes (pg_statio_user_indexes, pg_stat_user_indexes) -----------------------------------

@dataclass(frozen=True)
class IndexIO:
    """Index blocks found in shared buffers (hit) or read from outside them, in this database."""

    blks_hit: int
    blks_read: int
    stats_reset: datetime | None


def index_io(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> IndexIO:
    with bounded(conn, timeout_ms):
        hit, read, reset = conn.execute(
            """SELECT coalesce(sum(idx_blks_hit), 0)::bigint, coalesce(sum(idx_blks_read), 0)::bigint,
                      (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database())
                 FROM pg_statio_user_indexes"""
        ).fetchone()
    return IndexIO(hit, read, reset)


@dataclass(frozen=True)
class IndexUsage:
    schema: str
    table: str
    index: str
    scans: int
    tuples_read: int
    size_bytes: int
    blks_hit: int
    blks_read: int
    enforces_constraint: bool  # a primary key, unique or exclusion index: needed even if never scanned


def index_usage(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[IndexUsage]:
    """Every index of this database as this server has used it since its statistics began."""
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT s.schemaname, s.relname, s.indexrelname, s.idx_scan, s.idx_tup_read,
                      pg_relation_size(s.indexrelid), io.idx_blks_hit, io.idx_blks_read,
                      (i.indisunique OR i.indisprimary OR i.indisexclusion
                       OR EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = s.indexrelid))
                 FROM pg_stat_user_indexes s
                 JOIN pg_statio_user_indexes io ON io.indexrelid = s.indexrelid
                 JOIN pg_index i ON i.indexrelid = s.indexrelid
                ORDER BY s.schemaname, s.relname, s.indexrelname"""
        ).fetchall()
    return [IndexUsage(*row) for row in rows]


def stats_since(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> datetime | None:
    """When this database's statistics were last reset on this server (None: never)."""
    with bounded(conn, timeout_ms):
        return conn.execute(
            "SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]


# -- connections --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConnectionCounts:
    """Client backends on the whole server (connections are a server-wide limit), idle included."""

    total: int
    max_connections: int
    superuser_reserved: int
    breakdown: tuple[tuple[str | None, str | None, str | None, int], ...]  # (database, state, application, n)

    @property
    def available(self) -> int:
        """Connections ordinary roles may open at most."""
        return self.max_connections - self.superuser_reserved


def connection_counts(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> ConnectionCounts:
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT current_setting('max_connections')::int,
                      current_setting('superuser_reserved_connections')::int,
                      datname, state, application_name, count(*)::int
                 FROM pg_stat_activity
                WHERE backend_type = 'client backend'
                GROUP BY datname, state, application_name
                ORDER BY count(*) DESC, datname, state, application_name"""
        ).fetchall()
    if not rows:  # not even ourselves: only possible without the privilege to see backends
        raise ProbeError("pg_stat_activity shows no client backend: grant pg_read_all_stats to this role")
    breakdown = tuple((db, state, app, n) for _m, _r, db, state, app, n in rows)
    return ConnectionCounts(sum(n for *_x, n in breakdown), rows[0][0], rows[0][1], breakdown)

