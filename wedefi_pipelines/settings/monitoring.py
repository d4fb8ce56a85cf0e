"""Alerting and monitoring settings: the seed's `alerts` list (`condition: query_duration >
5000ms`), issue 15's rules, and the sensors' and probes' own settings."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from wedefi_pipelines.settings.base import DurationMs, _Strict, parse_duration_ms  # noqa: F401


# -- alerting (the seed's "Automated Performance Alerting" list) ---------------------------

# rule -> (metric, operator, kind): kind "ms" a duration (ms, s, m/min, h), "%" a ratio,
# "bytes" a size (B, kB, MB, GB, TB: powers of 1024, like PostgreSQL's), "" a plain number.
_ALERT_METRICS = {
    "SlowQueryDetected": ("query_duration", ">", "ms"),
    "HighConnectionCount": ("active_connections", ">", ""),
    "IndexScanEfficiency": ("index_hit_ratio", "<", "%"),
    "ReplicationLag": ("replica_lag", ">", "ms"),
    # issue 15: what the trusted monitors alert on beyond the seed's four
    "HighConnectionUsage": ("connection_usage", ">", "%"),
    "TransactionIdWraparound": ("xid_age", ">", ""),
    "MultixactWraparound": ("multixact_age", ">", ""),
    "LongTransaction": ("transaction_age", ">", "ms"),
    "IdleInTransaction": ("idle_in_transaction_age", ">", "ms"),
    "ReplicationSlotRetainedWal": ("retained_wal", ">", "bytes"),
    "ReplicationSlotInactive": ("slot_inactive", ">", "ms"),
    "InvalidIndex": ("invalid_indexes", ">", ""),
    "VacuumBacklog": ("dead_tuples_over_threshold_for", ">", "ms"),
    "Deadlocks": ("deadlocks_per_minute", ">", ""),
    "StandbyConflicts": ("standby_conflicts", ">", ""),
}
AlertName = Literal[
    "SlowQueryDetected", "HighConnectionCount", "IndexScanEfficiency", "ReplicationLag", "HighConnectionUsage",
    "TransactionIdWraparound", "MultixactWraparound", "LongTransaction", "IdleInTransaction",
    "ReplicationSlotRetainedWal", "ReplicationSlotInactive", "InvalidIndex", "VacuumBacklog", "Deadlocks",
    "StandbyConflicts",
]
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|%|B|kB|MB|GB|TB)?\s*$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}
_BYTE_UNITS = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


class AlertRule(_Strict):
    name: AlertName
    condition: str
    action: str = "log_and_alert"
    # An optional second condition on the same metric past which the alert is critical.
    critical: str | None = None

    @model_validator(mode="after")
    def _condition_matches_name(self) -> "AlertRule":
        self.threshold  # parse now so a bad condition fails at load time
        critical = self.critical_threshold
        if critical is not None:
            _metric, op, _unit = _ALERT_METRICS[self.name]
            if (critical <= self.threshold) if op == ">" else (critical >= self.threshold):
                raise ValueError(f"{self.name}: critical ({self.critical}) must be past the condition "
                                 f"({self.condition})")
        return self

    @property
    def threshold(self) -> float:
        return self._parse(self.condition)

    @property
    def critical_threshold(self) -> float | None:
        return None if self.critical is None else self._parse(self.critical)

    def _parse(self, condition: str) -> float:
        metric, op, unit = _ALERT_METRICS[self.name]
        match = _CONDITION.match(condition)
        if not match:
            raise ValueError(f"condition {condition!r} is not '<metric> {op} <number>{unit}'")
        got_metric, got_op, number, got_unit = match.groups()
        if got_metric != metric or got_op != op:
            raise ValueError(f"{self.name} needs a condition on '{metric} {op} ...', got {condition!r}")
        value = float(number)
        if unit == "ms":
            if got_unit not in (*_DURATION_UNITS_MS, None):
                raise ValueError(f"{self.name}: unit must be ms, s, m/min or h, got {got_unit!r}")
            return value * _DURATION_UNITS_MS[got_unit or "ms"]
        if unit == "bytes":
            if got_unit not in (*_BYTE_UNITS, None):
                raise ValueError(f"{self.name}: unit must be B, kB, MB, GB or TB, got {got_unit!r}")
            return value * _BYTE_UNITS[got_unit or "B"]
        if unit == "%":
            if got_unit not in ("%", None):
                raise ValueError(f"{self.name}: unit must be %, got {got_unit!r}")
            if not 0 < value <= 100:
                raise ValueError(f"{self.name}: a ratio must be in (0, 100]%, got {value}")
            return value
        if got_unit is not None:
            raise ValueError(f"{self.name}: takes a plain number, got unit {got_unit!r}")
        return value


DEFAULT_ALERTS = (
    AlertRule(name="SlowQueryDetected", condition="query_duration > 5000ms"),
    AlertRule(name="HighConnectionCount", condition="active_connections > 80", action="scale_read_replicas"),
    AlertRule(name="IndexScanEfficiency", condition="index_hit_ratio < 95%", action="analyze_missing_indexes"),
    AlertRule(name="ReplicationLag", condition="replica_lag > 1000ms", action="investigate_replication"),
    # Defaults below from postgres_exporter's alert mixin and awesome-prometheus-alerts (docs/health.md).
    AlertRule(name="HighConnectionUsage", condition="connection_usage > 80%", action="scale_read_replicas"),
    AlertRule(name="TransactionIdWraparound", condition="xid_age > 1000000000", critical="xid_age > 1500000000",
              action="vacuum_freeze"),
    AlertRule(name="MultixactWraparound", condition="multixact_age > 1000000000",
              critical="multixact_age > 1500000000", action="vacuum_freeze"),
    AlertRule(name="LongTransaction", condition="transaction_age > 5min", action="end_long_transactions"),
    AlertRule(name="IdleInTransaction", condition="idle_in_transaction_age > 1min", action="end_long_transactions"),
    AlertRule(name="ReplicationSlotRetainedWal", condition="retained_wal > 1GB", action="fix_replication_slot"),
    AlertRule(name="ReplicationSlotInactive", condition="slot_inactive > 30min", action="fix_replication_slot"),
    AlertRule(name="InvalidIndex", condition="invalid_indexes > 0", action="rebuild_invalid_index"),
    AlertRule(name="VacuumBacklog", condition="dead_tuples_over_threshold_for > 1h", action="investigate_vacuum"),
    AlertRule(name="Deadlocks", condition="deadlocks_per_minute > 5", action="investigate_locking"),
    AlertRule(name="StandbyConflicts", condition="standby_conflicts > 0", action="investigate_replica_queries"),
)


def _parse_session_limits(value: Any) -> Any:
    """{application_name prefix: duration or null}: durations as for the other settings."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of application_name prefix to a duration (or null), got {value!r}")
    out = {}
    for prefix, limit in value.items():
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"an application_name prefix must be a non-empty string, got {prefix!r}")
        out[prefix] = None if limit is None else parse_duration_ms(limit)
    return out


DEFAULT_PIPELINE_SESSIONS = {
    # every connection of this project: pools ('wedefi-pipelines:primary', the warm rewrite's
    # CLUSTER and VACUUM among them), probes, routing checks
    "wedefi-pipelines": 2 * 3_600_000.0,
    "wedefi-pipelines:archive-export": 6 * 3_600_000.0,  # a cold month's export transaction
    "wedefi-pipelines:adopt": 24 * 3_600_000.0,  # online adoption: CREATE INDEX CONCURRENTLY on whole tables
}


class MonitoringSettings(_Strict):
    """The seed's query report (mean > 100 ms, top 20), separate from the 5,000 ms alert."""

    slow_query_report_mean_ms: DurationMs = 100.0
    slow_query_report_top: int = Field(20, ge=1, le=500)
    statement_timeout_ms: int = Field(2000, ge=100, le=60_000)
    sensor_interval_s: int = Field(30, ge=5, le=3600)
    # Index hit ratio windows with fewer index block accesses than this pass (too small to judge).
    index_hit_min_blocks: int = Field(1000, ge=0)
    # ALERT_WEBHOOK_URL posts: per-attempt connect/read timeout, attempts, first backoff (doubling).
    webhook_timeout_s: float = Field(3.0, gt=0, le=60)
    webhook_attempts: int = Field(3, ge=1, le=10)
    webhook_backoff_s: float = Field(0.5, ge=0, le=60)
    # A breach episode ends (and its alert resolves) once its probe has passed this long:
    # damps flapping, and keeps one-off breaches (a slow query) open long enough to dispatch.
    clear_after_s: int = Field(300, ge=0, le=86_400)
    # The pipeline's own sessions (by application_name prefix, the longest matching wins) are
    # held to these transaction ages instead of LongTransaction/IdleInTransaction; null:
    # never alerted on. A warm rewrite, an archive export or an adoption is long on purpose.
    pipeline_sessions: Annotated[dict[str, float | None], BeforeValidator(_parse_session_limits)] = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_SESSIONS))
    # `wedefi-pipelines healthcheck`: a daemon heartbeat, or a RUNNING sensor's tick, is late
    # once older than its interval plus this.
    healthcheck_tolerance_s: int = Field(300, ge=0, le=86_400)
    # platform_health: a month due for its tier this long (past its end + the tier's age) and
    # still in PostgreSQL is overdue (the daily tiering schedule has had a day and a half).
    platform_overdue_grace_h: float = Field(36.0, ge=0, le=24 * 365)
    platform_interval_s: int = Field(300, ge=5, le=86_400)  # platform_health_sensor reads the whole month catalog
