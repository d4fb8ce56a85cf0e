"""Snapshot ingestion (issue 4): price_snapshots (daily partitions), token_balances,
portfolio_snapshots + position_snapshots (one tick, one transaction), governance_locks,
asset_correlations, their checks and schedules, the seed_history job, and complete_positions
(with its sensor) for the app's positions written without "capturedAt"."""

import dagster as dg

from wedefi_pipelines.defs.ingestion.assets import (
    asset_correlations,
    governance_locks,
    portfolio_tick,
    price_snapshots,
    token_balances,
)
from wedefi_pipelines.defs.ingestion.checks import checks
from wedefi_pipelines.defs.ingestion.completion import complete_positions, complete_positions_sensor
from wedefi_pipelines.defs.ingestion.jobs import asset_jobs, seed_history_job
from wedefi_pipelines.defs.ingestion.schedules import schedules
from wedefi_pipelines.sources.resources import MarketResource, PriceSourceResource

defs = dg.Definitions(
    assets=[price_snapshots, token_balances, portfolio_tick, governance_locks, asset_correlations],
    asset_checks=checks,
    jobs=[seed_history_job, complete_positions, *asset_jobs],
    schedules=schedules,
    sensors=[complete_positions_sensor],
    resources={"market": MarketResource(), "price_source": PriceSourceResource()},
)
