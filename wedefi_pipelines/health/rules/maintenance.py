"""What takes PostgreSQL down in practice (issue 15): transaction ID and multixact
wraparound, long and idle-in-transaction sessions, replication slots, invalid indexes,
vacuum backlog, deadlocks and standby conflicts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

from wedefi_pipelines.health.maintenance_probes import (AutovacuumSettings, DatabaseAge, DatabaseCounters, InvalidIndex,
                                                       OpenTransaction, ReplicationSlot, TableDeadTuples)
from wedefi_pipelines.health.rules.findings import Finding, duration_text, count_text, bytes_text, server_label


# -- wraparound (issue 15) ---------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    warning: float
    critical: float | None = None


def wraparound_findings(server: str, age: DatabaseAge, xid: Threshold, multixact: Threshold) -> list[Finding]:
    """The database's transaction ID and multixact age against their warning and critical
    thresholds (wraparound stops the server 3 million short of 2,147,483,647)."""
    findings = []
    for condition, value, threshold, what in (("xid_wraparound", age.xid_age, xid, "transaction ID"),
                                              ("multixact_wraparound", age.multixact_age, multixact, "multixact")):
        breached = value > threshold.warning
        critical = threshold.critical is not None and value > threshold.critical
        left = 2_147_483_647 - value
        summary = (f"database {age.database}'s oldest {what} is {count_text(value)} old, over the "
                   f"{count_text(threshold.critical if critical else threshold.warning)} threshold "
                   f"({count_text(left)} left before wraparound)") if breached else (
            f"database {age.database}'s {what} age is {count_text(value)} (threshold {count_text(threshold.warning)})")
        evidence = {"server": server, "database": age.database, "age": value, "threshold": threshold.warning,
                    "critical_threshold": threshold.critical, "until_wraparound": left,
                    "oldest_tables": [{"table": t, "xid_age": x, "multixact_age": m} for t, x, m in age.oldest_tables]}
        findings.append(Finding(condition, server, breached, summary, evidence,
                                severity="critical" if critical else None))
    return findings


# -- long and idle transactions ---------------------------------------------------------------

def pipeline_limit(application_name: str | None, limits: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    """(matched prefix, its limit in ms) for one of the pipeline's own sessions, by the longest
    application_name prefix in `limits`; (None, None) for anyone else's session. A limit of
    None means the session is never alerted on."""
    app = application_name or ""
    matches = [prefix for prefix in limits if app.startswith(prefix)]
    if not matches:
        return None, None
    prefix = max(matches, key=len)
    return prefix, limits[prefix]


def transaction_findings(
    server: str, transactions: Iterable[OpenTransaction], long_ms: float, idle_ms: float,
    pipeline_limits: Mapping[str, float | None], limit: int = 10,
) -> list[Finding]:
    """A long-transaction and an idle-in-transaction verdict for one server. The app's
    sessions are held to LongTransaction (transaction age) and IdleInTransaction (time idle
    inside it); the pipeline's own sessions (application_name prefix) to their own limit on
    transaction age only, or not at all."""
    long_rows, idle_rows, pipeline_rows = [], [], []
    for tx in transactions:
        prefix, own = pipeline_limit(tx.application_name, pipeline_limits)
        if prefix is not None:
            if own is not None and tx.age_ms > own:
                long_rows.append({**tx.as_dict(), "limit_ms": own, "pipeline_session": prefix})
            else:
                pipeline_rows.append({**tx.as_dict(), "limit_ms": own, "pipeline_session": prefix})
            continue
        if tx.age_ms > long_ms:
            long_rows.append({**tx.as_dict(), "limit_ms": long_ms, "pipeline_session": None})
        if tx.idle_ms is not None and tx.idle_ms > idle_ms:
            idle_rows.append({**tx.as_dict(), "limit_ms": idle_ms, "pipeline_session": None})
    label = server_label(server)

    def describe(row: Mapping[str, Any], age_key: str) -> str:
        return (f"pid {row['pid']} ({row['user']}, {row['application_name'] or 'no application_name'}, started "
                f"{row['xact_start'][:19]}) for {duration_text(row[age_key])}")

    if long_rows:
        worst = max(long_rows, key=lambda r: r["age_ms"])
        long_summary = (f"{len(long_rows)} transaction(s) open too long on the {label}: oldest {describe(worst, 'age_ms')}"
                        f", over its {duration_text(worst['limit_ms'])} limit")
    else:
        long_summary = f"no transaction open over {duration_text(long_ms)} on the {label}"
    if idle_rows:
        worst = max(idle_rows, key=lambda r: r["idle_ms"])
        idle_summary = (f"{len(idle_rows)} session(s) idle in transaction on the {label}: longest "
                        f"{describe(worst, 'idle_ms')}, over {duration_text(idle_ms)}")
    else:
        idle_summary = f"no session idle in transaction over {duration_text(idle_ms)} on the {label}"
    base = {"server": server, "pipeline_sessions_within_limits": pipeline_rows[:limit]}
    return [
        Finding("long_transaction", server, bool(long_rows), long_summary,
                {**base, "threshold_ms": long_ms, "oldest_age_ms": max((r["age_ms"] for r in long_rows), default=None),
                 "transactions": sorted(long_rows, key=lambda r: -r["age_ms"])[:limit]}),
        Finding("idle_in_transaction", server, bool(idle_rows), idle_summary,
                {**base, "threshold_ms": idle_ms, "oldest_idle_ms": max((r["idle_ms"] for r in idle_rows), default=None),
                 "transactions": sorted(idle_rows, key=lambda r: -r["idle_ms"])[:limit]}),
    ]


# -- replication slots ------------------------------------------------------------------------

def slot_findings(
    server: str, slots: list[ReplicationSlot], previous: Mapping[str, Any] | None, now: datetime,
    retained_threshold: float, inactive_ms: float,
) -> tuple[list[Finding], dict[str, Any]]:
    """One verdict per slot: breached when it retains more WAL than ReplicationSlotRetainedWal,
    has been inactive longer than ReplicationSlotInactive (inactive_since on PostgreSQL 17+,
    else since the first evaluation that saw it inactive, kept in the baseline), or its
    WAL is 'unreserved' or 'lost' (critical: it will break, or has broken, its consumer).
    Also a 'no slots' verdict per server that has none."""
    seen = dict((previous or {}).get("inactive", {}))
    inactive_seen: dict[str, str] = {}
    findings = []
    label = server_label(server)
    for slot in slots:
        since = slot.inactive_since
        if not slot.active and since is None:
            since = datetime.fromisoformat(seen.get(slot.name, now.isoformat()))
        if not slot.active and since is not None:
            inactive_seen[slot.name] = since.isoformat()
        inactive_for_ms = (now - since).total_seconds() * 1000.0 if (not slot.active and since) else 0.0
        reasons, rule = [], None
        if slot.wal_status in ("unreserved", "lost"):
            reasons.append(f"its WAL is {slot.wal_status}" + (" (the consumer can no longer catch up)"
                                                              if slot.wal_status == "lost" else
                                                              " (removed at the next checkpoint)"))
        if slot.retained_bytes is not None and slot.retained_bytes > retained_threshold:
            reasons.append(f"it retains {bytes_text(slot.retained_bytes)} of WAL, over {bytes_text(retained_threshold)}")
            rule = rule or "ReplicationSlotRetainedWal"
        if not slot.active and inactive_for_ms > inactive_ms:
            reasons.append(f"it has had no consumer for {duration_text(inactive_for_ms)}, over {duration_text(inactive_ms)}")
            rule = rule or "ReplicationSlotInactive"
        breached = bool(reasons)
        state = "active" if slot.active else "inactive"
        summary = (f"replication slot {slot.name} on the {label}: " + "; ".join(reasons)) if breached else (
            f"replication slot {slot.name} on the {label} is {state}, retains {bytes_text(slot.retained_bytes)}"
            f" (wal_status {slot.wal_status})")
        evidence = {"server": server, **slot.as_dict(), "inactive_for_ms": round(inactive_for_ms, 1),
                    "retained_threshold_bytes": retained_threshold, "inactive_threshold_ms": inactive_ms}
        findings.append(Finding("replication_slot", f"{server}.{slot.name}", breached, summary, evidence,
                                severity="critical" if slot.wal_status in ("unreserved", "lost") else None,
                                rule_name=rule))
    names = [slot.name for slot in slots]
    if not findings:
        findings.append(Finding("replication_slot", server, False, f"no replication slot on the {label}",
                                {"server": server}))
    return findings, {"inactive": inactive_seen, "slots": names}


# -- invalid indexes --------------------------------------------------------------------------

def invalid_index_finding(server: str, indexes: list[InvalidIndex], threshold: float) -> Finding:
    breached = len(indexes) > threshold
    names = ", ".join(ix.as_dict()["index"] for ix in indexes[:5]) + (" ..." if len(indexes) > 5 else "")
    summary = (f"{len(indexes)} invalid index(es) on the {server_label(server)}: {names} (an interrupted "
               f"CREATE INDEX CONCURRENTLY?)") if breached else (
        f"{len(indexes)} invalid index(es) on the {server_label(server)} (threshold {threshold:g})")
    return Finding("invalid_index", server, breached, summary,
                   {"server": server, "invalid_indexes": len(indexes), "threshold": threshold,
                    "indexes": [ix.as_dict() for ix in indexes[:20]]})


# -- vacuum -----------------------------------------------------------------------------------

def _reloption(options: Iterable[str], name: str) -> str | None:
    for option in options:
        key, _, value = option.partition("=")
        if key == name:
            return value
    return None


def autovacuum_threshold(table: TableDeadTuples, av: AutovacuumSettings) -> float:
    """Dead tuples past which autovacuum vacuums the table, as PostgreSQL computes it (the
    table's own reloptions first; a never-analyzed table counts as empty)."""
    base = _reloption(table.options, "autovacuum_vacuum_threshold")
    scale = _reloption(table.options, "autovacuum_vacuum_scale_factor")
    cap = _reloption(table.options, "autovacuum_vacuum_max_threshold")
    value = (int(base) if base is not None else av.threshold) + (
        float(scale) if scale is not None else av.scale_factor) * max(table.reltuples, 0.0)
    cap_value = int(cap) if cap is not None else av.max_threshold
    if cap_value is not None and cap_value >= 0:
        value = min(value, float(cap_value))
    return value


def vacuum_finding(
    server: str, av: AutovacuumSettings, tables: Iterable[TableDeadTuples], previous: Mapping[str, Any] | None,
    now: datetime, for_ms: float, limit: int = 10,
) -> tuple[Finding, dict[str, Any]]:
    """Tables whose dead tuples have stayed above their autovacuum threshold for longer than
    VacuumBacklog (since the first evaluation that saw them there, kept in the baseline). A
    frozen warm month has no dead tuples, so it never counts, vacuumed lately or not."""
    seen = dict((previous or {}).get("over_since", {}))
    over_since: dict[str, str] = {}
    overdue, waiting = [], []
    for table in tables:
        threshold = autovacuum_threshold(table, av)
        if table.dead_tuples <= threshold:
            continue
        since = seen.get(table.name, now.isoformat())
        over_since[table.name] = since
        over_ms = (now - datetime.fromisoformat(since)).total_seconds() * 1000.0
        row = {"table": table.name, "dead_tuples": table.dead_tuples, "live_tuples": table.live_tuples,
               "autovacuum_threshold": round(threshold), "over_threshold_since": since,
               "over_threshold_ms": round(over_ms, 1),
               "autovacuum_enabled": av.enabled and _reloption(table.options, "autovacuum_enabled") not in ("false", "off"),
               "last_vacuum": table.last_vacuum.isoformat() if table.last_vacuum else None,
               "last_autovacuum": table.last_autovacuum.isoformat() if table.last_autovacuum else None}
        (overdue if over_ms > for_ms else waiting).append(row)
    label = server_label(server)
    if overdue:
        worst = max(overdue, key=lambda r: r["dead_tuples"])
        off = " (autovacuum is off for it)" if not worst["autovacuum_enabled"] else ""
        summary = (f"{len(overdue)} table(s) on the {label} above their autovacuum threshold for over {duration_text(for_ms)}: "
                   f"{worst['table']} has {worst['dead_tuples']:,} dead tuples (threshold "
                   f"{worst['autovacuum_threshold']:,}){off}")
    else:
        summary = (f"no table on the {label} above its autovacuum threshold for over {duration_text(for_ms)}"
                   + (f" ({len(waiting)} above it for less)" if waiting else ""))
    evidence = {"server": server, "threshold_ms": for_ms, "autovacuum": av.enabled,
                "tables": sorted(overdue, key=lambda r: -r["dead_tuples"])[:limit],
                "tables_over_threshold_for_less": sorted(waiting, key=lambda r: -r["dead_tuples"])[:limit]}
    return Finding("vacuum_backlog", server, bool(overdue), summary, evidence), {"over_since": over_since}


# -- deadlocks and standby conflicts (counters since the previous evaluation) -----------------

def counter_baseline(counters: DatabaseCounters, now: datetime) -> dict[str, Any]:
    return {"deadlocks": counters.deadlocks, "conflicts": dict(counters.conflicts),
            "reset": counters.stats_reset.isoformat() if counters.stats_reset else None, "at": now.isoformat()}


def _window(counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime):
    """(usable previous figures or None, seconds since them)."""
    reset = counters.stats_reset.isoformat() if counters.stats_reset else None
    if not previous or previous.get("reset") != reset or "at" not in previous:
        return None, None
    if counters.deadlocks < previous.get("deadlocks", 0):
        return None, None
    return previous, max((now - datetime.fromisoformat(previous["at"])).total_seconds(), 0.001)


def deadlock_finding(server: str, counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime,
                     per_minute: float) -> Finding:
    """Deadlocks per minute since the previous evaluation against Deadlocks (the first
    evaluation, with nothing to compare, passes)."""
    before, seconds = _window(counters, previous, now)
    label = server_label(server)
    evidence = {"server": server, "deadlocks_total": counters.deadlocks, "threshold_per_minute": per_minute}
    if before is None:
        return Finding("deadlocks", server, False,
                       f"{counters.deadlocks:,} deadlocks on the {label} since its statistics' reset: the next "
                       f"evaluation measures the rate", {**evidence, "deadlocks": None, "window_s": None})
    new = counters.deadlocks - before["deadlocks"]
    rate = new * 60.0 / seconds
    breached = new > 0 and rate > per_minute
    summary = (f"{new} deadlock(s) on the {label} in the last {seconds:,.0f} s ({rate:,.1f}/min, over "
               f"{per_minute:g}/min)") if breached else (
        f"{new} deadlock(s) on the {label} in the last {seconds:,.0f} s (threshold {per_minute:g}/min)")
    return Finding("deadlocks", server, breached, summary,
                   {**evidence, "deadlocks": new, "window_s": round(seconds, 1), "per_minute": round(rate, 2)})


def conflict_finding(server: str, counters: DatabaseCounters, previous: Mapping[str, Any] | None, now: datetime,
                     threshold: float) -> Finding:
    """Queries the replica cancelled to let replay go on, since the previous evaluation, by
    cause (pg_stat_database_conflicts), against StandbyConflicts."""
    before, seconds = _window(counters, previous, now)
    label = server_label(server)
    evidence = {"server": server, "conflicts_total": counters.conflicts_total, "threshold": threshold}
    if before is None:
        return Finding("standby_conflict", server, False,
                       f"{counters.conflicts_total:,} query(ies) cancelled by recovery conflicts on the {label} since "
                       f"its statistics' reset: the next evaluation counts new ones", {**evidence, "conflicts": None})
    causes = {cause: n - before.get("conflicts", {}).get(cause, 0) for cause, n in counters.conflicts.items()}
    causes = {cause: n for cause, n in causes.items() if n > 0}
    new = sum(causes.values())
    breached = new > threshold
    by_cause = ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items()))
    summary = (f"{new} query(ies) on the {label} cancelled by recovery conflicts in the last {seconds:,.0f} s "
               f"({by_cause}), over {threshold:g}") if breached else (
        f"{new} recovery conflict(s) on the {label} in the last {seconds:,.0f} s (threshold {threshold:g})")
    return Finding("standby_conflict", server, breached, summary,
                   {**evidence, "conflicts": new, "by_cause": causes, "window_s": round(seconds, 1)})
