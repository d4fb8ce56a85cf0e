"""Rollups (issue 16): `price_rollups` (daily partitions, like price_snapshots) and
`portfolio_rollups`, each with its `rollups_match_raw` check, and the hourly schedules
that keep them current. The work is in wedefi_pipelines.rollups; these stay thin."""

from datetime import datetime, timedelta, timezone

import dagster as dg

from pydantic import Field, field_validator

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.time_partitions import daily_partitions
from wedefi_pipelines.resources.archive import ArchiveStore, ArchiveStoreResource
from wedefi_pipelines.resources.database import ConfigurationError, DatabaseResource
from wedefi_pipelines.rollups.refresh import RefreshResult, month_days, refresh
from wedefi_pipelines.rollups.tables import PORTFOLIO, PRICE, Family
from wedefi_pipelines.rollups.verify import verify_sample

CHECK = "rollups_match_raw"


def _today() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _check(database: DatabaseResource, fam: Family, asset: str) -> dg.AssetCheckResult:
    settings = database.db.settings.rollups
    since = _today() - timedelta(days=settings.sweep_days)
    with database.db.connect("primary") as conn:
        verdict = verify_sample(conn, fam, settings.check_sample_rows, since)
    return dg.AssetCheckResult(
        asset_key=asset, check_name=CHECK, passed=not verdict.mismatches, severity=dg.AssetCheckSeverity.ERROR,
        description=f"{verdict.checked} sampled rollup row(s) recomputed from raw rows, {len(verdict.mismatches)} "
                    f"differ; {verdict.not_judged} not judged (their day is stale, archived or lost raw rows)",
        metadata={"checked": verdict.checked, "not_judged": verdict.not_judged,
                  "mismatches": dg.MetadataValue.json(verdict.mismatches[:20])})


def _store(archive: ArchiveStoreResource) -> ArchiveStore | None:
    """The archive, when configured: only a month whose raw rows are archived needs it (the
    refresh then says so in its notes), so rollups run where S3 is not set up."""
    try:
        return archive.store
    except ConfigurationError:
        return None


def _materialize(result: RefreshResult, check: dg.AssetCheckResult) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={**result.metadata(), "dagster/row_count": sum(result.rows_written.values())},
                                check_results=[check])


def _spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(CHECK, asset=asset, description=(
        "A random sample (settings rollups.check_sample_rows, 50 per table) of the last rollups.sweep_days days' "
        "rollup rows equals the same aggregates recomputed in Python from the raw rows still in PostgreSQL."))


@dg.asset(partitions_def=daily_partitions, backfill_policy=dg.BackfillPolicy.single_run(), deps=["price_snapshots"],
          check_specs=[_spec("price_rollups")], kinds={"postgres"}, group_name="rollups")
def price_rollups(context: dg.AssetExecutionContext, database: DatabaseResource,
                  archive: ArchiveStoreResource) -> dg.MaterializeResult:
    """"PriceRollupHourly" and "PriceRollupDaily": per token and UTC hour (day), open, high,
    low, close, sum and count of "PriceSnapshot" over all sources. A run recomputes its
    days, then every other day whose raw rows changed since they were folded in (the
    watermark: the app's writes, late rows, drains and restores included), looking back
    rollups.sweep_days days, at every row in the default partition and at older months
    never rolled up; archived months not rolled up yet are computed from the archive.
    Idempotent."""
    window = context.partition_time_window
    first, last = window.start.date(), (window.end - timedelta(days=1)).date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    since = (_today() - timedelta(days=database.db.settings.rollups.sweep_days)).date()
    result = refresh(database.db, PRICE, days=days, sweep_since=since, store=_store(archive), logger=context.log)
    return _materialize(result, _check(database, PRICE, "price_rollups"))


class PortfolioRollupsConfig(dg.Config):
    months: list[str] = Field(default_factory=list, description=(
        "Months to recompute whole, like 2025-11 (a repair, or what cold_archive's 'rollups behind' names); "
        "the days that changed are refreshed anyway."))

    @field_validator("months")
    @classmethod
    def _months(cls, values: list[str]) -> list[str]:
        for value in values:
            p.parse_month(value)  # a clear error naming the value
        return values


@dg.asset(deps=["portfolio_snapshots"], check_specs=[_spec("portfolio_rollups")], kinds={"postgres"},
          group_name="rollups")
def portfolio_rollups(context: dg.AssetExecutionContext, config: PortfolioRollupsConfig, database: DatabaseResource,
                      archive: ArchiveStoreResource) -> dg.MaterializeResult:
    """"PortfolioRollupDaily": per wallet (and the all-wallets NULL row) and UTC day, open,
    close, min, max and count of "PortfolioSnapshot"."totalUsdValue", for the days that
    changed (the watermark), older months never rolled up, archived months not rolled up
    yet from the archive, and the whole `months` of its config."""
    since = (_today() - timedelta(days=database.db.settings.rollups.sweep_days)).date()
    days = [d for month in config.months for d in month_days(p.parse_month(month))]
    result = refresh(database.db, PORTFOLIO, days=days, sweep_since=since, store=_store(archive), logger=context.log)
    return _materialize(result, _check(database, PORTFOLIO, "portfolio_rollups"))


price_rollups_job = dg.define_asset_job("price_rollups_job", selection=dg.AssetSelection.assets(price_rollups),
                                        description="price_rollups for one day (and every day that changed).")
portfolio_rollups_job = dg.define_asset_job("portfolio_rollups_job",
                                            selection=dg.AssetSelection.assets(portfolio_rollups))


@dg.schedule(job=price_rollups_job, cron_schedule="7 * * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def price_rollups_hourly(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Today's price_rollups every hour at :07 (after the quarter-hour price loads)."""
    day = context.scheduled_execution_time.astimezone(timezone.utc).date().isoformat()
    return dg.RunRequest(run_key=f"price_rollups:{context.scheduled_execution_time.isoformat()}", partition_key=day)


@dg.schedule(job=portfolio_rollups_job, cron_schedule="12 * * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def portfolio_rollups_hourly(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """portfolio_rollups every hour at :12."""
    return dg.RunRequest(run_key=f"portfolio_rollups:{context.scheduled_execution_time.isoformat()}")


defs = dg.Definitions(
    assets=[price_rollups, portfolio_rollups],
    jobs=[price_rollups_job, portfolio_rollups_job],
    schedules=[price_rollups_hourly, portfolio_rollups_hourly],
)
