"""Writing contract values to Redis: guarded, pipelined, and skipping what did not change.

Every writer this project runs (the refresh asset, the API-side read-through,
invalidation) goes through `put_many`; the app's own `CacheManager` writes with
`SETEX key TTL value`. Values carry nothing but the app's data (contract.py), so:

* **When a value was computed is its expiry minus its TTL.** This project stores each
  value with `PXAT computedAt + TTL`; the app's `SETEX` stores `write time + TTL`. A
  script reads any key's age from `TIME` and `PTTL` alone, whoever wrote it.
* **Newest computation wins.** A value is written only if the key does not hold one
  computed later (by that age). A slow refresh that read the database before a balance
  sync can therefore never overwrite the fresher value that sync's invalidation wrote,
  nor one the app stored after its own, later read.
* **Unchanged values are not resent.** When comparing is cheaper than writing, a first
  pipelined pass sends only each value's SHA-1: a key holding the same bytes
  (`redis.sha1hex` of the stored value) just gets its expiry moved to the new
  computedAt + TTL; only keys that differ (or vanished) are then written in full.

The scripts touch one key each and keep no state beside the value and its expiry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import redis

from wedefi_pipelines.cache.contract import FAMILIES, Encoded

# Bytes a compare-first call costs on the wire (script sha, key, SHA-1, times): comparing
# pays off when the bytes of unchanged values it avoids resending exceed this.
TOUCH_COST_BYTES = 128

# ARGV: 1 value (or its SHA-1 for _TOUCH), 2 computedAt ms, 3 TTL ms, 4 computedAt + TTL ms.
# The key's own computedAt is now + PTTL - TTL; a key without expiry (PTTL -1) is older
# than anything, a missing one (-2) is no obstacle.
_NEWER = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(ARGV[4]) <= now_ms then return 3 end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 and now_ms + pttl - tonumber(ARGV[3]) > tonumber(ARGV[2]) then return 0 end
"""

# Write unless the key holds a value computed later. 1 written, 0 kept the newer one,
# 3 the value is older than its TTL already (not stored).
_PUT = _NEWER + """
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[4])
return 1
"""

# Same bytes already there: move the expiry to computedAt + TTL. 1 touched, 0 a later
# value is there, 3 too old, -1 the bytes differ or the key is gone (write it in full).
_TOUCH = """
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then return -1 end
""" + _NEWER + """
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 1
"""


# The unchanged ratio a batch is expected to have, at the least: one batch where every
# value changed (wallets changed together are often neighbours in id order) must not stop
# the rest of the run from comparing values that are many times larger than the question.
MIN_EXPECTED_UNCHANGED = 0.25


def worth_comparing(mean_value_bytes: float, unchanged_ratio: float) -> bool:
    """Compare first when resending unchanged values would cost more than asking about each key."""
    return mean_value_bytes * max(unchanged_ratio, MIN_EXPECTED_UNCHANGED) > TOUCH_COST_BYTES


@dataclass
class WriteCounts:
    written: int = 0      # value sent and stored
    unchanged: int = 0    # same bytes already cached: expiry renewed, value not resent
    kept_newer: int = 0   # a value computed later was already there: left alone
    compared: int = 0     # keys that went through the compare-first pass
    expired: int = 0      # computed longer ago than its TTL by the time it reached Redis: not stored

    def add(self, other: "WriteCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def unchanged_ratio(self) -> float:
        return self.unchanged / self.compared if self.compared else 0.0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class CacheStore:
    """The Redis side of the cache, over one redis-py client (thread-safe, pooled)."""

    client: redis.Redis
    _put: object = field(init=False, repr=False)
    _touch: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._put = self.client.register_script(_PUT)
        self._touch = self.client.register_script(_TOUCH)

    def put_many(self, entries: Sequence[Encoded], ttl: int, compare: bool = False) -> WriteCounts:
        """Write one pipelined batch with TTL `ttl` seconds; see the module docstring for the rules."""
        counts = WriteCounts()
        if not entries:
            return counts
        ttl_ms = ttl * 1000

        def args(e: Encoded, first: bytes | str) -> list:
            return [first, e.computed_ms, ttl_ms, e.computed_ms + ttl_ms]

        pending = list(entries)
        if compare:
            counts.compared = len(pending)
            pipe = self.client.pipeline(transaction=False)
            for e in pending:
                self._touch(keys=[e.key], args=args(e, e.sha1), client=pipe)
            outcomes = pipe.execute()
            pending = [e for e, r in zip(pending, outcomes) if r == -1]
            counts.unchanged = outcomes.count(1)
            counts.kept_newer = outcomes.count(0)
            counts.expired = outcomes.count(3)
        if pending:
            pipe = self.client.pipeline(transaction=False)
            for e in pending:
                self._put(keys=[e.key], args=args(e, e.value), client=pipe)
            outcomes = pipe.execute()
            counts.written += outcomes.count(1)
            counts.kept_newer += outcomes.count(0)
            counts.expired += outcomes.count(3)
        return counts

    def get(self, key: str) -> tuple[bytes | None, int]:
        """The key's value and its PTTL in milliseconds (-2: no key, -1: no expiry), in one round trip."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[tuple[bytes | None, int]]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)  # one round trip; a write in between only skews computedAt
        pipe.mget(keys)
        for key in keys:
            pipe.pttl(key)
        values, *pttls = pipe.execute()
        return list(zip(values, pttls))

    def delete(self, keys: Sequence[str]) -> int:
        return self.client.delete(*keys) if keys else 0


class CacheUnavailable(RuntimeError):
    """Redis is unset, unreachable or failing; the message names it and what was being done."""


def describe(client: redis.Redis) -> str:
    """Where a client points, without credentials: 'redis://127.0.0.1:6379/0'."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def count_keys(client: redis.Redis) -> dict[str, int]:
    """Keys per family (SCAN, so it never blocks Redis the way KEYS would)."""
    return {name: sum(1 for _ in client.scan_iter(match=fam.pattern, count=1000)) for name, fam in FAMILIES.items()}
