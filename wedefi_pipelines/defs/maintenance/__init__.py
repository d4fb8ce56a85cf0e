"""Maintenance of the pipelines themselves (issue 8): the partition safety sensor, which
requests `partition_horizon_job` between its schedules, and Dagster run retention."""

import dagster as dg

from wedefi_pipelines.defs.maintenance.retention import dagster_run_retention, dagster_run_retention_daily
from wedefi_pipelines.defs.maintenance.sensors import partition_safety_sensor

defs = dg.Definitions(
    jobs=[dagster_run_retention],
    schedules=[dagster_run_retention_daily],
    sensors=[partition_safety_sensor],
)
