"""Pure health logic: thresholds applied to probe figures, deltas of cumulative counters,
breach episodes and the sensor cursor that carries them between ticks. No I/O.

A *finding* is one subject's verdict (a replica, a server). Its *incident* key names what
an alert is about ("health.replication_lag.wedefi_read"). An *episode* is one continuous
breach of an incident: it opens on the first breached evaluation, lasts while evaluations
stay breached, and closes on the first passing one. Each episode gets its own run key,
so a lasting breach requests one check run, not one per tick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from wedefi_pipelines.health.probes import (
    ConnectionCounts,
    IndexIO,
    RunningQuery,
    StatementSnapshot,
    StatementStat,
)
from wedefi_pipelines.replication import ReplicaLag

INCIDENT_PREFIX = "health"

# condition -> (seed alert rule, "Alert".type, default severity)
CONDITIONS: dict[str, tuple[str, str, str]] = {
    "replication_lag": ("ReplicationLag", "replication_lag", "warning"),
    "replica_missing": ("ReplicationLag", "replica_missing", "critical"),
    "slow_query": ("SlowQueryDetected", "slow_query", "warning"),
    "index_hit_ratio": ("IndexScanEfficiency", "index_scan_efficiency", "warning"),
    "connection_count": ("HighConnectionCount", "high_connection_count", "warning"),
}

# What the person paged should do first (docs/health.md has the full runbook).
RUNBOOK: dict[str, str] = {
    "replication_lag": "investigate_replication: reads already skip this replica (routing lag_threshold); look for "
                       "long queries or locks on the replica, its disk and network, and WAL volume on the primary.",
    "replica_missing": "investigate_replication: the replica is down or no longer streaming; check its server and "
                       "its log (primary_conninfo, replication slot, WAL still on the primary), then restart it.",
    "slow_query": "log_and_alert: EXPLAIN (ANALYZE, BUFFERS) the statement named in the evidence; look for a missing "
                  "time bound on a partitioned table, a missing index, or lock waits.",
    "index_hit_ratio": "analyze_missing_indexes: a cold cache after a restart recovers by itself; otherwise find the "
                       "index reads in index_usage_report and consider shared_buffers or a better index.",
    "connection_count": "scale_read_replicas: find the application holding connections in the evidence (idle ones "
                        "first); use a pooler (PgBouncer) or send reads to replicas before max_connections is hit.",
}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(value: str) -> str:
    """A subject as it may appear in run keys, tags and incident keys."""
    return _UNSAFE.sub("_", value).strip("_") or "_"


def condition_of(incident: str) -> str | None:
    """'health.replication_lag.wedefi_read' -> 'replication_lag'."""
    parts = incident.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == INCIDENT_PREFIX and parts[1] in CONDITIONS else None


def incident_key(condition: str, subject: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown health condition {condition!r}; expected one of {sorted(CONDITIONS)}")
    return f"{INCIDENT_PREFIX}.{condition}.{safe_name(subject)}"


@dataclass(frozen=True)
class Finding:
    condition: str
    subject: str
    breached: bool
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    severity: str | None = None  # None: the condition's default

    @property
    def incident(self) -> str:
        return incident_key(self.condition, self.subject)

    @property
    def rule(self) -> str:
        return CONDITIONS[self.condition][0]

    @property
    def alert_type(self) -> str:
        return CONDITIONS[self.condition][1]

    @property
    def alert_severity(self) -> str:
        return self.severity or CONDITIONS[self.condition][2]


@dataclass(frozen=True)
class Evaluation:
    """One probe round: verdicts, subjects that could not be evaluated (their episodes
    neither open nor close), and the figures the next round compares against."""

    findings: tuple[Finding, ...]
    unknown: frozenset[str] = frozenset()  # incident keys
    notes: tuple[str, ...] = ()
    baseline: Mapping[str, Any] = field(default_factory=dict)

    @property
    def breached(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.breached)


def _ms(value: float) -> str:
    return f"{value:,.0f} ms"


def server_label(server: str) -> str:
    """'read_replica' -> 'read replica', for sentences."""
    return server.replace("_", " ")


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
        summary = (f"replica {name} lags {_ms(lag.lag_ms)} ({lag.byte_lag:,} bytes of WAL) behind the primary, "
                   f"over the {_ms(threshold_ms)} threshold" if breached
                   else f"replica {name} {verb} the {_ms(threshold_ms)} threshold ({_ms(lag.lag_ms)}, "
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
        parts.append(f"{len(grown)} statement(s) had an execution over {_ms(threshold_ms)} "
                     f"(slowest {_ms(worst.max_exec_ms)}: {texts.get(worst.queryid, 'queryid ' + str(worst.queryid))[:120]})")
    if running:
        parts.append(f"{len(running)} query(ies) running for over {_ms(threshold_ms)} "
                     f"(longest {_ms(running[0].duration_ms)}, pid {running[0].pid})")
    breached = bool(parts)
    summary = (f"slow queries on the {server_label(server)}: " + "; ".join(parts)) if breached else (
        f"no execution over {_ms(threshold_ms)} on the {server_label(server)}")
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

def connection_finding(server: str, counts: ConnectionCounts, threshold: float) -> Finding:
    breached = counts.total > threshold
    near_limit = counts.total >= 0.9 * counts.available
    evidence = {
        "server": server, "client_backends": counts.total, "threshold": threshold,
        "max_connections": counts.max_connections, "superuser_reserved": counts.superuser_reserved,
        "by_database_state_application": [
            {"database": db, "state": state, "application_name": app, "connections": n}
            for db, state, app, n in counts.breakdown[:20]
        ],
    }
    idle = sum(n for _db, state, _app, n in counts.breakdown if state == "idle")
    summary = (f"{counts.total} client connections on the {server_label(server)} ({idle} idle), over the threshold of "
               f"{threshold:g}; max_connections is {counts.max_connections}")
    if not breached:
        summary = f"{counts.total} client connections on the {server_label(server)} (threshold {threshold:g})"
    return Finding("connection_count", server, breached, summary, evidence,
                   severity="critical" if breached and near_limit else None)


# -- episodes and the sensor cursor ------------------------------------------------------------

@dataclass(frozen=True)
class Episode:
    incident: str
    id: str  # when it opened, compact UTC: part of the run key
    since: str  # ISO 8601
    passing_since: str | None = None  # ISO 8601: the probe passes again, the hold is running

    @property
    def run_key(self) -> str:
        return f"{self.incident}.{self.id}"


@dataclass(frozen=True)
class EpisodeChanges:
    opened: tuple[tuple[Finding, Episode], ...]
    ongoing: tuple[tuple[Finding, Episode], ...]
    closed: tuple[Episode, ...]
    open: Mapping[str, Episode]


def episode_id(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def track_episodes(
    open_episodes: Mapping[str, Episode], evaluation: Evaluation, now: datetime, clear_after_s: float = 0.0
) -> EpisodeChanges:
    """Open an episode per newly breached incident and keep the breached ones. An episode
    whose incident passes (or is no longer evaluated at all) closes once it has passed for
    `clear_after_s`; a breach during that hold continues the same episode. Unknown
    incidents (their server could not be asked) keep their episode as it is."""
    now_iso = now.astimezone(timezone.utc).isoformat()
    opened, ongoing, still_open = [], [], {}
    for finding in evaluation.breached:
        key = finding.incident
        if key in still_open:  # two findings for one incident: the first one speaks
            continue
        episode = open_episodes.get(key)
        if episode is None:
            episode = Episode(key, episode_id(now), now_iso)
            opened.append((finding, episode))
        else:
            episode = Episode(key, episode.id, episode.since)
            ongoing.append((finding, episode))
        still_open[key] = episode
    closed = []
    for key, episode in open_episodes.items():
        if key in still_open:
            continue
        if key in evaluation.unknown:
            still_open[key] = episode
            continue
        passing_since = episode.passing_since or now_iso
        if (now - datetime.fromisoformat(passing_since)).total_seconds() >= clear_after_s:
            closed.append(episode)
        else:
            still_open[key] = Episode(key, episode.id, episode.since, passing_since)
    return EpisodeChanges(tuple(opened), tuple(ongoing), tuple(closed), still_open)


CURSOR_VERSION = 1


@dataclass(frozen=True)
class CursorState:
    episodes: Mapping[str, Episode] = field(default_factory=dict)
    baseline: Mapping[str, Any] = field(default_factory=dict)


def parse_cursor(text: str | None) -> CursorState:
    """The sensor's state; an empty, foreign or older cursor starts afresh (ValueError for a
    cursor that is ours but damaged, so it is not silently dropped)."""
    if not text:
        return CursorState()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"health sensor cursor is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
        return CursorState()
    try:
        episodes = {k: Episode(k, v["id"], v["since"], v.get("passing_since"))
                    for k, v in data.get("episodes", {}).items()}
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"health sensor cursor has a damaged episode: {exc!r}") from None
    baseline = data.get("baseline", {})
    if not isinstance(baseline, dict):
        raise ValueError("health sensor cursor's baseline is not an object")
    return CursorState(episodes, baseline)


def dump_cursor(state: CursorState) -> str:
    return json.dumps(
        {"v": CURSOR_VERSION,
         "episodes": {k: {"id": e.id, "since": e.since, "passing_since": e.passing_since}
                      for k, e in sorted(state.episodes.items())},
         "baseline": state.baseline},
        sort_keys=True, separators=(",", ":"),
    )
