"""The `database_schema` asset: WeDefiDaily's schema, applied from sql/."""

import dagster as dg

from wedefi_pipelines.migrations import discover, migrate
from wedefi_pipelines.resources.database import DatabaseResource


@dg.asset(kinds={"postgres"}, group_name="schema", pool="wedefi_ddl")
def database_schema(context: dg.AssetExecutionContext, database: DatabaseResource) -> dg.MaterializeResult:
    """WeDefiDaily's tables, as the app's Prisma schema maps them, partitioned where the
    time series demand it. Applies every pending file of sql/ in order, under an advisory
    lock, refusing any applied file that has since changed."""
    result = migrate(database.db.urls["primary"])
    context.log.info("applied %s; already applied %s", result.applied, result.already_applied)
    return dg.MaterializeResult(
        metadata={
            "applied": result.applied,
            "already_applied": len(result.already_applied),
            "migrations": [m.path.name for m in discover()],
        }
    )


defs = dg.Definitions(assets=[database_schema])
