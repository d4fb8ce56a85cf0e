"""Runs the probes on every server they concern and applies the rules: the one place the
sensors, the check runs, the demo and the benchmark evaluate health through.

The servers are the primary and each distinct replica behind DATABASE_URL_READ and
DATABASE_URL_ANALYTICS (named like the settings: primary, read_replica,
analytics_replica). A replica that cannot be reached makes its own verdicts unknown
(its episodes neither open nor close): the replication check reports it as missing. A
primary that cannot be reached raises, so the sensor's tick fails visibly.
"""

from __future__ import annotations

import dataclasses
from datetime import date
from typing import Any, Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict

from wedefi_pipelines import catalog, locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.health import maintenance_probes, probes, rules
from wedefi_pipelines.health.alerting import utcnow
from wedefi_pipelines.health.rules import Evaluation, ExpectedReplica, incident_key
from wedefi_pipelines.resources.database import Database, Server
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.policy import needs_newest

SERVER_LABELS: dict[Server, str] = {"primary": "primary", "read": "read_replica", "analytics": "analytics_replica"}


def server_address(url: str) -> str:
    """host:port/dbname of a URL, never its password."""
    params = conninfo_to_dict(url)
    return f"{params.get('host', 'localhost')}:{params.get('port', '5432')}/{params.get('dbname', '')}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _own_within_limit(application_name: str | None, age_ms: float, limits: Mapping[str, float | None]) -> bool:
    """One of the pipeline's own sessions (archive export, warm rewrite, adoption) within its
    monitoring.pipeline_sessions limit: its long statements are its work, not an incident."""
    prefix, limit = rules.pipeline_limit(application_name, limits)
    return prefix is not None and (limit is None or age_ms <= limit)


class HealthMonitor:
    """Health evaluations over a `Database`'s servers. Each method takes the figures the
    previous evaluation left (a sensor's cursor; None means "since the statistics' reset")
    and returns an Evaluation whose baseline the next one takes."""

    def __init__(self, database: Database, settings: Settings | None = None) -> None:
        self.db = database
        self.settings = settings or database.settings
        self.timeout_ms = self.settings.monitoring.statement_timeout_ms

    def servers(self) -> list[tuple[str, Server]]:
        """(label, server) for the primary and each replica URL not already listed."""
        seen = {self.db.urls["primary"]}
        found: list[tuple[str, Server]] = [("primary", "primary")]
        for server in ("read", "analytics"):
            url = self.db.urls[server]
            if url and url not in seen:
                seen.add(url)
                found.append((SERVER_LABELS[server], server))
        return found

    def _per_server(self, condition: str, previous: Mapping[str, Any] | None, probe,
                    servers: list[tuple[str, Server]] | None = None, unknown_keys=None) -> Evaluation:
        """Run `probe(label, conn, previous_for_label) -> (finding or findings, baseline)` on
        each server (all of them unless `servers` says which); an unreachable replica is
        unknown (its incident, or those `unknown_keys(label, previous_for_label)` names) and
        keeps its previous baseline."""
        previous = previous or {}
        findings, unknown, notes, baseline = [], set(), [], {}
        for label, server in self.servers() if servers is None else servers:
            try:
                with self.db.autocommit(server) as conn:
                    found, figures = probe(label, conn, previous.get(label))
            except psycopg.OperationalError as exc:
                if server == "primary":
                    raise
                unknown.add(incident_key(condition, label))
                if unknown_keys is not None:
                    unknown.update(unknown_keys(label, previous.get(label)))
                notes.append(f"{label} not evaluated: {one_line(exc)}")
                if label in previous:
                    baseline[label] = previous[label]
                continue
            findings.extend(found if isinstance(found, list) else [found])
            if figures is not None:
                baseline[label] = figures
        return Evaluation(tuple(findings), frozenset(unknown), tuple(notes), baseline)

    def _primary(self):
        return self.servers()[:1]

    def _replicas(self):
        return self.servers()[1:]

    # -- the four conditions ---------------------------------------------------------------
    def replication(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Lag of every streaming replica, from the primary; presence of each expected one."""
        threshold = self.settings.alert_threshold("ReplicationLag")
        names = dict((previous or {}).get("names", {}))
        expected = []
        for label, server in self.servers()[1:]:
            address = server_address(self.db.urls[server])
            try:
                with self.db.autocommit(server) as conn:
                    names[label] = probes.replica_identity(conn, self.timeout_ms)
                expected.append(ExpectedReplica(label, names[label], None, address))
            except (psycopg.Error, ValueError) as exc:
                expected.append(ExpectedReplica(label, names.get(label), one_line(exc), address))
        with self.db.autocommit("primary") as primary:
            lags = probes.replica_lags(primary, self.timeout_ms)
        findings = rules.replication_findings(lags, expected, threshold)
        return Evaluation(tuple(findings), baseline={"names": names})

    def slow_queries(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """A single execution over SlowQueryDetected since the previous evaluation
        (max_exec_time growth in pg_stat_statements) or one running that long now."""
        threshold = self.settings.alert_threshold("SlowQueryDetected")

        def probe(label, conn, before):
            snapshot = probes.statement_snapshot(conn, self.timeout_ms, min_max_exec_ms=threshold)
            grown = rules.grown_statements(snapshot, before, threshold)
            limits = self.settings.monitoring.pipeline_sessions
            running = [q for q in probes.running_queries(conn, threshold, self.timeout_ms)  # not our own work
                       if not _own_within_limit(q.application_name, q.duration_ms, limits)]
            texts = probes.statement_texts(conn, [s.queryid for s, _ in grown[:10]], self.timeout_ms)
            finding = rules.slow_query_finding(label, grown, running, texts, threshold)
            return finding, rules.statement_baseline(snapshot, threshold)

        return self._per_server("slow_query", previous, probe)

    def index_hit_ratio(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Index blocks served from shared buffers since the previous evaluation."""
        threshold = self.settings.alert_threshold("IndexScanEfficiency")
        min_blocks = self.settings.monitoring.index_hit_min_blocks

        def probe(label, conn, before):
            io = probes.index_io(conn, self.timeout_ms)
            finding = rules.index_hit_finding(label, io, before, threshold, min_blocks)
            if finding.breached:
                top = sorted(probes.index_usage(conn, self.timeout_ms), key=lambda ix: -ix.blks_read)[:5]
                reads = [{"index": f"{ix.schema}.{ix.index}", "table": ix.table, "blks_read": ix.blks_read,
                          "blks_hit": ix.blks_hit, "size_bytes": ix.size_bytes} for ix in top]
                finding = dataclasses.replace(
                    finding, evidence={**finding.evidence, "top_index_reads_cumulative": reads})
            return finding, rules.index_io_baseline(io)

        return self._per_server("index_hit_ratio", previous, probe)

    def connections(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Client backends per server, idle included, against HighConnectionCount and
        HighConnectionUsage (a percentage of max_connections - superuser_reserved_connections)."""
        threshold = self.settings.alert_threshold("HighConnectionCount")
        usage = self.settings.alert_threshold("HighConnectionUsage")

        def probe(label, conn, _before):
            counts = probes.connection_counts(conn, self.timeout_ms)
            return rules.connection_finding(label, counts, threshold, usage), None

        return self._per_server("connection_count", previous, probe)

    # -- issue 15: what takes PostgreSQL down beyond the seed's four ----------------------------
    def wraparound(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Transaction ID and multixact age of the app's database, on the primary (a
        replica's catalog is the primary's)."""
        xid, mxid = (self.settings.alert_rule(n) for n in ("TransactionIdWraparound", "MultixactWraparound"))
        xid_t = rules.Threshold(xid.threshold, xid.critical_threshold)
        mxid_t = rules.Threshold(mxid.threshold, mxid.critical_threshold)

        def probe(label, conn, _before):
            age = maintenance_probes.database_age(conn, self.timeout_ms)
            if age.xid_age > xid_t.warning or age.multixact_age > mxid_t.warning:
                age = maintenance_probes.database_age(conn, self.timeout_ms, with_tables=True)
            return rules.wraparound_findings(label, age, xid_t, mxid_t), None

        return self._per_server("xid_wraparound", previous, probe, self._primary())

    def long_transactions(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """The oldest open transactions and idle-in-transaction sessions on every server
        (on a replica they cause replay conflicts, or hold the primary's vacuum back through
        hot_standby_feedback); the pipeline's own sessions against their own limits."""
        long_ms = self.settings.alert_threshold("LongTransaction")
        idle_ms = self.settings.alert_threshold("IdleInTransaction")
        own = self.settings.monitoring.pipeline_sessions
        floor = min([long_ms, idle_ms] + [v for v in own.values() if v is not None])

        def probe(label, conn, _before):
            transactions = maintenance_probes.open_transactions(conn, floor, self.timeout_ms)
            return rules.transaction_findings(label, transactions, long_ms, idle_ms, own), None

        return self._per_server("long_transaction", previous, probe,
                                unknown_keys=lambda label, _p: {incident_key("idle_in_transaction", label)})

    def replication_slots(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Every replication slot on every server: retained WAL, wal_status, inactivity."""
        retained = self.settings.alert_threshold("ReplicationSlotRetainedWal")
        inactive = self.settings.alert_threshold("ReplicationSlotInactive")

        def probe(label, conn, before):
            slots = maintenance_probes.replication_slots(conn, self.timeout_ms)
            return rules.slot_findings(label, slots, before, utcnow(), retained, inactive)

        def unknown(label, before):  # a replica that cannot be asked keeps its slots' episodes
            return {incident_key("replication_slot", f"{label}.{name}") for name in (before or {}).get("slots", [])}

        return self._per_server("replication_slot", previous, probe, unknown_keys=unknown)

    def invalid_indexes(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Invalid indexes of the app's database (the catalog is the primary's)."""
        threshold = self.settings.alert_threshold("InvalidIndex")

        def probe(label, conn, _before):
            return rules.invalid_index_finding(label, maintenance_probes.invalid_indexes(conn, self.timeout_ms), threshold), None

        return self._per_server("invalid_index", previous, probe, self._primary())

    def vacuum_health(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Tables (leaf partitions included) above their autovacuum threshold for longer than
        VacuumBacklog, on the primary (a replica cannot vacuum)."""
        for_ms = self.settings.alert_threshold("VacuumBacklog")

        def probe(label, conn, before):
            av, tables = maintenance_probes.dead_tuples(conn, self.timeout_ms)
            return rules.vacuum_finding(label, av, tables, before, utcnow(), for_ms)

        return self._per_server("vacuum_backlog", previous, probe, self._primary())

    def deadlocks(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Deadlocks per minute in the app's database since the previous evaluation, per server."""
        per_minute = self.settings.alert_threshold("Deadlocks")

        def probe(label, conn, before):
            counters, now = maintenance_probes.database_counters(conn, self.timeout_ms), utcnow()
            return rules.deadlock_finding(label, counters, before, now, per_minute), rules.counter_baseline(counters, now)

        return self._per_server("deadlocks", previous, probe)

    def standby_conflicts(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """Queries each replica cancelled for replay since the previous evaluation."""
        threshold = self.settings.alert_threshold("StandbyConflicts")

        def probe(label, conn, before):
            counters, now = maintenance_probes.database_counters(conn, self.timeout_ms), utcnow()
            return rules.conflict_finding(label, counters, before, now, threshold), rules.counter_baseline(counters, now)

        return self._per_server("standby_conflict", previous, probe, self._replicas())

    def platform(self, previous: Mapping[str, Any] | None = None) -> Evaluation:
        """The platform's own health from the month catalog, on the primary: the horizon,
        rows stuck in default partitions, months past their tier, archives left half-way."""

        def probe(label, conn, _before):
            now = utcnow()
            with probes.bounded(conn, self.timeout_ms * 5):  # the whole catalog: a few statements per table
                tables = catalog.read_catalog(conn, newest=needs_newest(now, self.settings))
                archived = {name: catalog.archived_months(conn, t.table) for name, t in tables.items()}
                running = {(t.table.group, m) for t in tables.values() for m, s in t.months.items()
                           if s.frozen and locks.is_held(conn, "tiering.month", t.table.group, p.month_year(m))}
            groups: dict[tuple[str, date], list[catalog.MonthState]] = {}
            for t in tables.values():
                for month, state in t.months.items():
                    groups.setdefault((t.table.group, month), []).append(state)
            findings = []
            for name, t in tables.items():
                by_month = {m: s for (g, m), s in groups.items() if g == t.table.group}
                findings += [rules.horizon_finding(t, now.date(), self.settings),
                             rules.default_rows_finding(t, archived[name]),
                             rules.overdue_finding(t, by_month, now, self.settings),
                             rules.unfinished_finding(t, running)]
            return findings, None

        return self._per_server("partition_horizon", previous, probe, self._primary())

    def evaluate_all(self) -> dict[str, Evaluation]:
        """Every probe once, each since its statistics' reset (the demo's snapshot)."""
        return {name: evaluate(self) for name, evaluate in EVALUATIONS.items()}


EVALUATIONS = {
    "replication": HealthMonitor.replication,
    "slow_queries": HealthMonitor.slow_queries,
    "index_hit_ratio": HealthMonitor.index_hit_ratio,
    "connections": HealthMonitor.connections,
    "wraparound": HealthMonitor.wraparound,
    "long_transactions": HealthMonitor.long_transactions,
    "replication_slots": HealthMonitor.replication_slots,
    "invalid_indexes": HealthMonitor.invalid_indexes,
    "vacuum_health": HealthMonitor.vacuum_health,
    "deadlocks": HealthMonitor.deadlocks,
    "standby_conflicts": HealthMonitor.standby_conflicts,
    "platform": HealthMonitor.platform,
}


def health_lines(database: Database, settings: Settings | None = None) -> list[str]:
    """Every probe once on every server, and the alerts still open: what the demo prints."""
    from wedefi_pipelines.health.alerting import open_alerts

    lines = ["health (every probe once, each since its statistics' reset):"]
    for name, evaluation in HealthMonitor(database, settings).evaluate_all().items():
        for finding in evaluation.findings:
            lines.append(f"  {name:<17} {'BREACH' if finding.breached else 'ok':<6} {finding.summary}")
        lines.extend(f"  {name:<17} {'?':<6} {note}" for note in evaluation.notes)
    with database.connection("alert_processing") as conn:
        alerts = open_alerts(conn)
    lines.append(f"open alerts: {len(alerts) or 'none'}")
    lines.extend(f"  [{a.severity}] {a.type}: {a.title} ({a.status} since {a.trigger_at:%Y-%m-%d %H:%M:%S} UTC, "
                 f"{a.metadata.get('occurrences', 1)} occurrence(s))" for a in alerts)
    return lines
