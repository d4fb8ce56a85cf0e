"""`wedefi-pipelines metrics`: the probes, the platform figures and the runs' outcomes as
Prometheus metrics (Dagster OSS exposes none).

Every scrape runs the probes afresh (each under the probes' statement_timeout, so a busy
server costs a scrape at most that long per probe) rather than serving the sensors' last
values: the sensors keep deltas in their cursors, while Prometheus wants the raw
cumulative counters (deadlocks, recovery conflicts, index blocks) to take its own rates,
and a scrape then never reports a value older than itself. `prometheus_rules()` turns the
settings' thresholds into the matching alerting rules (docs/prometheus/wedefi-rules.yml is
its output for the default settings).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wedefi_pipelines.health import maintenance_probes, platform, probes
from wedefi_pipelines.health.monitor import HealthMonitor, one_line
from wedefi_pipelines.health.rules import autovacuum_threshold, pipeline_limit
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)
PREFIX = "wedefi"


class _Families:
    """Metric families created on first use, yielded in creation order."""

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}

    def _get(self, cls, name: str, doc: str, labels: list[str]):
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = cls(f"{PREFIX}_{name}", doc, labels=labels)
        return family

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            self._get(GaugeMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), float(value))

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            self._get(CounterMetricFamily, name, doc, list(labels)).add_metric(list(labels.values()), float(value))


class PlatformCollector(Collector):
    """Collects on every scrape; each source (server, probe, Redis, the Dagster instance)
    that fails is reported as down and the rest is still served."""

    def __init__(self, database, settings: Settings | None = None, redis_client: Any = None,
                 instance_factory: Callable[[], Any] | None = None, repository: Any = None) -> None:
        self.monitor = HealthMonitor(database, settings)
        self.db = database
        self.settings = self.monitor.settings
        self.redis = redis_client
        self.instance_factory = instance_factory
        self.repository = repository

    def describe(self):  # nothing at registration: collect() talks to the servers
        return []

    def collect(self):
        started = time.perf_counter()
        out = _Families()
        for label, server in self.monitor.servers():
            try:
                with self.db.autocommit(server) as conn:
                    out.gauge("up", "1 when the source answered this scrape", {"source": f"postgres_{label}"}, 1)
                    self._server(out, label, conn)
            except psycopg.Error as exc:
                log.warning("metrics: %s unreachable: %s", label, one_line(exc))
                out.gauge("up", "1 when the source answered this scrape", {"source": f"postgres_{label}"}, 0)
        self._redis(out)
        self._dagster(out)
        out.gauge("metrics_collect_seconds", "time this scrape took", {}, time.perf_counter() - started)
        yield from out.families.values()

    # -- PostgreSQL, per server ----------------------------------------------------------------
    @contextmanager
    def _probe(self, out: _Families, name: str, label: str) -> Iterator[None]:
        try:
            yield
            ok = 1
        except (psycopg.Error, probes.ProbeError, ValueError) as exc:
            log.warning("metrics: probe %s on %s failed: %s", name, label, one_line(exc))
            ok = 0
        out.gauge("probe_success", "1 when the probe ran on the server this scrape", {"probe": name, "server": label}, ok)

    def _server(self, out: _Families, label: str, conn: psycopg.Connection) -> None:
        timeout = self.monitor.timeout_ms
        s = {"server": label}
        primary = label == "primary"
        if primary:
            with self._probe(out, "replica_lags", label):
                lags = probes.replica_lags(conn, timeout)
                out.gauge("pg_replicas_streaming", "standbys in the primary's pg_stat_replication", {}, len(lags))
                for name, lag in lags.items():
                    out.gauge("pg_replication_lag_seconds", "replay lag (0 when no WAL is pending)", {"replica": name},
                              lag.lag_ms / 1000.0)
                    out.gauge("pg_replication_lag_bytes", "WAL bytes not yet replayed", {"replica": name}, lag.byte_lag)
        slow_ms = self.settings.alert_threshold("SlowQueryDetected")
        with self._probe(out, "statement_snapshot", label):
            snapshot = probes.statement_snapshot(conn, timeout, min_max_exec_ms=slow_ms)
            out.gauge("pg_slow_statements", "statements whose slowest execution is over SlowQueryDetected", s,
                      len(snapshot.statements))
            out.gauge("pg_slow_statements_max_exec_seconds_sum",
                      "sum of those statements' slowest executions: grows when an execution passes the threshold", s,
                      sum(st.max_exec_ms for st in snapshot.statements.values()) / 1000.0)
        with self._probe(out, "running_queries", label):
            running = probes.running_queries(conn, 0, timeout)
            out.gauge("pg_longest_running_query_seconds", "the longest query running now", s,
                      max((q.duration_ms for q in running), default=0.0) / 1000.0)
        with self._probe(out, "index_io", label):
            io = probes.index_io(conn, timeout)
            out.counter("pg_index_blocks_hit", "index blocks found in shared buffers", s, io.blks_hit)
            out.counter("pg_index_blocks_read", "index blocks read from outside shared buffers", s, io.blks_read)
        with self._probe(out, "connection_counts", label):
            counts = probes.connection_counts(conn, timeout)
            out.gauge("pg_client_connections", "client backends on the server, idle included", s, counts.total)
            out.gauge("pg_max_connections", "max_connections", s, counts.max_connections)
            out.gauge("pg_superuser_reserved_connections", "superuser_reserved_connections", s, counts.superuser_reserved)
        if primary:
            with self._probe(out, "database_age", label):
                age = maintenance_probes.database_age(conn, timeout)
                out.gauge("pg_xid_age", "age(datfrozenxid) of the app database", {"database": age.database}, age.xid_age)
                out.gauge("pg_multixact_age", "mxid_age(datminmxid) of the app database", {"database": age.database},
                          age.multixact_age)
        with self._probe(out, "open_transactions", label):
            own = self.settings.monitoring.pipeline_sessions
            oldest = {"app": 0.0, **{prefix: 0.0 for prefix in own}}
            idle = dict(oldest)
            for tx in maintenance_probes.open_transactions(conn, 0, timeout):
                prefix, _limit = pipeline_limit(tx.application_name, own)
                key = prefix or "app"
                oldest[key] = max(oldest[key], tx.age_ms / 1000.0)
                idle[key] = max(idle[key], (tx.idle_ms or 0.0) / 1000.0)
            for key in oldest:
                out.gauge("pg_oldest_transaction_seconds", "age of the oldest open transaction, by session kind "
                          "(app, or the pipeline's application_name prefix)", {**s, "sessions": key}, oldest[key])
                out.gauge("pg_oldest_idle_in_transaction_seconds", "longest time a session has been idle in "
                          "transaction, by session kind", {**s, "sessions": key}, idle[key])
        with self._probe(out, "replication_slots", label):
            for slot in maintenance_probes.replication_slots(conn, timeout):
                labels = {**s, "slot": slot.name}
                out.gauge("pg_replication_slot_active", "1 while a consumer streams from the slot", labels, slot.active)
                out.gauge("pg_replication_slot_retained_bytes", "WAL the slot retains", labels, slot.retained_bytes)
                if slot.wal_status:
                    out.gauge("pg_replication_slot_wal_status", "1 for the slot's wal_status",
                              {**labels, "wal_status": slot.wal_status}, 1)
        if primary:
            with self._probe(out, "invalid_indexes", label):
                out.gauge("pg_invalid_indexes", "invalid indexes (builds in progress excepted)", {},
                          len(maintenance_probes.invalid_indexes(conn, timeout)))
            with self._probe(out, "dead_tuples", label):
                av, tables = maintenance_probes.dead_tuples(conn, timeout)
                over = [t for t in tables if t.dead_tuples > autovacuum_threshold(t, av)]
                out.gauge("pg_tables_over_autovacuum_threshold", "tables whose dead tuples exceed their autovacuum "
                          "threshold now", {}, len(over))
                for table in over:
                    out.gauge("pg_table_over_autovacuum_threshold", "1 while the table's dead tuples exceed its "
                              "autovacuum threshold", {"table": table.name}, 1)
                    out.gauge("pg_table_dead_tuples", "dead tuples of a table over its threshold", {"table": table.name},
                              table.dead_tuples)
        with self._probe(out, "database_counters", label):
            counters = maintenance_probes.database_counters(conn, timeout)
            out.counter("pg_deadlocks", "deadlocks in the app database", s, counters.deadlocks)
            if not primary:
                for cause, n in sorted(counters.conflicts.items()):
                    out.counter("pg_standby_conflicts", "queries cancelled by recovery conflicts, by cause",
                                {**s, "cause": cause}, n)
        if primary:
            self._platform(out, conn)

    def _platform(self, out: _Families, conn: psycopg.Connection) -> None:
        timeout = self.monitor.timeout_ms
        with self._probe(out, "partitions", "primary"):
            for f in platform.partition_figures(conn, self.settings, timeout_ms=timeout):
                t = {"table": f.table}
                out.gauge("partition_months", "monthly children attached", t, f.months)
                out.gauge("partition_current_month_present", "1 when this month's child exists", t, f.current_month)
                out.gauge("partition_months_ahead", "consecutive months after this one already provisioned", t,
                          f.months_ahead)
                out.gauge("partition_default_rows", "rows waiting in the default partition", t, f.default_rows)
                out.gauge("partition_rows_waiting_completion", "rows in the default partition without their "
                          "partition key yet (complete_positions places them)", t, f.waiting_completion)
                for tier, months in (("warm", f.overdue_warm), ("cold", f.overdue_cold)):
                    out.gauge("tier_overdue_months", "months past their tier still in PostgreSQL (the daily "
                              "schedule should have moved them)", {**t, "tier": tier}, len(months))
        with self._probe(out, "archive", "primary"):
            for f in platform.archive_figures(conn, timeout_ms=timeout):
                t = {"table": f.table}
                for status in ("archived", "restored"):
                    out.gauge("archive_months", "months in the archive metadata, by status", {**t, "status": status},
                              f.months.get(status, 0))
                out.gauge("archive_rows", "rows of the archived months", t, f.rows)
                out.gauge("archive_bytes", "bytes of the archived months' objects", t, f.bytes)
                if f.last_archived_at is not None:
                    out.gauge("archive_last_archived_timestamp_seconds", "when the latest month was archived", t,
                              f.last_archived_at.timestamp())

    # -- Redis ---------------------------------------------------------------------------------
    def _redis(self, out: _Families) -> None:
        if self.redis is None:
            return
        try:
            figures = platform.cache_figures(self.redis, self.settings)
        except Exception as exc:  # redis-py's errors and a refused connection alike: Redis is optional
            log.warning("metrics: Redis unreadable: %s", one_line(exc))
            out.gauge("up", "1 when the source answered this scrape", {"source": "redis"}, 0)
            return
        out.gauge("up", "1 when the source answered this scrape", {"source": "redis"}, 1)
        for f in figures:
            fam = {"family": f.family}
            out.gauge("cache_keys", "keys of the cache family", fam, f.keys)
            out.gauge("cache_oldest_key_age_seconds", "since the oldest value was computed (TTL - PTTL)", fam,
                      f.oldest_age_s)
            out.gauge("cache_unreadable_keys", "keys without an expiry (their age is unknown)", fam, f.unreadable)

    # -- Dagster -------------------------------------------------------------------------------
    def _dagster(self, out: _Families) -> None:
        if self.instance_factory is None or self.repository is None:
            return
        from wedefi_pipelines.health import dagster_state

        try:
            with self.instance_factory() as instance:
                beats, _required = dagster_state.heartbeats(instance)
                found = dagster_state.instigators(instance, self.repository)
                runs = dagster_state.job_runs(instance, self.repository)
        except Exception as exc:  # the instance's storage is another server: report it down, serve the rest
            log.warning("metrics: Dagster instance unreadable: %s", one_line(exc))
            out.gauge("up", "1 when the source answered this scrape", {"source": "dagster"}, 0)
            return
        out.gauge("up", "1 when the source answered this scrape", {"source": "dagster"}, 1)
        now = time.time()
        for beat in beats:
            out.gauge("dagster_daemon_heartbeat_age_seconds", "since the daemon's latest heartbeat",
                      {"daemon": beat.daemon_type}, None if beat.timestamp is None else now - beat.timestamp)
        for item in found:
            labels = {"kind": item.kind, "name": item.name}
            out.gauge("dagster_instigator_running", "1 when the sensor or schedule is on", labels, item.running)
            out.gauge("dagster_instigator_last_tick_timestamp_seconds", "its latest tick", labels, item.last_tick_at)
            out.gauge("dagster_instigator_last_tick_failed", "1 when its latest tick failed", labels,
                      item.last_status == "FAILURE" if item.last_status else None)
        for job in runs:
            for status, n in job.counts.items():
                out.gauge("dagster_runs", "finished runs in the instance (until retention purges them), by outcome",
                          {"job": job.job, "status": status}, n)
            if job.last_status is not None:
                out.gauge("dagster_job_last_run_success", "1 when the job's latest finished run succeeded",
                          {"job": job.job}, job.last_status == "SUCCESS")
                out.gauge("dagster_job_last_run_end_timestamp_seconds", "when the job's latest finished run ended",
                          {"job": job.job}, job.last_end)


# -- the matching Prometheus rules -------------------------------------------------------------

def _for(ms: float) -> str:
    seconds = int(round(ms / 1000.0))
    if seconds % 3600 == 0 and seconds:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _num(value: float) -> str:
    return f"{value:.10g}"


def prometheus_rules(settings: Settings) -> dict:
    """Alerting rules over the metrics above with the thresholds the sensors use (a
    Prometheus `for:` stands in for the durations the sensors keep in their cursors)."""
    t = settings.alert_threshold
    rule = settings.alert_rule
    mon = settings.monitoring
    tolerance = mon.healthcheck_tolerance_s

    def alert(name: str, expr: str, severity: str, summary: str, wedefi_rule: str | None = None, for_: str | None = None,
              **labels: str):
        item = {"alert": name, "expr": expr}
        if for_:
            item["for"] = for_
        item["labels"] = {"severity": severity, **({"wedefi_rule": wedefi_rule} if wedefi_rule else {}), **labels}
        item["annotations"] = {"summary": summary, "runbook": "docs/runbook.md"}
        return item

    pg = [
        alert("WedefiPostgresDown", 'wedefi_up{source=~"postgres_.*"} == 0', "critical",
              "{{ $labels.source }} did not answer the metrics scrape", for_="1m"),
        alert("WedefiReplicationLag", f"wedefi_pg_replication_lag_seconds > {_num(t('ReplicationLag') / 1000)} "
              "and wedefi_pg_replication_lag_bytes > 0", "warning",
              "replica {{ $labels.replica }} lags {{ $value }} s", "ReplicationLag"),
        alert("WedefiSlowQuery", f"wedefi_pg_longest_running_query_seconds > {_num(t('SlowQueryDetected') / 1000)} "
              "or delta(wedefi_pg_slow_statements_max_exec_seconds_sum[2m]) > 0", "warning",
              "a query over {} s on {{{{ $labels.server }}}}".format(_num(t("SlowQueryDetected") / 1000)),
              "SlowQueryDetected"),
        alert("WedefiIndexHitRatio",
              f"100 * rate(wedefi_pg_index_blocks_hit_total[5m]) / (rate(wedefi_pg_index_blocks_hit_total[5m]) + "
              f"rate(wedefi_pg_index_blocks_read_total[5m])) < {_num(t('IndexScanEfficiency'))} and "
              f"(increase(wedefi_pg_index_blocks_hit_total[5m]) + increase(wedefi_pg_index_blocks_read_total[5m])) >= "
              f"{mon.index_hit_min_blocks}", "warning",
              "index hit ratio on {{ $labels.server }} is {{ $value }}%", "IndexScanEfficiency"),
        alert("WedefiHighConnectionCount", f"wedefi_pg_client_connections > {_num(t('HighConnectionCount'))}",
              "warning", "{{ $value }} client connections on {{ $labels.server }}", "HighConnectionCount"),
        alert("WedefiHighConnectionUsage",
              "100 * wedefi_pg_client_connections / (wedefi_pg_max_connections - "
              f"wedefi_pg_superuser_reserved_connections) > {_num(t('HighConnectionUsage'))}", "warning",
              "{{ $value }}% of the connections ordinary roles may open on {{ $labels.server }}", "HighConnectionUsage"),
    ]
    for name, metric, wedefi_rule in (("WedefiTransactionIdWraparound", "wedefi_pg_xid_age", "TransactionIdWraparound"),
                                      ("WedefiMultixactWraparound", "wedefi_pg_multixact_age", "MultixactWraparound")):
        r = rule(wedefi_rule)
        pg.append(alert(name, f"{metric} > {_num(r.threshold)}", "warning",
                        "{{ $labels.database }} is {{ $value }} transactions from its oldest unfrozen row", wedefi_rule))
        if r.critical_threshold is not None:
            pg.append(alert(name + "Critical", f"{metric} > {_num(r.critical_threshold)}", "critical",
                            "{{ $labels.database }} nears wraparound ({{ $value }})", wedefi_rule))
    pg.append(alert("WedefiLongTransaction",
                    f'wedefi_pg_oldest_transaction_seconds{{sessions="app"}} > {_num(t("LongTransaction") / 1000)}',
                    "warning", "a transaction open {{ $value }} s on {{ $labels.server }}", "LongTransaction"))
    pg.append(alert("WedefiIdleInTransaction",
                    f'wedefi_pg_oldest_idle_in_transaction_seconds{{sessions="app"}} > '
                    f'{_num(t("IdleInTransaction") / 1000)}',
                    "warning", "a session idle in transaction {{ $value }} s on {{ $labels.server }}",
                    "IdleInTransaction"))
    for prefix, limit in sorted(mon.pipeline_sessions.items()):
        if limit is not None:
            pg.append(alert("WedefiPipelineLongTransaction",
                            f'wedefi_pg_oldest_transaction_seconds{{sessions="{prefix}"}} > {_num(limit / 1000)}',
                            "warning", f"a {prefix} transaction open {{{{ $value }}}} s on {{{{ $labels.server }}}}",
                            "LongTransaction", sessions=prefix))
    pg += [
        alert("WedefiReplicationSlotRetainedWal",
              f"wedefi_pg_replication_slot_retained_bytes > {_num(t('ReplicationSlotRetainedWal'))}", "warning",
              "slot {{ $labels.slot }} retains {{ $value }} bytes of WAL", "ReplicationSlotRetainedWal"),
        alert("WedefiReplicationSlotInactive", "wedefi_pg_replication_slot_active == 0", "warning",
              "slot {{ $labels.slot }} has no consumer", "ReplicationSlotInactive",
              for_=_for(t("ReplicationSlotInactive"))),
        alert("WedefiReplicationSlotWalLost", 'wedefi_pg_replication_slot_wal_status{wal_status=~"unreserved|lost"} == 1',
              "critical", "slot {{ $labels.slot }}'s WAL is {{ $labels.wal_status }}", "ReplicationSlotRetainedWal"),
        alert("WedefiInvalidIndex", f"wedefi_pg_invalid_indexes > {_num(t('InvalidIndex'))}", "warning",
              "{{ $value }} invalid index(es)", "InvalidIndex"),
        alert("WedefiVacuumBacklog", "wedefi_pg_table_over_autovacuum_threshold == 1", "warning",
              "{{ $labels.table }} stays above its autovacuum threshold", "VacuumBacklog",
              for_=_for(t("VacuumBacklog"))),
        alert("WedefiDeadlocks", f"increase(wedefi_pg_deadlocks_total[1m]) > {_num(t('Deadlocks'))}", "warning",
              "{{ $value }} deadlocks in a minute on {{ $labels.server }}", "Deadlocks"),
        alert("WedefiStandbyConflicts",
              f"sum by (server) (increase(wedefi_pg_standby_conflicts_total[5m])) > {_num(t('StandbyConflicts'))}",
              "warning", "{{ $value }} queries cancelled by replay on {{ $labels.server }}", "StandbyConflicts"),
    ]
    horizon = settings.partitions.horizon_months
    platform_rules = [
        alert("WedefiCurrentMonthMissing", "wedefi_partition_current_month_present == 0", "critical",
              "{{ $labels.table }} has no child for this month: its rows go to the default partition"),
        alert("WedefiHorizonShort", f"wedefi_partition_months_ahead < {max(horizon - 1, 1)}", "warning",
              "{{ $labels.table }} is provisioned {{ $value }} month(s) ahead", for_="1h"),
        alert("WedefiDefaultPartitionRows", "wedefi_partition_default_rows > 0", "warning",
              "{{ $value }} rows wait in {{ $labels.table }}'s default partition", for_="1h"),
        alert("WedefiRedisDown", 'wedefi_up{source="redis"} == 0', "warning", "the cache's Redis did not answer",
              for_="5m"),
        alert("WedefiDaemonHeartbeatStale",
              f"wedefi_dagster_daemon_heartbeat_age_seconds > {30 + tolerance}", "critical",
              "the Dagster daemon's {{ $labels.daemon }} heartbeat is {{ $value }} s old"),
        alert("WedefiJobFailed", "wedefi_dagster_job_last_run_success == 0", "warning",
              "the latest run of {{ $labels.job }} failed"),
    ]
    return {"groups": [{"name": "wedefi-postgres", "rules": pg}, {"name": "wedefi-platform", "rules": platform_rules}]}


def rules_yaml(settings: Settings) -> str:
    import yaml

    header = ("# Prometheus alerting rules for `wedefi-pipelines metrics`, generated from the settings by\n"
              "# `wedefi-pipelines metrics --print-rules` (these are the defaults; regenerate after changing\n"
              "# $WEDEFI_SETTINGS). Thresholds are the health sensors'. Checked by `promtool check rules`.\n")
    return header + yaml.safe_dump(prometheus_rules(settings), sort_keys=False, width=120)
