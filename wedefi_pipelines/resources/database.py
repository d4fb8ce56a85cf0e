"""WeDefiDaily's database: a connection pool per server and the seed's read/write routing.

The seed's routing table (settings.routing) sends portfolio and dashboard reads to the
read replica, balance sync and alert processing to the primary, and risk analytics to
the analytics replica. A replica that is unreachable, not streaming, or lagging past its
`lag_threshold` (50 ms) is skipped for the primary, and the switch is logged (once per
change, not per query). An unset read or analytics URL means the primary serves it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional

import dagster as dg
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import PrivateAttr

from wedefi_pipelines.replication import replica_name, replication_lag
from wedefi_pipelines.settings import WORKLOADS, Settings, current_settings

log = logging.getLogger(__name__)

ENV_PRIMARY = "DATABASE_URL_PRIMARY"
ENV_READ = "DATABASE_URL_READ"
ENV_ANALYTICS = "DATABASE_URL_ANALYTICS"
APPLICATION_NAME = "wedefi-pipelines"

Server = Literal["primary", "read", "analytics"]
_TARGET_SERVER: dict[str, Server] = {
    "primary": "primary",
    "read_replicas": "read",
    "analytics_replica": "analytics",
}


class ConfigurationError(RuntimeError):
    """A required setting or environment variable is missing; the message names it."""


_PRIMARY_HELP = (
    "set it to WeDefiDaily's primary (postgresql://user@host:5432/db), or run "
    "`wedefi-pipelines stack` and use the exports it prints"
)


def require_env(name: str, purpose: str) -> str:
    """The variable's value, or a ConfigurationError naming it and saying what it is for."""
    value = os.environ.get(name)
    if not value:
        raise ConfigurationError(f"{name} is not set: {purpose}")
    return value


@dataclass(frozen=True)
class ReplicaHealth:
    server: Server
    name: str | None
    usable: bool
    lag_ms: float | None
    reason: str


@dataclass(frozen=True)
class Route:
    workload: str
    wanted: Server
    server: Server
    reason: str


class Database:
    """Pools for the primary, read and analytics servers, and workload routing between them.

    Plain Python (no Dagster), so the API-side CacheManager, the CLI, benchmarks and
    tests use the same routing as the assets.
    """

    def __init__(
        self,
        primary_url: str,
        read_url: str | None = None,
        analytics_url: str | None = None,
        settings: Settings | None = None,
        logger: logging.Logger | None = None,
        application_name: str = APPLICATION_NAME,
    ) -> None:
        self.settings = settings or current_settings()
        self.urls: dict[Server, str | None] = {
            "primary": primary_url,
            "read": read_url if read_url and read_url != primary_url else None,
            "analytics": analytics_url if analytics_url and analytics_url != primary_url else None,
        }
        self.log = logger or log
        self.application_name = application_name
        self._pools: dict[Server, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._health: dict[Server, tuple[float, ReplicaHealth]] = {}
        self._last_route: dict[str, Server] = {}

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, settings: Settings | None = None,
        logger: logging.Logger | None = None,
    ) -> "Database":
        """From the configuration contract's variables (os.environ, or a stack's env())."""
        env = os.environ if env is None else env
        primary = env.get(ENV_PRIMARY)
        if not primary:
            raise ConfigurationError(f"{ENV_PRIMARY} is not set: {_PRIMARY_HELP}")
        return cls(primary, env.get(ENV_READ), env.get(ENV_ANALYTICS), settings, logger)

    # -- pools ----------------------------------------------------------------------------
    def _server_settings(self, server: Server):
        db = self.settings.database
        return {"primary": db.primary, "read": db.read_replica, "analytics": db.analytics_replica}[server]

    def pool(self, server: Server) -> ConnectionPool:
        url = self.urls[server] if server != "primary" else self.urls["primary"]
        if url is None:
            server, url = "primary", self.urls["primary"]
        with self._lock:
            pool = self._pools.get(server)
            if pool is None:
                cfg = self._server_settings(server)
                pool = ConnectionPool(
                    url,
                    min_size=0,
                    max_size=cfg.max_connections,
                    kwargs={
                        "application_name": f"{self.application_name}:{server}",
                        "connect_timeout": max(1, int(cfg.connect_timeout_s)),
                    },
                    check=ConnectionPool.check_connection,
                    timeout=cfg.connect_timeout_s + 2,
                    name=f"wedefi-{server}",
                    open=False,
                )
                pool.open(wait=False)
                self._pools[server] = pool
            return pool

    @contextmanager
    def connect(self, server: Server = "primary") -> Iterator[psycopg.Connection]:
        """A pooled connection to one server, inside a transaction: committed on success."""
        pool = self.pool(server)
        with _transaction(pool, pool.getconn()) as conn:
            yield conn

    @contextmanager
    def autocommit(self, server: Server = "primary") -> Iterator[psycopg.Connection]:
        """A dedicated autocommit connection, for what cannot run in a transaction block
        (VACUUM, DETACH ... CONCURRENTLY, session advisory locks held across transactions)."""
        url = self.urls[server] or self.urls["primary"]
        cfg = self._server_settings(server)
        with psycopg.connect(
            url, autocommit=True, connect_timeout=max(1, int(cfg.connect_timeout_s)),
            application_name=f"{self.application_name}:{server}",
        ) as conn:
            yield conn

    def connect_caught_up(self, server: Server, timeout_s: float, application_name: str
                          ) -> tuple[psycopg.Connection, str, str]:
        """A dedicated autocommit connection to the `server` replica once it has replayed
        everything the primary has written so far, waiting up to `timeout_s`; else (no such
        replica, unreachable, or still behind) to the primary. Returns (connection, its
        URL, 'primary' or '<server> replica'): whoever reads what a just-committed
        transaction froze (the archive export) sees exactly that state."""
        primary_url = self.urls["primary"]
        url = self.urls.get(server)
        if server != "primary" and url:
            with psycopg.connect(primary_url, autocommit=True) as primary:
                lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            try:
                replica = psycopg.connect(url, autocommit=True, connect_timeout=5, application_name=application_name)
            except psycopg.OperationalError as exc:
                self.log.warning("%s replica unreachable (%s): using the primary", server, exc)
            else:
                deadline = time.monotonic() + timeout_s
                while not replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                    if time.monotonic() > deadline:
                        self.log.warning("%s replica has not replayed %s within %.0fs: using the primary",
                                         server, lsn, timeout_s)
                        replica.close()
                        break
                    time.sleep(0.05)
                else:
                    return replica, url, f"{server} replica"
        return psycopg.connect(primary_url, autocommit=True, application_name=application_name), primary_url, "primary"

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- routing --------------------------------------------------------------------------
    def replica_health(self, server: Server, max_age_s: float | None = None) -> ReplicaHealth:
        """Is this replica reachable, streaming and within its lag threshold? Cached briefly."""
        if server == "primary" or self.urls[server] is None:
            return ReplicaHealth(server, None, False, None, f"no {server} replica configured")
        max_age_s = self.settings.database.lag_check_interval_s if max_age_s is None else max_age_s
        cached = self._health.get(server)
        now = time.monotonic()
        if cached and now - cached[0] < max_age_s:
            return cached[1]
        health = self._probe_replica(server)
        self._health[server] = (now, health)
        return health

    def _probe_replica(self, server: Server) -> ReplicaHealth:
        cfg = self._server_settings(server)
        threshold = cfg.lag_threshold
        try:
            with psycopg.connect(
                self.urls[server], connect_timeout=max(1, int(cfg.connect_timeout_s)), autocommit=True,
                application_name=f"{self.application_name}:probe",
            ) as replica:
                replica.execute("SET statement_timeout = 2000")
                name = replica_name(replica)
        except (psycopg.Error, ValueError) as exc:
            return ReplicaHealth(server, None, False, None, f"{server} replica unusable: {exc}".strip())
        try:
            with self.connect("primary") as primary:
                primary.execute("SET LOCAL statement_timeout = 2000")
                lag = replication_lag(primary).get(name)
        except (psycopg.Error, PoolTimeout) as exc:
            return ReplicaHealth(server, name, False, None, f"cannot read pg_stat_replication on the primary: {exc}")
        if lag is None:
            return ReplicaHealth(server, name, False, None, f"replica {name} is not streaming from the primary")
        if lag.lag_ms > threshold:
            return ReplicaHealth(
                server, name, False, lag.lag_ms,
                f"replica {name} lags {lag.lag_ms:.0f} ms ({lag.byte_lag} bytes) > {threshold:.0f} ms",
            )
        return ReplicaHealth(server, name, True, lag.lag_ms, f"replica {name} lags {lag.lag_ms:.0f} ms")

    def route(self, workload: str) -> Route:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
        wanted = _TARGET_SERVER[getattr(self.settings.routing, workload)]
        if wanted == "primary":
            return Route(workload, wanted, "primary", "routed to the primary")
        if self.urls[wanted] is None:
            return Route(workload, wanted, "primary", f"{wanted} URL not set: primary serves it")
        health = self.replica_health(wanted)
        server: Server = wanted if health.usable else "primary"
        route = Route(workload, wanted, server, health.reason)
        if self._last_route.get(workload) != server:
            if server == "primary":
                self.log.warning("%s: %s; served by the primary", workload, health.reason)
            elif workload in self._last_route:
                self.log.info("%s: back on the %s replica (%s)", workload, wanted, health.reason)
            self._last_route[workload] = server
        return route

    @contextmanager
    def connection(self, workload: str) -> Iterator[psycopg.Connection]:
        """A connection for a workload of the seed's routing table, falling back to the primary."""
        route = self.route(workload)
        pool = self.pool(route.server)
        try:
            conn = pool.getconn()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if route.server == "primary":
                raise
            reason = f"{route.server} replica unreachable ({exc})"
            self._health[route.server] = (time.monotonic(), ReplicaHealth(route.server, None, False, None, reason))
            self.log.warning("%s: %s; served by the primary", workload, reason)
            self._last_route[workload] = "primary"
            pool = self.pool("primary")
            conn = pool.getconn()
        with _transaction(pool, conn) as conn:
            yield conn


@contextmanager
def _transaction(pool: ConnectionPool, conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """The pooled connection inside a transaction (committed on success), then back to its pool."""
    try:
        with conn.transaction():
            yield conn
    finally:
        pool.putconn(conn)


class DatabaseResource(dg.ConfigurableResource):
    """WeDefiDaily's PostgreSQL, with the seed's read/write routing.

    URLs left unset come from the environment when a run starts: DATABASE_URL_PRIMARY
    (required), DATABASE_URL_READ and DATABASE_URL_ANALYTICS (fall back to the primary).
    `defs` therefore loads anywhere; a run that needs the database fails at its start
    naming the missing variable.
    """

    primary_url: Optional[str] = None
    read_url: Optional[str] = None
    analytics_url: Optional[str] = None

    _db: Optional[Database] = PrivateAttr(default=None)
    _logger: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._db = None
        self._logger = context.log if context.log is not None else log

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> Database:
        """The pools, created on first use so a run that never touches a server never connects."""
        if self._db is None:
            env = dict(os.environ)
            for key, value in ((ENV_PRIMARY, self.primary_url), (ENV_READ, self.read_url),
                               (ENV_ANALYTICS, self.analytics_url)):
                if value:
                    env[key] = value
            self._db = Database.from_env(env, logger=self._logger or log)
        return self._db

