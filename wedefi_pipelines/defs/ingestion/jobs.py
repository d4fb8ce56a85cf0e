"""The `seed_history` job, and the asset jobs the ingestion schedules run."""

from datetime import datetime, timedelta, timezone
from typing import Optional

import dagster as dg
from pydantic import Field, field_validator

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.time_partitions import daily_partitions
from wedefi_pipelines.ingest.history import scaled_market, seed_history
from wedefi_pipelines.ingest.portfolio import parse_utc
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import divides_a_day


class SeedHistoryConfig(dg.Config):
    months: int = Field(default=14, ge=1, le=120, description="Calendar months of history, the current one included.")
    scale: float = Field(default=0.02, gt=0, le=1,
                         description="Share of the seed's full market (500 tokens, 10,000 wallets: settings "
                                     "sources.synthetic); 0.02 is 10 tokens and 200 wallets.")
    price_tick_minutes: int = Field(default=60, ge=1, le=1440, description="Price tick of the history.")
    portfolio_tick_minutes: int = Field(default=1440, ge=5, le=10080,
                                        description="One portfolio/position tick every this many minutes.")
    end: Optional[str] = Field(default=None, description="ISO-8601 UTC end of the history; default now.")

    @field_validator("price_tick_minutes")
    @classmethod
    def _divides_a_day(cls, value: int) -> int:
        return divides_a_day(value)


@dg.op(name="synthesize_history", tags={"kind": "postgres"})
def seed_history_op(context: dg.OpExecutionContext, config: SeedHistoryConfig, database: DatabaseResource) -> None:
    """Synthesize the history through the live write paths (idempotent: re-run to resume)."""
    end = parse_utc(config.end, "end") if config.end else datetime.now(timezone.utc).replace(tzinfo=None)
    market = scaled_market(database.db.settings.sources.synthetic, config.scale, config.price_tick_minutes)
    context.log.info(f"history: {config.months} months to {end:%Y-%m-%d %H:%M}, {market.tokens} tokens, "
                     f"{market.wallets} wallets, prices every {config.price_tick_minutes} min, "
                     f"portfolio every {config.portfolio_tick_minutes} min")
    with database.db.autocommit("primary") as conn:
        result = seed_history(conn, market, months=config.months, end=end,
                              portfolio_every_minutes=config.portfolio_tick_minutes,
                              lookback=timedelta(hours=database.db.settings.ingestion.price_lookback_hours),
                              run_id=context.run_id, logger=context.log)
    first = p.month_bounds(p.parse_month(result.months[0]))[0]
    keys = set(daily_partitions.get_partition_keys())
    day = first
    while day <= end:  # the days now holding prices, as price_snapshots partitions
        if day.date().isoformat() in keys:
            context.log_event(dg.AssetMaterialization(asset_key="price_snapshots", partition=day.date().isoformat(),
                                                      metadata={"written_by": "seed_history"}))
        day += timedelta(days=1)
    for key in ("token_balances", "portfolio_snapshots", "position_snapshots", "governance_locks"):
        context.log_event(dg.AssetMaterialization(asset_key=key, metadata={"written_by": "seed_history"}))
    context.log.info(f"seed_history done: {result.metadata()}")


@dg.job(name="seed_history", description="N months of synthetic history for every snapshot table (demo, benchmarks, "
                                         "tiering), through the same write paths as live ingestion.")
def seed_history_job():
    seed_history_op()


price_snapshots_job = dg.define_asset_job(
    "price_snapshots_job", selection=dg.AssetSelection.assets("price_snapshots"),
    description="price_snapshots for one day (its check included).")
portfolio_tick_job = dg.define_asset_job(
    "portfolio_tick_job",
    selection=dg.AssetSelection.assets("token_balances", "portfolio_snapshots", "position_snapshots"),
    description="Balance sync, then the tick's portfolio and position rows.")
governance_locks_job = dg.define_asset_job(
    "governance_locks_job", selection=dg.AssetSelection.assets("governance_locks"))
asset_correlations_job = dg.define_asset_job(
    "asset_correlations_job", selection=dg.AssetSelection.assets("asset_correlations"))

asset_jobs = [price_snapshots_job, portfolio_tick_job, governance_locks_job, asset_correlations_job]
