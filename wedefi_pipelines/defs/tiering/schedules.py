"""`tiering_daily`: every day, request exactly the months due for the warm or cold tier.

Run keys carry the day: a month whose run failed is requested again the next day and
never twice on the same day (Dagster never relaunches a run key).
"""

from datetime import datetime, timezone

import dagster as dg

from wedefi_pipelines import catalog, locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.time_partitions import monthly_partitions
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.tiering.policy import due_months, needs_newest

tiering_job = dg.define_asset_job(
    "tiering_job",
    selection=dg.AssetSelection.assets("warm_tier", "cold_archive"),
    description="warm_tier and/or cold_archive for one month (the schedule picks which).",
)


def tiering_requests(database: DatabaseResource, now: datetime, day: str) -> list[dg.RunRequest] | dg.SkipReason:
    settings = database.db.settings
    with database.db.connect("primary") as conn:
        locks.set_timeout(conn, "statement_timeout", settings.monitoring.statement_timeout_ms * 10)
        states = catalog.month_states(conn, tables=p.TIERED_TABLES, newest=needs_newest(now, settings))
    due = due_months(states, now, settings)
    valid = set(monthly_partitions.get_partition_keys(current_time=now))
    requests = []
    for asset, months in (("warm_tier", due.warm), ("cold_archive", due.cold)):
        for month in months:
            key = p.partition_key(month)
            if key not in valid:
                continue
            why = "; ".join(f"{t}: {r}" for (t, m), r in due.reasons.items() if m == month)
            requests.append(dg.RunRequest(
                run_key=f"{asset}:{key}:{day}", partition_key=key, asset_selection=[dg.AssetKey(asset)],
                tags={"wedefi/tier_reason": why[:200]}))
    if not requests:
        return dg.SkipReason(f"no month is due for the warm or cold tier on {day} "
                             f"({len(states)} table-months inspected)")
    return requests


@dg.schedule(job=tiering_job, cron_schedule="30 3 * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def tiering_daily(context: dg.ScheduleEvaluationContext, database: DatabaseResource):
    """Daily at 03:30 UTC: warm_tier for months that turned warm, cold_archive for months
    that turned cold, that an interrupted run left frozen, or whose late rows wait."""
    now = context.scheduled_execution_time or datetime.now(timezone.utc)
    return tiering_requests(database, now, now.strftime("%Y-%m-%d"))
