"""Redis cache (issue 6): the `redis_cache` asset, refreshed right after price or portfolio
ingestion, and the "cache" resource (Redis, from REDIS_URL) that ingestion also uses for
invalidation."""

import dagster as dg
import psycopg

from wedefi_pipelines.cache.refresh import refresh_cache
from wedefi_pipelines.cache.store import CacheUnavailable
from wedefi_pipelines.resources.cache import CacheResource
from wedefi_pipelines.resources.database import DatabaseResource

# Refresh once after any upstream update (a price day or a portfolio tick), never two at
# once. Not `eager()`: its "no missing upstream" rule never holds for an unpartitioned
# asset over daily price partitions reaching back to the first history month.
REFRESH_AFTER_INGESTION = (
    dg.AutomationCondition.any_deps_updated().since_last_handled() & ~dg.AutomationCondition.in_progress()
).with_label("after price or portfolio ingestion")


@dg.asset(
    deps=["price_snapshots", "portfolio_snapshots"],
    kinds={"redis", "postgres"},
    group_name="cache",
    pool="wedefi_cache",
    automation_condition=REFRESH_AFTER_INGESTION,
)
def redis_cache(context: dg.AssetExecutionContext, database: DatabaseResource, cache: CacheResource) -> dg.MaterializeResult:
    """The Redis values WeDefiDaily's API reads instead of querying PostgreSQL: every token's
    latest price (`price:latest:{tokenId}`, 60 s), every wallet's portfolio summary
    (`portfolio:{walletId}`, 300 s) and governance locks (`governance:{walletId}`, 1800 s),
    in the app's own format (contract v2 of docs/cache.md: what its CacheManager reads).

    Read through the database's routing (read replica, or the primary when it lags or is
    down), written in pipelined batches; values whose bytes did not change are not resent,
    only their expiry renewed. Runs as its own step, so a Redis outage fails this asset only,
    never ingestion; the next run rewrites whatever is missing.
    """
    try:
        report = refresh_cache(database.db, cache.client(), logger=context.log)
    except CacheUnavailable as exc:
        raise dg.Failure(description=str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise dg.Failure(description=f"the cache refresh cannot read the database: {exc}") from exc
    return dg.MaterializeResult(metadata=report.metadata())


redis_cache_automation = dg.AutomationConditionSensorDefinition(
    "redis_cache_automation",
    target=dg.AssetSelection.assets(redis_cache),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Refreshes the Redis cache after price or portfolio ingestion (running by default: "
    "the API's cached values expire within 60-300 s without it).",
)

defs = dg.Definitions(
    assets=[redis_cache],
    sensors=[redis_cache_automation],
    resources={"cache": CacheResource()},
)
