"""Run retention: Dagster never deletes runs, and every sensor-triggered run adds its
event log to the `dagster` database. A daily job deletes finished runs older than
`older_than_days` (default 90) with their events and compute logs, keeping runs that
materialized partitions (their events are the partitions' status). The rule is
`wedefi_pipelines.instance.purge_runs`; `python -m wedefi_pipelines.instance purge-runs`
does the same by hand."""

import dagster as dg
from pydantic import Field

from wedefi_pipelines.instance import purge_runs

RETENTION_DAYS = 90


class RunRetentionConfig(dg.Config):
    older_than_days: int = Field(default=RETENTION_DAYS, ge=1, le=3650,
                                 description="Delete finished runs last updated more than this many days ago.")
    max_runs: int = Field(default=10_000, ge=1, le=1_000_000,
                          description="At most this many runs per run, oldest first (the next day continues).")


@dg.op(name="purge_old_runs")
def purge_old_runs(context: dg.OpExecutionContext, config: RunRetentionConfig) -> None:
    result = purge_runs(context.instance, config.older_than_days, max_runs=config.max_runs)
    context.log.info(f"deleted {len(result.deleted)} run(s) last updated before {result.cutoff.isoformat()}; "
                     f"kept {result.kept_for_partitions} partition run(s)")


@dg.job(name="dagster_run_retention", tags={"dagster/max_retries": "0"}, executor_def=dg.in_process_executor,
        description="Deletes finished Dagster runs older than 90 days (not partition runs), with their event logs.")
def dagster_run_retention():
    purge_old_runs()


dagster_run_retention_daily = dg.ScheduleDefinition(
    name="dagster_run_retention_daily",
    job=dagster_run_retention,
    cron_schedule="45 4 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day at 04:45 UTC: run retention (the instance's own retention covers ticks only).",
)
