"""The cache's key and value contract, version 2: the WeDefiDaily app's own format.

Pure (no I/O): key names, TTL lookup, and the exact bytes of each value. docs/cache.md is
the human version of this module; change both together and bump CONTRACT_VERSION there
and here when a value's format changes.

Keys (the seed's "Caching Strategy"), and what the seed's `CacheManager` reads from them:

    price:latest:{tokenId}    TTL cache.price_latest_ttl_s (60 s)   parseFloat(value)
    portfolio:{walletId}      TTL cache.portfolio_ttl_s    (300 s)  JSON.parse(value)
    governance:{walletId}     TTL cache.governance_ttl_s   (1800 s) JSON.parse(value)

A price is the plain decimal text of "PriceSnapshot"."priceUsd" (no exponent, no
envelope). A portfolio value is `JSON.stringify` of what the seed's
`getPortfolioSummary(walletId)` returns through Prisma; a governance value the same for
`governanceLock.findMany({ where: { walletId } })`. So the app reads values this project
wrote exactly as it reads the ones it wrote itself. Prisma's JSON rules, reproduced here:

* objects carry every scalar field in the Prisma model's order, relations after them;
* Decimal -> decimal.js `toJSON()`: the shortest exact digits, in exponent form when the
  value's decimal exponent is <= -7 or >= 21 (`9e-7`, `1.5e+21`), plain otherwise;
* DateTime -> `Date.toJSON()`: `2025-01-31T12:00:00.000Z` (the columns hold UTC);
* BigInt ("TokenBalance"."blockNumber") -> its decimal digits as a JSON string: the rule
  the app must install (`BigInt.prototype.toJSON = function () { return this.toString() }`),
  since `JSON.stringify` throws on a BigInt otherwise;
* Json columns -> the JSON value itself.

Nothing else is inside a value. When a value was computed is carried by its expiry: every
writer stores a value with `PXAT computedAt + TTL` (the app's `SETEX key TTL` does the
same, at its write time), so `computedAt = expiry - TTL` for any value (store.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson  # 3-10x faster than json for the same compact output

CONTRACT_VERSION = 2
# Keys the contract does not publish: stampede locks. Outside the three key patterns,
# so `--scan --pattern 'portfolio:*'` lists values only.
LOCK_PREFIX = "wedefi:lock:"

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PLAIN_DECIMAL = re.compile(r"^-?\d+(\.\d*[1-9])?$")  # PostgreSQL's trim_scale(x)::text
# decimal.js (Prisma.Decimal) switches to exponent notation at these decimal exponents
JS_EXP_NEG = -7
JS_EXP_POS = 21


class ContractError(ValueError):
    """A cached value that does not follow this contract (malformed, or another version's format)."""


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
    """'2025-01-31T12:00:00.123Z', what JavaScript's `Date.toJSON()` prints.

    An aware datetime is converted to UTC; a naive one is taken as UTC already (the
    app's `timestamp(3) without time zone` columns hold UTC). Sub-millisecond digits are
    truncated, never rounded up.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return f"{moment.strftime(_ISO_FORMAT)}.{moment.microsecond // 1000:03d}Z"


def parse_iso_utc(text: str) -> datetime:
    if not isinstance(text, str) or not _ISO_RE.match(text):
        raise ContractError(f"a time must look like 2025-01-31T12:00:00.000Z, got {text!r}")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch (a naive datetime is UTC), truncated like iso_utc."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta = moment - _EPOCH
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def from_epoch_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def js_decimal(text: str | None) -> str | None:
    """decimal.js's `toString()` of a decimal given as PostgreSQL's `trim_scale(x)::text`.

    That is what `JSON.stringify` writes for a Prisma Decimal: the same digits, switched
    to exponent notation when the decimal exponent is <= -7 (|x| < 1e-6) or >= 21
    (|x| >= 1e21): `0.0000009` -> `9e-7`, `1500000000000000000000` -> `1.5e+21`.
    """
    if text is None:
        return None
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, frac = digits.partition(".")
    if whole != "0":
        exponent = len(whole) - 1
        if exponent < JS_EXP_POS:
            return text
        significant = (whole + frac).rstrip("0")
    else:
        if not frac:
            return text  # zero
        stripped = frac.lstrip("0")
        exponent = -(len(frac) - len(stripped) + 1)
        if exponent > JS_EXP_NEG:
            return text
        significant = stripped
    mantissa = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
    return f"{sign}{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


def plain_decimal(text: str) -> str:
    """A price value: PostgreSQL's plain decimal text, checked (no exponent, no trailing zeros)."""
    if not isinstance(text, str) or not PLAIN_DECIMAL.match(text):
        raise ContractError(f"a price must be a plain decimal like 3001.25, got {text!r}")
    return text


# -- values -------------------------------------------------------------------------------------

def value_json(value: Any) -> bytes:
    """`JSON.stringify`'s compact form. Json columns may hold integers beyond 64 bits,
    which orjson refuses; the standard library writes them (JSON.parse reads both alike)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Encoded:
    """A value ready for Redis: its bytes, their SHA-1 (what Lua's redis.sha1hex computes),
    and when the data behind it was read (epoch milliseconds)."""

    key: str
    value: bytes
    sha1: str
    computed_ms: int


def encode(fam: Family, entity_id: str, value: Any, computed_at: datetime | int) -> Encoded:
    """The value's bytes: a price's decimal text, or the JSON of a wallet family's array."""
    if fam is PRICE:
        raw = plain_decimal(value).encode()
    elif isinstance(value, list):
        raw = value_json(value)
    else:
        raise ContractError(f"{fam.name} values are JSON arrays (Prisma findMany results), got {type(value).__name__}")
    at = computed_at if isinstance(computed_at, int) else epoch_ms(computed_at)
    return Encoded(fam.key(entity_id), raw, hashlib.sha1(raw).hexdigest(), at)


def decode(fam: Family, raw: bytes | str) -> Any:
    """A cached value, checked against this contract: a price's text, or a JSON array."""
    if fam is PRICE:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return plain_decimal(text)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # integers beyond 64 bits in a Json column
            value = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{fam.name} value is not JSON: {exc}") from None
    if not isinstance(value, list):
        raise ContractError(f"{fam.name} value must be a JSON array (a Prisma findMany result), "
                            f"got {type(value).__name__} (a contract v1 envelope?)")
    return value


# -- value shapes: Prisma's models, fields in schema order ---------------------------------------

def token_value(row: Mapping[str, Any]) -> dict:
    """Prisma's `Token`: id, chainId, address, symbol, name, decimals, isNative, metadata, createdAt, updatedAt."""
    return {k: row[k] for k in ("id", "chainId", "address", "symbol", "name", "decimals", "isNative", "metadata",
                                "createdAt", "updatedAt")}


def balance_value(row: Mapping[str, Any], token: dict) -> dict:
    """Prisma's `TokenBalance` with `include: { token: true }`."""
    return {
        "id": row["id"], "walletId": row["walletId"], "tokenId": row["tokenId"], "rawBalance": row["rawBalance"],
        "quantity": js_decimal(row["quantity"]), "usdValue": js_decimal(row["usdValue"]),
        "blockNumber": None if row["blockNumber"] is None else str(row["blockNumber"]),
        "fetchedAt": row["fetchedAt"], "createdAt": row["createdAt"], "updatedAt": row["updatedAt"],
        "token": token,
    }


def wallet_value(row: Mapping[str, Any], balances: list[dict]) -> dict:
    """Prisma's `Wallet` with `include: { balances: ... }`."""
    return {k: row[k] for k in ("id", "address", "chainId", "label", "metadata", "createdAt", "updatedAt")} | {
        "balances": balances}


def lock_value(row: Mapping[str, Any]) -> dict:
    """Prisma's `GovernanceLock`."""
    return {
        "id": row["id"], "protocolId": row["protocolId"], "walletId": row["walletId"],
        "lockAmount": js_decimal(row["lockAmount"]), "votingPower": js_decimal(row["votingPower"]),
        "boostMultiplier": js_decimal(row["boostMultiplier"]), "lockEndsAt": row["lockEndsAt"],
        "lastRefreshedAt": row["lastRefreshedAt"], "metadata": row["metadata"],
        "createdAt": row["createdAt"], "updatedAt": row["updatedAt"],
    }
