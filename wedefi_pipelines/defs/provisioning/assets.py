"""Monthly partitions ahead of the data: the `table_partitions` backfill asset and the
`partition_horizon` maintenance asset (replacing the seed's create_monthly_partitions()
and its pg_cron job). The work is in wedefi_pipelines.provisioning; these stay thin."""

from datetime import datetime, timezone

import dagster as dg
from pydantic import Field, field_validator

from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.defs.time_partitions import monthly_partitions
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings


class PartitionHorizonConfig(dg.Config):
    months_ahead: int = Field(
        default=current_settings().partitions.horizon_months,
        description=(f"Months to keep ready after the current one, {provisioning.MIN_MONTHS_AHEAD} to "
                     f"{provisioning.MAX_MONTHS_AHEAD} (default: settings partitions.horizon_months)."),
    )

    @field_validator("months_ahead")
    @classmethod
    def _in_range(cls, value: int) -> int:
        return provisioning.validate_months_ahead(value)


def _table_outcomes(results: list[provisioning.MonthOutcome]) -> dict:
    summary: dict = {}
    for outcome in results:
        summary.setdefault(outcome.action, []).append(p.month_year(outcome.month))
        if outcome.moved:
            summary.setdefault("rows_moved_from_default", {})[p.month_year(outcome.month)] = outcome.moved
    return summary


def _outcome_metadata(outcomes: dict[str, list[provisioning.MonthOutcome]]) -> dict[str, dg.MetadataValue]:
    per_table = {table: _table_outcomes(results) for table, results in outcomes.items()}
    return {
        "months_created": dg.MetadataValue.int(sum(o.action == "created" for r in outcomes.values() for o in r)),
        "rows_moved_from_default": dg.MetadataValue.int(sum(o.moved for r in outcomes.values() for o in r)),
        "tables": dg.MetadataValue.json(per_table),
    }


@dg.asset(
    partitions_def=monthly_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["database_schema"],
    kinds={"postgres"},
    group_name="partitions",
    pool="wedefi_ddl",
)
def table_partitions(context: dg.AssetExecutionContext, database: DatabaseResource) -> dg.MaterializeResult:
    """The monthly children of "PriceSnapshot", "PortfolioSnapshot" and "PositionSnapshot"
    for the selected months, with their per-child indexes and PortfolioSnapshot's 4 hash
    sub-partitions; rows of those months waiting in a default partition are moved in. A month range backfilled from the UI runs once over
    the whole range. Months archived to the cold tier count as covered and are skipped
    (only a restore brings one back). Ingestion depends on it month by month."""
    window = context.partition_time_window
    months = p.months_between(p.month_of(window.start), p.add_months(p.month_of(window.end), -1))
    with database.db.autocommit("primary") as conn:
        outcomes = provisioning.provision_months(conn, months)
    metadata = {"months": dg.MetadataValue.text(f"{p.month_year(months[0])}..{p.month_year(months[-1])}"),
                **_outcome_metadata(outcomes)}
    failed = list(dict.fromkeys(o.detail for r in outcomes.values() for o in r if o.action == "failed"))
    if failed:
        raise dg.Failure(description="some months could not be provisioned:\n" + "\n".join(failed), metadata=metadata)
    context.log.info("months %s..%s: %s created", months[0], months[-1], metadata["months_created"].value)
    return dg.MaterializeResult(metadata=metadata)


def _horizon_metadata(report: provisioning.HorizonReport) -> dict[str, dg.MetadataValue]:
    rows = ["| table | oldest | newest | created | rows moved | rows left in default |", "|---|---|---|---|---|---|"]
    rows += ["| " + " | ".join(str(v) for v in row) + " |" for row in report.rows()]
    return {
        "horizon": dg.MetadataValue.text(f"{p.month_year(report.horizon[0])}..{p.month_year(report.horizon[-1])}"),
        "months_created": dg.MetadataValue.int(report.created_count),
        "rows_moved_from_default": dg.MetadataValue.int(report.moved_count),
        "rows_left_in_default": dg.MetadataValue.int(report.left_count),
        "summary": dg.MetadataValue.md("\n".join(rows)),
        "tables": dg.MetadataValue.json({name: t.summary() for name, t in report.tables.items()}),
        "TokenBalance": dg.MetadataValue.json(report.token_balance.summary()),
    }


@dg.asset(
    deps=["database_schema"],
    kinds={"postgres"},
    group_name="partitions",
    pool="wedefi_ddl",
)
def partition_horizon(
    context: dg.AssetExecutionContext, config: PartitionHorizonConfig, database: DatabaseResource
) -> dg.MaterializeResult:
    """The current month and the next `months_ahead` exist for "PriceSnapshot",
    "PortfolioSnapshot" and "PositionSnapshot", so writes never fall into a default
    partition; rows that did (an outage, late or early data) are moved into their month's
    new child, creating any month between so no gap appears. Rows of archived months stay
    in the default for the cold archive. Verifies "TokenBalance" has its 8 hash
    partitions. Runs under advisory locks with a short lock_timeout and retries, so
    concurrent runs create each child once and readers and writers are never stuck behind
    it. Scheduled monthly and daily (partition_horizon_monthly/_daily)."""
    with database.db.autocommit("primary") as conn:
        report = provisioning.run_horizon(conn, config.months_ahead, today=datetime.now(timezone.utc),
                                          earliest=database.db.settings.partitions.start)
    metadata = _horizon_metadata(report)
    for name, t in report.tables.items():
        for month, (count, reason) in t.left_in_default.items():
            context.log.warning("%s: %d row(s) of %s stay in the default partition: %s",
                                name, count, p.month_year(month), reason)
    if not report.ok:
        raise dg.Failure(description="partition horizon incomplete:\n" + "\n".join(report.problems), metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)
