"""Refreshing the whole cache from the database: what the `redis_cache` asset runs.

Reads go through the database's workload routing (prices as `user_dashboard`, wallets as
`portfolio_queries`: the read replica, or the primary when the replica lags or is down),
in keyset chunks of `cache.pipeline_batch` wallets, each chunk one statement per family.
Writes go out in pipelined batches of the same size through `CacheStore.put_many`, which
skips values whose bytes did not change when comparing is cheaper than resending
(decided per batch from the value size and the unchanged ratio seen so far).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator, Sequence

import redis

from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.store import CacheStore, CacheUnavailable, WriteCounts, describe, worth_comparing
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)

ALL_FAMILIES = ("price", "portfolio", "governance")
PRICE_WORKLOAD = "user_dashboard"
WALLET_WORKLOAD = "portfolio_queries"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def read_time(database: Database, workload: str) -> tuple[datetime, str]:
    """The `computedAt` of a read about to run for `workload`, and why it goes where it goes.

    On the primary, now. On a replica, now minus the lag it may have before reads leave
    it (`lag_threshold`): what it serves may be that old, and so a value read there
    never outranks one read from the primary after a commit the replica may not have
    replayed yet (the newest-wins rule of CacheStore).
    """
    route = database.route(workload)
    now = utc_now()
    if route.server == "primary":
        return now, route.reason
    replicas = database.settings.database
    threshold_ms = (replicas.read_replica if route.server == "read" else replicas.analytics_replica).lag_threshold
    return now - timedelta(milliseconds=threshold_ms), route.reason


@dataclass
class FamilyReport:
    keys: int = 0  # values computed from the database
    batches: int = 0
    writes: WriteCounts = field(default_factory=WriteCounts)
    unchanged_ratio: float = 1.0  # optimistic until a compared batch says otherwise

    def as_dict(self) -> dict[str, int]:
        return {"keys": self.keys, "batches": self.batches, **self.writes.as_dict()}


@dataclass
class RefreshReport:
    families: dict[str, FamilyReport]
    seconds: float = 0.0
    read_from: dict[str, str] = field(default_factory=dict)
    redis: str = ""

    @property
    def keys(self) -> int:
        return sum(f.keys for f in self.families.values())

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else 0.0

    def metadata(self) -> dict:
        """Flat metadata for Dagster: keys written per family and how long it took."""
        meta: dict = {"seconds": round(self.seconds, 3), "keys": self.keys, "keys_per_s": round(self.keys_per_s, 1),
                      "redis": self.redis}
        for name, fam in self.families.items():
            for k, v in fam.as_dict().items():
                meta[f"{name}_{k}"] = v
        for workload, reason in self.read_from.items():
            meta[f"read_from_{workload}"] = reason
        return meta


class _Writer:
    """Batches one family's values into pipelined writes, deciding per batch whether to compare."""

    def __init__(self, store: CacheStore, fam: c.Family, ttl: int, batch: int, report: FamilyReport,
                 on_batch: Callable[[str, int], None] | None) -> None:
        self.store, self.fam, self.ttl, self.batch, self.report = store, fam, ttl, batch, report
        self.on_batch = on_batch
        self.pending: list[c.Encoded] = []

    def add(self, entity_id: str, value: object, computed_ms: int) -> None:
        self.pending.append(c.encode(self.fam, entity_id, value, computed_ms))
        self.report.keys += 1
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        mean_bytes = sum(len(e.value) for e in entries) / len(entries)
        compare = worth_comparing(mean_bytes, self.report.unchanged_ratio)
        counts = self.store.put_many(entries, self.ttl, compare=compare)
        if compare:
            self.report.unchanged_ratio = counts.unchanged_ratio
        self.report.writes.add(counts)
        self.report.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.fam.name, self.report.batches)


def refresh_cache(
    database: Database,
    client: redis.Redis,
    settings: Settings | None = None,
    *,
    families: Iterable[str] = ALL_FAMILIES,
    as_of: datetime | None = None,
    on_batch: Callable[[str, int], None] | None = None,
    logger: logging.Logger | None = None,
) -> RefreshReport:
    """Recompute every price, portfolio and governance value and write what changed.

    `as_of` moves the latest-price window (tests, replays); values are always stamped
    with the real time their read started. `on_batch(family, n)` is called after each
    written batch. A Redis failure raises CacheUnavailable naming the server and how far
    the refresh got; a database failure propagates as psycopg's error.
    """
    settings = settings or database.settings
    cfg = settings.cache
    logger = logger or log
    chosen = c.families(families)
    store = CacheStore(client)
    report = RefreshReport({f.name: FamilyReport() for f in chosen}, redis=describe(client))
    writers = {f.name: _Writer(store, f, f.ttl(cfg), cfg.pipeline_batch, report.families[f.name], on_batch)
               for f in chosen}
    since = q.window_start(cfg.lookback_days, as_of)
    started = time.perf_counter()
    try:
        if "price" in writers:
            computed_at, report.read_from[PRICE_WORKLOAD] = read_time(database, PRICE_WORKLOAD)
            at = c.epoch_ms(computed_at)
            with database.connection(PRICE_WORKLOAD) as conn:
                prices = q.latest_prices(conn, since)
            for token_id, price in prices.items():
                writers["price"].add(token_id, price, at)
            writers["price"].flush()
        wallet_families = [f for f in c.WALLET_FAMILIES if f in writers]
        if wallet_families:
            _refresh_wallets(database, writers, wallet_families, cfg.pipeline_batch, report.read_from)
    except redis.RedisError as exc:
        done = ", ".join(f"{n}: {f.writes.written + f.writes.unchanged}" for n, f in report.families.items())
        raise CacheUnavailable(
            f"Redis at {report.redis} failed during the cache refresh ({type(exc).__name__}: {exc}); "
            f"keys stored before the failure: {done}. The next refresh rewrites everything that is missing."
        ) from exc
    report.seconds = time.perf_counter() - started
    logger.info("cache refresh: %s keys in %.2fs (%s)", report.keys, report.seconds,
                {n: f.as_dict() for n, f in report.families.items()})
    return report


def _refresh_wallets(database: Database, writers: dict[str, _Writer], wallet_families: Sequence[str],
                     chunk: int, read_from: dict[str, str]) -> None:
    for at, values in _prefetched(_wallet_chunks(database, wallet_families, chunk, read_from)):
        for name, by_wallet in values.items():
            for wallet_id, value in by_wallet.items():
                writers[name].add(wallet_id, value, at)
    for name in wallet_families:
        writers[name].flush()


def _wallet_chunks(database: Database, wallet_families: Sequence[str], chunk: int,
                   read_from: dict[str, str]) -> Iterator[tuple[int, dict[str, dict[str, list]]]]:
    """(computedAt in epoch ms, values by family) per keyset chunk of wallets, each chunk its own routed read."""
    after = None
    while True:
        computed_at, read_from[WALLET_WORKLOAD] = read_time(database, WALLET_WORKLOAD)
        with database.connection(WALLET_WORKLOAD) as conn:
            ids = q.wallet_ids_after(conn, after, chunk)
            if not ids:
                return
            wallets = q.WalletRange(ids[0], ids[-1])  # the whole id range: a wallet added meanwhile is not skipped
            values = {}
            if "portfolio" in wallet_families:
                values["portfolio"] = q.portfolio_summaries(conn, wallets)
            if "governance" in wallet_families:
                values["governance"] = q.governance_locks(conn, wallets)
        yield c.epoch_ms(computed_at), values
        after = ids[-1]


_DONE = object()


def _prefetched(items: Iterator) -> Iterator:
    """`items`, each next one computed in a worker thread while the caller handles the
    current one: the database works on chunk n+1 while this process encodes and writes
    chunk n (psycopg releases the GIL while it waits on the server)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-read") as pool:
        pending = pool.submit(next, items, _DONE)
        while True:
            item = pending.result()
            if item is _DONE:
                return
            pending = pool.submit(next, items, _DONE)
            yield item


def keep_refreshing(
    database: Database, client: redis.Redis, interval_s: float, stop: threading.Event,
    settings: Settings | None = None, logger: logging.Logger | None = None,
    on_refresh: Callable[[RefreshReport | Exception], None] | None = None,
) -> int:
    """Refresh every `interval_s` until `stop` is set; returns how many refreshes ran.

    For a process that keeps the embedded stack up (`demo --keep`): without it the keys
    expire 60-1800 s after the demo's refresh. In a deployment the `redis_cache_automation`
    sensor does this job. A failed refresh is logged and retried at the next interval.
    """
    logger = logger or log
    runs = 0
    while not stop.is_set():
        try:
            outcome: RefreshReport | Exception = refresh_cache(database, client, settings, logger=logger)
        except Exception as exc:  # Redis or the database down: keep trying, like the sensor would
            logger.warning("cache refresh failed: %s", exc)
            outcome = exc
        runs += 1
        if on_refresh is not None:
            on_refresh(outcome)
        stop.wait(interval_s)
    return runs
