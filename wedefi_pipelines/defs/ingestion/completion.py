"""`complete_positions`: the app's positions written without "capturedAt" get their
PortfolioSnapshot's time and move into their month; `complete_positions_sensor` runs it
when such rows wait. The work is `wedefi_pipelines.positions`."""

import hashlib
from datetime import datetime, timezone

import dagster as dg

from wedefi_pipelines import locks, positions
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings

JOB = "complete_positions"
_UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dg.op(name="complete_waiting_positions", pool="wedefi_ddl")
def complete_waiting_positions(context: dg.OpExecutionContext, database: DatabaseResource) -> dg.Output[dict]:
    """Moves every waiting position whose portfolio row exists into its month, a batch per
    transaction; rows whose portfolio row is missing stay in the default partition, counted."""
    report = positions.complete_positions(database.db, database.db.settings, logger=context.log)
    meta = report.metadata()
    return dg.Output(meta, metadata={k: dg.MetadataValue.json(v) if isinstance(v, dict) else v
                                     for k, v in meta.items()})


@dg.job(name=JOB, tags={"dagster/max_retries": "0"}, executor_def=dg.in_process_executor,
        description='Completes "PositionSnapshot" rows the app wrote without "capturedAt": each gets its '
                    "PortfolioSnapshot's time and moves from the default partition into its month.")
def complete_positions():
    complete_waiting_positions()


@dg.sensor(
    name="complete_positions_sensor",
    job_name=JOB,
    minimum_interval_seconds=current_settings().ingestion.complete_positions_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description='Requests complete_positions when "PositionSnapshot_default" holds rows without "capturedAt" whose '
                "PortfolioSnapshot row exists (running by default: the app writes positions that way). The same "
                "waiting rows are requested at most once a day; new rows ask again.",
)
def complete_positions_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource):
    unfinished = context.instance.get_run_records(filters=dg.RunsFilter(job_name=JOB, statuses=_UNFINISHED), limit=1)
    if unfinished:
        return dg.SkipReason(f"{JOB} run {unfinished[0].dagster_run.run_id} is not finished yet")
    settings = database.db.settings
    with database.db.connect("primary") as conn:
        locks.set_timeout(conn, "statement_timeout", settings.monitoring.statement_timeout_ms)
        waiting = positions.waiting(conn)
    if not waiting.placeable:
        extra = (f"; {waiting.orphaned} wait without their PortfolioSnapshot row (see the positions_completed check)"
                 if waiting.orphaned else "")
        return dg.SkipReason(f"no position waits for its capturedAt{extra}")
    today = datetime.now(timezone.utc).date().isoformat()
    digest = hashlib.sha256(f"{waiting.placeable}:{waiting.first_id}:{waiting.last_id}".encode()).hexdigest()[:12]
    return dg.RunRequest(run_key=f"{JOB}:{today}:{digest}",
                         tags={"wedefi/positions_waiting": str(waiting.placeable)})
