"""The tier assets: `warm_tier` and `cold_archive`, one monthly partition per month.

Both process every range table for their month and skip (successfully, saying why in
their metadata) a month that is not due, so a month-range backfill from the UI is safe.
The work is in wedefi_pipelines.tiering; these stay thin.
"""

import dagster as dg

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.tiering.checks import CHECK_SPECS, evaluate
from wedefi_pipelines.defs.time_partitions import monthly_partitions
from wedefi_pipelines.resources.archive import ArchiveStoreResource
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.policy import groups
from wedefi_pipelines.tiering.warm import warm_month


def _fail_or_return(context: dg.AssetExecutionContext, results: dict, errors: dict,
                    check_results: list[dg.AssetCheckResult] | None = None) -> dg.MaterializeResult:
    metadata = {name: dg.MetadataValue.json(meta) for name, meta in results.items()}
    changed = [name for name, meta in results.items() if meta.get("action") not in (None, "skipped")]
    metadata["changed"] = dg.MetadataValue.json(changed)
    if errors:
        metadata.update({f"{name}_error": dg.MetadataValue.text(str(exc)) for name, exc in errors.items()})
        raise dg.Failure(
            description="; ".join(f"{name}: {exc}" for name, exc in errors.items()), metadata=metadata)
    if not changed:
        context.log.info("nothing to do for %s: %s", context.partition_key,
                         "; ".join(f"{n}: {m.get('reason')}" for n, m in results.items()))
    return dg.MaterializeResult(metadata=metadata, check_results=check_results)


@dg.asset(
    partitions_def=monthly_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    deps=["table_partitions"],
    kinds={"postgres"},
    group_name="tiering",
    pool="wedefi_warm",
)
def warm_tier(context: dg.AssetExecutionContext, database: DatabaseResource) -> dg.MaterializeResult:
    """The month's "PriceSnapshot", "PortfolioSnapshot" and "PositionSnapshot" children in
    the warm layout (30 days to a year old): still attached, rows rewritten in the order
    history reads them (one token's or one wallet's), BRIN instead of the btrees that
    order makes redundant, frozen and analysed. Queries on the parents see every row.
    A month that is not warm is skipped; metadata gives bytes per row and the time of one
    key's week before and after."""
    month = p.parse_month(context.partition_key)
    results, errors = {}, {}
    for table in p.TIERED_TABLES:
        try:
            results[table.name] = warm_month(database.db, table, month, logger=context.log).metadata()
        except Exception as exc:  # one table failing must not hide the others' outcome
            context.log.error("%s %s: %s", table.name, p.month_year(month), exc)
            errors[table.name] = exc
    return _fail_or_return(context, results, errors)


@dg.asset(
    partitions_def=monthly_partitions,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    deps=["table_partitions"],
    kinds={"postgres", "s3", "parquet"},
    group_name="tiering",
    pool="wedefi_archive",
    check_specs=CHECK_SPECS,
)
def cold_archive(context: dg.AssetExecutionContext, database: DatabaseResource,
                 archive: ArchiveStoreResource) -> dg.MaterializeResult:
    """The month's rows moved from PostgreSQL to verified zstd Parquet on S3
    (s3://$ARCHIVE_BUCKET/$ARCHIVE_PREFIX/<Table>/year=YYYY/month=MM/), recorded in
    "<Table>_archive_metadata" and "<Table>_archive_objects", then the month's children
    dropped. "PortfolioSnapshot" and "PositionSnapshot" move together. Re-running a month
    resumes an interrupted run or archives late rows as an additional object; a month that
    is not cold is skipped. Restore with the restore_archived_month job."""
    month = p.parse_month(context.partition_key)
    store = archive.store
    archiver = Archiver(database.db, store, logger=context.log)
    results, errors = {}, {}
    for group in groups():
        try:
            results[group] = archiver.archive_month(group, month).metadata(store)
        except Exception as exc:  # the other group still runs; the run fails at the end
            context.log.error("%s %s: %s", group, p.month_year(month), exc)
            errors[group] = exc
    return _fail_or_return(context, results, errors, evaluate(database.db, store))
