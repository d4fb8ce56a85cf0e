"""Database health sensors and alerting (issue 7): probes on every server, blocking checks
on `database_health`, one sensor per seed alert, the run-failure sensor that writes the
app's "Alert" rows, and the daily slow-query and index-usage reports. See docs/health.md."""

import dagster as dg

from .assets import database_health, index_usage_report, slow_query_report
from .checks import HEALTH_CHECKS
from .jobs import (connection_count_check_job, health_reports_job, index_hit_ratio_check_job,
                   replication_lag_check_job, slow_query_check_job)
from .resources import AlertSinkResource
from .schedules import health_reports_schedule
from .sensors import HEALTH_SENSORS

defs = dg.Definitions(
    assets=[database_health, slow_query_report, index_usage_report],
    asset_checks=HEALTH_CHECKS,
    jobs=[replication_lag_check_job, slow_query_check_job, index_hit_ratio_check_job, connection_count_check_job,
          health_reports_job],
    schedules=[health_reports_schedule],
    sensors=HEALTH_SENSORS,
    resources={"alert_sink": AlertSinkResource()},
)
