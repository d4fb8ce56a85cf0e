"""The cache's key and value contract, version 1: what WeDefiDaily's API may read from Redis.

Pure (no I/O): key names, TTL lookup, the value envelope and the shapes of its `data`.
docs/cache.md is the human version of this module; change both together, and bump
SCHEMA_VERSION when a shape changes incompatibly (readers treat any other version as a
miss, so a deploy with a new version re-reads from the database and overwrites).

Keys (the seed's "Caching Strategy"):

    price:latest:{tokenId}    TTL cache.price_latest_ttl_s (60 s)
    portfolio:{walletId}      TTL cache.portfolio_ttl_s    (300 s)
    governance:{walletId}     TTL cache.governance_ttl_s   (1800 s)

Every value is one JSON object whose first members have a fixed layout, so Redis-side
scripts can read them with GETRANGE without parsing the whole value:

    {"schemaVersion":1,"computedAt":"2025-01-31T12:00:00.000Z","fingerprint":"<16 hex>","data":{...}}

`computedAt` is fixed-width UTC with milliseconds, so strings compare like times;
`fingerprint` is a hash of `data` alone, so an unchanged value is recognised across
refreshes. Numbers inside `data` are exact decimal strings (no exponent, no trailing
zeros: PostgreSQL's `trim_scale(x)::text`), never floats.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson  # 3-10x faster than json here; same compact output, so the same fingerprints

SCHEMA_VERSION = 1
FINGERPRINT_HEX = 16
# Keys the contract does not publish: stampede locks. Outside the three key patterns,
# so `--scan --pattern 'portfolio:*'` lists values only.
LOCK_PREFIX = "wedefi:lock:"

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"
_ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class ContractError(ValueError):
    """A cached value that does not follow this contract (malformed, or another schema version)."""


@dataclass(frozen=True)
class Family:
    """One kind of cached value: its key prefix and the settings field holding its TTL."""

    name: str
    prefix: str
    ttl_field: str

    def key(self, entity_id: str) -> str:
        if not entity_id:
            raise ValueError(f"{self.name}: an empty id has no cache key")
        return self.prefix + entity_id

    def entity_id(self, key: str) -> str:
        if not key.startswith(self.prefix):
            raise ValueError(f"{key!r} is not a {self.name} key ({self.prefix}...)")
        return key[len(self.prefix):]

    def ttl(self, cache_settings: Any) -> int:
        return int(getattr(cache_settings, self.ttl_field))

    @property
    def pattern(self) -> str:
        return self.prefix + "*"


PRICE = Family("price", "price:latest:", "price_latest_ttl_s")
PORTFOLIO = Family("portfolio", "portfolio:", "portfolio_ttl_s")
GOVERNANCE = Family("governance", "governance:", "governance_ttl_s")
FAMILIES: dict[str, Family] = {f.name: f for f in (PRICE, PORTFOLIO, GOVERNANCE)}
WALLET_FAMILIES = ("portfolio", "governance")


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown cache family {name!r}; expected one of {sorted(FAMILIES)}") from None


def families(names: Any) -> tuple[Family, ...]:
    """Validated families from names, in the order given, without repeats."""
    if isinstance(names, str):
        names = (names,)
    chosen: list[Family] = []
    for name in names:
        fam = family(name)
        if fam not in chosen:
            chosen.append(fam)
    return tuple(chosen)


def lock_key(key: str) -> str:
    return LOCK_PREFIX + key


# -- times and numbers --------------------------------------------------------------------------

def iso_utc(moment: datetime) -> str:
    """'2025-01-31T12:00:00.123Z': fixed width, so these strings sort like the times.

    An aware datetime is converted to UTC; a naive one is taken as UTC already (the
    app's `timestamp(3) without time zone` columns hold UTC). Sub-millisecond digits are
    truncated, never rounded up, so a value is never dated later than it was computed.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return f"{moment.strftime(_ISO_FORMAT)}.{moment.microsecond // 1000:03d}Z"


def iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso_utc(moment)


def parse_iso_utc(text: str) -> datetime:
    if not isinstance(text, str) or not _ISO_RE.match(text):
        raise ContractError(f"computedAt must look like 2025-01-31T12:00:00.000Z, got {text!r}")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)  # 100x faster than strptime


# -- envelope -----------------------------------------------------------------------------------

def data_json(data: Any) -> bytes:
    """The canonical JSON of a value's `data`: compact UTF-8, members in the order built here."""
    return orjson.dumps(data)


def fingerprint(data_text: bytes) -> str:
    return hashlib.blake2b(data_text, digest_size=FINGERPRINT_HEX // 2).hexdigest()


@dataclass(frozen=True)
class Encoded:
    """A value ready for Redis: its bytes, the fingerprint of its data and its computedAt."""

    key: str
    value: bytes
    fingerprint: str
    computed_at: str


def encode(key: str, data: Any, computed_at: datetime | str) -> Encoded:
    at = computed_at if isinstance(computed_at, str) else iso_utc(computed_at)
    text = data_json(data)
    fp = fingerprint(text)
    head = f'{{"schemaVersion":{SCHEMA_VERSION},"computedAt":"{at}","fingerprint":"{fp}","data":'
    return Encoded(key, head.encode() + text + b"}", fp, at)


@dataclass(frozen=True)
class Envelope:
    schema_version: int
    computed_at: datetime
    fingerprint: str
    data: Any


def decode(raw: bytes | str) -> Envelope:
    """A cached value, checked against this version of the contract."""
    try:
        obj = orjson.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"cached value is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ContractError(f"cached value must be a JSON object, got {type(obj).__name__}")
    version = obj.get("schemaVersion")
    if version != SCHEMA_VERSION:
        raise ContractError(f"cached value has schemaVersion {version!r}; this reader understands {SCHEMA_VERSION}")
    missing = [k for k in ("computedAt", "fingerprint", "data") if k not in obj]
    if missing:
        raise ContractError(f"cached value lacks {missing}")
    return Envelope(version, parse_iso_utc(obj["computedAt"]), obj["fingerprint"], obj["data"])


# -- data shapes (v1) ---------------------------------------------------------------------------

def price_data(token_id: str, price_usd: str, source: str, recorded_at: datetime) -> dict:
    """`price:latest:{tokenId}`: the newest "PriceSnapshot" row of the token."""
    return {"tokenId": token_id, "priceUsd": price_usd, "source": source, "recordedAt": iso_utc(recorded_at)}


def portfolio_data(
    wallet: Mapping[str, Any], usd_value: str, tokens_tracked: int,
    holdings: list[dict], snapshot: dict | None,
) -> dict:
    """`portfolio:{walletId}`: the seed's portfolio summary, shaped like the app's /portfolio route.

    `totals` sums every "TokenBalance" of the wallet (a NULL "usdValue" counts as 0);
    `topHoldings` are its priced balances by "usdValue", largest first, ties by token id;
    `snapshot` is its newest "PortfolioSnapshot" within the lookback window, or null.
    """
    return {
        "wallet": dict(wallet),
        "totals": {"usdValue": usd_value, "tokensTracked": tokens_tracked},
        "topHoldings": holdings,
        "snapshot": snapshot,
    }


def wallet_data(wallet_id: str, address: str, label: str | None, chain_id: int, chain_name: str) -> dict:
    return {"id": wallet_id, "address": address, "label": label, "chainId": chain_id, "chainName": chain_name}


def holding_data(
    token_id: str, symbol: str, name: str, decimals: int, is_native: bool,
    quantity: str, raw_balance: str, usd_value: str,
) -> dict:
    return {
        "token": {"id": token_id, "symbol": symbol, "name": name, "decimals": decimals, "isNative": is_native},
        "quantity": quantity,
        "rawBalance": raw_balance,
        "usdValue": usd_value,
    }


def snapshot_data(
    captured_at: datetime, total: str, change_24h: str | None, change_7d: str | None, change_30d: str | None,
) -> dict:
    return {
        "capturedAt": iso_utc(captured_at),
        "totalUsdValue": total,
        "totalUsdValueChange24h": change_24h,
        "totalUsdValueChange7d": change_7d,
        "totalUsdValueChange30d": change_30d,
    }


def governance_data(wallet_id: str, locks: list[dict]) -> dict:
    """`governance:{walletId}`: the wallet's "GovernanceLock" rows (an empty list is a valid value)."""
    return {"walletId": wallet_id, "locks": locks}


def lock_data(
    protocol_id: str, slug: str, protocol_name: str, lock_amount: str, voting_power: str,
    boost_multiplier: str | None, lock_ends_at: datetime | None, last_refreshed_at: datetime,
) -> dict:
    return {
        "protocol": {"id": protocol_id, "slug": slug, "name": protocol_name},
        "lockAmount": lock_amount,
        "votingPower": voting_power,
        "boostMultiplier": boost_multiplier,
        "lockEndsAt": iso_or_none(lock_ends_at),
        "lastRefreshedAt": iso_utc(last_refreshed_at),
    }
