"""`restore_archived_month`: an archived month back into PostgreSQL, verified."""

import re

import dagster as dg
from pydantic import Field, field_validator

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStoreResource
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.tiering.restore import restore_month


class RestoreConfig(dg.Config):
    table: str = Field(description='"PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot" or "PriceRollupHourly" '
                                   "(PortfolioSnapshot and PositionSnapshot are restored together)")
    month: str = Field(description="the month to restore, like 2025-01")

    @field_validator("table")
    @classmethod
    def _known_table(cls, value: str) -> str:
        names = [t.name for t in p.TIERED_TABLES]
        if value not in names:
            raise ValueError(f"table must be one of {sorted(names)}, got {value!r}")
        return value

    @field_validator("month")
    @classmethod
    def _month(cls, value: str) -> str:
        if not re.fullmatch(r"\d{4}-\d{2}", value.strip()):
            raise ValueError(f"month must look like 2025-01, got {value!r}")
        p.parse_month(value)
        return value.strip()


@dg.op(pool="wedefi_archive")
def restore_month_from_archive(context: dg.OpExecutionContext, config: RestoreConfig, database: DatabaseResource,
                               archive: ArchiveStoreResource) -> dg.Output[dict]:
    """Reload the month from its verified Parquet objects into a fresh attached child,
    check count and content hash against the archive metadata, mark it 'restored'."""
    outcome = restore_month(database.db, archive.store, config.table, p.parse_month(config.month), logger=context.log)
    return dg.Output(outcome.metadata(), metadata={k: dg.MetadataValue.json(v) if isinstance(v, dict) else v
                                                   for k, v in outcome.metadata().items()})


@dg.job(description="Restore one archived month (config: table like PriceSnapshot, month like 2025-01) "
                    "from S3 into PostgreSQL, verified, and mark its archive metadata 'restored'.")
def restore_archived_month():
    restore_month_from_archive()
