"""Each price source as the chunks the load path takes (one transaction each).

- synthetic: one chunk per UTC day of the window, ticks up to now; the market promises
  one row per (token, tick), so a day not loaded yet goes the direct COPY path;
- http: current prices only, so one chunk over the window, and only when the window
  contains now (a past day cannot be fetched from /simple/price: the run says so and
  loads nothing). Tokens are matched by "Token".metadata->>'coingeckoId';
- file: one chunk over the window; rows outside it are rejected with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import psycopg

from wedefi_pipelines.ingest.prices import PriceChunk
from wedefi_pipelines.partitioning import to_utc_naive
from wedefi_pipelines.sources.coingecko import CoinGeckoSource
from wedefi_pipelines.sources.files import read_price_file
from wedefi_pipelines.sources.synthetic import SOURCE, SyntheticMarket

COINGECKO_ID_KEY = "coingeckoId"


@dataclass
class SourcePlan:
    origin: str
    chunks: list[PriceChunk] | Iterator[PriceChunk]
    notes: list[str] = field(default_factory=list)


def synthetic_plan(market: SyntheticMarket, start: datetime, end: datetime, now: datetime) -> SourcePlan:
    start, end, now = to_utc_naive(start), to_utc_naive(end), to_utc_naive(now)

    def chunks() -> Iterator[PriceChunk]:
        day = start
        while day < end and day <= now:
            nxt = min(day + timedelta(days=1), end)
            yield PriceChunk(day, nxt, market.iter_price_days(day, nxt, until=now), source=SOURCE,
                             tokens=market.token_ids, unique_keys=True)
            day = nxt

    return SourcePlan(origin=SOURCE, chunks=chunks())


def coin_map(conn: psycopg.Connection) -> dict[str, list[str]]:
    """CoinGecko id -> our token ids (several chains' tokens may share one coin)."""
    mapping: dict[str, list[str]] = {}
    for token_id, coin_id in conn.execute(
            'SELECT id, metadata->>%s FROM "Token" WHERE metadata->>%s IS NOT NULL ORDER BY id',
            (COINGECKO_ID_KEY, COINGECKO_ID_KEY)):
        mapping.setdefault(coin_id, []).append(token_id)
    return mapping


def http_plan(conn: psycopg.Connection, source: CoinGeckoSource, start: datetime, end: datetime,
              now: datetime) -> SourcePlan:
    start, end, now = to_utc_naive(start), to_utc_naive(end), to_utc_naive(now)
    plan = SourcePlan(origin=source.origin, chunks=[])
    if not start <= now < end:
        plan.notes.append(f"{source.origin} serves current prices only and the window "
                          f"[{start:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M}) does not contain now: nothing fetched "
                          "(load history from a file with the file_path config)")
        return plan
    coins = coin_map(conn)
    if not coins:
        raise ValueError(f'no "Token" row has metadata.{COINGECKO_ID_KEY}: set it on the tokens to price from '
                         f"{source.origin}")
    rows, missing = source.price_rows(coins, now)
    if missing:
        plan.notes.append(f"{len(missing)} coin id(s) not returned by the API: {missing[:20]}")
    plan.chunks = [PriceChunk(start, end, [rows])]
    return plan


def file_plan(path: str, start: datetime, end: datetime) -> SourcePlan:
    resolved = Path(path).expanduser().resolve()
    return SourcePlan(origin=f"file:{resolved}",
                      chunks=[PriceChunk(to_utc_naive(start), to_utc_naive(end), read_price_file(resolved))])
