"""One validated settings object: thresholds, tier ages, routing and source choices.

Defaults live here, in code. A YAML file named by $WEDEFI_SETTINGS overrides any part of
them; it is shaped like the seed's configuration (its `database`/`routing` block and its
`alerts` list with `condition: query_duration > 5000ms`), so the seed's YAML can be
pasted in. A bad value fails when the code location loads, with the key that was wrong.
"""

from __future__ import annotations

import os
import re
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

SETTINGS_ENV = "WEDEFI_SETTINGS"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the file and the key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(value: Any) -> float:
    """'50ms', '1s', '5000ms' or a bare number of milliseconds -> milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '50ms', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like '50ms' or '1s', got {value!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2) or "ms"]


DurationMs = Annotated[float, BeforeValidator(parse_duration_ms), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


# -- alerting (the seed's "Automated Performance Alerting" list) ---------------------------

# rule -> (metric, operator, kind): kind "ms" a duration (ms, s, m/min, h), "%" a ratio,
# "bytes" a size (B, kB, MB, GB, TB: powers of 1024, like PostgreSQL's), "" a plain number.
_ALERT_METRICS = {
    "SlowQueryDetected": ("query_duration", ">", "ms"),
    "HighConnectionCount": ("active_connections", ">", ""),
    "IndexScanEfficiency": ("index_hit_ratio", "<", "%"),
    "ReplicationLag": ("replica_lag", ">", "ms"),
    # issue 15: what the trusted monitors alert on beyond the seed's four
    "HighConnectionUsage": ("connection_usage", ">", "%"),
    "TransactionIdWraparound": ("xid_age", ">", ""),
    "MultixactWraparound": ("multixact_age", ">", ""),
    "LongTransaction": ("transaction_age", ">", "ms"),
    "IdleInTransaction": ("idle_in_transaction_age", ">", "ms"),
    "ReplicationSlotRetainedWal": ("retained_wal", ">", "bytes"),
    "ReplicationSlotInactive": ("slot_inactive", ">", "ms"),
    "InvalidIndex": ("invalid_indexes", ">", ""),
    "VacuumBacklog": ("dead_tuples_over_threshold_for", ">", "ms"),
    "Deadlocks": ("deadlocks_per_minute", ">", ""),
    "StandbyConflicts": ("standby_conflicts", ">", ""),
}
AlertName = Literal[
    "SlowQueryDetected", "HighConnectionCount", "IndexScanEfficiency", "ReplicationLag", "HighConnectionUsage",
    "TransactionIdWraparound", "MultixactWraparound", "LongTransaction", "IdleInTransaction",
    "ReplicationSlotRetainedWal", "ReplicationSlotInactive", "InvalidIndex", "VacuumBacklog", "Deadlocks",
    "StandbyConflicts",
]
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|%|B|kB|MB|GB|TB)?\s*$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}
_BYTE_UNITS = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


class AlertRule(_Strict):
    name: AlertName
    condition: str
    action: str = "log_and_alert"
    # An optional second condition on the same metric past which the alert is critical.
    critical: str | None = None

    @model_validator(mode="after")
    def _condition_matches_name(self) -> "AlertRule":
        self.threshold  # parse now so a bad condition fails at load time
        critical = self.critical_threshold
        if critical is not None:
            _metric, op, _unit = _ALERT_METRICS[self.name]
            if (critical <= self.threshold) if op == ">" else (critical >= self.threshold):
                raise ValueError(f"{self.name}: critical ({self.critical}) must be past the condition "
                                 f"({self.condition})")
        return self

    @property
    def threshold(self) -> float:
        return self._parse(self.condition)

    @property
    def critical_threshold(self) -> float | None:
        return None if self.critical is None else self._parse(self.critical)

    def _parse(self, condition: str) -> float:
        metric, op, unit = _ALERT_METRICS[self.name]
        match = _CONDITION.match(condition)
        if not match:
            raise ValueError(f"condition {condition!r} is not '<metric> {op} <number>{unit}'")
        got_metric, got_op, number, got_unit = match.groups()
        if got_metric != metric or got_op != op:
            raise ValueError(f"{self.name} needs a condition on '{metric} {op} ...', got {condition!r}")
        value = float(number)
        if unit == "ms":
            if got_unit not in (*_DURATION_UNITS_MS, None):
                raise ValueError(f"{self.name}: unit must be ms, s, m/min or h, got {got_unit!r}")
            return value * _DURATION_UNITS_MS[got_unit or "ms"]
        if unit == "bytes":
            if got_unit not in (*_BYTE_UNITS, None):
                raise ValueError(f"{self.name}: unit must be B, kB, MB, GB or TB, got {got_unit!r}")
            return value * _BYTE_UNITS[got_unit or "B"]
        if unit == "%":
            if got_unit not in ("%", None):
                raise ValueError(f"{self.name}: unit must be %, got {got_unit!r}")
            if not 0 < value <= 100:
                raise ValueError(f"{self.name}: a ratio must be in (0, 100]%, got {value}")
            return value
        if got_unit is not None:
            raise ValueError(f"{self.name}: takes a plain number, got unit {got_unit!r}")
        return value


DEFAULT_ALERTS = (
    AlertRule(name="SlowQueryDetected", condition="query_duration > 5000ms"),
    AlertRule(name="HighConnectionCount", condition="active_connections > 80", action="scale_read_replicas"),
    AlertRule(name="IndexScanEfficiency", condition="index_hit_ratio < 95%", action="analyze_missing_indexes"),
    AlertRule(name="ReplicationLag", condition="replica_lag > 1000ms", action="investigate_replication"),
    # Defaults below from postgres_exporter's alert mixin and awesome-prometheus-alerts (docs/health.md).
    AlertRule(name="HighConnectionUsage", condition="connection_usage > 80%", action="scale_read_replicas"),
    AlertRule(name="TransactionIdWraparound", condition="xid_age > 1000000000", critical="xid_age > 1500000000",
              action="vacuum_freeze"),
    AlertRule(name="MultixactWraparound", condition="multixact_age > 1000000000",
              critical="multixact_age > 1500000000", action="vacuum_freeze"),
    AlertRule(name="LongTransaction", condition="transaction_age > 5min", action="end_long_transactions"),
    AlertRule(name="IdleInTransaction", condition="idle_in_transaction_age > 1min", action="end_long_transactions"),
    AlertRule(name="ReplicationSlotRetainedWal", condition="retained_wal > 1GB", action="fix_replication_slot"),
    AlertRule(name="ReplicationSlotInactive", condition="slot_inactive > 30min", action="fix_replication_slot"),
    AlertRule(name="InvalidIndex", condition="invalid_indexes > 0", action="rebuild_invalid_index"),
    AlertRule(name="VacuumBacklog", condition="dead_tuples_over_threshold_for > 1h", action="investigate_vacuum"),
    AlertRule(name="Deadlocks", condition="deadlocks_per_minute > 5", action="investigate_locking"),
    AlertRule(name="StandbyConflicts", condition="standby_conflicts > 0", action="investigate_replica_queries"),
)


def _parse_session_limits(value: Any) -> Any:
    """{application_name prefix: duration or null}: durations as for the other settings."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of application_name prefix to a duration (or null), got {value!r}")
    out = {}
    for prefix, limit in value.items():
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"an application_name prefix must be a non-empty string, got {prefix!r}")
        out[prefix] = None if limit is None else parse_duration_ms(limit)
    return out


DEFAULT_PIPELINE_SESSIONS = {
    # every connection of this project: pools ('wedefi-pipelines:primary', the warm rewrite's
    # CLUSTER and VACUUM among them), probes, routing checks
    "wedefi-pipelines": 2 * 3_600_000.0,
    "wedefi-pipelines:archive-export": 6 * 3_600_000.0,  # a cold month's export transaction
    "wedefi-pipelines:adopt": 24 * 3_600_000.0,  # online adoption: CREATE INDEX CONCURRENTLY on whole tables
}


class MonitoringSettings(_Strict):
    """The seed's query report (mean > 100 ms, top 20), separate from the 5,000 ms alert."""

    slow_query_report_mean_ms: DurationMs = 100.0
    slow_query_report_top: int = Field(20, ge=1, le=500)
    statement_timeout_ms: int = Field(2000, ge=100, le=60_000)
    sensor_interval_s: int = Field(30, ge=5, le=3600)
    # Index hit ratio windows with fewer index block accesses than this pass (too small to judge).
    index_hit_min_blocks: int = Field(1000, ge=0)
    # ALERT_WEBHOOK_URL posts: per-attempt connect/read timeout, attempts, first backoff (doubling).
    webhook_timeout_s: float = Field(3.0, gt=0, le=60)
    webhook_attempts: int = Field(3, ge=1, le=10)
    webhook_backoff_s: float = Field(0.5, ge=0, le=60)
    # A breach episode ends (and its alert resolves) once its probe has passed this long:
    # damps flapping, and keeps one-off breaches (a slow query) open long enough to dispatch.
    clear_after_s: int = Field(300, ge=0, le=86_400)
    # The pipeline's own sessions (by application_name prefix, the longest matching wins) are
    # held to these transaction ages instead of LongTransaction/IdleInTransaction; null:
    # never alerted on. A warm rewrite, an archive export or an adoption is long on purpose.
    pipeline_sessions: Annotated[dict[str, float | None], BeforeValidator(_parse_session_limits)] = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_SESSIONS))
    # `wedefi-pipelines healthcheck`: a daemon heartbeat, or a RUNNING sensor's tick, is late
    # once older than its interval plus this.
    healthcheck_tolerance_s: int = Field(300, ge=0, le=86_400)
    # platform_health: a month due for its tier this long (past its end + the tier's age) and
    # still in PostgreSQL is overdue (the daily tiering schedule has had a day and a half).
    platform_overdue_grace_h: float = Field(36.0, ge=0, le=24 * 365)
    platform_interval_s: int = Field(300, ge=5, le=86_400)  # platform_health_sensor reads the whole month catalog


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
