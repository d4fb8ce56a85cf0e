"""The seed's four alerts: replication lag (and missing replicas), slow queries, index hit
ratio, connections (also as a share of max_connections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from wedefi_pipelines.health.probes import ConnectionCounts, IndexIO, RunningQuery, StatementSnapshot, StatementStat
from wedefi_pipelines.health.rules.findings import Finding, ms_text, server_label
from wedefi_pipelines.replication import ReplicaLag


# -- replication ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpectedReplica:
    """A replica behind DATABASE_URL_READ or DATABASE_URL_ANALYTICS, as far as we could name it."""

    server: str  # 'read_replica' | 'analytics_replica' (the settings' names for the servers)
    name: str | None  # its application_name, when it answered (or as last seen)
    error: str | None  # why it could not be asked, if it could not
    address: str  # host:port, for the alert


def replication_findings(
    lags: Mapping[str, ReplicaLag], expected: Iterable[ExpectedReplica], threshold_ms: float
) -> list[Finding]:
    """A lag verdict per streaming replica, and a presence verdict per expected replica."""
    findings: list[Finding] = []
    servers = {}
    for replica in expected:
        present = replica.error is None and replica.name in lags
        label = server_label(replica.server) + (f" {replica.name}" if replica.name else "")
        if present:
            servers[replica.name] = replica.server
            summary = f"the {label} ({replica.address}) streams from the primary"
        elif replica.error is not None:
            summary = f"the {label} at {replica.address} is missing: {replica.error}"
        else:
            summary = (f"the {label} at {replica.address} is missing: it is not in the primary's "
                       "pg_stat_replication (not streaming)")
        findings.append(Finding(
            "replica_missing", replica.server, not present, summary,
            {"server": replica.server, "replica": replica.name, "address": replica.address,
             "error": replica.error, "streaming": present},
        ))
    for name, lag in sorted(lags.items()):
        breached = lag.lag_ms > threshold_ms
        verb = "lags" if breached else "is within"
        summary = (f"replica {name} lags {ms_text(lag.lag_ms)} ({lag.byte_lag:,} bytes of WAL) behind the primary, "
                   f"over the {ms_text(threshold_ms)} threshold" if breached
                   else f"replica {name} {verb} the {ms_text(threshold_ms)} threshold ({ms_text(lag.lag_ms)}, "
                        f"{lag.byte_lag:,} bytes)")
        findings.append(Finding(
            "replication_lag", name, breached, summary,
            {**lag.as_dict(), "server": servers.get(name), "threshold_ms": threshold_ms},
        ))
    return findings


# -- slow queries ----------------------------------------------------------------------------

def statement_baseline(snapshot: StatementSnapshot, threshold_ms: float) -> dict[str, Any]:
    """What the next round needs to see a single execution pass the threshold: the maxima of
    the statements already past it (the others are known to be below it). Compact enough for
    a sensor cursor whatever the number of statements."""
    return {
        "reset": snapshot.stats_reset.isoformat() if snapshot.stats_reset else None,
        "max": {str(q): s.max_exec_ms for q, s in snapshot.statements.items() if s.max_exec_ms > threshold_ms},
    }


def grown_statements(
    snapshot: StatementSnapshot, baseline: Mapping[str, Any] | None, threshold_ms: float
) -> list[tuple[StatementStat, float | None]]:
    """Statements with an execution over the threshold since the baseline (max_exec_time
    grew past it), with their previous maximum; all such statements when there is no
    baseline or the statistics were reset since."""
    current_reset = snapshot.stats_reset.isoformat() if snapshot.stats_reset else None
    valid = baseline is not None and baseline.get("reset") == current_reset
    previous: Mapping[str, float] = (baseline or {}).get("max", {}) if valid else {}
    grown = []
    for queryid, stat in snapshot.statements.items():
        if stat.max_exec_ms <= threshold_ms:
            continue
        before = previous.get(str(queryid))
        if before is None or stat.max_exec_ms > before:
            grown.append((stat, before))
    return sorted(grown, key=lambda item: -item[0].max_exec_ms)


def slow_query_finding(
    server: str,
    grown: list[tuple[StatementStat, float | None]],
    running: list[RunningQuery],
    texts: Mapping[int, str],
    threshold_ms: float,
    limit: int = 10,
) -> Finding:
    statements = [
        {"queryid": str(stat.queryid), "query": texts.get(stat.queryid, "(text unavailable)"),
         "max_exec_ms": round(stat.max_exec_ms, 1),
         "previous_max_ms": None if before is None else round(before, 1),
         "calls": stat.calls, "mean_exec_ms": round(stat.mean_exec_ms, 1)}
        for stat, before in grown[:limit]
    ]
    running_rows = [
        {"pid": q.pid, "duration_ms": round(q.duration_ms, 1), "user": q.user,
         "application_name": q.application_name, "query": q.query}
        for q in running[:limit]
    ]
    parts = []
    if grown:
        worst = grown[0][0]
        parts.append(f"{len(grown)} statement(s) had an execution over {ms_text(threshold_ms)} "
                     f"(slowest {ms_text(worst.max_exec_ms)}: {texts.get(worst.queryid, 'queryid ' + str(worst.queryid))[:120]})")
    if running:
        parts.append(f"{len(running)} query(ies) running for over {ms_text(threshold_ms)} "
                     f"(longest {ms_text(running[0].duration_ms)}, pid {running[0].pid})")
    breached = bool(parts)
    summary = (f"slow queries on the {server_label(server)}: " + "; ".join(parts)) if breached else (
        f"no execution over {ms_text(threshold_ms)} on the {server_label(server)}")
    return Finding("slow_query", server, breached, summary,
                   {"server": server, "threshold_ms": threshold_ms, "statements": statements,
                    "running": running_rows})


def statement_deltas(
    current: StatementSnapshot, previous: StatementSnapshot | None
) -> dict[int, StatementStat]:
    """Each statement's figures since `previous` (all of them after a reset or without one).
    A statement whose calls went down was evicted and re-added: its figures restart."""
    if previous is None or previous.stats_reset != current.stats_reset:
        return dict(current.statements)
    deltas = {}
    for queryid, now in current.statements.items():
        before = previous.statements.get(queryid)
        if before is None or now.calls < before.calls:
            deltas[queryid] = now
        elif now.calls > before.calls:
            deltas[queryid] = StatementStat(
                queryid, now.calls - before.calls, now.total_exec_ms - before.total_exec_ms, now.max_exec_ms,
                now.rows - before.rows, now.shared_blks_hit - before.shared_blks_hit,
                now.shared_blks_read - before.shared_blks_read, now.read_time_ms - before.read_time_ms,
            )
    return deltas


def hit_percent(hit: int, read: int) -> float | None:
    total = hit + read
    return None if total == 0 else 100.0 * hit / total


def slow_statement_report(deltas: Mapping[int, StatementStat], mean_ms: float, top: int) -> list[StatementStat]:
    """The seed's report: statements whose mean execution time over the window exceeds
    `mean_ms`, slowest mean first, at most `top`."""
    slow = [s for s in deltas.values() if s.calls > 0 and s.mean_exec_ms > mean_ms]
    return sorted(slow, key=lambda s: (-s.mean_exec_ms, s.queryid))[:top]


# -- index hit ratio ---------------------------------------------------------------------------

def index_io_baseline(io: IndexIO) -> dict[str, Any]:
    return {"hit": io.blks_hit, "read": io.blks_read, "reset": io.stats_reset.isoformat() if io.stats_reset else None}


def index_hit_finding(
    server: str, io: IndexIO, baseline: Mapping[str, Any] | None, threshold_pct: float, min_blocks: int,
    top_reads: list[Mapping[str, Any]] | None = None,
) -> Finding:
    """The share of index block reads served from shared buffers since the baseline (the
    counters are cumulative since the statistics' reset; a window too small to mean
    anything, under `min_blocks` block accesses, passes)."""
    reset = io.stats_reset.isoformat() if io.stats_reset else None
    usable = (baseline is not None and baseline.get("reset") == reset
              and io.blks_hit >= baseline.get("hit", 0) and io.blks_read >= baseline.get("read", 0))
    hit = io.blks_hit - baseline["hit"] if usable else io.blks_hit
    read = io.blks_read - baseline["read"] if usable else io.blks_read
    ratio = hit_percent(hit, read)
    window = "since the previous evaluation" if usable else "since the statistics were reset"
    evidence = {"server": server, "blks_hit": hit, "blks_read": read,
                "hit_ratio_pct": None if ratio is None else round(ratio, 2),
                "threshold_pct": threshold_pct, "min_blocks": min_blocks, "window": window,
                "top_index_reads": list(top_reads or [])}
    if ratio is None or hit + read < min_blocks:
        return Finding("index_hit_ratio", server, False,
                       f"{hit + read:,} index block accesses on the {server_label(server)} {window}: too few to judge "
                       f"(minimum {min_blocks:,})", evidence)
    breached = ratio < threshold_pct
    summary = (f"index hit ratio on the {server_label(server)} is {ratio:.1f}% {window} ({read:,} of {hit + read:,} index "
               f"blocks read from outside shared buffers), below {threshold_pct:g}%") if breached else (
        f"index hit ratio on the {server_label(server)} is {ratio:.1f}% {window} (threshold {threshold_pct:g}%)")
    return Finding("index_hit_ratio", server, breached, summary, evidence)


def unused_indexes(usage_by_server: Mapping[str, list[Any] | None]) -> list[dict[str, Any]]:
    """One row per index with its scans on every server. An index is unused only when every
    server answered and none ever scanned it, and it enforces no constraint."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for server, usage in usage_by_server.items():
        for ix in usage or ():
            row = rows.setdefault((ix.schema, ix.index), {
                "schema": ix.schema, "table": ix.table, "index": ix.index, "size_bytes": ix.size_bytes,
                "enforces_constraint": ix.enforces_constraint, "scans": {},
            })
            row["scans"][server] = ix.scans
    complete = all(usage is not None for usage in usage_by_server.values())
    for row in rows.values():
        never = all(row["scans"].get(server, 0) == 0 for server in usage_by_server)
        row["never_scanned"] = never and complete
        row["unused"] = row["never_scanned"] and not row["enforces_constraint"]
    return sorted(rows.values(), key=lambda r: (not r["unused"], -r["size_bytes"], r["schema"], r["index"]))


# -- connections --------------------------------------------------------------------------------

def connection_finding(server: str, counts: ConnectionCounts, threshold: float,
                       usage_pct: float | None = None) -> Finding:
    """Client connections against the seed's absolute HighConnectionCount and, when given,
    HighConnectionUsage: a percentage of what ordinary roles may open (max_connections -
    superuser_reserved_connections), the postgres_exporter mixin's measure."""
    over_count = counts.total > threshold
    usage = 100.0 * counts.total / counts.available if counts.available > 0 else 100.0
    over_usage = usage_pct is not None and usage > usage_pct
    breached = over_count or over_usage
    near_limit = counts.total >= 0.9 * counts.available
    evidence = {
        "server": server, "client_backends": counts.total, "threshold": threshold,
        "usage_pct": round(usage, 1), "usage_threshold_pct": usage_pct,
        "max_connections": counts.max_connections, "superuser_reserved": counts.superuser_reserved,
        "by_database_state_application": [
            {"database": db, "state": state, "application_name": app, "connections": n}
            for db, state, app, n in counts.breakdown[:20]
        ],
    }
    idle = sum(n for _db, state, _app, n in counts.breakdown if state == "idle")
    over = []
    if over_count:
        over.append(f"over the threshold of {threshold:g}")
    if over_usage:
        over.append(f"{usage:.0f}% of the {counts.available} available, over {usage_pct:g}%")
    summary = (f"{counts.total} client connections on the {server_label(server)} ({idle} idle), {' and '.join(over)}; "
               f"max_connections is {counts.max_connections}")
    if not breached:
        summary = (f"{counts.total} client connections on the {server_label(server)} (threshold {threshold:g}"
                   + (f", {usage:.0f}% of {counts.available} available, threshold {usage_pct:g}%)" if usage_pct else ")"))
    return Finding("connection_count", server, breached, summary, evidence,
                   severity="critical" if breached and near_limit else None,
                   rule_name="HighConnectionUsage" if over_usage and not over_count else None)
