"""One validated settings object: thresholds, tier ages, routing and source choices.

Defaults live here, in code. A YAML file named by $WEDEFI_SETTINGS overrides any part of
them; it is shaped like the seed's configuration (its `database`/`routing` block and its
`alerts` list with `condition: query_duration > 5000ms`), so the seed's YAML can be
pasted in. A bad value fails when the code location loads, with the key that was wrong.
"""

from __future__ import annotations

import os
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from wedefi_pipelines.settings.base import (SETTINGS_ENV, DurationMs, SettingsError, _Strict,  # noqa: F401
                                            parse_duration_ms)
from wedefi_pipelines.settings.monitoring import *  # noqa: F401,F403 (the alerting settings, importable from here)
from wedefi_pipelines.settings.monitoring import DEFAULT_ALERTS, AlertRule, MonitoringSettings


# -- database and routing (the seed's "Read Replica Architecture") ------------------------

class ServerSettings(_Strict):
    max_connections: int = Field(20, ge=1, le=1000)
    lag_threshold: DurationMs = 50.0  # replicas only: reads move to the primary past this
    connect_timeout_s: float = Field(3.0, gt=0, le=60)


Target = Literal["primary", "read_replicas", "analytics_replica"]
WORKLOADS = ("portfolio_queries", "balance_sync", "alert_processing", "risk_analytics", "user_dashboard")


class DatabaseSettings(_Strict):
    primary: ServerSettings = ServerSettings(max_connections=20)
    read_replica: ServerSettings = ServerSettings(max_connections=30)
    analytics_replica: ServerSettings = ServerSettings(max_connections=30)
    lag_check_interval_s: float = Field(1.0, ge=0, le=60)


class RoutingSettings(_Strict):
    portfolio_queries: Target = "read_replicas"
    balance_sync: Target = "primary"
    alert_processing: Target = "primary"
    risk_analytics: Target = "analytics_replica"
    user_dashboard: Target = "read_replicas"


# -- tiers, partitions, sources, cache -------------------------------------------------------

RANGE_TABLES = ("PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot")


class TierAges(_Strict):
    hot_days: int = Field(30, ge=1)
    cold_days: int = Field(365, ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> "TierAges":
        if self.cold_days <= self.hot_days:
            raise ValueError(f"cold_days ({self.cold_days}) must be greater than hot_days ({self.hot_days})")
        return self


class TierSettings(_Strict):
    PriceSnapshot: TierAges = TierAges()
    PortfolioSnapshot: TierAges = TierAges()
    PositionSnapshot: TierAges = TierAges()
    # The hourly price rollup tiers like its source, later: asset_correlations reads a year
    # of it at 60 minutes, and a chart at 1h resolution over its archived months reads S3.
    # The daily rollups ("PriceRollupDaily", "PortfolioRollupDaily") stay hot.
    PriceRollupHourly: TierAges = TierAges(hot_days=30, cold_days=730)
    # DETACH and the warm rewrite wait at most this long for their lock, then retry (with
    # backoff) up to lock_attempts times, so they never stall the app's queries queued behind.
    lock_timeout_ms: int = Field(1000, ge=10, le=600_000)
    lock_attempts: int = Field(10, ge=1, le=1000)
    # a second warm/archive/restore run of the same month waits this long for the first
    lock_wait_s: float = Field(3600.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _portfolio_and_positions_move_together(self) -> "TierSettings":
        if self.PortfolioSnapshot != self.PositionSnapshot:
            raise ValueError("PortfolioSnapshot and PositionSnapshot archive together: give them the same ages")
        return self

    def for_table(self, table: str) -> TierAges:
        return getattr(self, table)


class ArchiveSettings(_Strict):
    """The cold tier's Parquet files and S3 transfers."""

    zstd_level: int = Field(1, ge=1, le=22)  # measured: level 3 is slower and no smaller on these rows
    # decimals (random low digits): 7.6 B/row at level 9 against 8.0 at level 1, 0.45 s more per million rows
    decimal_zstd_level: int = Field(9, ge=1, le=22)
    # one token's month (8,928 rows at 5-minute ticks) spans one or two groups: 65,536 reads it 2.8x faster
    # than 131,072 for 0.1% more bytes (docs/tiering.md)
    row_group_rows: int = Field(65_536, ge=1024, le=10_000_000)
    export_work_mem_mb: int = Field(64, ge=4, le=8192)  # the export's ORDER BY sort memory
    replica_catchup_s: float = Field(10.0, ge=0, le=600)  # wait for the analytics replica, else export from the primary
    multipart_chunk_mb: int = Field(16, ge=5, le=5120)
    s3_max_attempts: int = Field(5, ge=1, le=20)
    s3_connect_timeout_s: float = Field(5.0, gt=0, le=300)
    s3_read_timeout_s: float = Field(60.0, gt=0, le=3600)
    # the Iceberg namespace of the archive's tables (<namespace>.PriceSnapshot, ...) in the catalog 'wedefi'
    iceberg_namespace: str = Field("wedefi", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class AdoptionSettings(_Strict):
    """`wedefi-pipelines adopt` (docs/adoption.md): how long it may hold the app up, and batch sizes."""

    # every strong lock waits at most this long per attempt (below deadlock_timeout's 1 s),
    # then the transaction rolls back and retries with backoff, up to lock_attempts times
    lock_timeout_ms: int = Field(500, ge=10, le=5000)
    lock_attempts: int = Field(30, ge=1, le=1000)
    # the swap transaction's statements are cut off past this (the app waits behind them)
    swap_statement_timeout_ms: int = Field(800, ge=50, le=10_000)
    # the swap starts only when at most this many logged changes remain to replay under its lock
    swap_max_pending: int = Field(2000, ge=1, le=1_000_000)
    copy_chunk_pages: int = Field(4096, ge=16, le=1_000_000)  # one copy transaction reads this many heap pages
    replay_batch: int = Field(5000, ge=1, le=1_000_000)
    # a second `adopt` waits this long for the running one (or a killed one's session) to end, then refuses
    run_lock_wait_s: float = Field(60.0, ge=0, le=86_400)


class PartitionSettings(_Strict):
    start: date = date(2024, 1, 1)
    horizon_months: int = Field(6, ge=1, le=60)

    @field_validator("start")
    @classmethod
    def _first_of_month(cls, value: date) -> date:
        if value.day != 1:
            raise ValueError(f"must be the first day of a month, got {value.isoformat()}")
        return value


def divides_a_day(minutes: int) -> int:
    """`minutes` if a day is a whole number of such ticks, else a ValueError saying so."""
    if minutes < 1 or 1440 % minutes:
        raise ValueError(f"must divide a day (1, 5, 15, 60, ...), got {minutes}")
    return minutes


class SyntheticSettings(_Strict):
    seed: int = 20240101
    tokens: int = Field(500, ge=2, le=100_000)
    wallets: int = Field(10_000, ge=1, le=10_000_000)
    max_tokens_per_wallet: int = Field(50, ge=1, le=1000)
    tick_minutes: int = Field(15, ge=1, le=1440)

    @field_validator("tick_minutes")
    @classmethod
    def _divides_a_day(cls, value: int) -> int:
        return divides_a_day(value)


class HttpSourceSettings(_Strict):
    base_url: str = "https://api.coingecko.com/api/v3"
    api_key_env: str = "COINGECKO_API_KEY"
    api_key_header: str = "x-cg-demo-api-key"
    batch_size: int = Field(100, ge=1, le=1000)
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_retries: int = Field(5, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0, le=60)
    max_wait_s: float = Field(120.0, ge=0, le=3600)  # a longer Retry-After fails the run instead of stalling it
    source_name: str = Field("coingecko", min_length=1, max_length=32)  # "PriceSnapshot".source


class SourceSettings(_Strict):
    price: Literal["synthetic", "http"] = "synthetic"
    synthetic: SyntheticSettings = SyntheticSettings()
    http: HttpSourceSettings = HttpSourceSettings()


class CacheSettings(_Strict):
    """The seed's Redis TTLs, and how the refresh and the API-side CacheManager behave."""

    price_latest_ttl_s: int = Field(60, ge=1)
    portfolio_ttl_s: int = Field(300, ge=1)
    governance_ttl_s: int = Field(1800, ge=1)
    pipeline_batch: int = Field(1000, ge=1, le=100_000)
    top_holdings: int = Field(20, ge=1, le=500)  # the seed's `take: 20` per wallet
    lookback_days: int = Field(7, ge=1, le=366)  # time bound of "latest" lookups (prices, portfolio ticks)
    socket_timeout_s: float = Field(0.5, gt=0, le=30)
    outage_retry_s: float = Field(1.0, ge=0, le=300)  # an outage short-circuits calls this long between probes
    lock_timeout_s: float = Field(5.0, gt=0, le=300)  # stampede lock: lifetime, and how long followers wait


class IngestionSettings(_Strict):
    """Price loads, portfolio ticks and risk correlations (issue 4)."""

    reject_warn_ratio: float = Field(0.01, ge=0, le=1)  # price_snapshots' check warns past this share rejected
    price_lookback_hours: int = Field(48, ge=1, le=24 * 90)  # "latest price" reads only this recent window
    portfolio_tick_minutes: int = Field(5, ge=1, le=1440)
    correlation_top_k: int = Field(50, ge=2, le=1000)
    correlation_timeframes: tuple[Literal["7d", "30d", "90d", "1y"], ...] = ("7d", "30d")
    correlation_interval_minutes: int = Field(60, ge=1, le=1440)  # returns are sampled on this grid
    # The app's positions written without "capturedAt": how often complete_positions_sensor
    # looks for them, and how many complete_positions moves per transaction.
    complete_positions_interval_s: int = Field(60, ge=5, le=86_400)
    complete_positions_batch: int = Field(5000, ge=1, le=1_000_000)

    @field_validator("portfolio_tick_minutes", "correlation_interval_minutes")
    @classmethod
    def _divides_a_day(cls, value: int) -> int:
        return divides_a_day(value)

    @field_validator("correlation_timeframes")
    @classmethod
    def _some_timeframes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"list one or more distinct timeframes, got {list(value)}")
        return value


class RollupSettings(_Strict):
    """Rollups (issue 16): how far back each refresh looks for days that changed (the
    default partition's days are always looked at, however old), and how many rollup rows
    the rollups_match_raw checks recompute from raw rows."""

    sweep_days: int = Field(35, ge=1, le=3660)
    check_sample_rows: int = Field(50, ge=1, le=10_000)


class Settings(_Strict):
    database: DatabaseSettings = DatabaseSettings()
    routing: RoutingSettings = RoutingSettings()
    alerts: tuple[AlertRule, ...] = DEFAULT_ALERTS
    monitoring: MonitoringSettings = MonitoringSettings()
    tiers: TierSettings = TierSettings()
    archive: ArchiveSettings = ArchiveSettings()
    partitions: PartitionSettings = PartitionSettings()
    sources: SourceSettings = SourceSettings()
    cache: CacheSettings = CacheSettings()
    ingestion: IngestionSettings = IngestionSettings()
    adoption: AdoptionSettings = AdoptionSettings()
    rollups: RollupSettings = RollupSettings()

    @field_validator("alerts")
    @classmethod
    def _complete_alerts(cls, rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        """A YAML list may name some alerts only; the others keep their defaults."""
        names = [r.name for r in rules]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"alert(s) listed twice: {sorted(duplicated)}")
        given = {r.name: r for r in rules}
        return tuple(given.get(d.name, d) for d in DEFAULT_ALERTS)

    def alert_rule(self, name: str) -> AlertRule:
        for rule in self.alerts:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def alert_threshold(self, name: str) -> float:
        return self.alert_rule(name).threshold


def _format_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid settings in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_settings(data: dict[str, Any] | None, source: str = "settings") -> Settings:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"invalid settings in {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_error(source, exc)) from None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Defaults, overridden by the YAML at `path` (or $WEDEFI_SETTINGS when `path` is None)."""
    path = path if path is not None else os.environ.get(SETTINGS_ENV)
    if not path:
        return Settings()
    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"{SETTINGS_ENV}={path}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise SettingsError(f"{SETTINGS_ENV}={path}: not valid YAML: {exc}") from None
    return parse_settings(data, source=str(file))


@lru_cache(maxsize=1)
def current_settings() -> Settings:
    """The process-wide settings, read once when the code location loads."""
    return load_settings()
