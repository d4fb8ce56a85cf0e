"""Writing contract values to Redis: guarded, pipelined, and skipping what did not change.

Every writer (the refresh asset, the API's read-through, invalidation) goes through
`put_many`, so two rules hold whoever writes:

* **Newest computation wins.** A value is written only if the key does not already hold
  one computed later (its `computedAt`, read by a Lua script with GETRANGE on the fixed
  prefix of the envelope). A slow refresh that read the database before a balance sync
  can therefore never overwrite the fresher value that sync's invalidation just wrote.
* **Unchanged values are not resent.** When comparing is cheaper than writing, a first
  pipelined pass sends only each key's data fingerprint: a key still holding the same
  data gets its `computedAt` moved forward in place (SETRANGE, fixed width) and its TTL
  renewed; only the keys that differ (or vanished) are then written in full.

The scripts touch one key each and keep no state beside the value itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import redis

from wedefi_pipelines.cache.contract import FAMILIES, Encoded

# Bytes a compare-first call costs on the wire (script sha, key, fingerprint, time, ttl):
# comparing pays off when the bytes of unchanged values it avoids resending exceed this.
TOUCH_COST_BYTES = 128
_HEAD = 127  # the envelope's fixed prefix fits well within this many bytes

# Write unless the key holds a value computed later. Returns 1 written, 0 kept the newer one.
_PUT = f"""
local head = redis.call('GETRANGE', KEYS[1], 0, {_HEAD})
local at = string.match(head, '"computedAt":"([^"]+)"')
if at and at > ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

# Same data already there: move computedAt forward and renew the TTL. Returns 1 touched,
# 0 a later value is there, -1 the data differs or the key is gone (write it in full).
_TOUCH = f"""
local head = redis.call('GETRANGE', KEYS[1], 0, {_HEAD})
local at, fp = string.match(head, '"computedAt":"([^"]+)","fingerprint":"([^"]+)"')
if not at or fp ~= ARGV[1] then return -1 end
if at > ARGV[2] then return 0 end
redis.call('SETRANGE', KEYS[1], string.find(head, at, 1, true) - 1, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
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
    unchanged: int = 0    # same data already cached: TTL renewed, value not resent
    kept_newer: int = 0   # a value computed later was already there: left alone
    compared: int = 0     # keys that went through the compare-first pass

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
        """Write one pipelined batch; see the module docstring for the two rules."""
        counts = WriteCounts()
        if not entries:
            return counts
        pending = list(entries)
        if compare:
            counts.compared = len(pending)
            pipe = self.client.pipeline(transaction=False)
            for e in pending:
                self._touch(keys=[e.key], args=[e.fingerprint, e.computed_at, ttl], client=pipe)
            outcomes = pipe.execute()
            pending = [e for e, r in zip(pending, outcomes) if r == -1]
            counts.unchanged = sum(1 for r in outcomes if r == 1)
            counts.kept_newer = sum(1 for r in outcomes if r == 0)
        if pending:
            pipe = self.client.pipeline(transaction=False)
            for e in pending:
                self._put(keys=[e.key], args=[e.value, e.computed_at, ttl], client=pipe)
            outcomes = pipe.execute()
            counts.written += sum(1 for r in outcomes if r == 1)
            counts.kept_newer += sum(1 for r in outcomes if r == 0)
        return counts

    def get(self, key: str) -> bytes | None:
        return self.client.get(key)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.client.mget(keys) if keys else []

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
