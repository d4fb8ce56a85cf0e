"""Findings and incidents: one subject's verdict, the incident key an alert is about,
the conditions and their seed rules, and how figures are written in sentences."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    # the platform's own health (issue 15, item 2): what only this project knows
    "partition_horizon": ("PartitionHorizon", "partition_horizon", "critical"),
    "default_rows": ("DefaultPartitionRows", "default_partition_rows", "warning"),
    "tier_overdue": ("TierOverdue", "tier_overdue", "warning"),
    "archive_unfinished": ("ArchiveUnfinished", "archive_unfinished", "warning"),
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
    "partition_horizon": "materialize partition_horizon: writes past the newest month land in the default partition; "
                         "look at its last runs and the partition_horizon schedules (are they RUNNING?).",
    "default_rows": "materialize partition_horizon (partition_safety_sensor should have): it drains the month's rows "
                    "into their child; if it fails, its error names the rows (a duplicate, a bad timestamp).",
    "tier_overdue": "look at tiering_daily's runs: warm_tier / cold_archive for the months in the evidence failed or "
                    "never ran; run them by hand (the UI's backfill) once the cause is fixed.",
    "archive_unfinished": "re-run cold_archive for the month in the evidence: it resumes from its frozen tables "
                          "(nothing is lost meanwhile: the frozen tables are the month's only copy until recorded).",
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


def ms_text(value: float) -> str:
    return f"{value:,.0f} ms"


def duration_text(ms: float) -> str:
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


def count_text(value: float) -> str:
    return f"{value:,.0f}"


def bytes_text(value: float | None) -> str:
    if value is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TB"
