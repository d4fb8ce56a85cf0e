"""The health domain's assets: the servers the checks judge, and the two daily reports."""

import dagster as dg

from wedefi_pipelines.health import reports
from wedefi_pipelines.health.monitor import HealthMonitor
from wedefi_pipelines.resources.database import DatabaseResource

database_health = dg.AssetSpec(
    "database_health",
    group_name="health",
    kinds={"postgres"},
    description=(
        "WeDefiDaily's live PostgreSQL servers (the primary and the replicas behind DATABASE_URL_READ "
        "and DATABASE_URL_ANALYTICS). Nothing materializes it: its blocking checks (replication_lag, "
        "slow_queries, index_hit_ratio, connection_count, wraparound, long_transactions, replication_slots, "
        "invalid_indexes, vacuum_health, deadlocks, standby_conflicts) are what the health sensors run when a probe "
        "breaches, and a failed check becomes an \"Alert\" row. See docs/health.md."
    ),
)


def _table(rows: list[dict], columns: list[str]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: row.get(c) for c in columns}) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in columns]),
    )


SLOW_COLUMNS = ["server", "mean_exec_ms", "calls", "total_exec_ms", "max_exec_ms", "rows", "hit_percent",
                "read_time_ms", "queryid", "query"]


@dg.asset(group_name="health", kinds={"postgres"}, deps=["database_schema"])
def slow_query_report(context: dg.AssetExecutionContext, database: DatabaseResource) -> dg.MaterializeResult:
    """The seed's slow-query report for DBAs and developers: on each server, the statements
    whose mean execution time since the previous report exceeds
    monitoring.slow_query_report_mean_ms (100 ms), slowest first (top 20), with normalized
    text, calls, hit percent and block read time. Read it to pick what to optimise next."""
    previous = context.instance.get_latest_materialization_event(context.asset_key)
    report = reports.slow_query_report(HealthMonitor(database.db), context.run_id, previous.run_id if previous else None)
    for note in report.notes:
        context.log.warning(note)
    return dg.MaterializeResult(metadata={
        "slow_statements": len(report.rows),
        "slowest_mean_ms": max((r["mean_exec_ms"] for r in report.rows), default=0.0),
        "statements": _table(report.rows, SLOW_COLUMNS),
        "windows": dg.MetadataValue.json(report.windows),
        "statements_seen": dg.MetadataValue.json(report.statements_seen),
        "notes": dg.MetadataValue.json(report.notes),
    })


INDEX_COLUMNS = ["schema", "table", "index", "size_bytes", "scans", "enforces_constraint", "unused"]


@dg.asset(group_name="health", kinds={"postgres"}, deps=["database_schema"])
def index_usage_report(context: dg.AssetExecutionContext, database: DatabaseResource) -> dg.MaterializeResult:
    """The seed's index utilisation report: every index with its scans on each server (the
    replicas serve reads the primary never sees), its size, and whether it enforces a
    constraint; the indexes no server ever scanned are candidates to drop. Plus each
    server's index hit ratio since its statistics began."""
    report = reports.index_usage_report(HealthMonitor(database.db))
    for note in report.notes:
        context.log.warning(note)
    rows = [{**row, "scans": ", ".join(f"{s}={n}" for s, n in sorted(row["scans"].items()))}
            for row in report.indexes]
    unused = [r for r in rows if r["unused"]]
    return dg.MaterializeResult(metadata={
        "indexes": len(rows),
        "unused_indexes": len(unused),
        "unused_bytes": sum(r["size_bytes"] for r in unused),
        "unused": _table(unused, INDEX_COLUMNS),
        "largest": _table(sorted(rows, key=lambda r: -r["size_bytes"])[:50], INDEX_COLUMNS),
        "hit_ratio_pct": dg.MetadataValue.json(report.hit_ratio_pct),
        "stats_since": dg.MetadataValue.json(report.stats_since),
        "notes": dg.MetadataValue.json(report.notes),
    })
