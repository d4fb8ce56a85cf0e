"""A deterministic synthetic DeFi market: the default source for the demo, tests and benchmarks.

Everything is a pure function of (seed, entity index, time), so any window can be
generated on its own, in any order, and re-generating it gives the same rows: that is
what makes a re-materialized partition byte-identical and a history backfill resumable.

- Prices: per token, a daily random walk in log space (a common market factor plus the
  token's own noise, so correlations are not all zero), anchored at day boundaries, with
  a Brownian bridge between anchors for the intraday ticks on a `tick_minutes` grid.
  Rounded to 10 significant digits, as price APIs return them. Token i's series does not
  depend on how many tokens the market has, so a scaled-down market is a prefix of the
  full one.
- Balances: wallet w holds `k_w` consecutive tokens (popular, low-index tokens more
  often); its quantities change when its own version counter ticks (every 6 h to 7 d,
  per wallet), so a 5-minute balance sync changes only a few wallets.
- DeFi positions and governance locks: a share of wallets, with deterministic protocols,
  amounts, cost bases and lock ends; voting power decays linearly to the lock end, by day.

No I/O here: registering the chain, tokens, wallets and protocols in the database is
`wedefi_pipelines.ingest.reference.register_market`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wedefi_pipelines.partitioning import to_utc_naive
from wedefi_pipelines.settings import divides_a_day

SOURCE = "synthetic"
EPOCH = datetime(2015, 1, 1)  # the walk starts here; no synthetic price exists before it
_NAMESPACE = uuid.UUID("6f1d7a52-1a0e-4c53-9a55-2f0d7c3e8b11")
_MS_PER_DAY = 86_400_000
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

CHAINS = ((1, "Ethereum", "ETH", "ETH", "https://etherscan.io"), (8453, "Base", "BASE", "ETH", "https://basescan.org"))
# slug, name, chain, kind: 'dex' and 'lending' hold positions, 'vote-escrow' holds governance locks
PROTOCOLS = (
    ("aerodrome", "Aerodrome", 8453, "vote-escrow"),
    ("velodrome", "Velodrome", 8453, "vote-escrow"),
    ("curve", "Curve Finance", 1, "vote-escrow"),
    ("uniswap-v3", "Uniswap V3", 1, "dex"),
    ("aave-v3", "Aave V3", 8453, "lending"),
    ("moonwell", "Moonwell", 8453, "lending"),
    ("lido", "Lido", 1, "staking"),
    ("pendle", "Pendle", 1, "dex"),
)
POSITION_TYPES = {"dex": "lp", "lending": "lending", "staking": "staked", "vote-escrow": "locked"}
_DECIMALS = np.array([18, 18, 18, 6, 8], dtype=np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-spread 64-bit hash, vectorized (uint64 wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, *keys) -> np.ndarray:
    """Deterministic uniforms in [0, 1) for each combination of integer keys (broadcast)."""
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        for key in keys:
            h = _mix(h ^ (np.asarray(key).astype(np.uint64) + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def round_significant(values: np.ndarray, digits: int = 10) -> np.ndarray:
    """Round positive values to `digits` significant digits."""
    exponent = np.floor(np.log10(values))
    scale = np.power(10.0, digits - 1 - exponent)
    return np.round(values * scale) / scale


def _hex_addresses(seed: int, kind: int, count: int) -> list[str]:
    """'0x' + 40 hex digits per index, deterministic."""
    idx = np.arange(count)
    words = [
        (uniform(seed, kind, idx, part) * (1 << 53)).astype(np.uint64) & np.uint64(0xFFFFFFFFFF) for part in range(4)
    ]
    return ["0x" + "".join(f"{int(w[i]):010x}" for w in words) for i in range(count)]


def _datetimes_ms(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype("datetime64[ms]"), type=pa.timestamp("ms"))


@dataclass(frozen=True)
class TickGrid:
    """Ticks every `minutes` on a grid anchored at EPOCH (so also at every midnight if 1440 % minutes == 0)."""

    minutes: int

    def __post_init__(self) -> None:
        divides_a_day(self.minutes)

    @property
    def per_day(self) -> int:
        return 1440 // self.minutes


@dataclass
class SyntheticMarket:
    """The market: `tokens` tokens, `wallets` wallets with 1..`max_tokens_per_wallet` balances each."""

    seed: int = 20240101
    tokens: int = 500
    wallets: int = 10_000
    max_tokens_per_wallet: int = 50
    min_tokens_per_wallet: int | None = None
    tick_minutes: int = 15
    _checkpoints: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokens < 2:
            raise ValueError(f"a market needs at least 2 tokens, got {self.tokens}")
        if self.wallets < 1:
            raise ValueError(f"a market needs at least 1 wallet, got {self.wallets}")
        if not 1 <= self.max_tokens_per_wallet:
            raise ValueError(f"max_tokens_per_wallet must be >= 1, got {self.max_tokens_per_wallet}")
        low = self.min_tokens_per_wallet if self.min_tokens_per_wallet is not None else max(1, self.max_tokens_per_wallet // 2)
        if not 1 <= low <= self.max_tokens_per_wallet:
            raise ValueError(f"min_tokens_per_wallet must be in [1, {self.max_tokens_per_wallet}], got {low}")
        self.min_tokens_per_wallet = low
        self.grid = TickGrid(self.tick_minutes)
        self._checkpoints = [self._base_log_price]

    # -- reference entities ---------------------------------------------------------------
    def token_id(self, index: int) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.seed}:token:{index}"))

    def wallet_id(self, index: int) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.seed}:wallet:{index}"))

    def protocol_id(self, slug: str) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"protocol:{slug}"))

    @cached_property
    def token_ids(self) -> list[str]:
        return [self.token_id(i) for i in range(self.tokens)]

    @cached_property
    def wallet_ids(self) -> list[str]:
        return [self.wallet_id(i) for i in range(self.wallets)]

    @cached_property
    def _token_ids_arrow(self) -> pa.Array:
        return pa.array(self.token_ids, type=pa.string())

    @cached_property
    def _wallet_ids_arrow(self) -> pa.Array:
        return pa.array(self.wallet_ids, type=pa.string())

    def _is_stable(self, idx: np.ndarray) -> np.ndarray:
        return (idx % 20) == 7

    @cached_property
    def token_decimals(self) -> np.ndarray:
        idx = np.arange(self.tokens)
        decimals = _DECIMALS[(uniform(self.seed, 11, idx) * len(_DECIMALS)).astype(np.int64)]
        return np.where(self._is_stable(idx), 6, decimals)

    def chain_rows(self) -> list[dict]:
        return [
            {"id": cid, "name": name, "shortName": short, "nativeCurrencySymbol": native, "explorerUrl": url}
            for cid, name, short, native, url in CHAINS
        ]

    def token_rows(self) -> pa.Table:
        idx = np.arange(self.tokens)
        chains = np.array([c[0] for c in CHAINS])[idx % len(CHAINS)]
        stable = self._is_stable(idx)
        symbols = [f"{'USD' if s else 'SYN'}{i:04d}" for i, s in zip(idx, stable)]
        return pa.table({
            "id": self._token_ids_arrow,
            "chainId": pa.array(chains, type=pa.int32()),
            "address": pa.array(_hex_addresses(self.seed, 1, self.tokens)),
            "symbol": pa.array(symbols),
            "name": pa.array([f"Synthetic {'Stablecoin' if s else 'Token'} {i}" for i, s in zip(idx, stable)]),
            "decimals": pa.array(self.token_decimals, type=pa.int32()),
        })

    def wallet_rows(self) -> pa.Table:
        idx = np.arange(self.wallets)
        chains = np.array([c[0] for c in CHAINS])[idx % len(CHAINS)]
        return pa.table({
            "id": self._wallet_ids_arrow,
            "address": pa.array(_hex_addresses(self.seed, 2, self.wallets)),
            "chainId": pa.array(chains, type=pa.int32()),
            "label": pa.array([f"synthetic wallet {i}" for i in idx]),
        })

    def protocol_rows(self) -> list[dict]:
        return [
            {"id": self.protocol_id(slug), "slug": slug, "name": name, "chainId": chain}
            for slug, name, chain, _kind in PROTOCOLS
        ]

    # -- prices ---------------------------------------------------------------------------
    @cached_property
    def _base_log_price(self) -> np.ndarray:
        idx = np.arange(self.tokens)
        # 10^-3 .. 10^4.5 USD, stablecoins at 1
        base = np.log(10.0) * (-3.0 + 7.5 * uniform(self.seed, 21, idx))
        return np.where(self._is_stable(idx), 0.0, base)

    @cached_property
    def _daily_vol(self) -> np.ndarray:
        idx = np.arange(self.tokens)
        return np.where(self._is_stable(idx), 0.0005, 0.02 + 0.06 * uniform(self.seed, 22, idx))

    @cached_property
    def _beta(self) -> np.ndarray:
        idx = np.arange(self.tokens)
        return np.where(self._is_stable(idx), 0.0, 0.2 + 0.7 * uniform(self.seed, 23, idx))

    def _shocks(self, stream: int, day: int, per_token: int) -> np.ndarray:
        """Standard normals, shape (tokens, per_token), with the market factor mixed in per beta.

        Row 0 of the draw is the market; token i's row does not depend on the token count."""
        draws = np.random.default_rng([self.seed, stream, day]).standard_normal((self.tokens + 1, per_token))
        beta = self._beta[:, None]
        return beta * draws[0][None, :] + np.sqrt(1.0 - beta * beta) * draws[1:]

    def _step(self, day: int) -> np.ndarray:
        """The change of every token's log price over the UTC day `day` (days since EPOCH)."""
        return self._shocks(1, day, 1)[:, 0] * self._daily_vol

    def _anchor(self, day: int) -> np.ndarray:
        """Every token's log price at midnight of `day`. Checkpoints every 32 days keep
        memory small (tokens x days/32) while any day costs at most 32 steps."""
        every = 32
        while len(self._checkpoints) <= day // every:
            last = len(self._checkpoints) - 1
            level = self._checkpoints[last] + sum(self._step(d) for d in range(last * every, (last + 1) * every))
            self._checkpoints.append(level)
        level = self._checkpoints[day // every]
        for d in range((day // every) * every, day):
            level = level + self._step(d)
        return level

    def day_prices(self, day_start: datetime) -> tuple[np.ndarray, np.ndarray]:
        """(tick times as datetime64[ms], prices of shape (ticks, tokens)) for the UTC day."""
        day_start = to_utc_naive(day_start)
        day = (day_start - EPOCH).days
        if day < 0 or day_start != EPOCH + timedelta(days=day):
            raise ValueError(f"day_start must be a UTC midnight on or after {EPOCH.date()}, got {day_start}")
        start_level = self._anchor(day)
        end_level = start_level + self._step(day)
        n = self.grid.per_day
        walk = np.cumsum(self._shocks(2, day, n), axis=1)  # W_1 .. W_n, shape (tokens, n)
        k = np.arange(n) / n
        at_ticks = np.hstack([np.zeros((self.tokens, 1)), walk[:, :-1]])  # W_0 .. W_{n-1}
        bridge = at_ticks - k[None, :] * walk[:, -1:]  # a Brownian bridge: 0 at both midnights
        level = start_level[:, None] + k[None, :] * (end_level - start_level)[:, None]
        log_price = level + bridge * (self._daily_vol / np.sqrt(n))[:, None]
        prices = round_significant(np.exp(log_price.T))
        start = np.datetime64(day_start, "ms")
        times = start + np.arange(n, dtype=np.int64) * np.timedelta64(self.tick_minutes * 60_000, "ms")
        return times, prices

    def prices(self, start: datetime, end: datetime, until: datetime | None = None) -> pa.Table:
        """Every tick in [start, end) and <= until (the present), one row per token and tick:
        tokenId, priceUsd (float64, 10 significant digits), source, recordedAt (timestamp[ms])."""
        return pa.concat_tables(list(self.iter_price_days(start, end, until)) or [self._empty_prices()])

    def iter_price_days(self, start: datetime, end: datetime, until: datetime | None = None):
        """The ticks of [start, end), one table per UTC day, oldest first."""
        start, end = to_utc_naive(start), to_utc_naive(end)
        until = to_utc_naive(until) if until is not None else None
        day = datetime(start.year, start.month, start.day)
        while day < end:
            times, prices = self.day_prices(day)
            lo, hi = np.datetime64(max(start, day), "ms"), np.datetime64(end, "ms")
            keep = (times >= lo) & (times < hi)
            if until is not None:
                keep &= times <= np.datetime64(until, "ms")
            if keep.any():
                yield self._price_table(times[keep], prices[keep])
            day += timedelta(days=1)

    def _price_table(self, times: np.ndarray, prices: np.ndarray) -> pa.Table:
        n_ticks = len(times)
        token_idx = pa.array(np.tile(np.arange(self.tokens), n_ticks))
        return pa.table({
            "tokenId": self._token_ids_arrow.take(token_idx),
            "priceUsd": pa.array(prices.ravel(), type=pa.float64()),
            "source": pa.array([SOURCE]).take(pa.array(np.zeros(n_ticks * self.tokens, dtype=np.int32))),
            "recordedAt": _datetimes_ms(np.repeat(times, self.tokens)),
        })

    def _empty_prices(self) -> pa.Table:
        return pa.table({"tokenId": pa.array([], pa.string()), "priceUsd": pa.array([], pa.float64()),
                         "source": pa.array([], pa.string()), "recordedAt": pa.array([], pa.timestamp("ms"))})

    # -- balances -------------------------------------------------------------------------
    @cached_property
    def _holdings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(wallet index, token index, slot) of every balance the market has."""
        w = np.arange(self.wallets)
        width = self.max_tokens_per_wallet - self.min_tokens_per_wallet + 1
        count = np.minimum(self.min_tokens_per_wallet + (uniform(self.seed, 31, w) * width).astype(np.int64), self.tokens)
        first = (self.tokens * uniform(self.seed, 32, w) ** 2).astype(np.int64)  # popular tokens more often
        wallet_idx = np.repeat(w, count)
        slot = np.arange(len(wallet_idx)) - np.repeat(np.cumsum(count) - count, count)
        token_idx = (first[wallet_idx] + slot) % self.tokens
        return wallet_idx, token_idx, slot

    def _version(self, wallet_idx: np.ndarray, at: datetime) -> np.ndarray:
        """Each wallet's balance version at `at`: it ticks every 6 h .. 7 d, at a per-wallet phase."""
        hours = (to_utc_naive(at) - EPOCH).total_seconds() / 3600.0
        period = 6.0 + 162.0 * uniform(self.seed, 33, wallet_idx)
        phase = period * uniform(self.seed, 34, wallet_idx)
        return np.floor((hours + phase) / period).astype(np.int64)

    def balances(self, at: datetime) -> pa.Table:
        """Every wallet's balances at `at`: walletId, tokenId, rawBalance (base units, text),
        quantity (text, 6 decimals), blockNumber."""
        wallet_idx, token_idx, slot = self._holdings
        version = self._version(wallet_idx, at)
        base_usd = 10.0 ** (1.0 + 4.0 * uniform(self.seed, 35, wallet_idx, slot))
        base_qty = base_usd / np.exp(self._base_log_price[token_idx])
        factor = 0.5 + uniform(self.seed, 36, wallet_idx, slot, version)
        sold = uniform(self.seed, 37, wallet_idx, slot, version) < 0.02
        micro = np.where(sold, 0, np.round(base_qty * factor * 1e6)).astype(np.int64)
        decimals = self.token_decimals[token_idx]
        return pa.table({
            "walletId": self._wallet_ids_arrow.take(pa.array(wallet_idx)),
            "tokenId": self._token_ids_arrow.take(pa.array(token_idx)),
            "rawBalance": _raw_balance(micro, decimals),
            "quantity": _micro_text(micro),
            "blockNumber": pa.array(np.full(len(micro), self.block_number(at)), type=pa.int64()),
        })

    @staticmethod
    def block_number(at: datetime) -> int:
        """A 12-second block clock, like Ethereum's after the merge."""
        return 15_537_394 + int((to_utc_naive(at) - datetime(2022, 9, 15, 6, 42, 42)).total_seconds() // 12)

    # -- DeFi positions and governance locks ----------------------------------------------
    def _protocols_of_kind(self, kinds: tuple[str, ...]) -> list[str]:
        return [slug for slug, _name, _chain, kind in PROTOCOLS if kind in kinds]

    def positions(self, at: datetime) -> pa.Table:
        """DeFi positions of about 30% of wallets (1-3 each) at `at`: walletId, tokenId,
        protocolId, positionType, quantity (text), costBasisUsd (text)."""
        slugs = self._protocols_of_kind(("dex", "lending", "staking"))
        w = np.arange(self.wallets)
        count = np.where(uniform(self.seed, 41, w) < 0.3, 1 + (uniform(self.seed, 42, w) * 3).astype(np.int64), 0)
        wallet_idx = np.repeat(w, count)
        slot = np.arange(len(wallet_idx)) - np.repeat(np.cumsum(count) - count, count)
        protocol_idx = (uniform(self.seed, 43, wallet_idx, slot) * len(slugs)).astype(np.int64)
        token_idx = (self.tokens * uniform(self.seed, 44, wallet_idx, slot) ** 2).astype(np.int64)
        version = self._version(wallet_idx, at)
        base_usd = 10.0 ** (2.0 + 3.0 * uniform(self.seed, 45, wallet_idx, slot))
        base_qty = base_usd / np.exp(self._base_log_price[token_idx])
        micro = np.round(base_qty * (0.5 + uniform(self.seed, 46, wallet_idx, slot, version)) * 1e6).astype(np.int64)
        cost_cents = np.round(base_usd * (0.8 + 0.4 * uniform(self.seed, 47, wallet_idx, slot)) * 100).astype(np.int64)
        kinds = {slug: kind for slug, _n, _c, kind in PROTOCOLS}
        protocol_ids = pa.array([self.protocol_id(s) for s in slugs])
        types = pa.array([POSITION_TYPES[kinds[s]] for s in slugs])
        return pa.table({
            "walletId": self._wallet_ids_arrow.take(pa.array(wallet_idx)),
            "tokenId": self._token_ids_arrow.take(pa.array(token_idx)),
            "protocolId": protocol_ids.take(pa.array(protocol_idx)),
            "positionType": types.take(pa.array(protocol_idx)),
            "quantity": _micro_text(micro),
            "costBasisUsd": _fixed_text(cost_cents, 2),
        })

    def governance_locks(self, at: datetime) -> pa.Table:
        """Vote-escrow locks of about 20% of wallets (1-2 protocols each) at `at`: walletId,
        protocolId, lockAmount, votingPower, boostMultiplier (text), lockEndsAt."""
        slugs = self._protocols_of_kind(("vote-escrow",))
        at = to_utc_naive(at)
        w = np.arange(self.wallets)
        count = np.where(uniform(self.seed, 51, w) < 0.2, 1 + (uniform(self.seed, 52, w) * 2).astype(np.int64), 0)
        wallet_idx = np.repeat(w, count)
        slot = np.arange(len(wallet_idx)) - np.repeat(np.cumsum(count) - count, count)
        protocol_idx = (uniform(self.seed, 53, w)[wallet_idx] * len(slugs)).astype(np.int64) + slot
        protocol_idx %= len(slugs)
        amount_micro = np.round(10.0 ** (2.0 + 4.0 * uniform(self.seed, 54, wallet_idx, slot)) * 1e6).astype(np.int64)
        # locks of up to 4 years, ending on a UTC midnight between 2025 and 2029
        max_lock_days = 4 * 365
        end_day = 3653 + (uniform(self.seed, 55, wallet_idx, slot) * max_lock_days).astype(np.int64)
        today = (at - EPOCH).days
        remaining = np.clip(end_day - today, 0, max_lock_days)
        power_micro = amount_micro * remaining // max_lock_days
        boost_bp = 10_000 + 15_000 * remaining // max_lock_days  # 1.0x .. 2.5x, in basis points
        ends = np.datetime64(EPOCH, "ms") + end_day * np.timedelta64(_MS_PER_DAY, "ms")
        protocol_ids = pa.array([self.protocol_id(s) for s in slugs])
        return pa.table({
            "walletId": self._wallet_ids_arrow.take(pa.array(wallet_idx)),
            "protocolId": protocol_ids.take(pa.array(protocol_idx)),
            "lockAmount": _micro_text(amount_micro),
            "votingPower": _micro_text(power_micro),
            "boostMultiplier": _fixed_text(boost_bp, 4),
            "lockEndsAt": _datetimes_ms(ends),
        })


def _fixed_text(units: np.ndarray, scale: int) -> pa.Array:
    """Non-negative integers of 10^-scale units as exact decimal text ('12.345600')."""
    units = np.asarray(units, dtype=np.int64)
    whole = pa.array(units // 10**scale).cast(pa.string())
    frac = pc.utf8_lpad(pa.array(units % 10**scale).cast(pa.string()), width=scale, padding="0")
    return pc.binary_join_element_wise(whole, frac, ".")


def _micro_text(micro: np.ndarray) -> pa.Array:
    return _fixed_text(micro, 6)


def _raw_balance(micro: np.ndarray, decimals: np.ndarray) -> pa.Array:
    """Base units as an integer string: micro-units followed by (decimals - 6) zeros."""
    digits = pa.array(micro).cast(pa.string())
    zeros = pa.array(["0" * int(d - 6) for d in range(6, 19)])
    padding = zeros.take(pa.array(np.asarray(decimals) - 6))
    raw = pc.binary_join_element_wise(digits, padding, "")
    return pc.if_else(pc.equal(pa.array(micro), 0), pa.scalar("0"), raw)
