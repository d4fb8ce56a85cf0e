"""Ingestion assets: the write side of WeDefiDaily's time series, thin over wedefi_pipelines.ingest."""

from datetime import datetime, timedelta, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from wedefi_pipelines.cache.invalidation import invalidate_wallets
from wedefi_pipelines.defs.time_partitions import daily_partitions
from wedefi_pipelines.ingest import correlations, price_sources
from wedefi_pipelines.ingest.balances import sync_balances
from wedefi_pipelines.ingest.governance import sync_governance_locks
from wedefi_pipelines.ingest.portfolio import capture_tick, parse_utc, provision_tick, resolve_tick
from wedefi_pipelines.ingest.prices import load_prices
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.resources.cache import CacheResource
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.sources.resources import MarketResource, PriceSourceResource

REJECT_CHECK = "reject_ratio_within_threshold"
PORTFOLIO_OP = "portfolio_tick"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _lookback(database: DatabaseResource) -> timedelta:
    return timedelta(hours=database.db.settings.ingestion.price_lookback_hours)


class PriceSnapshotsConfig(dg.Config):
    file_path: Optional[str] = Field(
        default=None,
        description="Import this CSV or Parquet file (columns tokenId, priceUsd, source, recordedAt ISO-8601 UTC) "
                    "instead of reading the configured price source; rows outside the run's partition window are "
                    "rejected.",
    )


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[dg.AssetDep("table_partitions", partition_mapping=dg.TimeWindowPartitionMapping())],
    check_specs=[dg.AssetCheckSpec(
        REJECT_CHECK, asset="price_snapshots",
        description="Warns when more than settings ingestion.reject_warn_ratio (1%) of a load was rejected.")],
    kinds={"postgres"},
    group_name="ingestion",
)
def price_snapshots(
    context: dg.AssetExecutionContext,
    config: PriceSnapshotsConfig,
    database: DatabaseResource,
    market: MarketResource,
    price_source: PriceSourceResource,
) -> dg.MaterializeResult:
    """Token prices in USD ("PriceSnapshot", monthly children), one row per token, source and
    tick; read by the app's charts, portfolio valuation and risk analytics. Daily partitions:
    a run covers its days (a backfilled range runs once), today's partition adds the ticks
    seen so far. Re-running a day adds nothing: the key is ("tokenId", source,
    "recordedAt"). Rows failing validation go to "PriceSnapshot_rejects" with their reason."""
    window = context.partition_time_window
    start = window.start.astimezone(timezone.utc).replace(tzinfo=None)
    end = window.end.astimezone(timezone.utc).replace(tzinfo=None)
    now = _now()
    with database.db.autocommit("primary") as conn:
        if config.file_path:
            plan = price_sources.file_plan(config.file_path, start, end)
        elif price_source.selected == "synthetic":
            synthetic = market.market()
            register_market(conn, synthetic)
            plan = price_sources.synthetic_plan(synthetic, start, end, now)
        else:
            plan = price_sources.http_plan(conn, price_source.http_source(context.log), start, end, now)
        result = load_prices(conn, plan.chunks, window=(start, end), origin=plan.origin, now=now,
                             run_id=context.run_id, logger=context.log)
    result.notes[:0] = plan.notes
    for note in result.notes:
        context.log.warning(note)
    threshold = database.db.settings.ingestion.reject_warn_ratio
    return dg.MaterializeResult(
        metadata={**result.metadata(), "dagster/row_count": result.inserted},
        check_results=[dg.AssetCheckResult(
            check_name=REJECT_CHECK,
            passed=result.reject_ratio <= threshold,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"rejected": result.rejected, "received": result.received,
                      "reject_ratio": round(result.reject_ratio, 6), "threshold": threshold,
                      "rejects_by_reason": dict(result.rejects_by_reason)},
            description=f"{result.rejected} of {result.received} rows rejected",
        )],
    )


class TickConfig(dg.Config):
    tick: Optional[str] = Field(
        default=None,
        description="ISO-8601 UTC time of the tick (schedules pass their scheduled time); default now. "
                    "Truncated to settings ingestion.portfolio_tick_minutes.",
    )


@dg.asset(deps=["price_snapshots"], kinds={"postgres"}, group_name="ingestion")
def token_balances(context: dg.AssetExecutionContext, config: TickConfig, database: DatabaseResource,
                   market: MarketResource, cache: CacheResource) -> dg.MaterializeResult:
    """Every wallet's token balances ("TokenBalance", hash-partitioned by wallet), with their
    USD value at the latest price; what the app's portfolio pages read. Synced in bulk on
    the primary; unchanged rows are not rewritten. The changed wallets are the cache's
    invalidation set."""
    at = resolve_tick(config.tick, _now(), database.db.settings.ingestion.portfolio_tick_minutes)
    source = market.market()
    with database.db.connection("balance_sync") as conn:
        register_market(conn, source)
        result = sync_balances(conn, source.balances(at), at, _lookback(database))
    invalidation = invalidate_wallets(cache, database, result.changed_wallet_ids, families=["portfolio"],
                                      logger=context.log)
    return dg.MaterializeResult(metadata={**result.metadata(), "dagster/row_count": result.changed,
                                          "cache_invalidation": invalidation})


@dg.multi_asset(
    name=PORTFOLIO_OP,
    specs=[
        dg.AssetSpec("portfolio_snapshots", deps=["token_balances", "price_snapshots"], kinds={"postgres"},
                     group_name="ingestion", skippable=True,
                     description="Every wallet's portfolio value per 5-minute tick, plus the app's all-wallets row "
                                 "(\"PortfolioSnapshot\", monthly x 4 hash sub-partitions): totals, tokens tracked, "
                                 "changes over 24 h / 7 d / 30 d. The dashboard's history charts read it."),
        dg.AssetSpec("position_snapshots", deps=["portfolio_snapshots"], kinds={"postgres"},
                     group_name="ingestion", skippable=True,
                     description="Each wallet's positions at the tick (\"PositionSnapshot\", monthly): liquid "
                                 "balances and DeFi positions, each pointing at its PortfolioSnapshot row of the "
                                 "same capturedAt (written in the same transaction)."),
    ],
    can_subset=True,
)
def portfolio_tick(context: dg.AssetExecutionContext, config: TickConfig, database: DatabaseResource,
                   market: MarketResource):
    """One portfolio tick: its PortfolioSnapshot rows and, in the same transaction, its
    PositionSnapshot rows. Re-running a tick changes nothing."""
    tick = resolve_tick(config.tick, _now(), database.db.settings.ingestion.portfolio_tick_minutes)
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    with_positions = "position_snapshots" in selected
    source = market.market()
    with database.db.autocommit("primary") as conn:
        register_market(conn, source)
        provision_tick(conn, tick)
        result = capture_tick(conn, tick, portfolio="portfolio_snapshots" in selected, positions=with_positions,
                              defi_positions=source.positions(tick) if with_positions else None,
                              lookback=_lookback(database))
    for note in result.notes:
        context.log.info(note)
    if "portfolio_snapshots" in selected:
        yield dg.MaterializeResult(asset_key="portfolio_snapshots", metadata={
            **result.portfolio_metadata(), "dagster/row_count": result.wallet_rows + int(result.all_wallets_row)})
    if with_positions:
        yield dg.MaterializeResult(asset_key="position_snapshots", metadata={
            **result.position_metadata(), "dagster/row_count": result.positions})


@dg.asset(kinds={"postgres"}, group_name="ingestion")
def governance_locks(context: dg.AssetExecutionContext, config: TickConfig, database: DatabaseResource,
                     market: MarketResource, cache: CacheResource) -> dg.MaterializeResult:
    """Vote-escrow locks per wallet and protocol ("GovernanceLock"): amount, voting power,
    boost, lock end; the app's governance page (cached 30 minutes). Unchanged locks are not
    rewritten; the changed wallets are the cache's invalidation set."""
    at = resolve_tick(config.tick, _now(), database.db.settings.ingestion.portfolio_tick_minutes)
    source = market.market()
    with database.db.autocommit("primary") as conn:
        register_market(conn, source)
        result = sync_governance_locks(conn, source.governance_locks(at), at)
    invalidation = invalidate_wallets(cache, database, result.changed_wallet_ids, families=["governance"],
                                      logger=context.log)
    return dg.MaterializeResult(metadata={**result.metadata(), "dagster/row_count": result.changed,
                                          "cache_invalidation": invalidation})


class CorrelationsConfig(dg.Config):
    as_of: Optional[str] = Field(default=None, description="ISO-8601 UTC end of the timeframes; default now.")
    top_k: Optional[int] = Field(default=None, description="Tokens to correlate (default settings "
                                                           "ingestion.correlation_top_k, 50).")


@dg.asset(deps=["price_snapshots", "token_balances"], kinds={"postgres", "scipy"}, group_name="ingestion")
def asset_correlations(context: dg.AssetExecutionContext, config: CorrelationsConfig,
                       database: DatabaseResource) -> dg.MaterializeResult:
    """Pairwise correlation of returns between the top K held tokens over the seed's
    timeframes ("AssetCorrelation", token1Id < token2Id, with p-value and sample size): what
    the seed's calculateRiskMetrics reads. Prices are read from the analytics replica."""
    settings = database.db.settings.ingestion
    as_of = parse_utc(config.as_of, "as_of") if config.as_of else _now()
    top_k = config.top_k or settings.correlation_top_k
    if top_k < 2:
        raise dg.Failure(f"top_k must be >= 2, got {top_k}")
    with database.db.connection("risk_analytics") as read_conn:
        tokens, pairs = correlations.compute_correlations(
            read_conn, as_of, top_k, settings.correlation_timeframes,
            timedelta(minutes=settings.correlation_interval_minutes))
    with database.db.connect("primary") as conn:
        written = correlations.write_correlations(conn, pairs, as_of)
    result = correlations.CorrelationResult(as_of, len(tokens), {tf: len(v) for tf, v in pairs.items()}, written)
    return dg.MaterializeResult(metadata={**result.metadata(), "dagster/row_count": written})
