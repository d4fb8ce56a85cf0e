"""Database health sensors and alerting (issues 7 and 15): probes on every server, blocking
checks on `database_health`, one sensor per seed alert and per condition issue 15 adds, the
run-failure sensor that writes the app's "Alert" rows, and the daily slow-query and index-usage reports. See docs/health.md."""

import dagster as dg

from .assets import database_health, index_usage_report, slow_query_report
from .checks import HEALTH_CHECKS
from .jobs import CHECK_JOBS, health_reports_job
from .resources import AlertSinkResource
from .schedules import health_reports_schedule
from .sensors import HEALTH_SENSORS

defs = dg.Definitions(
    assets=[database_health, slow_query_report, index_usage_report],
    asset_checks=HEALTH_CHECKS,
    jobs=[*CHECK_JOBS, health_reports_job],
    schedules=[health_reports_schedule],
    sensors=HEALTH_SENSORS,
    resources={"alert_sink": AlertSinkResource()},
)
