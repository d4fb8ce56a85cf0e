"""Maintenance probes (issue 15): wraparound age, long and idle transactions, replication
slots, invalid indexes, dead tuples against the autovacuum threshold, and the database
counters behind deadlock and standby-conflict rates. Same contract as probes.py: each a
cheap read in a transaction of its own under a statement_timeout, per server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

import psycopg

from wedefi_pipelines.health.probes import DEFAULT_TIMEOUT_MS, bounded


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
