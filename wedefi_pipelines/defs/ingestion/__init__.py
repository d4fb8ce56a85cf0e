"""Snapshot ingestion (issue 4): price_snapshots (daily partitions), token_balances,
portfolio_snapshots + position_snapshots (one tick, one transaction), governance_locks,
asset_correlations, their checks and schedules, and the seed_history job."""

import dagster as dg

from wedefi_pipelines.defs.ingestion.assets import (
    asset_correlations,
    governance_locks,
    portfolio_tick,
    price_snapshots,
    token_balances,
)
from wedefi_pipelines.defs.ingestion.checks import checks
from wedefi_pipelines.defs.ingestion.jobs import asset_jobs, seed_history_job
from wedefi_pipelines.defs.ingestion.schedules import schedules
from wedefi_pipelines.sources.resources import MarketResource, PriceSourceResource

defs = dg.Definitions(
    assets=[price_snapshots, token_balances, portfolio_tick, governance_locks, asset_correlations],
    asset_checks=checks,
    jobs=[seed_history_job, *asset_jobs],
    schedules=schedules,
    resources={"market": MarketResource(), "price_source": PriceSourceResource()},
)
