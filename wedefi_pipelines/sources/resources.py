"""Dagster resources wrapping the sources, chosen by settings.sources (defaults in code,
$WEDEFI_SETTINGS overrides). Thin: every source is usable without Dagster.

- "market": the synthetic market (settings.sources.synthetic): tokens, wallets, balances,
  DeFi positions, governance locks, and prices when the price source is 'synthetic'.
- "price_source": which source `price_snapshots` reads ('synthetic' or 'http'), and the
  CoinGecko-style HTTP client when it is 'http' (settings.sources.http; the API key comes
  from the environment variable that settings name, read when a run starts).
"""

import os
from typing import Optional

import dagster as dg
from pydantic import field_validator

from wedefi_pipelines.settings import current_settings
from wedefi_pipelines.sources.coingecko import CoinGeckoSource
from wedefi_pipelines.sources.synthetic import SyntheticMarket

PRICE_SOURCES = ("synthetic", "http")


class MarketResource(dg.ConfigurableResource):
    """The deterministic synthetic market. Unset fields come from settings.sources.synthetic."""

    seed: Optional[int] = None
    tokens: Optional[int] = None
    wallets: Optional[int] = None
    max_tokens_per_wallet: Optional[int] = None
    tick_minutes: Optional[int] = None

    def market(self) -> SyntheticMarket:
        s = current_settings().sources.synthetic
        return SyntheticMarket(
            seed=s.seed if self.seed is None else self.seed,
            tokens=s.tokens if self.tokens is None else self.tokens,
            wallets=s.wallets if self.wallets is None else self.wallets,
            max_tokens_per_wallet=s.max_tokens_per_wallet if self.max_tokens_per_wallet is None
            else self.max_tokens_per_wallet,
            tick_minutes=s.tick_minutes if self.tick_minutes is None else self.tick_minutes,
        )


class PriceSourceResource(dg.ConfigurableResource):
    """Where `price_snapshots` reads prices from: 'synthetic' (the market) or 'http' (a
    CoinGecko-style /simple/price API). Unset fields come from settings.sources."""

    kind: Optional[str] = None
    base_url: Optional[str] = None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in PRICE_SOURCES:
            raise ValueError(f"price_source.kind must be one of {PRICE_SOURCES}, got {value!r}")
        return value

    @property
    def selected(self) -> str:
        return self.kind or current_settings().sources.price

    def http_source(self, logger=None) -> CoinGeckoSource:
        h = current_settings().sources.http
        return CoinGeckoSource(
            base_url=self.base_url or h.base_url,
            api_key=os.environ.get(h.api_key_env) or None,
            api_key_header=h.api_key_header,
            api_key_env=h.api_key_env,
            batch_size=h.batch_size,
            timeout_s=h.timeout_s,
            max_retries=h.max_retries,
            backoff_s=h.backoff_s,
            max_wait_s=h.max_wait_s,
            source_name=h.source_name,
            logger=logger,
        )
