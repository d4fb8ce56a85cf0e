"""Invalidation: after balance sync or governance ingestion changes wallets, their keys are
refreshed in the same run, so the API never serves the old value for a full TTL.

Called by the ingestion assets right after their write commits. It reads the new values
from the primary (the workload `balance_sync`: a replica may not have replayed that
commit yet) and writes them through the same guarded path as every writer, so a refresh
running concurrently with a read from before the commit cannot put the old value back.
Keys of wallets that no longer exist are deleted; if the database cannot be read, the
wallets' keys are deleted instead, so the next read goes to the database.

It never fails its caller: with Redis unset or down it logs why and returns a summary
saying it skipped (DESIGN.md section 3: ingestion succeeds without Redis).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Sequence

import psycopg
import redis

from wedefi_pipelines.cache import contract as c
from wedefi_pipelines.cache import queries as q
from wedefi_pipelines.cache.refresh import read_time
from wedefi_pipelines.cache.store import CacheStore, CacheUnavailable, describe
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)

INVALIDATION_WORKLOAD = "balance_sync"


def _client(cache: Any) -> redis.Redis:
    """A redis-py client from the "cache" resource or a client; CacheUnavailable says why not."""
    if cache is None:
        raise CacheUnavailable("no cache configured")
    if isinstance(cache, redis.Redis):
        return cache
    return cache.client()  # CacheResource: names REDIS_URL when unset, the server when down


def invalidate_wallets(
    cache: Any,
    database: Any,
    wallet_ids: Iterable[str],
    families: Sequence[str] = c.WALLET_FAMILIES,
    logger: Any = None,
    settings: Settings | None = None,
) -> dict:
    """Refresh (or delete) the `portfolio:`/`governance:` keys of `wallet_ids`.

    `cache`: the "cache" resource, a redis-py client, or None; `database`: the "database"
    resource or a Database. Returns a summary for the caller's metadata:
    `{"status": "refreshed"|"skipped"|"deleted"|"nothing to do", ...}`.
    """
    logger = logger or log
    chosen = c.families(families)
    if any(f.name not in c.WALLET_FAMILIES for f in chosen):
        raise ValueError(f"invalidation covers the wallet families {c.WALLET_FAMILIES}, got {list(families)}")
    ids = sorted(set(wallet_ids))
    if not ids:
        return {"status": "nothing to do", "wallets": 0}
    try:
        client = _client(cache)
    except CacheUnavailable as exc:
        logger.warning("cache invalidation skipped for %s wallets: %s", len(ids), exc)
        return {"status": "skipped", "wallets": len(ids), "reason": str(exc)}
    db: Database = getattr(database, "db", database)
    cfg = (settings or db.settings).cache
    store = CacheStore(client)
    started = time.perf_counter()
    try:
        try:
            values = _read(db, ids, chosen, cfg)
        except psycopg.Error as exc:
            keys = [f.key(i) for f in chosen for i in ids]
            deleted = store.delete(keys)
            logger.warning("cache invalidation: cannot read the new values (%s); deleted %s keys of %s wallets "
                           "so the next read goes to the database", exc, deleted, len(ids))
            return {"status": "deleted", "wallets": len(ids), "deleted": deleted, "reason": str(exc).strip()}
        summary: dict = {"status": "refreshed", "wallets": len(ids)}
        for fam in chosen:
            at, by_wallet = values[fam.name]
            written = kept = 0
            for start in range(0, len(ids), cfg.pipeline_batch):
                chunk = [i for i in ids[start:start + cfg.pipeline_batch] if i in by_wallet]
                counts = store.put_many([c.encode(fam, i, by_wallet[i], at) for i in chunk], fam.ttl(cfg))
                written, kept = written + counts.written, kept + counts.kept_newer
            gone = [fam.key(i) for i in ids if i not in by_wallet]
            summary[f"{fam.name}_written"] = written
            summary[f"{fam.name}_kept_newer"] = kept
            summary[f"{fam.name}_deleted"] = store.delete(gone)
    except redis.RedisError as exc:
        reason = f"Redis at {describe(client)} failed: {type(exc).__name__}: {exc}"
        logger.warning("cache invalidation skipped for %s wallets: %s", len(ids), reason)
        return {"status": "skipped", "wallets": len(ids), "reason": reason}
    summary["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("cache invalidation: %s", summary)
    return summary


def _read(db: Database, ids: list[str], chosen: Sequence[c.Family], cfg) -> dict[str, tuple[int, dict]]:
    """Each family's new values (and their computedAt, epoch ms), read from the primary after the caller's commit."""
    out: dict[str, tuple[int, dict]] = {}
    for fam in chosen:
        at = c.epoch_ms(read_time(db, INVALIDATION_WORKLOAD)[0])
        by_wallet: dict[str, list] = {}
        with db.connection(INVALIDATION_WORKLOAD) as conn:
            for start in range(0, len(ids), cfg.pipeline_batch):
                chunk = ids[start:start + cfg.pipeline_batch]
                if fam is c.PORTFOLIO:
                    by_wallet.update(q.portfolio_summaries(conn, chunk))
                else:
                    by_wallet.update(q.governance_locks(conn, chunk))
        out[fam.name] = (at, by_wallet)
    return out

