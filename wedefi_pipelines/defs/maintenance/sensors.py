"""`partition_safety_sensor`: requests `partition_horizon_job` as soon as a month of the
horizon is missing or rows wait in a default partition, instead of at the next daily
schedule. The decision is `provisioning.safety`'s."""

from datetime import datetime, timezone

import dagster as dg

from wedefi_pipelines import locks
from wedefi_pipelines.provisioning import safety
from wedefi_pipelines.resources.database import DatabaseResource

HORIZON_JOB = "partition_horizon_job"  # defined by the provisioning domain, with its schedules
HORIZON_OP = "partition_horizon"
INTERVAL_S = 60
TAG_PENDING = "wedefi/partition_safety"
_UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def run_config(months_ahead: int) -> dict:
    """The horizon and its three checks run one after the other: in one process, rather than
    one subprocess per step each loading the code location again."""
    return {"execution": {"config": {"in_process": {}}},
            "ops": {HORIZON_OP: {"config": {"months_ahead": months_ahead}}}}


@dg.sensor(
    name="partition_safety_sensor",
    job_name=HORIZON_JOB,
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests partition_horizon_job when a month of the horizon is missing or a default partition "
                "holds rows it would drain (running by default: writes into a missing month land in the default "
                "partition, where queries cannot prune them). At most one run per day for the same work.",
)
def partition_safety_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource):
    unfinished = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=HORIZON_JOB, statuses=_UNFINISHED), limit=1)
    if unfinished:
        return dg.SkipReason(f"{HORIZON_JOB} run {unfinished[0].dagster_run.run_id} is not finished yet")
    settings = database.db.settings
    now = datetime.now(timezone.utc)
    with database.db.connect("primary") as conn:
        locks.set_timeout(conn, "statement_timeout", settings.monitoring.statement_timeout_ms)
        work = safety.pending_work(conn, now, settings.partitions.horizon_months, settings.partitions.start)
    key = safety.run_key(now.date(), work)
    summary = safety.summary(work)
    if key is None:
        return dg.SkipReason(summary)
    context.log.warning(f"partition horizon work pending: {summary}")
    return dg.RunRequest(
        run_key=key,
        run_config=run_config(settings.partitions.horizon_months),
        tags={TAG_PENDING: summary[:1000]},
    )
