"""seed_history: N months of synthetic history through the same write paths as live ingestion.

For the demo and the benchmarks, so tiering has months older than a year to work on. The
seed's full volumes over 14 months would be about a billion portfolio rows, so a scale
factor shrinks the market (tokens and wallets) and the ticks are coarser than live ones
(prices hourly, one portfolio tick a day by default).

- Prices: a complete past month with no child yet goes through the whole-month path (bare
  table, COPY, indexes, ATTACH); the current month, and any month that already has a child
  or rows in the default partition, through the ordinary day-by-day load (idempotent).
- Portfolio and positions: for each tick, the balance sync as of the tick, then the tick's
  portfolio and position rows (ticks already captured are skipped).
- Governance locks: the state at the end.

Every step is idempotent, so a crashed seed_history is resumed by running it again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Callable

import psycopg

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.ingest.balances import sync_balances
from wedefi_pipelines.ingest.governance import sync_governance_locks
from wedefi_pipelines.ingest.portfolio import capture_tick, provision_tick, truncate_to_tick
from wedefi_pipelines.ingest.prices import PriceChunk, known_token_ids, load_prices, load_whole_month, month_blocker
from wedefi_pipelines.ingest.reference import register_market
from wedefi_pipelines.settings import SyntheticSettings
from wedefi_pipelines.sources.synthetic import SOURCE, SyntheticMarket

log = logging.getLogger(__name__)


def scaled_market(settings: SyntheticSettings, scale: float, price_tick_minutes: int) -> SyntheticMarket:
    """The settings' market shrunk by `scale` (tokens and wallets; 1.0 is the seed's full size).

    Token i and wallet i are the same at every scale, so a small history is a prefix of a
    large one."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    tokens = max(2, math.ceil(settings.tokens * scale))
    return SyntheticMarket(
        seed=settings.seed,
        tokens=tokens,
        wallets=max(1, math.ceil(settings.wallets * scale)),
        max_tokens_per_wallet=min(settings.max_tokens_per_wallet, tokens),
        tick_minutes=price_tick_minutes,
    )


def history_months(end: datetime, months: int) -> list[date]:
    """The `months` calendar months ending with `end`'s (which is partial)."""
    if months < 1:
        raise ValueError(f"months must be >= 1, got {months}")
    last = p.month_of(end)
    return [p.add_months(last, -i) for i in range(months - 1, -1, -1)]


def portfolio_ticks(start: datetime, end: datetime, every_minutes: int) -> list[datetime]:
    """Ticks on the `every_minutes` grid in [start, end]."""
    tick = truncate_to_tick(start, every_minutes)
    if tick < start:
        tick += timedelta(minutes=every_minutes)
    ticks = []
    while tick <= end:
        ticks.append(tick)
        tick += timedelta(minutes=every_minutes)
    return ticks


@dataclass
class HistoryResult:
    months: list[str]
    whole_month_loads: list[str] = field(default_factory=list)
    day_loads: list[str] = field(default_factory=list)
    price_rows: int = 0
    portfolio_ticks: int = 0
    portfolio_rows: int = 0
    position_rows: int = 0
    balance_changes: int = 0
    governance_locks: int = 0
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        return {
            "months": self.months, "whole_month_loads": self.whole_month_loads, "day_by_day_loads": self.day_loads,
            "price_rows_inserted": self.price_rows, "portfolio_ticks": self.portfolio_ticks,
            "portfolio_rows": self.portfolio_rows, "position_rows": self.position_rows,
            "balance_rows_changed": self.balance_changes, "governance_locks_changed": self.governance_locks,
            "notes": self.notes,
        }


def seed_history(
    conn: psycopg.Connection,
    market: SyntheticMarket,
    *,
    months: int,
    end: datetime,
    portfolio_every_minutes: int = 1440,
    lookback: timedelta = timedelta(hours=48),
    run_id: str | None = None,
    logger: logging.Logger | None = None,
    progress: Callable[[str], None] | None = None,
) -> HistoryResult:
    """Write the history on an autocommit connection to the primary."""
    logger = logger or log
    say = progress or logger.info
    end = p.to_utc_naive(end)
    month_list = history_months(end, months)
    result = HistoryResult(months=[p.month_year(m) for m in month_list])
    register_market(conn, market)
    known = known_token_ids(conn)
    current = p.month_of(end)

    for month in month_list:
        start, month_end = p.month_bounds(month)
        blocker = month_blocker(conn, month) if month < current else "the month is not over"
        if blocker is None:
            loaded = load_whole_month(conn, month, market.iter_price_days(start, month_end), origin=SOURCE,
                                      now=end, run_id=run_id, known_tokens=known, logger=logger)
            result.whole_month_loads.append(p.month_year(month))
        else:
            stop = min(month_end, end + timedelta(milliseconds=1))
            chunks = (PriceChunk(day, min(day + timedelta(days=1), stop), [table], source=SOURCE,
                                 tokens=market.token_ids, unique_keys=True)
                      for day, table in _days_with_prices(market, start, stop, end))
            loaded = load_prices(conn, chunks, window=(start, stop), origin=SOURCE, now=end, run_id=run_id,
                                 known_tokens=known, logger=logger)
            result.day_loads.append(p.month_year(month))
            result.notes.append(f"{p.month_year(month)} loaded day by day: {blocker}")
        result.price_rows += loaded.inserted
        say(f"prices {p.month_year(month)}: {loaded.inserted} rows"
            f" ({'whole month, attached' if blocker is None else 'day by day'})")

    first = p.month_bounds(month_list[0])[0]
    provisioned: set[date] = set()
    ticks = portfolio_ticks(first, end, portfolio_every_minutes)
    for i, tick in enumerate(ticks):
        if p.month_of(tick) not in provisioned:
            provision_tick(conn, tick)
            provisioned.add(p.month_of(tick))
        result.balance_changes += sync_balances(conn, market.balances(tick), tick, lookback).changed
        captured = capture_tick(conn, tick, defi_positions=market.positions(tick), lookback=lookback)
        result.portfolio_ticks += 1
        result.portfolio_rows += captured.wallet_rows + int(captured.all_wallets_row)
        result.position_rows += captured.positions
        if (i + 1) % 50 == 0 or i + 1 == len(ticks):
            say(f"portfolio ticks: {i + 1}/{len(ticks)} (up to {tick:%Y-%m-%d %H:%M})")
    result.governance_locks = sync_governance_locks(conn, market.governance_locks(end), end).changed
    return result


def _days_with_prices(market: SyntheticMarket, start: datetime, stop: datetime, until: datetime):
    day = start
    while day < stop:
        nxt = min(day + timedelta(days=1), stop)
        for table in market.iter_price_days(day, nxt, until):
            yield day, table
        day = nxt
