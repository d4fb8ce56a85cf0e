"""The read-through cache the WeDefiDaily API reads through: the seed's CacheManager, made safe.

Plain Python (no Dagster): an API process builds one `CacheManager` and shares it
between its threads. What it adds to the seed's get-or-query-then-setex:

* **Stampede protection.** Concurrent misses for one key run one database query: threads
  of one process wait for a single in-flight load (single flight), and processes
  coordinate through a short Redis lock (`wedefi:lock:<key>`); the others poll the key
  until the value lands, and query themselves only if the holder dies.
* **Redis down.** Every call is served from the database; the outage is logged once when
  it starts and once when it ends, not per call, and Redis is only re-probed every
  `cache.outage_retry_s`, so a dead Redis costs no timeout per request.
* **Database down.** Whatever the cache holds is still served, as a `CachedValue` carrying
  the time it was computed (its expiry minus its TTL, contract.py), so the caller can
  show its age; a miss raises
  DataUnavailable. The outage is logged once and the database re-probed every
  `cache.outage_retry_s`, failing fast in between.
* **Batches and pages.** `get_batched_portfolio_data` reads many wallets with one MGET
  and loads every miss with one statement (the seed's N+1 fix);
  `get_paged_portfolio_data` keeps the seed's page/limit/total and adds a keyset cursor,
  so deep pages cost what the first does and concurrent inserts never repeat or skip a wallet.

Values are the app's own format (contract v2): the price's decimal text, or the Prisma
result arrays the app's `JSON.parse` reads. They are written through
`CacheStore.put_many`, so a value read here never overwrites one computed later by the
refresh, by invalidation or by the app.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Mapping, Sequence

import psycopg
import redis

from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.refresh import PRICE_WORKLOAD, WALLET_WORKLOAD, read_time
from wedefi_pipelines.cache.store import CacheStore
from wedefi_pipelines.resources.cache import optional_redis
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)

_POLL_S = 0.005  # how often a process waiting on another's load looks for the value
_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)  # PoolTimeout is an OperationalError


class DataUnavailable(RuntimeError):
    """The value is not cached and the database cannot be read; the message says why."""


@dataclass(frozen=True)
class CachedValue:
    """A contract value and where it came from: `computed_at` says how old `data` is.

    `data` is what the app's reader gets: a price's decimal text (str; read it with
    `Decimal`), or the JSON-parsed Prisma result (a list of dicts: one wallet with its
    balances, or the wallet's governance locks). `computed_at` is None for a key stored
    without expiry (outside the contract: its age is unknown)."""

    key: str
    data: Any
    computed_at: datetime | None
    source: str  # "cache" or "database"

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.computed_at is None:
            return None
        return ((now or datetime.now(timezone.utc)) - self.computed_at).total_seconds()


class Batch(dict):
    """Wallet id -> CachedValue; `unavailable` lists ids neither cached nor readable (database down)."""

    def __init__(self, *args: Any, unavailable: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.unavailable = list(unavailable)


@dataclass(frozen=True)
class PortfolioPage:
    data: list[CachedValue]
    limit: int
    page: int | None  # None when reading by cursor
    total: int | None  # None when include_total=False
    pages: int | None
    next_cursor: str | None  # pass back as `cursor` for the next page; None on the last page


class Outage:
    """One dependency's availability: logs the start and the end of an outage, once each,
    and says when to try it again."""

    def __init__(self, what: str, retry_s: float, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.retry_s, self.log, self.clock = what, retry_s, logger, clock
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.episodes = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def should_try(self) -> bool:
        return self.down_since is None or self.clock() >= self.retry_at

    def failed(self, exc: BaseException, consequence: str) -> None:
        with self._lock:
            now = self.clock()
            self.retry_at = now + self.retry_s
            if self.down_since is None:
                self.down_since = now
                self.episodes += 1
                self.log.warning("%s unavailable (%s: %s); %s until it returns",
                                 self.what, type(exc).__name__, str(exc).strip() or "no detail", consequence)

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is not None:
                self.log.warning("%s is back after %.1fs", self.what, self.clock() - self.down_since)
                self.down_since = None


class _SingleFlight:
    """Concurrent calls for one key share the first caller's result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Future] = {}
        self.joined = 0  # callers that waited for another's call instead of making their own

    def do(self, key: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = Future()
            else:
                self.joined += 1
        if not leader:
            return call.result()
        try:
            result = fn()
        except BaseException as exc:
            call.set_exception(exc)
            raise
        else:
            call.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]


@dataclass
class ManagerStats:
    hits: int = 0
    misses: int = 0
    queries: Counter = field(default_factory=Counter)  # database statements, by family ("page" for paging)
    redis_errors: int = 0
    database_errors: int = 0

    @property
    def db_queries(self) -> int:
        return sum(self.queries.values())


class CacheManager:
    """Read-through access to the cache contract's values, for the API side.

    Thread-safe; one per process. It owns the database and Redis client it is given:
    `close()` closes both.
    """

    def __init__(self, database: Database, client: redis.Redis | None, settings: Settings | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.db = database
        self.settings = settings or database.settings
        self.cfg = self.settings.cache
        self.log = logger or log
        self.store = CacheStore(client) if client is not None else None
        self.redis_outage = Outage("Redis", self.cfg.outage_retry_s, self.log)
        self.db_outage = Outage("database", self.cfg.outage_retry_s, self.log)
        self.stats = ManagerStats()
        self._stats_lock = threading.Lock()
        self._flights = _SingleFlight()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Settings | None = None,
                 logger: logging.Logger | None = None) -> "CacheManager":
        """From the configuration contract's variables; without a usable REDIS_URL it reads the database only."""
        database = Database.from_env(env, settings=settings, logger=logger)
        return cls(database, optional_redis(env, database.settings, logger), database.settings, logger)

    def close(self) -> None:
        if self.store is not None:
            self.store.client.close()
        self.db.close()

    def __enter__(self) -> "CacheManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the seed's three reads ----------------------------------------------------------------
    def get_latest_price(self, token_id: str) -> CachedValue | None:
        """`price:latest:{tokenId}`; None when the token has no price inside the lookback window."""
        return self._get(c.PRICE, token_id)

    def get_portfolio_summary(self, wallet_id: str) -> CachedValue | None:
        """`portfolio:{walletId}`: `[wallet with its balances worth > 0]`; None for an unknown
        wallet (also when the app's reader cached `[]` for it)."""
        value = self._get(c.PORTFOLIO, wallet_id)
        return None if value is None or not value.data else value

    def get_governance_locks(self, wallet_id: str) -> CachedValue | None:
        """`governance:{walletId}`: the wallet's "GovernanceLock" rows (possibly `[]`); None for an unknown wallet."""
        return self._get(c.GOVERNANCE, wallet_id)

    # -- many wallets ----------------------------------------------------------------------------
    def get_batched_portfolio_data(self, wallet_ids: Sequence[str]) -> Batch:
        """Portfolio summaries of many wallets: one MGET, then one statement for every miss."""
        ids = list(dict.fromkeys(wallet_ids))
        found: dict[str, CachedValue] = {}
        if ids and self._redis_usable():
            try:
                raws = self.store.get_many([c.PORTFOLIO.key(i) for i in ids])
                self.redis_outage.succeeded()
                for wallet_id, (raw, pttl) in zip(ids, raws):
                    hit = self._decode(c.PORTFOLIO, c.PORTFOLIO.key(wallet_id), raw, pttl)
                    if hit is not None:
                        found[wallet_id] = hit
            except redis.RedisError as exc:
                self._redis_failed(exc)
        missing = [i for i in ids if i not in found]
        self._count(hits=len(found), misses=len(missing))
        unavailable: list[str] = []
        if missing:
            try:
                found.update(self._load_and_store(c.PORTFOLIO, missing))
            except DataUnavailable:
                unavailable = missing
        # a cached `[]` (the app's reader stores one for an unknown id) is an unknown wallet
        return Batch(((i, found[i]) for i in ids if i in found and found[i].data), unavailable=unavailable)

    def get_paged_portfolio_data(
        self, page: int = 1, limit: int = 50, *, min_value: Decimal | str | int | None = None,
        wallet_id: str | None = None, cursor: str | None = None, include_total: bool = True,
    ) -> PortfolioPage:
        """The seed's paged portfolio listing (wallets by "createdAt", then id), summaries from the cache.

        `page` gives the seed's skip/take; `cursor` (the previous page's `next_cursor`)
        gives keyset paging, which deep pages and concurrent inserts do not disturb.
        """
        if limit < 1 or limit > 1000:
            raise ValueError(f"limit must be between 1 and 1000, got {limit}")
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        filters = q.PageFilter(wallet_id, None if min_value is None else Decimal(str(min_value)))
        after = q.decode_cursor(cursor) if cursor else None
        rows, total = self._query("page", WALLET_WORKLOAD, lambda conn: (
            q.page_wallets(conn, limit, filters, offset=None if after else (page - 1) * limit, after=after),
            q.count_wallets(conn, filters) if include_total else None,
        ))
        summaries = self.get_batched_portfolio_data([wid for wid, _ in rows])
        if summaries.unavailable:
            raise DataUnavailable(f"portfolio summaries of {len(summaries.unavailable)} wallets of this page "
                                  f"are neither cached nor readable: the database is unavailable")
        last = rows[-1] if len(rows) == limit else None
        return PortfolioPage(
            data=[summaries[wid] for wid, _ in rows if wid in summaries],  # each .data: [wallet]
            limit=limit,
            page=None if after else page,
            total=total,
            pages=None if total is None else math.ceil(total / limit),
            next_cursor=q.encode_cursor(last[1], last[0]) if last else None,
        )

    # -- read-through ----------------------------------------------------------------------------
    def _get(self, fam: c.Family, entity_id: str) -> CachedValue | None:
        key = fam.key(entity_id)
        if self._redis_usable():
            try:
                hit = self._read(fam, key)
                self.redis_outage.succeeded()
                if hit is not None:
                    self._count(hits=1)
                    return hit
            except redis.RedisError as exc:
                self._redis_failed(exc)
        self._count(misses=1)
        return self._flights.do(key, lambda: self._fill(fam, entity_id, key))

    def _fill(self, fam: c.Family, entity_id: str, key: str) -> CachedValue | None:
        """One process's single load of a missing key, coordinated with other processes."""
        lock = None
        if self._redis_usable():
            try:
                lock, hit = self._lock_or_wait(fam, key)
                if hit is not None:
                    return hit
            except redis.RedisError as exc:
                self._redis_failed(exc)
        try:
            return self._load_and_store(fam, [entity_id]).get(entity_id)
        finally:
            if lock is not None:
                try:
                    lock.release()
                except redis.RedisError:
                    pass  # it expires by itself

    def _lock_or_wait(self, fam: c.Family, key: str):
        """(lock, None) when this process should load the key; (None, value) when another
        process's load landed meanwhile; (None, None) when waiting timed out."""
        lock = self.store.client.lock(c.lock_key(key), timeout=self.cfg.lock_timeout_s, blocking=False,
                                      raise_on_release_error=False)
        deadline = time.monotonic() + self.cfg.lock_timeout_s
        while True:
            if lock.acquire(blocking=False):
                hit = self._read(fam, key)  # it may have landed between our miss and the lock
                if hit is None:
                    return lock, None
                lock.release()
                return None, hit
            time.sleep(_POLL_S)
            hit = self._read(fam, key)
            if hit is not None:
                return None, hit
            if time.monotonic() >= deadline:
                return None, None

    def _load_and_store(self, fam: c.Family, ids: list[str]) -> dict[str, CachedValue]:
        workload = PRICE_WORKLOAD if fam is c.PRICE else WALLET_WORKLOAD
        values, at = self._query(fam.name, workload, lambda conn: self._loader(fam, conn, ids), stamped=True)
        entries = [c.encode(fam, i, value, at) for i, value in values.items()]
        if entries and self._redis_usable():
            try:
                self.store.put_many(entries, fam.ttl(self.cfg), compare=False)
                self.redis_outage.succeeded()
            except redis.RedisError as exc:
                self._redis_failed(exc)
        stamped = c.from_epoch_ms(at)
        # decoded from the bytes just stored, so a load and a later hit return the same data
        # (a Json integer beyond a double's precision reads back as the float JSON.parse gives)
        return {fam.entity_id(e.key): CachedValue(e.key, c.decode(fam, e.value), stamped, "database") for e in entries}

    def _loader(self, fam: c.Family, conn: psycopg.Connection, ids: list[str]) -> dict[str, Any]:
        if fam is c.PRICE:
            return q.latest_prices(conn, q.window_start(self.cfg.lookback_days), ids)
        if fam is c.PORTFOLIO:
            return q.portfolio_summaries(conn, ids)
        return q.governance_locks(conn, ids)

    def _query(self, label: str, workload: str, fn: Callable[[psycopg.Connection], Any], stamped: bool = False) -> Any:
        """fn's result on a routed connection (and, `stamped`, the computedAt of what it read, epoch ms)."""
        if not self.db_outage.should_try():
            raise DataUnavailable(f"not cached, and the database is unavailable (down for "
                                  f"{time.monotonic() - self.db_outage.down_since:.1f}s; retried every "
                                  f"{self.cfg.outage_retry_s}s)")
        with self._stats_lock:
            self.stats.queries[label] += 1
        try:
            computed_at, _ = read_time(self.db, workload)
            with self.db.connection(workload) as conn:
                result = fn(conn)
        except _DB_ERRORS as exc:
            with self._stats_lock:
                self.stats.database_errors += 1
            self.db_outage.failed(exc, "serving cached values only")
            raise DataUnavailable(f"not cached, and the database cannot be read: {exc}") from exc
        self.db_outage.succeeded()
        return (result, c.epoch_ms(computed_at)) if stamped else result

    # -- Redis ----------------------------------------------------------------------------------
    def _read(self, fam: c.Family, key: str) -> CachedValue | None:
        return self._decode(fam, key, *self.store.get(key))

    def _decode(self, fam: c.Family, key: str, raw: bytes | None, pttl: int) -> CachedValue | None:
        if raw is None:
            return None
        try:
            data = c.decode(fam, raw)
        except c.ContractError as exc:
            self.log.debug("%s: treated as a miss (%s)", key, exc)
            return None
        computed_at = None
        if pttl >= 0:  # computedAt = expiry - TTL (contract.py)
            computed_at = datetime.now(timezone.utc) + timedelta(milliseconds=pttl - fam.ttl(self.cfg) * 1000)
        return CachedValue(key, data, computed_at, "cache")

    def _redis_usable(self) -> bool:
        return self.store is not None and self.redis_outage.should_try()

    def _redis_failed(self, exc: BaseException) -> None:
        with self._stats_lock:
            self.stats.redis_errors += 1
        self.redis_outage.failed(exc, "serving from the database")

    def _count(self, hits: int = 0, misses: int = 0) -> None:
        with self._stats_lock:
            self.stats.hits += hits
            self.stats.misses += misses
