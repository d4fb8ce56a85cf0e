"""Redis for the cache: a plain client factory (API side, CLI, benchmarks) and the Dagster
resource "cache".

Redis is required by the cache assets only. `CacheResource.client()` fails naming
REDIS_URL when it is unset, or naming the server when it does not answer; ingestion
passes the resource to `invalidate_wallets`, which turns that failure into a logged
skip, so a balance sync still succeeds with Redis down (DESIGN.md section 3).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import dagster as dg
import redis
from pydantic import PrivateAttr
from redis.backoff import NoBackoff
from redis.retry import Retry

from wedefi_pipelines.cache.store import CacheUnavailable, describe
from wedefi_pipelines.settings import Settings, current_settings

log = logging.getLogger(__name__)

ENV_REDIS = "REDIS_URL"
_REDIS_HELP = "set it to the cache's Redis (redis://host:6379/0), or run `wedefi-pipelines stack` and use its exports"


def redis_client(url: str, settings: Settings | None = None) -> redis.Redis:
    """A pooled client that fails fast: short socket timeouts and a single immediate retry
    (redis-py's default of 10 retries with backoff would stall every call while Redis is
    down; one retry still absorbs the stale pooled connection left by a Redis restart)."""
    timeout = (settings or current_settings()).cache.socket_timeout_s
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1), health_check_interval=30,
    )


def connect_redis(url: str | None, settings: Settings | None = None) -> redis.Redis:
    """A client that answered PING, or CacheUnavailable naming REDIS_URL or the server."""
    if not url:
        raise CacheUnavailable(f"{ENV_REDIS} is not set: {_REDIS_HELP}")
    client = redis_client(url, settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise CacheUnavailable(f"Redis at {describe(client)} ({ENV_REDIS}) does not answer: {exc}") from exc
    return client


def optional_redis(env: Mapping[str, str] | None = None, settings: Settings | None = None,
                   logger: Any = None) -> redis.Redis | None:
    """A connected client, or None (logged with the reason) when REDIS_URL is unset or Redis is down."""
    env = os.environ if env is None else env
    try:
        return connect_redis(env.get(ENV_REDIS), settings)
    except CacheUnavailable as exc:
        (logger or log).warning("cache disabled: %s", exc)
        return None


class CacheResource(dg.ConfigurableResource):
    """The cache's Redis (resource key "cache").

    `redis_url` left unset is read from REDIS_URL when a step first asks for the client,
    so `defs` loads anywhere; the client is created once per step and closed after it.
    """

    redis_url: Optional[str] = None

    _client: Optional[redis.Redis] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._client = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def url(self) -> str | None:
        return self.redis_url or os.environ.get(ENV_REDIS)

    def client(self) -> redis.Redis:
        """The Redis client, or CacheUnavailable naming REDIS_URL / the server: for the cache assets."""
        if self._client is None:
            self._client = connect_redis(self.url)
        return self._client
