"""Asset checks on `partition_horizon`: months exist ahead, no gaps, default partitions
empty. Non-blocking (a red check does not fail the run), ERROR severity when red. They
read the primary's catalog (a replica's may lag) with a statement timeout."""

from datetime import datetime, timezone

import dagster as dg

from wedefi_pipelines import locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.defs.provisioning.assets import partition_horizon
from wedefi_pipelines.resources.database import DatabaseResource


# Counting a default partition by month reads all its rows: after a long outage that is
# millions, so the checks get more time than the sensors' probes do.
STATEMENT_TIMEOUT_MS = 60_000


def _inspect(database: DatabaseResource) -> list[provisioning.TableInspection]:
    with database.db.connect("primary") as conn:
        locks.set_timeout(conn, "statement_timeout", STATEMENT_TIMEOUT_MS)
        return provisioning.inspect_partitions(conn)


def _months(months) -> list[str]:
    return [p.month_year(m) for m in sorted(months)]


@dg.asset_check(asset=partition_horizon, blocking=False)
def horizon_covered(database: DatabaseResource) -> dg.AssetCheckResult:
    """Every range-partitioned table has the current month and the next
    partitions.horizon_months months attached (or archived), so no write lands in a
    default partition."""
    ahead = database.db.settings.partitions.horizon_months
    today = datetime.now(timezone.utc)
    missing = {t.table: _months(provisioning.missing_horizon_months(t.covered, today, ahead))
               for t in _inspect(database)}
    missing = {table: months for table, months in missing.items() if months}
    horizon = p.horizon_months(today, ahead)
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("every month of the horizon exists" if not missing
                     else "months of the horizon are missing: materialize partition_horizon"),
        metadata={"horizon": f"{p.month_year(horizon[0])}..{p.month_year(horizon[-1])}",
                  "missing_months": dg.MetadataValue.json(missing)},
    )


@dg.asset_check(asset=partition_horizon, blocking=False)
def no_partition_gaps(database: DatabaseResource) -> dg.AssetCheckResult:
    """No month is missing between each table's oldest and newest month; archived months
    count as covered. A gap sends its month's rows to the default partition."""
    tables = _inspect(database)
    gaps = {t.table: _months(provisioning.gap_months(t.covered)) for t in tables}
    gaps = {table: months for table, months in gaps.items() if months}
    extent = {t.table: {"oldest": _months(t.covered)[0] if t.covered else None,
                        "newest": _months(t.covered)[-1] if t.covered else None,
                        "archived": _months(t.archived)} for t in tables}
    return dg.AssetCheckResult(
        passed=not gaps,
        severity=dg.AssetCheckSeverity.ERROR,
        description="no gaps" if not gaps else "months are missing between the oldest and newest child",
        metadata={"gaps": dg.MetadataValue.json(gaps), "extent": dg.MetadataValue.json(extent)},
    )


@dg.asset_check(asset=partition_horizon, blocking=False)
def default_partitions_empty(database: DatabaseResource) -> dg.AssetCheckResult:
    """No range table's default partition holds rows (and each has one). Rows there are
    kept, not lost, but queries cannot prune them and the warm and cold tiers do not see
    them: partition_horizon drains them; rows of archived months wait for the cold archive.
    Positions the app wrote without "capturedAt" belong to no month yet: they are counted
    apart (complete_positions moves them) and do not fail this check."""
    tables = _inspect(database)
    counts = {t.table: {p.month_year(m): n for m, n in sorted(t.default_rows.items())} for t in tables}
    total = sum(sum(c.values()) for c in counts.values())
    missing_default = [t.table for t in tables if not t.has_default]
    archived_rows = {t.table: {p.month_year(m): n for m, n in t.default_rows.items() if m in t.archived}
                     for t in tables}
    passed = total == 0 and not missing_default
    description = "default partitions are empty"
    if total:
        description = f"{total} row(s) wait in default partitions: materialize partition_horizon"
    if missing_default:
        description += f"; no default partition on {', '.join(missing_default)} (out-of-range writes fail)"
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "rows_in_default": dg.MetadataValue.int(total),
            "rows_by_table_and_month": dg.MetadataValue.json({t: c for t, c in counts.items() if c}),
            "rows_of_archived_months": dg.MetadataValue.json({t: c for t, c in archived_rows.items() if c}),
            "tables_without_default": dg.MetadataValue.json(missing_default),
            "rows_waiting_for_complete_positions": dg.MetadataValue.json(
                {t.table: t.null_key_rows for t in tables if t.null_key_rows}),
        },
    )


checks = [horizon_covered, no_partition_gaps, default_partitions_empty]
