"""The daily health reports (the seed's monitoring queries, as assets)."""

import dagster as dg

from .jobs import health_reports_job

health_reports_schedule = dg.ScheduleDefinition(
    name="health_reports_schedule",
    job=health_reports_job,
    cron_schedule="30 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Materializes slow_query_report and index_usage_report every day at 06:30 UTC.",
)
