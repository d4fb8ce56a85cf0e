"""The seed's two monitoring reports, per server: slow statements and index usage.

`slow_query_report`: statements whose mean execution time over the window exceeds
monitoring.slow_query_report_mean_ms (100 ms), the slowest `slow_query_report_top` (20)
first, with normalized text, calls, rows, hit percent and block read time. The window
runs from the previous materialized report (its figures are kept in
wedefi_health_statement_baseline under its run id) to now; with no previous report, or
after a pg_stat_statements reset, from the statistics' reset.

`index_usage_report`: every index with its scans on each server, its size, whether it
enforces a constraint, and each server's index hit ratio since its statistics began. An
index is called unused only if no server ever scanned it (and every server answered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from wedefi_pipelines.health import probes, rules
from wedefi_pipelines.health.monitor import HealthMonitor, one_line
from wedefi_pipelines.health.probes import StatementSnapshot, StatementStat

BASELINE_TABLE = "wedefi_health_statement_baseline"


def load_statement_baselines(conn: psycopg.Connection, run_id: str | None) -> dict[str, StatementSnapshot]:
    """The figures the report of `run_id` saw, per server."""
    if not run_id:
        return {}
    snapshots: dict[str, StatementSnapshot] = {}
    for server, reset, *figures in conn.execute(
        """SELECT server, stats_reset, queryid, calls, total_exec_ms, max_exec_ms, rows,
                  shared_blks_hit, shared_blks_read, read_time_ms
             FROM wedefi_health_statement_baseline WHERE run_id = %s""",
        (run_id,),
    ):
        snapshot = snapshots.setdefault(server, StatementSnapshot(reset, {}))
        snapshot.statements[figures[0]] = StatementStat(*figures)
    return snapshots


def save_statement_baseline(
    conn: psycopg.Connection, run_id: str, server: str, snapshot: StatementSnapshot
) -> None:
    conn.execute("DELETE FROM wedefi_health_statement_baseline WHERE run_id = %s AND server = %s", (run_id, server))
    with conn.cursor().copy(
        """COPY wedefi_health_statement_baseline (run_id, server, queryid, calls, total_exec_ms, max_exec_ms, rows,
                  shared_blks_hit, shared_blks_read, read_time_ms, stats_reset) FROM STDIN"""
    ) as copy:
        for s in snapshot.statements.values():
            copy.write_row((run_id, server, s.queryid, s.calls, s.total_exec_ms, s.max_exec_ms, s.rows,
                            s.shared_blks_hit, s.shared_blks_read, s.read_time_ms, snapshot.stats_reset))


def prune_statement_baselines(conn: psycopg.Connection, keep_run_ids: list[str]) -> int:
    return conn.execute(
        "DELETE FROM wedefi_health_statement_baseline WHERE NOT (run_id = ANY(%s))", (keep_run_ids,)
    ).rowcount


@dataclass
class SlowQueryReport:
    rows: list[dict[str, Any]] = field(default_factory=list)  # every server's slow statements
    windows: dict[str, str] = field(default_factory=dict)  # server -> what the window is
    statements_seen: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "the cluster's start"


def slow_query_report(monitor: HealthMonitor, run_id: str, previous_run_id: str | None) -> SlowQueryReport:
    """Build the report for every server and keep this run's figures for the next one."""
    mon = monitor.settings.monitoring
    timeout = monitor.timeout_ms
    report = SlowQueryReport()
    with monitor.db.connect("primary") as primary:
        previous = load_statement_baselines(primary, previous_run_id)
    snapshots = {}
    for label, server in monitor.servers():
        try:
            with monitor.db.autocommit(server) as conn:
                snapshot = probes.statement_snapshot(conn, timeout, with_read_time=True)
                before = previous.get(label)
                deltas = rules.statement_deltas(snapshot, before)
                slow = rules.slow_statement_report(deltas, mon.slow_query_report_mean_ms, mon.slow_query_report_top)
                texts = probes.statement_texts(conn, [s.queryid for s in slow], timeout)
        except psycopg.OperationalError as exc:
            if server == "primary":
                raise
            report.notes.append(f"{label} not reported: {one_line(exc)}")
            continue
        snapshots[label] = snapshot
        if before is not None and before.stats_reset == snapshot.stats_reset:
            report.windows[label] = f"since report run {previous_run_id}"
        else:
            report.windows[label] = f"since pg_stat_statements was reset ({_when(snapshot.stats_reset)})"
        report.statements_seen[label] = len(deltas)
        for s in slow:
            report.rows.append({
                "server": label, "queryid": str(s.queryid), "query": texts.get(s.queryid, "")[:500],
                "calls": s.calls, "mean_exec_ms": round(s.mean_exec_ms, 2), "total_exec_ms": round(s.total_exec_ms, 1),
                "max_exec_ms": round(s.max_exec_ms, 1), "rows": s.rows,
                "hit_percent": _round(rules.hit_percent(s.shared_blks_hit, s.shared_blks_read)),
                "read_time_ms": round(s.read_time_ms, 1),
            })
    with monitor.db.connect("primary") as primary:
        for label, snapshot in snapshots.items():
            save_statement_baseline(primary, run_id, label, snapshot)
        prune_statement_baselines(primary, [r for r in (previous_run_id, run_id) if r])
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass
class IndexUsageReport:
    indexes: list[dict[str, Any]] = field(default_factory=list)
    hit_ratio_pct: dict[str, float | None] = field(default_factory=dict)  # per server, since stats began
    stats_since: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def unused(self) -> list[dict[str, Any]]:
        return [row for row in self.indexes if row["unused"]]


def index_usage_report(monitor: HealthMonitor) -> IndexUsageReport:
    report = IndexUsageReport()
    usage_by_server: dict[str, list[probes.IndexUsage] | None] = {}
    for label, server in monitor.servers():
        try:
            with monitor.db.autocommit(server) as conn:
                usage = probes.index_usage(conn, monitor.timeout_ms)
                since = probes.stats_since(conn, monitor.timeout_ms)
        except psycopg.OperationalError as exc:
            if server == "primary":
                raise
            usage_by_server[label] = None
            report.notes.append(f"{label} not reported (so no index is called unused): {one_line(exc)}")
            continue
        usage_by_server[label] = usage
        report.stats_since[label] = _when(since)
        report.hit_ratio_pct[label] = _round(rules.hit_percent(sum(i.blks_hit for i in usage),
                                                               sum(i.blks_read for i in usage)))
    report.indexes = rules.unused_indexes(usage_by_server)
    return report
