"""Ingestion for the demo: history at a small scale, then a few live days and ticks through
the assets themselves, on one consistent synthetic market.

The live assets' `market` resource is set to the same scaled market seed_history writes,
so the tokens and wallets of the live ticks are the history's. Everything runs in-process
(`dg.materialize` / `execute_in_process`) against the database named by the
configuration contract's variables; pass `instance` to record the runs in a Dagster
instance.
"""

from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

import dagster as dg

from wedefi_pipelines.defs.ingestion.assets import (
    PORTFOLIO_OP,
    asset_correlations,
    governance_locks,
    portfolio_tick,
    price_snapshots,
    token_balances,
)
from wedefi_pipelines.defs.ingestion.checks import positions_have_portfolio_rows
from wedefi_pipelines.defs.ingestion.jobs import seed_history_job
from wedefi_pipelines.ingest.history import scaled_market
from wedefi_pipelines.ingest.portfolio import truncate_to_tick
from wedefi_pipelines.resources.cache import CacheResource
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings
from wedefi_pipelines.sources.resources import MarketResource, PriceSourceResource

DEMO_SCALE = 0.02  # 10 tokens, 200 wallets of the settings' 500 / 10,000
DEMO_PRICE_TICK = 60


def console_log_level(level: str, run_config: Optional[dict] = None) -> dict:
    """`run_config` with Dagster's console logger set to `level` (the demo shows WARNING and up)."""
    return {**(run_config or {}), "loggers": {"console": {"config": {"log_level": level}}}}


def demo_resources(scale: float = DEMO_SCALE, price_tick_minutes: int = DEMO_PRICE_TICK) -> dict:
    market = scaled_market(current_settings().sources.synthetic, scale, price_tick_minutes)
    return {
        "database": DatabaseResource(),
        "market": MarketResource(seed=market.seed, tokens=market.tokens, wallets=market.wallets,
                                 max_tokens_per_wallet=market.max_tokens_per_wallet, tick_minutes=market.tick_minutes),
        "price_source": PriceSourceResource(kind="synthetic"),
        "cache": CacheResource(),
    }


def seed_history(months: int = 14, scale: float = DEMO_SCALE, end: Optional[datetime] = None,
                 instance: Optional[dg.DagsterInstance] = None, log_level: str = "DEBUG") -> dg.ExecuteInProcessResult:
    """The `seed_history` job: `months` months up to `end` (default now), one portfolio tick a day."""
    config = {"months": months, "scale": scale, "price_tick_minutes": DEMO_PRICE_TICK, "portfolio_tick_minutes": 1440}
    if end is not None:
        config["end"] = end.isoformat()
    return seed_history_job.execute_in_process(
        run_config=console_log_level(log_level, {"ops": {"synthesize_history": {"config": config}}}),
        resources={"database": DatabaseResource()}, instance=instance)


def recent_ingestion(days: int = 3, ticks: int = 3, scale: float = DEMO_SCALE, now: Optional[datetime] = None,
                     instance: Optional[dg.DagsterInstance] = None,
                     progress: Callable[[str], None] = print, log_level: str = "DEBUG") -> dict[str, dict]:
    """price_snapshots for the last `days` days (one single-run backfill), then `ticks`
    5-minute ticks of token_balances + portfolio_snapshots + position_snapshots (with their
    check) and governance_locks, then asset_correlations. Returns each asset's last metadata."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(tzinfo=None)
    resources = demo_resources(scale)
    first_day = (now - timedelta(days=days - 1)).date().isoformat()
    out: dict[str, dict] = {}

    def keep(result: dg.ExecuteInProcessResult) -> None:
        for event in result.get_asset_materialization_events():
            m = event.materialization
            out[m.asset_key.to_user_string()] = {k: v.value for k, v in m.metadata.items()}

    result = dg.materialize([price_snapshots], resources=resources, instance=instance,
                            run_config=console_log_level(log_level), tags={
        "dagster/asset_partition_range_start": first_day, "dagster/asset_partition_range_end": now.date().isoformat()})
    keep(result)
    prices = out["price_snapshots"]
    progress(f"price_snapshots {first_day}..{now.date()}: {prices['inserted']} rows inserted, "
             f"{prices['already_present']} already present (never written twice), {prices['rejected']} rejected")
    last = truncate_to_tick(now, current_settings().ingestion.portfolio_tick_minutes)
    for i in range(ticks - 1, -1, -1):
        tick = (last - timedelta(minutes=5 * i)).isoformat()
        config = {"ops": {op: {"config": {"tick": tick}} for op in ("token_balances", PORTFOLIO_OP, "governance_locks")}}
        result = dg.materialize([token_balances, portfolio_tick, governance_locks, positions_have_portfolio_rows],
                                resources=resources, run_config=console_log_level(log_level, config), instance=instance)
        keep(result)
        checks = ", ".join(f"{c.check_name} {'passed' if c.passed else 'FAILED'}"
                           for c in result.get_asset_check_evaluations())
        refreshed = out["token_balances"]["cache_invalidation"].get("portfolio_written", 0)
        progress(f"tick {tick}: {out['portfolio_snapshots']['wallet_rows']} portfolio rows, "
                 f"{out['position_snapshots']['positions']} positions, "
                 f"{out['token_balances']['changed_rows']} balances changed ({refreshed} portfolio keys refreshed); "
                 f"{checks}")
    result = dg.materialize([asset_correlations], resources=resources, instance=instance,
                            run_config=console_log_level(
                                log_level, {"ops": {"asset_correlations": {"config": {"as_of": now.isoformat()}}}}))
    keep(result)
    progress(f"asset_correlations: {out['asset_correlations']['pairs_by_timeframe']} pairs")
    return out
