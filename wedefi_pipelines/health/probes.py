"""Health probes: one cheap read of PostgreSQL's statistics each, over a given connection.

Every probe runs inside its own transaction with a local `statement_timeout`, so a
sensor never hangs on a busy server and the caller's session settings are untouched.
Statistics are per server: call each probe on the primary and on every replica
(replica scans and queries never show in the primary's views). Figures from
pg_stat_statements and pg_statio_* are cumulative; the callers (rules.py) turn them into
deltas against the previous evaluation. Correct on PostgreSQL 15 to 18: the only column
that differs (pg_stat_statements' block read time, renamed in 1.11 / PG17) is chosen
from the installed extension's version.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Mapping, Sequence

import psycopg
from psycopg import sql

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
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(timeout_ms)),))
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


# -- transaction ID and multixact wraparound (issue 15) ----------------------------------------

@dataclass(frozen=True)
class DatabaseAge:
    """How many transactions (and multixacts) this database's oldest unfrozen row is behind:
    PostgreSQL stops assigning new ones 3 million short of 2^31."""

    database: str
    xid_age: int
    multixact_age: int
    oldest_tables: tuple[tuple[str, int, int], ...] = ()  # (table, xid age, multixact age), when asked


def database_age(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 with_tables: bool = False) -> DatabaseAge:
    """age(datfrozenxid) and mxid_age(datminmxid) of this database; with `with_tables`, the
    five tables holding them back (what VACUUM (FREEZE) must reach first)."""
    with bounded(conn, timeout_ms):
        name, xid_age, mxid_age = conn.execute(
            """SELECT datname, age(datfrozenxid), mxid_age(datminmxid)
                 FROM pg_database WHERE datname = current_database()"""
        ).fetchone()
        tables: tuple = ()
        if with_tables:
            tables = tuple(conn.execute(
                """SELECT c.oid::regclass::text, age(c.relfrozenxid), mxid_age(c.relminmxid)
                     FROM pg_class c
                    WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> '0'::xid
                    ORDER BY greatest(age(c.relfrozenxid), mxid_age(c.relminmxid)) DESC
                    LIMIT 5"""
            ).fetchall())
    return DatabaseAge(name, int(xid_age), int(mxid_age), tables)


# -- open transactions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenTransaction:
    """A client session of this database inside a transaction."""

    pid: int
    user: str | None
    application_name: str | None
    state: str | None
    xact_start: datetime
    age_ms: float  # since the transaction began
    idle_ms: float | None  # since it went 'idle in transaction' (None: it is not idle)
    xmin_age: int | None  # transactions its snapshot holds back (age(backend_xmin))
    query: str

    def as_dict(self) -> dict:
        return {"pid": self.pid, "user": self.user, "application_name": self.application_name, "state": self.state,
                "xact_start": self.xact_start.isoformat(), "age_ms": round(self.age_ms, 1),
                "idle_ms": None if self.idle_ms is None else round(self.idle_ms, 1), "xmin_age": self.xmin_age,
                "query": self.query}


def open_transactions(conn: psycopg.Connection, min_age_ms: float,
                      timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[OpenTransaction]:
    """Client transactions in this database open for at least `min_age_ms`, oldest first
    (autovacuum workers and WAL senders are not client backends)."""
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT pid, usename, application_name, state, xact_start,
                      EXTRACT(EPOCH FROM clock_timestamp() - xact_start) * 1000.0,
                      CASE WHEN state LIKE 'idle in transaction%%'
                           THEN EXTRACT(EPOCH FROM clock_timestamp() - state_change) * 1000.0 END,
                      age(backend_xmin), left(query, 500)
                 FROM pg_stat_activity
                WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                  AND datname = current_database() AND xact_start IS NOT NULL
                  AND xact_start <= clock_timestamp() - make_interval(secs => %s / 1000.0)
                ORDER BY xact_start""",
            (float(min_age_ms),),
        ).fetchall()
    return [OpenTransaction(pid, user, app, state, start, float(age), None if idle is None else float(idle), xmin,
                            text or "")
            for pid, user, app, state, start, age, idle, xmin, text in rows]


# -- replication slots ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplicationSlot:
    name: str
    slot_type: str  # physical | logical
    active: bool
    temporary: bool
    wal_status: str | None  # reserved | extended | unreserved | lost (None: never reserved WAL)
    retained_bytes: int | None  # WAL kept for it: from its restart_lsn to the current position
    safe_wal_size: int | None  # bytes more it may fall behind before 'lost' (max_slot_wal_keep_size set)
    inactive_since: datetime | None  # PostgreSQL 17+ only
    invalidation_reason: str | None  # PostgreSQL 17+ only

    def as_dict(self) -> dict:
        return {"slot": self.name, "slot_type": self.slot_type, "active": self.active, "temporary": self.temporary,
                "wal_status": self.wal_status, "retained_bytes": self.retained_bytes,
                "safe_wal_size": self.safe_wal_size,
                "inactive_since": self.inactive_since.isoformat() if self.inactive_since else None,
                "invalidation_reason": self.invalidation_reason}


def replication_slots(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[ReplicationSlot]:
    """Every replication slot of this server (slots are per server, not per database). The
    row goes through to_jsonb so the columns newer servers add (inactive_since,
    invalidation_reason: PostgreSQL 17) are read where they exist."""
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT to_jsonb(s),
                      pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                                           ELSE pg_current_wal_lsn() END, s.restart_lsn)::bigint
                 FROM pg_replication_slots s ORDER BY s.slot_name"""
        ).fetchall()
    slots = []
    for row, retained in rows:
        since = row.get("inactive_since")
        slots.append(ReplicationSlot(
            row["slot_name"], row["slot_type"], bool(row["active"]), bool(row.get("temporary")),
            row.get("wal_status"), retained, row.get("safe_wal_size"),
            datetime.fromisoformat(since) if since else None, row.get("invalidation_reason"),
        ))
    return slots


# -- invalid indexes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InvalidIndex:
    schema: str
    table: str
    index: str
    size_bytes: int
    definition: str
    ready: bool  # false: left by a failed CREATE INDEX CONCURRENTLY's first phase or DROP INDEX CONCURRENTLY

    def as_dict(self) -> dict:
        return {"index": f"{self.schema}.{self.index}", "table": f"{self.schema}.{self.table}",
                "size_bytes": self.size_bytes, "definition": self.definition, "ready": self.ready}


def invalid_indexes(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[InvalidIndex]:
    """Indexes of this database marked invalid (indisvalid false), except those on a table
    where a CREATE INDEX / REINDEX CONCURRENTLY is running now: such a build is invalid until
    it finishes, and adoption runs them on purpose."""
    with bounded(conn, timeout_ms):
        rows = conn.execute(
            """SELECT n.nspname, t.relname, c.relname, pg_relation_size(c.oid), pg_get_indexdef(c.oid), i.indisready
                 FROM pg_index i
                 JOIN pg_class c ON c.oid = i.indexrelid
                 JOIN pg_class t ON t.oid = i.indrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE NOT i.indisvalid
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
                  AND NOT EXISTS (
                        SELECT 1 FROM pg_stat_progress_create_index p
                         WHERE p.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND (p.index_relid = i.indexrelid OR p.relid = i.indrelid))
                ORDER BY 1, 2, 3"""
        ).fetchall()
    return [InvalidIndex(*row) for row in rows]


# -- dead tuples against the autovacuum threshold ------------------------------------------------

@dataclass(frozen=True)
class AutovacuumSettings:
    """The server's autovacuum trigger: a table is due once its dead tuples exceed
    min(threshold + scale_factor x reltuples, max_threshold) (max_threshold: PostgreSQL 18)."""

    enabled: bool
    threshold: int
    scale_factor: float
    max_threshold: int | None


@dataclass(frozen=True)
class TableDeadTuples:
    relid: int
    schema: str
    table: str
    dead_tuples: int
    live_tuples: int
    reltuples: float  # -1: never vacuumed or analyzed
    options: tuple[str, ...]  # reloptions, e.g. ('autovacuum_enabled=false',)
    last_vacuum: datetime | None
    last_autovacuum: datetime | None

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


def dead_tuples(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS
                ) -> tuple[AutovacuumSettings, list[TableDeadTuples]]:
    """The autovacuum settings and every table of this database holding dead tuples (leaf
    partitions included: a partitioned parent has no rows of its own). Reads the statistics
    functions over pg_class directly: the pg_stat_user_tables view computes every column of
    every table first (it groups over their indexes)."""
    with bounded(conn, timeout_ms):
        enabled, threshold, scale, max_threshold = conn.execute(
            """SELECT current_setting('autovacuum')::bool, current_setting('autovacuum_vacuum_threshold')::int,
                      current_setting('autovacuum_vacuum_scale_factor')::float8,
                      current_setting('autovacuum_vacuum_max_threshold', true)::int"""
        ).fetchone()
        rows = conn.execute(
            """SELECT c.oid::bigint, n.nspname, c.relname, pg_stat_get_dead_tuples(c.oid), pg_stat_get_live_tuples(c.oid),
                      c.reltuples, coalesce(c.reloptions, '{}'),
                      pg_stat_get_last_vacuum_time(c.oid), pg_stat_get_last_autovacuum_time(c.oid)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname !~ '^pg_toast' AND pg_stat_get_dead_tuples(c.oid) > 0
                ORDER BY pg_stat_get_dead_tuples(c.oid) DESC"""
        ).fetchall()
    settings = AutovacuumSettings(enabled, threshold, scale, max_threshold)
    return settings, [TableDeadTuples(relid, schema, table, dead, live, float(reltuples), tuple(options), lv, lav)
                      for relid, schema, table, dead, live, reltuples, options, lv, lav in rows]


# -- deadlocks and standby conflicts (cumulative, this database) ----------------------------------

@dataclass(frozen=True)
class DatabaseCounters:
    deadlocks: int
    conflicts: Mapping[str, int]  # recovery conflicts by cause (tablespace, lock, snapshot, ...): standbys only
    stats_reset: datetime | None

    @property
    def conflicts_total(self) -> int:
        return sum(self.conflicts.values())


def database_counters(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> DatabaseCounters:
    """pg_stat_database.deadlocks and pg_stat_database_conflicts for this database, since its
    statistics' reset (the conflict causes differ by version: PostgreSQL 16 adds active_logicalslot)."""
    with bounded(conn, timeout_ms):
        deadlocks, reset, conflicts = conn.execute(
            """SELECT d.deadlocks, d.stats_reset, to_jsonb(c) FROM pg_stat_database d
                 JOIN pg_stat_database_conflicts c ON c.datid = d.datid
                WHERE d.datname = current_database()"""
        ).fetchone()
    causes = {key.removeprefix("confl_"): int(value) for key, value in conflicts.items() if key.startswith("confl_")}
    return DatabaseCounters(int(deadlocks), causes, reset)
