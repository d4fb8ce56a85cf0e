"""The blocking health checks on `database_health`: one per sensor condition.

A check re-runs its probe when the run executes (so a breach that cleared in between
passes), against the figures the sensor compared with (its `baseline` config; empty
means "since the statistics' reset"), judging the sensor's incident (`subject`) or, when
launched by hand with no subject, every subject. A breach fails it with ERROR severity,
which fails the run; the run-failure sensor turns that into an "Alert".
"""

import json
from typing import Callable

import dagster as dg
from pydantic import Field

from wedefi_pipelines.health.monitor import HealthMonitor
from wedefi_pipelines.health.rules import Evaluation
from wedefi_pipelines.resources.database import DatabaseResource

from .assets import database_health


class HealthCheckConfig(dg.Config):
    subject: str = Field("", description="The incident key to judge, e.g. health.replication_lag.wedefi_read; "
                                         "empty: every subject.")
    baseline: str = Field("", description="JSON figures of the sensor's previous evaluation; empty: since the "
                                          "statistics' last reset.")


def _scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) and not (isinstance(value, str) and len(value) > 200)


def check_result(evaluation: Evaluation, subject: str = "") -> dg.AssetCheckResult:
    findings = [f for f in evaluation.findings if not subject or f.incident == subject]
    breached = [f for f in findings if f.breached]
    shown = breached or findings
    metadata: dict = {
        "evidence": dg.MetadataValue.json([{"incident": f.incident, "summary": f.summary, **f.evidence}
                                           for f in shown]),
        "notes": dg.MetadataValue.json(list(evaluation.notes)),
    }
    if shown:  # the first finding's figures as plain entries: visible (and plottable) in the UI
        metadata.update({k: v for k, v in shown[0].evidence.items() if _scalar(v)})
    if subject and not findings:
        note = "not evaluated (server unreachable)" if subject in evaluation.unknown else "no longer present"
        description = f"{subject}: {note}"
    else:
        description = "; ".join(f.summary for f in shown) or "nothing to judge"
    return dg.AssetCheckResult(
        passed=not breached,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description[:2000],
        metadata=metadata,
    )


def _health_check(name: str, evaluate: Callable[..., Evaluation], description: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=database_health.key, name=name, blocking=True, description=description)
    def _check(config: HealthCheckConfig, database: DatabaseResource) -> dg.AssetCheckResult:
        baseline = json.loads(config.baseline) if config.baseline else None
        return check_result(evaluate(HealthMonitor(database.db), baseline), config.subject)

    return _check


replication_lag_check = _health_check(
    "replication_lag", HealthMonitor.replication,
    "Every replica streams from the primary within ReplicationLag (1,000 ms; byte lag 0 means 0), and each "
    "replica behind DATABASE_URL_READ / DATABASE_URL_ANALYTICS is present.",
)
slow_queries_check = _health_check(
    "slow_queries", HealthMonitor.slow_queries,
    "No single execution over SlowQueryDetected (5,000 ms) on any server: max_exec_time growth in "
    "pg_stat_statements since the baseline, or a query running that long in pg_stat_activity.",
)
index_hit_ratio_check = _health_check(
    "index_hit_ratio", HealthMonitor.index_hit_ratio,
    "On each server, index blocks served from shared buffers stay at or above IndexScanEfficiency (95%).",
)
connection_count_check = _health_check(
    "connection_count", HealthMonitor.connections,
    "On each server, client connections (idle included) stay at or below HighConnectionCount (80) and "
    "HighConnectionUsage (80% of max_connections - superuser_reserved_connections).",
)

# issue 15
wraparound_check = _health_check(
    "wraparound", HealthMonitor.wraparound,
    "The app database's transaction ID and multixact ages stay under TransactionIdWraparound and "
    "MultixactWraparound (1.0 billion; critical past 1.5 billion).",
)
long_transactions_check = _health_check(
    "long_transactions", HealthMonitor.long_transactions,
    "On each server, no app transaction open longer than LongTransaction (5 min) nor idle in transaction longer "
    "than IdleInTransaction (1 min); the pipeline's own sessions within monitoring.pipeline_sessions.",
)
replication_slots_check = _health_check(
    "replication_slots", HealthMonitor.replication_slots,
    "No replication slot retains more WAL than ReplicationSlotRetainedWal (1 GB), stays inactive longer than "
    "ReplicationSlotInactive (30 min), or has its WAL 'unreserved' or 'lost'.",
)
invalid_indexes_check = _health_check(
    "invalid_indexes", HealthMonitor.invalid_indexes,
    "No invalid index (left by an interrupted CREATE INDEX CONCURRENTLY) beyond InvalidIndex (0), builds in "
    "progress excepted.",
)
vacuum_health_check = _health_check(
    "vacuum_health", HealthMonitor.vacuum_health,
    "No table's dead tuples stay above its autovacuum threshold for longer than VacuumBacklog (1 h).",
)
deadlocks_check = _health_check(
    "deadlocks", HealthMonitor.deadlocks,
    "On each server, deadlocks since the sensor's previous tick stay at or below Deadlocks (5 per minute).",
)
standby_conflicts_check = _health_check(
    "standby_conflicts", HealthMonitor.standby_conflicts,
    "On each replica, queries cancelled by recovery conflicts since the sensor's previous tick stay at or below "
    "StandbyConflicts (0).",
)

# issue 15, item 2: the platform's own health
platform_health_check = _health_check(
    "platform_health", HealthMonitor.platform,
    "From the month catalog: every range table has the current month and partitions.horizon_months ahead; no "
    "month's rows stay in a default partition; no month is past its tier (due for warm or cold, scheduled) for "
    "longer than monitoring.platform_overdue_grace_h; no archive run is left half-way.",
)

HEALTH_CHECKS = [replication_lag_check, slow_queries_check, index_hit_ratio_check, connection_count_check,
                 wraparound_check, long_transactions_check, replication_slots_check, invalid_indexes_check,
                 vacuum_health_check, deadlocks_check, standby_conflicts_check, platform_health_check]
