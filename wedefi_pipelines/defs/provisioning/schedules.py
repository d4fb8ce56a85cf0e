"""Schedules replacing the seed's pg_cron job: the horizon on the 1st of every month, and
daily as a safety net, so an outage of any length heals by the next day. Both are on by
default (the product depends on them)."""

import dagster as dg

partition_horizon_job = dg.define_asset_job(
    "partition_horizon_job",
    selection=dg.AssetSelection.assets("partition_horizon"),
    description="partition_horizon and its checks.",
)


def _horizon_schedule(name: str, cron: str, description: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name, job=partition_horizon_job, cron_schedule=cron, execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING, description=description,
    )


partition_horizon_monthly = _horizon_schedule(
    "partition_horizon_monthly", "5 0 1 * *",
    "On the 1st at 00:05 UTC: the month entering the horizon is created, months ahead of its data.",
)
# every other day of the month: the 1st already has its monthly run
partition_horizon_daily = _horizon_schedule(
    "partition_horizon_daily", "5 3 2-31 * *",
    "Daily safety net (03:05 UTC): heals missed months and drains default partitions.",
)

schedules = [partition_horizon_monthly, partition_horizon_daily]
