"""Health sensors (one per seed alert) and the run-failure sensor that raises alerts.

Each health sensor evaluates its probe on every server. An incident that starts breaching
opens an episode (kept in the cursor with the figures the next tick compares against) and
requests one check run, keyed by the episode; while it lasts, ticks request nothing more;
when it passes, the episode ends and the sensor resolves its "Alert" (no run-failure
sensor ever sees a recovery). Every tick also resolves any alert of its conditions left
open with no open episode (e.g. a check run that failed after the breach had cleared).
"""

import json
from typing import Callable

import dagster as dg

from wedefi_pipelines.health import rules
from wedefi_pipelines.health.alerting import utcnow
from wedefi_pipelines.health.monitor import HealthMonitor
from wedefi_pipelines.health.rules import CursorState, Evaluation
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings

from .checks import (connection_count_check, deadlocks_check, index_hit_ratio_check, invalid_indexes_check,
                     long_transactions_check, platform_health_check, replication_lag_check, replication_slots_check,
                     slow_queries_check, standby_conflicts_check, vacuum_health_check, wraparound_check)
from .incidents import (TAG_EPISODE, TAG_INCIDENT, TAG_RULE, TAG_SEVERITY, TAG_TYPE, TAG_WILL_RETRY,
                        incident_for_run)
from .jobs import (connection_count_check_job, deadlocks_check_job, index_hit_ratio_check_job,
                   invalid_indexes_check_job, long_transactions_check_job, platform_health_check_job,
                   replication_lag_check_job, replication_slots_check_job, slow_query_check_job,
                   standby_conflicts_check_job, vacuum_health_check_job, wraparound_check_job)
from .resources import AlertSinkResource

_INTERVAL_S = current_settings().monitoring.sensor_interval_s


def check_run_config(check: dg.AssetChecksDefinition, subject: str, baseline) -> dict:
    op_name = check.node_def.name
    return {"ops": {op_name: {"config": {"subject": subject, "baseline": json.dumps(baseline) if baseline else ""}}}}


def _health_sensor(
    name: str, conditions: tuple[str, ...], evaluate: Callable[..., Evaluation],
    check: dg.AssetChecksDefinition, job, description: str, interval_s: int = _INTERVAL_S,
) -> dg.SensorDefinition:
    prefixes = [f"{rules.INCIDENT_PREFIX}.{c}." for c in conditions]

    @dg.sensor(name=name, job=job, minimum_interval_seconds=interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING, description=description)
    def _sensor(context: dg.SensorEvaluationContext, database: DatabaseResource, alert_sink: AlertSinkResource):
        state = rules.parse_cursor(context.cursor)
        db = database.db
        evaluation = evaluate(HealthMonitor(db), state.baseline or None)
        changes = rules.track_episodes(state.episodes, evaluation, utcnow(), db.settings.monitoring.clear_after_s)
        run_requests = [
            dg.RunRequest(
                run_key=episode.run_key,
                run_config=check_run_config(check, finding.incident, state.baseline),
                tags={TAG_INCIDENT: finding.incident, TAG_EPISODE: episode.id, TAG_TYPE: finding.alert_type,
                      TAG_SEVERITY: finding.alert_severity, TAG_RULE: finding.rule},
            )
            for finding, episode in changes.opened
        ]
        sink = alert_sink.sink(db, context.log)
        stale = [key for key in sink.open_incidents(prefixes) if key not in changes.open]
        for alert in sink.resolve(stale, reason=f"{name}: the probe passes again"):
            context.log.info(f"resolved alert {alert.id} ({alert.incident})")
        for finding, episode in changes.opened:
            context.log.warning(f"{finding.summary} -> check run {episode.run_key}")
        for note in evaluation.notes:
            context.log.warning(note)
        cursor = rules.dump_cursor(CursorState(changes.open, evaluation.baseline))
        if run_requests:
            return dg.SensorResult(run_requests=run_requests, cursor=cursor)
        held = [e for e in changes.open.values() if e.passing_since]
        if changes.ongoing:
            reason = "; ".join(f"ongoing since {e.since} (run key {e.run_key}): {f.summary}" for f, e in changes.ongoing)
        elif held:
            reason = "; ".join(f"{e.incident} passes since {e.passing_since}: its alert resolves after "
                               f"monitoring.clear_after_s" for e in held)
        else:
            reason = "all clear: " + "; ".join(f.summary for f in evaluation.findings)
        return dg.SensorResult(skip_reason=dg.SkipReason(reason[:1000]), cursor=cursor)

    return _sensor


replication_lag_sensor = _health_sensor(
    "replication_lag_sensor", ("replication_lag", "replica_missing"), HealthMonitor.replication,
    replication_lag_check, replication_lag_check_job,
    "Replica lag past ReplicationLag (1,000 ms) from pg_stat_replication on the primary, or an expected replica "
    "missing from it: requests replication_lag_check_job once per episode, resolves the alert when it clears.",
)
slow_query_sensor = _health_sensor(
    "slow_query_sensor", ("slow_query",), HealthMonitor.slow_queries, slow_queries_check, slow_query_check_job,
    "A single execution past SlowQueryDetected (5,000 ms) on any server since the previous tick "
    "(pg_stat_statements max_exec_time growth, or a query running that long): requests slow_query_check_job.",
)
index_hit_ratio_sensor = _health_sensor(
    "index_hit_ratio_sensor", ("index_hit_ratio",), HealthMonitor.index_hit_ratio, index_hit_ratio_check,
    index_hit_ratio_check_job,
    "Index blocks served from shared buffers since the previous tick below IndexScanEfficiency (95%) on any "
    "server: requests index_hit_ratio_check_job.",
)
connection_count_sensor = _health_sensor(
    "connection_count_sensor", ("connection_count",), HealthMonitor.connections, connection_count_check,
    connection_count_check_job,
    "Client connections (idle included) past HighConnectionCount (80), or past HighConnectionUsage (80% of "
    "max_connections - superuser_reserved_connections), on any server: requests connection_count_check_job.",
)

# issue 15: what takes PostgreSQL down beyond the seed's four alerts
wraparound_sensor = _health_sensor(
    "wraparound_sensor", ("xid_wraparound", "multixact_wraparound"), HealthMonitor.wraparound, wraparound_check,
    wraparound_check_job,
    "age(datfrozenxid) and mxid_age(datminmxid) of the app database past TransactionIdWraparound / "
    "MultixactWraparound (1.0 billion, critical 1.5 billion): requests wraparound_check_job.",
)
long_transactions_sensor = _health_sensor(
    "long_transactions_sensor", ("long_transaction", "idle_in_transaction"), HealthMonitor.long_transactions,
    long_transactions_check, long_transactions_check_job,
    "App transactions open past LongTransaction (5 min) or idle in transaction past IdleInTransaction (1 min) on "
    "any server, naming pid, user, application and start; the pipeline's own sessions (application_name "
    "wedefi-pipelines...) only past monitoring.pipeline_sessions: requests long_transactions_check_job.",
)
replication_slots_sensor = _health_sensor(
    "replication_slots_sensor", ("replication_slot",), HealthMonitor.replication_slots, replication_slots_check,
    replication_slots_check_job,
    "Replication slots retaining over ReplicationSlotRetainedWal (1 GB), inactive past ReplicationSlotInactive "
    "(30 min), or with wal_status unreserved/lost, on any server: requests replication_slots_check_job.",
)
invalid_indexes_sensor = _health_sensor(
    "invalid_indexes_sensor", ("invalid_index",), HealthMonitor.invalid_indexes, invalid_indexes_check,
    invalid_indexes_check_job,
    "Invalid indexes (an interrupted CREATE INDEX CONCURRENTLY) past InvalidIndex (0), builds in progress "
    "excepted: requests invalid_indexes_check_job.",
)
vacuum_health_sensor = _health_sensor(
    "vacuum_health_sensor", ("vacuum_backlog",), HealthMonitor.vacuum_health, vacuum_health_check,
    vacuum_health_check_job,
    "Tables and partitions whose dead tuples stay above their autovacuum threshold past VacuumBacklog (1 h): "
    "requests vacuum_health_check_job.",
)
deadlocks_sensor = _health_sensor(
    "deadlocks_sensor", ("deadlocks",), HealthMonitor.deadlocks, deadlocks_check, deadlocks_check_job,
    "Deadlocks per minute since the previous tick past Deadlocks (5/min) on any server: requests "
    "deadlocks_check_job.",
)
standby_conflicts_sensor = _health_sensor(
    "standby_conflicts_sensor", ("standby_conflict",), HealthMonitor.standby_conflicts, standby_conflicts_check,
    standby_conflicts_check_job,
    "Queries a replica cancelled for replay (pg_stat_database_conflicts) since the previous tick past "
    "StandbyConflicts (0): requests standby_conflicts_check_job.",
)

platform_health_sensor = _health_sensor(
    "platform_health_sensor", ("partition_horizon", "default_rows", "tier_overdue", "archive_unfinished"),
    HealthMonitor.platform, platform_health_check, platform_health_check_job,
    "The platform's own health from the month catalog (every monitoring.platform_interval_s): months provisioned "
    "ahead, rows stuck in default partitions, months past their tier, archive runs left half-way: requests "
    "platform_health_check_job.",
    interval_s=current_settings().monitoring.platform_interval_s,
)


@dg.run_failure_sensor(
    name="alert_on_run_failure", monitor_all_code_locations=True, default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every failed run, in any code location, becomes (or updates) one \"Alert\" row per incident, "
                "status 'pending' for the app's alert processor, and a post to ALERT_WEBHOOK_URL when set.",
)
def alert_on_run_failure(context: dg.RunFailureSensorContext, database: DatabaseResource,
                         alert_sink: AlertSinkResource):
    run = context.dagster_run
    if run.tags.get(TAG_WILL_RETRY) == "true":
        return dg.SkipReason(f"run {run.run_id} of {run.job_name} will be retried: its final attempt decides")
    records = context.instance.all_logs(
        run.run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.ASSET_CHECK_EVALUATION})
    report = incident_for_run(run, context.failure_event.message, [r.dagster_event for r in records if r.dagster_event])
    alert = alert_sink.sink(database.db, context.log).raise_incident(report)
    verb = "opened" if alert.created else "updated"
    context.log.info(f"{verb} alert {alert.id} ({alert.incident}, {alert.metadata.get('occurrences')} occurrence(s))")


HEALTH_SENSORS = [replication_lag_sensor, slow_query_sensor, index_hit_ratio_sensor, connection_count_sensor,
                  wraparound_sensor, long_transactions_sensor, replication_slots_sensor, invalid_indexes_sensor,
                  vacuum_health_sensor, deadlocks_sensor, standby_conflicts_sensor, platform_health_sensor,
                  alert_on_run_failure]
