"""Schedules replacing the seed's pg_cron job: the horizon on the 1st of every month, and
daily as a safety net, so an outage of any length heals by the next day."""

import dagster as dg

partition_horizon_job = dg.define_asset_job(
    "partition_horizon_job",
    selection=dg.AssetSelection.assets("partition_horizon"),
    description="partition_horizon and its checks.",
)

partition_horizon_monthly = dg.ScheduleDefinition(
    name="partition_horizon_monthly",
    job=partition_horizon_job,
    cron_schedule="5 0 1 * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="On the 1st at 00:05 UTC: the new month's horizon month is created months ahead.",
)

partition_horizon_daily = dg.ScheduleDefinition(
    name="partition_horizon_daily",
    job=partition_horizon_job,
    # every other day of the month: the 1st already has its monthly run
    cron_schedule="5 3 2-31 * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily safety net (03:05 UTC): heals missed months and drains default partitions.",
)

schedules = [partition_horizon_monthly, partition_horizon_daily]
