"""Pure health logic: thresholds applied to probe figures, deltas of cumulative counters,
breach episodes and the sensor cursor that carries them between ticks. No I/O.

A *finding* is one subject's verdict (a replica, a server). Its *incident* key names what
an alert is about ("health.replication_lag.wedefi_read"). An *episode* is one continuous
breach of an incident: it opens on the first breached evaluation, lasts while evaluations
stay breached, and closes on the first passing one. Each episode gets its own run key,
so a lasting breach requests one check run, not one per tick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from wedefi_pipelines.health.probes import (
    AutovacuumSettings,
    ConnectionCounts,
    DatabaseAge,
    DatabaseCounters,
    IndexIO,
    InvalidIndex,
    OpenTransaction,
    ReplicationSlot,
    RunningQuery,
    StatementSnapshot,
    StatementStat,
    TableDeadTuples,
)
from wedefi_pipelines.replication import ReplicaLag

INCIDENT_PREFIX = "health"

# condition -> (seed alert rule, "Alert".type, default severity)
CONDITIONS: dict[str, tuple[str, str, str]] = {
    "replication_lag": ("ReplicationLag", "replication_lag", "warning"),
    "replica_missing": ("ReplicationLag", "replica_missing", "critical"),
    "slow_query": ("SlowQueryDetected", "slow_query", "warning"),
    "index_hit_ratio": ("IndexScanEfficiency", "index_scan_efficiency", "warning"),
    "connection_count": ("HighConnectionCount", "high_connection_count", "warning"),
    # issue 15
    "xid_wraparound": ("TransactionIdWraparound", "transaction_id_wraparound", "warning"),
    "multixact_wraparound": ("MultixactWraparound", "multixact_wraparound", "warning"),
    "long_transaction": ("LongTransaction", "long_transaction", "warning"),
    "idle_in_transaction": ("IdleInTransaction", "idle_in_transaction", "warning"),
    "replication_slot": ("ReplicationSlotRetainedWal", "replication_slot", "warning"),
    "invalid_index": ("InvalidIndex", "invalid_index", "warning"),
    "vacuum_backlog": ("VacuumBacklog", "vacuum_backlog", "warning"),
    "deadlocks": ("Deadlocks", "deadlocks", "warning"),
    "standby_conflict": ("StandbyConflicts", "standby_conflicts", "warning"),
}

# What the person paged should do first (docs/health.md has the full runbook).
RUNBOOK: dict[str, str] = {
    "replication_lag": "investigate_replication: reads already skip this replica (routing lag_threshold); look for "
                       "long queries or locks on the replica, its disk and network, and WAL volume on the primary.",
    "replica_missing": "investigate_replication: the replica is down or no longer streaming; check its server and "
                       "its log (primary_conninfo, replication slot, WAL still on the primary), then restart it.",
    "slow_query": "log_and_alert: EXPLAIN (ANALYZE, BUFFERS) the statement named in the evidence; look for a missing "
                  "time bound on a partitioned table, a missing index, or lock waits.",
    "index_hit_ratio": "analyze_missing_indexes: a cold cache after a restart recovers by itself; otherwise find the "
                       "index reads in index_usage_report and consider shared_buffers or a better index.",
    "connection_count": "scale_read_replicas: find the application holding connections in the evidence (idle ones "
                        "first); use a pooler (PgBouncer) or send reads to replicas before max_connections is hit.",
    "xid_wraparound": "vacuum_freeze: find what holds the oldest tables back (long transactions, prepared "
                      "transactions, slots), end it, then VACUUM (FREEZE) the tables in the evidence.",
    "multixact_wraparound": "vacuum_freeze: as for transaction IDs; multixacts come from row locks taken by "
                            "several sessions (SELECT ... FOR SHARE, foreign keys).",
    "long_transaction": "end_long_transactions: ask the owner of the pid in the evidence to finish; if it must go, "
                        "pg_cancel_backend(pid), then pg_terminate_backend(pid). It holds vacuum back meanwhile.",
    "idle_in_transaction": "end_long_transactions: a client opened a transaction and stopped talking; fix the client "
                           "(commit or roll back), set idle_in_transaction_session_timeout, or pg_terminate_backend(pid).",
    "replication_slot": "fix_replication_slot: bring its consumer back, or drop the slot "
                        "(pg_drop_replication_slot) before its retained WAL fills the disk.",
    "invalid_index": "rebuild_invalid_index: an interrupted CREATE INDEX CONCURRENTLY left it; DROP INDEX CONCURRENTLY "
                     "it and create it again, or REINDEX INDEX CONCURRENTLY.",
    "vacuum_backlog": "investigate_vacuum: autovacuum is off for the table, too slow, or blocked by an old snapshot "
                      "(long transaction, slot); fix that, then VACUUM (VERBOSE) the tables in the evidence.",
    "deadlocks": "investigate_locking: the server log has each deadlock's statements (log_lock_waits helps); make "
                 "the writers take their row locks in one order.",
    "standby_conflict": "investigate_replica_queries: replay cancelled queries on the replica; move long reads to "
                        "the analytics replica, raise max_standby_streaming_delay, or enable hot_standby_feedback.",
}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(value: str) -> str:
    """A subject as it may appear in run keys, tags and incident keys."""
    return _UNSAFE.sub("_", value).strip("_") or "_"


def condition_of(incident: str) -> str | None:
    """'health.replication_lag.wedefi_read' -> 'replication_lag'."""
    parts = incident.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == INCIDENT_PREFIX and parts[1] in CONDITIONS else None


def incident_key(condition: str, subject: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown health condition {condition!r}; expected one of {sorted(CONDITIONS)}")
    return f"{INCIDENT_PREFIX}.{condition}.{safe_name(subject)}"


@dataclass(frozen=True)
class Finding:
    condition: str
    subject: str
    breached: bool
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    severity: str | None = None  # None: the condition's default
    rule_name: str | None = None  # None: the condition's rule (a condition judged by two rules names the one that fired)

    @property
    def incident(self) -> str:
        return incident_key(self.condition, self.subject)

    @property
    def rule(self) -> str:
        return self.rule_name or CONDITIONS[self.condition][0]

    @property
    def alert_type(self) -> str:
        return CONDITIONS[self.condition][1]

    @property
    def alert_severity(self) -> str:
        return self.severity or CONDITIONS[self.condition][2]


@dataclass(frozen=True)
class Evaluation:
    """One probe round: verdicts, subjects that could not be evaluated (their episodes
    neither open nor close), and the figures the next round compares against."""

    findings: tuple[Finding, ...]
    unknown: frozenset[str] = frozenset()  # incident keys
    notes: tuple[str, ...] = ()
    baseline: Mapping[str, Any] = field(default_factory=dict)

    @property
    def breached(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.breached)


def _ms(value: float) -> str:
    return f"{value:,.0f} ms"


def _duration(ms: float) -> str:
    """A duration for sentences: '850 ms', '4.2 s', '42 s', '5 min', '1 h', '2.2 h'."""
    seconds = ms / 1000.0

    def short(value: float) -> str:
        return f"{value:,.1f}".removesuffix(".0")

    if seconds < 1:
        return f"{ms:,.0f} ms"
    if seconds < 120:
        return f"{short(seconds)} s" if seconds < 10 else f"{seconds:,.0f} s"
    if seconds < 3600:
        return f"{short(seconds / 60)} min"
    return f"{short(seconds / 3600)} h"


def server_label(server: str) -> str:
    """'read_replica' -> 'read replica', for sentences."""
    return server.replace("_", " ")


# -- replication ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpectedReplica:
    """A replica behind DATABASE_URL_READ or DATABASE_URL_ANALYTICS, as far as we could name it."""

    server: str  # 'read_replica' | 'analytics_replica' (the settings' names for the servers)
    name: str | None  # its application_name, when it answered (or as last seen)
    error: str | None  # why it could not be asked, if it could not
    address: str  # host:port, for the alert


def replication_findings(
    lags: Mapping[str, ReplicaLag], expected: Iterable[ExpectedReplica], threshold_ms: float
) -> list[Finding]:
    """A lag verdict per streaming replica, and a presence verdict per expected replica."""
    findings: list[Finding] = []
    servers = {}
    for replica in expected:
        present = replica.error is None and replica.name in lags
        label = server_label(replica.server) + (f" {replica.name}" if replica.name else "")
        if present:
            servers[replica.name] = replica.server
            summary = f"the {label} ({replica.address}) streams from the primary"
        elif replica.error is not None:
            summary = f"the {label} at {replica.address} is missing: {replica.error}"
        else:
            summary = (f"the {label} at {replica.address} is missing: it is not in the primary's "
                       "pg_stat_replication (not streaming)")
        findings.append(Finding(
            "replica_missing", replica.server, not present, summary,
            {"server": replica.server, "replica": replica.name, "address": replica.address,
             "error": replica.error, "streaming": present},
        ))
    for name, lag in sorted(lags.items()):
        breached = lag.lag_ms > threshold_ms
        verb = "lags" if breached else "is within"
        summary = (f"replica {name} lags {_ms(lag.lag_ms)} ({lag.byte_lag:,} bytes of WAL) behind the primary, "
                   f"over the {_ms(threshold_ms)} threshold" if breached
                   else f"replica {name} {verb} the {_ms(threshold_ms)} threshold ({_ms(lag.lag_ms)}, "
                        f"{lag.byte_lag:,} bytes)")
        findings.append(Finding(
            "replication_lag", name, breached, summary,
            {**lag.as_dict(), "server": servers.get(name), "threshold_ms": threshold_ms},
        ))
    return findings


# -- slow queries ----------------------------------------------------------------------------

def statement_baseline(snapshot: StatementSnapshot, threshold_ms: float) -> dict[str, Any]:
    """What the next round needs to see a single execution pass the threshold: the maxima of
    the statements already past it (the others are known to be below it). Compact enough for
    a sensor cursor whatever the number of statements."""
    return {
        "reset": snapshot.stats_reset.isoformat() if snapshot.stats_reset else None,
        "max": {str(q): s.max_exec_ms for q, s in snapshot.statements.items() if s.max_exec_ms > threshold_ms},
    }


def grown_statements(
    snapshot: StatementSnapshot, baseline: Mapping[str, Any] | None, threshold_ms: float
) -> list[tuple[StatementStat, float | None]]:
    """Statements with an execution over the threshold since the baseline (max_exec_time
    grew past it), with their previous maximum; all such statements when there is no
    baseline or the statistics were reset since."""
    current_reset = snapshot.stats_reset.isoformat() if snapshot.stats_reset else None
    valid = baseline is not None and baseline.get("reset") == current_reset
    previous: Mapping[str, float] = (baseline or {}).get("max", {}) if valid else {}
    grown = []
    for queryid, stat in snapshot.statements.items():
        if stat.max_exec_ms <= threshold_ms:
            continue
        before = previous.get(str(queryid))
        if before is None or stat.max_exec_ms > before:
            grown.append((stat, before))
    return sorted(grown, key=lambda item: -item[0].max_exec_ms)


def slow_query_finding(
    server: str,
    grown: list[tuple[StatementStat, float | None]],
    running: list[RunningQuery],
    texts: Mapping[int, str],
    threshold_ms: float,
    limit: int = 10,
) -> Finding:
    statements = [
        {"queryid": str(stat.queryid), "query": texts.get(stat.queryid, "(text unavailable)"),
         "max_exec_ms": round(stat.max_exec_ms, 1),
         "previous_max_ms": None if before is None else round(before, 1),
         "calls": stat.calls, "mean_exec_ms": round(stat.mean_exec_ms, 1)}
        for stat, before in grown[:limit]
    ]
    running_rows = [
        {"pid": q.pid, "duration_ms": round(q.duration_ms, 1), "user": q.user,
         "application_name": q.application_name, "query": q.query}
        for q in running[:limit]
    ]
    parts = []
    if grown:
        worst = grown[0][0]
        parts.append(f"{len(grown)} statement(s) had an execution over {_ms(threshold_ms)} "
                     f"(slowest {_ms(worst.max_exec_ms)}: {texts.get(worst.queryid, 'queryid ' + str(worst.queryid))[:120]})")
    if running:
        parts.append(f"{len(running)} query(ies) running for over {_ms(threshold_ms)} "
                     f"(longest {_ms(running[0].duration_ms)}, pid {running[0].pid})")
    breached = bool(parts)
    summary = (f"slow queries on the {server_label(server)}: " + "; ".join(parts)) if breached else (
        f"no execution over {_ms(threshold_ms)} on the {server_label(server)}")
    return Finding("slow_query", server, breached, summary,
                   {"server": server, "threshold_ms": threshold_ms, "statements": statements,
                    "running": running_rows})


def statement_deltas(
    current: StatementSnapshot, previous: StatementSnapshot | None
) -> dict[int, StatementStat]:
    """Each statement's figures since `previous` (all of them after a reset or without one).
    A statement whose calls went down was evicted and re-added: its figures restart."""
    if previous is None or previous.stats_reset != current.stats_reset:
        return dict(current.statements)
    deltas = {}
    for queryid, now in current.statements.items():
        before = previous.statements.get(queryid)
        if before is None or now.calls < before.calls:
            deltas[queryid] = now
        elif now.calls > before.calls:
            deltas[queryid] = StatementStat(
                queryid, now.calls - before.calls, now.total_exec_ms - before.total_exec_ms, now.max_exec_ms,
                now.rows - before.rows, now.shared_blks_hit - before.shared_blks_hit,
                now.shared_blks_read - before.shared_blks_read, now.read_time_ms - before.read_time_ms,
            )
    return deltas


def hit_percent(hit: int, read: int) -> float | None:
    total = hit + read
    return None if total == 0 else 100.0 * hit / total


def slow_statement_report(deltas: Mapping[int, StatementStat], mean_ms: float, top: int) -> list[StatementStat]:
    """The seed's report: statements whose mean execution time over the window exceeds
    `mean_ms`, slowest mean first, at most `top`."""
    slow = [s for s in deltas.values() if s.calls > 0 and s.mean_exec_ms > mean_ms]
    return sorted(slow, key=lambda s: (-s.mean_exec_ms, s.queryid))[:top]


# -- index hit ratio ---------------------------------------------------------------------------

def index_io_baseline(io: IndexIO) -> dict[str, Any]:
    return {"hit": io.blks_hit, "read": io.blks_read, "reset": io.stats_reset.isoformat() if io.stats_reset else None}


def index_hit_finding(
    server: str, io: IndexIO, baseline: Mapping[str, Any] | None, threshold_pct: float, min_blocks: int,
    top_reads: list[Mapping[str, Any]] | None = None,
) -> Finding:
    """The share of index block reads served from shared buffers since the baseline (the
    counters are cumulative since the statistics' reset; a window too small to mean
    anything, under `min_blocks` block accesses, passes)."""
    reset = io.stats_reset.isoformat() if io.stats_reset else None
    usable = (baseline is not None and baseline.get("reset") == reset
              and io.blks_hit >= baseline.get("hit", 0) and io.blks_read >= baseline.get("read", 0))
    hit = io.blks_hit - baseline["hit"] if usable else io.blks_hit
    read = io.blks_read - baseline["read"] if usable else io.blks_read
    ratio = hit_percent(hit, read)
    window = "since the previous evaluation" if usable else "since the statistics were reset"
    evidence = {"server": server, "blks_hit": hit, "blks_read": read,
                "hit_ratio_pct": None if ratio is None else round(ratio, 2),
                "threshold_pct": threshold_pct, "min_blocks": min_blocks, "window": window,
                "top_index_reads": list(top_reads or [])}
    if ratio is None or hit + read < min_blocks:
        return Finding("index_hit_ratio", server, False,
                       f"{hit + read:,} index block accesses on the {server_label(server)} {window}: too few to judge "
                       f"(minimum {min_blocks:,})", evidence)
    breached = ratio < threshold_pct
    summary = (f"index hit ratio on the {server_label(server)} is {ratio:.1f}% {window} ({read:,} of {hit + read:,} index "
               f"blocks read from outside shared buffers), below {threshold_pct:g}%") if breached else (
        f"index hit ratio on the {server_label(server)} is {ratio:.1f}% {window} (threshold {threshold_pct:g}%)")
    return Finding("index_hit_ratio", server, breached, summary, evidence)


def unused_indexes(usage_by_server: Mapping[str, list[Any] | None]) -> list[dict[str, Any]]:
    """One row per index with its scans on every server. An index is unused only when every
    server answered and none ever scanned it, and it enforces no constraint."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for server, usage in usage_by_server.items():
        for ix in usage or ():
            row = rows.setdefault((ix.schema, ix.index), {
                "schema": ix.schema, "table": ix.table, "index": ix.index, "size_bytes": ix.size_bytes,
                "enforces_constraint": ix.enforces_constraint, "scans": {},
            })
            row["scans"][server] = ix.scans
    complete = all(usage is not None for usage in usage_by_server.values())
    for row in rows.values():
        never = all(row["scans"].get(server, 0) == 0 for server in usage_by_server)
        row["never_scanned"] = never and complete
        row["unused"] = row["never_scanned"] and not row["enforces_constraint"]
    return sorted(rows.values(), key=lambda r: (not r["unused"], -r["size_bytes"], r["schema"], r["index"]))


# -- connections --------------------------------------------------------------------------------

def connection_finding(server: str, counts: ConnectionCounts, threshold: float,
                       usage_pct: float | None = None) -> Finding:
    """Client connections against the seed's absolute HighConnectionCount and, when given,
    HighConnectionUsage: a percentage of what ordinary roles may open (max_connections -
    superuser_reserved_connections), the postgres_exporter mixin's measure."""
    over_count = counts.total > threshold
    usage = 100.0 * counts.total / counts.available if counts.available > 0 else 100.0
    over_usage = usage_pct is not None and usage > usage_pct
    breached = over_count or over_usage
    near_limit = counts.total >= 0.9 * counts.available
    evidence = {
        "server": server, "client_backends": counts.total, "threshold": threshold,
        "usage_pct": round(usage, 1), "usage_threshold_pct": usage_pct,
        "max_connections": counts.max_connections, "superuser_reserved": counts.superuser_reserved,
        "by_database_state_application": [
            {"database": db, "state": state, "application_name": app, "connections": n}
            for db, state, app, n in counts.breakdown[:20]
        ],
    }
    idle = sum(n for _db, state, _app, n in counts.breakdown if state == "idle")
    over = []
    if over_count:
        over.append(f"over the threshold of {threshold:g}")
    if over_usage:
        over.append(f"{usage:.0f}% of the {counts.available} available, over {usage_pct:g}%")
    summary = (f"{counts.total} client connections on the {server_label(server)} ({idle} idle), {' and '.join(over)}; "
               f"max_connections is {counts.max_connections}")
    if not breached:
        summary = (f"{counts.total} client connections on the {server_label(server)} (threshold {threshold:g}"
                   + (f", {usage:.0f}% of {counts.available} available, threshold {usage_pct:g}%)" if usage_pct else ")"))
    return Finding("connection_count", server, breached, summary, evidence,
                   severity="critical" if breached and near_limit else None,
                   rule_name="HighConnectionUsage" if over_usage and not over_count else None)


# -- wraparound (issue 15) ---------------------------------------------------------------------

def _count(value: float) -> str:
    return f"{value:,.0f}"


@dataclass(frozen=True)
class Threshold:
    warning: float
    critical: float | None = None


def wraparound_findings(server: str, age: DatabaseAge, xid: Threshold, multixact: Threshold) -> list[Finding]:
    """The database's transaction ID and multixact age against their warning and critical
    thresholds (wraparound stops the server 3 million short of 2,147,483,647)."""
    findings = []
    for condition, value, threshold, what in (("xid_wraparound", age.xid_age, xid, "transaction ID"),
                                              ("multixact_wraparound", age.multixact_age, multixact, "multixact")):
        breached = value > threshold.warning
        critical = threshold.critical is not None and value > threshold.critical
        left = 2_147_483_647 - value
        summary = (f"database {age.database}'s oldest {what} is {_count(value)} old, over the "
                   f"{_count(threshold.critical if critical else threshold.warning)} threshold "
                   f"({_count(left)} left before wraparound)") if breached else (
            f"database {age.database}'s {what} age is {_count(value)} (threshold {_count(threshold.warning)})")
        evidence = {"server": server, "database": age.database, "age": value, "threshold": threshold.warning,
                    "critical_threshold": threshold.critical, "until_wraparound": left,
                    "oldest_tables": [{"table": t, "xid_age": x, "multixact_age": m} for t, x, m in age.oldest_tables]}
        findings.append(Finding(condition, server, breached, summary, evidence,
                                severity="critical" if critical else None))
    return findings


# -- long and idle transactions ---------------------------------------------------------------

def pipeline_limit(application_name: str | None, limits: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    """(matched prefix, its limit in ms) for one of the pipeline's own sessions, by the longest
    application_name prefix in `limits`; (None, None) for anyone else's session. A limit of
    None means the session is never alerted on."""
    app = application_name or ""
    matches = [prefix for prefix in limits if app.startswith(prefix)]
    if not matches:
        return None, None
    prefix = max(matches, key=len)
    return prefix, limits[prefix]


def transaction_findings(
    server: str, transactions: Iterable[OpenTransaction], long_ms: float, idle_ms: float,
    pipeline_limits: Mapping[str, float | None], limit: int = 10,
) -> list[Finding]:
    """A long-transaction and an idle-in-transaction verdict for one server. The app's
    sessions are held to LongTransaction (transaction age) and IdleInTransaction (time idle
    inside it); the pipeline's own sessions (application_name prefix) to their own limit on
    transaction age only, or not at all."""
    long_rows, idle_rows, pipeline_rows = [], [], []
    for tx in transactions:
        prefix, own = pipeline_limit(tx.application_name, pipeline_limits)
        if prefix is not None:
            if own is not None and tx.age_ms > own:
                long_rows.append({**tx.as_dict(), "limit_ms": own, "pipeline_session": prefix})
            else:
                pipeline_rows.append({**tx.as_dict(), "limit_ms": own, "pipeline_session": prefix})
            continue
        if tx.age_ms > long_ms:
            long_rows.append({**tx.as_dict(), "limit_ms": long_ms, "pipeline_session": None})
        if tx.idle_ms is not None and tx.idle_ms > idle_ms:
            idle_rows.append({**tx.as_dict(), "limit_ms": idle_ms, "pipeline_session": None})
    label = server_label(server)

    def describe(row: Mapping[str, Any], age_key: str) -> str:
        return (f"pid {row['pid']} ({row['user']}, {row['application_name'] or 'no application_name'}, started "
                f"{row['xact_start'][:19]}) for {_duration(row[age_key])}")

    if long_rows:
        worst = max(long_rows, key=lambda r: r["age_ms"])
        long_summary = (f"{len(long_rows)} transaction(s) open too long on the {label}: oldest {describe(worst, 'age_ms')}"
                        f", over its {_duration(worst['limit_ms'])} limit")
    else:
        long_summary = f"no transaction open over {_duration(long_ms)} on the {label}"
    if idle_rows:
        worst = max(idle_rows, key=lambda r: r["idle_ms"])
        idle_summary = (f"{len(idle_rows)} session(s) idle in transaction on the {label}: longest "
                        f"{describe(worst, 'idle_ms')}, over {_duration(idle_ms)}")
    else:
        idle_summary = f"no session idle in transaction over {_duration(idle_ms)} on the {label}"
    base = {"server": server, "pipeline_sessions_within_limits": pipeline_rows[:limit]}
    return [
        Finding("long_transaction", server, bool(long_rows), long_summary,
                {**base, "threshold_ms": long_ms, "oldest_age_ms": max((r["age_ms"] for r in long_rows), default=None),
                 "transactions": sorted(long_rows, key=lambda r: -r["age_ms"])[:limit]}),
        Finding("idle_in_transaction", server, bool(idle_rows), idle_summary,
                {**base, "threshold_ms": idle_ms, "oldest_idle_ms": max((r["idle_ms"] for r in idle_rows), default=None),
                 "transactions": sorted(idle_rows, key=lambda r: -r["idle_ms"])[:limit]}),
    ]


# -- replication slots ------------------------------------------------------------------------

def _bytes(value: float | None) -> str:
    if value is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TB"


def slot_findings(
    server: str, slots: list[ReplicationSlot], previous: Mapping[str, Any] | None, now: datetime,
    retained_threshold: float, inactive_ms: float,
) -> tuple[list[Finding], dict[str, Any]]:
    """One verdict per slot: breached when it retains more WAL than ReplicationSlotRetainedWal,
    has been inactive longer than ReplicationSlotInactive (inactive_since on PostgreSQL 17+,
    else since the first evaluation that saw it inactive, kept in the baseline), or its
    WAL is 'unreserved' or 'lost' (critical: it will break, or has broken, its consumer).
    Also a 'no slots' verdict per server that has none."""
    seen = dict((previous or {}).get("inactive", {}))
    inactive_seen: dict[str, str] = {}
    findings = []
    label = server_label(server)
    for slot in slots:
        since = slot.inactive_since
        if not slot.active and since is None:
            since = datetime.fromisoformat(seen.get(slot.name, now.isoformat()))
        if not slot.active and since is not None:
            inactive_seen[slot.name] = since.isoformat()
        inactive_for_ms = (now - since).total_seconds() * 1000.0 if (not slot.active and since) else 0.0
        reasons, rule = [], None
        if slot.wal_status in ("unreserved", "lost"):
            reasons.append(f"its WAL is {slot.wal_status}" + (" (the consumer can no longer catch up)"
                                                              if slot.wal_status == "lost" else
                                                              " (removed at the next checkpoint)"))
        if slot.retained_bytes is not None and slot.retained_bytes > retained_threshold:
            reasons.append(f"it retains {_bytes(slot.retained_bytes)} of WAL, over {_bytes(retained_threshold)}")
            rule = rule or "ReplicationSlotRetainedWal"
        if not slot.active and inactive_for_ms > inactive_ms:
            reasons.append(f"it has had no consumer for {_duration(inactive_for_ms)}, over {_duration(inactive_ms)}")
            rule = rule or "ReplicationSlotInactive"
        breached = bool(reasons)
        state = "active" if slot.active else "inactive"
        summary = (f"replication slot {slot.name} on the {label}: " + "; ".join(reasons)) if breached else (
            f"replication slot {slot.name} on the {label} is {state}, retains {_bytes(slot.retained_bytes)}"
            f" (wal_status {slot.wal_status})")
        evidence = {"server": server, **slot.as_dict(), "inactive_for_ms": round(inactive_for_ms, 1),
                    "retained_threshold_bytes": retained_threshold, "inactive_threshold_ms": inactive_ms}
        findings.append(Finding("replication_slot", f"{server}.{slot.name}", breached, summary, evidence,
                                severity="critical" if slot.wal_status in ("unreserved", "lost") else None,
                                rule_name=rule))
    names = [slot.name for slot in slots]
    if not findings:
        findings.append(Finding("replication_slot", server, False, f"no replication slot on the {label}",
                                {"server": server}))
    return findings, {"inactive": inactive_seen, "slots": names}


# -- invalid indexes --------------------------------------------------------------------------

def invalid_index_finding(server: str, indexes: list[InvalidIndex], threshold: float) -> Finding:
    breached = len(indexes) > threshold
    names = ", ".join(ix.as_dict()["index"] for ix in indexes[:5]) + (" ..." if len(indexes) > 5 else "")
    summary = (f"{len(indexes)} invalid index(es) on the {server_label(server)}: {names} (an interrupted "
               f"CREATE INDEX CONCURRENTLY?)") if breached else (
        f"{len(indexes)} invalid index(es) on the {server_label(server)} (threshold {threshold:g})")
    return Finding("invalid_index", server, breached, summary,
                   {"server": server, "invalid_indexes": len(indexes), "threshold": threshold,
                    "indexes": [ix.as_dict() for ix in indexes[:20]]})


# -- vacuum -----------------------------------------------------------------------------------

def _reloption(options: Iterable[str], name: str) -> str | None:
    for option in options:
        key, _, value = option.partition("=")
        if key == name:
            return value
    return None


def autovacuum_threshold(table: TableDeadTuples, av: AutovacuumSettings) -> float:
    """Dead tuples past which autovacuum vacuums the table, as PostgreSQL computes it (the
    table's own reloptions first; a never-analyzed table counts as empty)."""
    base = _reloption(table.options, "autovacuum_vacuum_threshold")
    scale = _reloption(table.options, "autovacuum_vacuum_scale_factor")
    cap = _reloption(table.options, "autovacuum_vacuum_max_threshold")
    value = (int(base) if base is not None else av.threshold) + (
        float(scale) if scale is not None else av.scale_factor) * max(table.reltuples, 0.0)
    cap_value = int(cap) if cap is not None else av.max_threshold
    if cap_value is not None and cap_value >= 0:
        value = min(value, float(cap_value))
    return value


def vacuum_finding(
    server: str, av: AutovacuumSettings, tables: Iterable[TableDeadTuples], previous: Mapping[str, Any] | None,
    now: datetime, for_ms: float, limit: int = 10,
) -> tuple[Finding, dict[str, Any]]:
    """Tables whose dead tuples have stayed above their autovacuum threshold for longer than
    VacuumBacklog (since the first evaluation that saw them there, kept in the baseline). A
    frozen warm month has no dead tuples, so it never counts, vacuumed lately or not."""
    seen = dict((previous or {}).get("over_since", {}))
    over_since: dict[str, str] = {}
    overdue, waiting = [], []
    for table in tables:
        threshold = autovacuum_threshold(table, av)
        if table.dead_tuples <= threshold:
            continue
        since = seen.get(table.name, now.isoformat())
        over_since[table.name] = since
        over_ms = (now - datetime.fromisoformat(since)).total_seconds() * 1000.0
        row = {"table": table.name, "dead_tuples": table.dead_tuples, "live_tuples": table.live_tuples,
               "autovacuum_threshold": round(threshold), "over_threshold_since": since,
               "over_threshold_ms": round(over_ms, 1),
               "autovacuum_enabled": av.enabled and _reloption(table.options, "autovacuum_enabled") not in ("false", "off"),
               "last_vacuum": table.last_vacuum.isoformat() if table.last_vacuum else None,
               "last_autovacuum": table.last_autovacuum.isoformat() if table.last_autovacuum else None}
        (overdue if over_ms > for_ms else waiting).append(row)
    label = server_label(server)
    if overdue:
        worst = max(overdue, key=lambda r: r["dead_tuples"])
        off = " (autovacuum is off for it)" if not worst["autovacuum_enabled"] else ""
        summary = (f"{len(overdue)} table(s) on the {label} above their autovacuum threshold for over {_duration(for_ms)}: "
                   f"{worst['table']} has {worst['dead_tuples']:,} dead tuples (threshold "
                   f"{worst['autovacuum_threshold']:,}){off}")
    else:
        summary = (f"no table on the {label} above its autovacuum threshold for over {_duration(for_ms)}"
                   + (f" ({len(waiting)} above it for less)" if waiting else ""))
    evidence = {"server": server, "threshold_ms": for_ms, "autovacuum": av.enabled,
                "tables": sorted(overdue, key=lambda r: -r["dead_tuples"])[:limit],
                "tables_over_threshold_for_less": sorted(waiting, key=lambda r: -r["dead_tuples"])[:limit]}
    return Finding("vacuum_backlog", server, bool(overdue), summary, evidence), {"over_since": over_since}


# -- deadlocks and standby conflicts (counters since the previous evaluation) -----------------

def counter_baseline(counters: DatabaseCounters, now: datetime) -> dict[str, Any]:
    return {"deadlocks": counters.deadlocks, "conflicts": dict(counters.conflicts),
            "reset": counters.stats_reset.isoformat() if counters.stats_reset else None, "at": now.isoformat()}


def _window(counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime):
    """(usable previous figures or None, seconds since them)."""
    reset = counters.stats_reset.isoformat() if counters.stats_reset else None
    if not previous or previous.get("reset") != reset or "at" not in previous:
        return None, None
    if counters.deadlocks < previous.get("deadlocks", 0):
        return None, None
    return previous, max((now - datetime.fromisoformat(previous["at"])).total_seconds(), 0.001)


def deadlock_finding(server: str, counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime,
                     per_minute: float) -> Finding:
    """Deadlocks per minute since the previous evaluation against Deadlocks (the first
    evaluation, with nothing to compare, passes)."""
    before, seconds = _window(counters, previous, now)
    label = server_label(server)
    evidence = {"server": server, "deadlocks_total": counters.deadlocks, "threshold_per_minute": per_minute}
    if before is None:
        return Finding("deadlocks", server, False,
                       f"{counters.deadlocks:,} deadlocks on the {label} since its statistics' reset: the next "
                       f"evaluation measures the rate", {**evidence, "deadlocks": None, "window_s": None})
    new = counters.deadlocks - before["deadlocks"]
    rate = new * 60.0 / seconds
    breached = new > 0 and rate > per_minute
    summary = (f"{new} deadlock(s) on the {label} in the last {seconds:,.0f} s ({rate:,.1f}/min, over "
               f"{per_minute:g}/min)") if breached else (
        f"{new} deadlock(s) on the {label} in the last {seconds:,.0f} s (threshold {per_minute:g}/min)")
    return Finding("deadlocks", server, breached, summary,
                   {**evidence, "deadlocks": new, "window_s": round(seconds, 1), "per_minute": round(rate, 2)})


def conflict_finding(server: str, counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime,
                     threshold: float) -> Finding:
    """Queries the replica cancelled to let replay go on, since the previous evaluation, by
    cause (pg_stat_database_conflicts), against StandbyConflicts."""
    before, seconds = _window(counters, previous, now)
    label = server_label(server)
    evidence = {"server": server, "conflicts_total": counters.conflicts_total, "threshold": threshold}
    if before is None:
        return Finding("standby_conflict", server, False,
                       f"{counters.conflicts_total:,} query(ies) cancelled by recovery conflicts on the {label} since "
                       f"its statistics' reset: the next evaluation counts new ones", {**evidence, "conflicts": None})
    causes = {cause: n - before.get("conflicts", {}).get(cause, 0) for cause, n in counters.conflicts.items()}
    causes = {cause: n for cause, n in causes.items() if n > 0}
    new = sum(causes.values())
    breached = new > threshold
    by_cause = ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items()))
    summary = (f"{new} query(ies) on the {label} cancelled by recovery conflicts in the last {seconds:,.0f} s "
               f"({by_cause}), over {threshold:g}") if breached else (
        f"{new} recovery conflict(s) on the {label} in the last {seconds:,.0f} s (threshold {threshold:g})")
    return Finding("standby_conflict", server, breached, summary,
                   {**evidence, "conflicts": new, "by_cause": causes, "window_s": round(seconds, 1)})


# -- episodes and the sensor cursor ------------------------------------------------------------

@dataclass(frozen=True)
class Episode:
    incident: str
    id: str  # when it opened, compact UTC: part of the run key
    since: str  # ISO 8601
    passing_since: str | None = None  # ISO 8601: the probe passes again, the hold is running

    @property
    def run_key(self) -> str:
        return f"{self.incident}.{self.id}"


@dataclass(frozen=True)
class EpisodeChanges:
    opened: tuple[tuple[Finding, Episode], ...]
    ongoing: tuple[tuple[Finding, Episode], ...]
    closed: tuple[Episode, ...]
    open: Mapping[str, Episode]


def episode_id(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def track_episodes(
    open_episodes: Mapping[str, Episode], evaluation: Evaluation, now: datetime, clear_after_s: float = 0.0
) -> EpisodeChanges:
    """Open an episode per newly breached incident and keep the breached ones. An episode
    whose incident passes (or is no longer evaluated at all) closes once it has passed for
    `clear_after_s`; a breach during that hold continues the same episode. Unknown
    incidents (their server could not be asked) keep their episode as it is."""
    now_iso = now.astimezone(timezone.utc).isoformat()
    opened, ongoing, still_open = [], [], {}
    for finding in evaluation.breached:
        key = finding.incident
        if key in still_open:  # two findings for one incident: the first one speaks
            continue
        episode = open_episodes.get(key)
        if episode is None:
            episode = Episode(key, episode_id(now), now_iso)
            opened.append((finding, episode))
        else:
            episode = Episode(key, episode.id, episode.since)
            ongoing.append((finding, episode))
        still_open[key] = episode
    closed = []
    for key, episode in open_episodes.items():
        if key in still_open:
            continue
        if key in evaluation.unknown:
            still_open[key] = episode
            continue
        passing_since = episode.passing_since or now_iso
        if (now - datetime.fromisoformat(passing_since)).total_seconds() >= clear_after_s:
            closed.append(episode)
        else:
            still_open[key] = Episode(key, episode.id, episode.since, passing_since)
    return EpisodeChanges(tuple(opened), tuple(ongoing), tuple(closed), still_open)


CURSOR_VERSION = 1


@dataclass(frozen=True)
class CursorState:
    episodes: Mapping[str, Episode] = field(default_factory=dict)
    baseline: Mapping[str, Any] = field(default_factory=dict)


def parse_cursor(text: str | None) -> CursorState:
    """The sensor's state; an empty, foreign or older cursor starts afresh (ValueError for a
    cursor that is ours but damaged, so it is not silently dropped)."""
    if not text:
        return CursorState()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"health sensor cursor is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
        return CursorState()
    try:
        episodes = {k: Episode(k, v["id"], v["since"], v.get("passing_since"))
                    for k, v in data.get("episodes", {}).items()}
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"health sensor cursor has a damaged episode: {exc!r}") from None
    baseline = data.get("baseline", {})
    if not isinstance(baseline, dict):
        raise ValueError("health sensor cursor's baseline is not an object")
    return CursorState(episodes, baseline)


def dump_cursor(state: CursorState) -> str:
    return json.dumps(
        {"v": CURSOR_VERSION,
         "episodes": {k: {"id": e.id, "since": e.since, "passing_since": e.passing_since}
                      for k, e in sorted(state.episodes.items())},
         "baseline": state.baseline},
        sort_keys=True, separators=(",", ":"),
    )
