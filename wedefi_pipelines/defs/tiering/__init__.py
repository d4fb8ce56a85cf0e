"""Hot/warm/cold tiering (issue 5): `warm_tier` and `cold_archive` (monthly, backfillable,
the latter with its consistency checks), the `restore_archived_month` job, the daily `tiering_daily` schedule and the
"archive" resource (the S3 location of the cold tier)."""

import dagster as dg

from wedefi_pipelines.defs.tiering.assets import cold_archive, warm_tier
from wedefi_pipelines.defs.tiering.jobs import restore_archived_month
from wedefi_pipelines.defs.tiering.schedules import tiering_daily, tiering_job
from wedefi_pipelines.resources.archive import ArchiveStoreResource

defs = dg.Definitions(
    assets=[warm_tier, cold_archive],
    jobs=[restore_archived_month, tiering_job],
    schedules=[tiering_daily],
    resources={"archive": ArchiveStoreResource()},
)
