"""Monthly partition provisioning (issue 3): `table_partitions` (monthly, backfillable),
`partition_horizon` (current + N months, default-partition drain), their checks and the
schedules that replace the seed's pg_cron job."""

import dagster as dg

from wedefi_pipelines.defs.provisioning.assets import partition_horizon, table_partitions
from wedefi_pipelines.defs.provisioning.checks import checks
from wedefi_pipelines.defs.provisioning.schedules import partition_horizon_job, schedules

defs = dg.Definitions(
    assets=[table_partitions, partition_horizon],
    asset_checks=checks,
    jobs=[partition_horizon_job],
    schedules=schedules,
)
