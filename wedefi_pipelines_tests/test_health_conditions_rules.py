"""Issue 15's rules as pure functions: settings, thresholds, the pipeline's own sessions,
autovacuum thresholds, slot inactivity and counter windows kept between evaluations."""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from wedefi_pipelines.health import rules
from wedefi_pipelines.health.maintenance_probes import (AutovacuumSettings, DatabaseAge, DatabaseCounters,
                                                       OpenTransaction, ReplicationSlot, TableDeadTuples)
from wedefi_pipelines.health.probes import ConnectionCounts
from wedefi_pipelines.settings import Settings, SettingsError, parse_settings

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)
NEW_SENSORS = ["wraparound_sensor", "long_transactions_sensor", "replication_slots_sensor", "invalid_indexes_sensor",
               "vacuum_health_sensor", "deadlocks_sensor", "standby_conflicts_sensor"]


def test_the_seven_sensors_their_checks_and_jobs_exist_and_run_by_default():
    from wedefi_pipelines.definitions import defs

    repo = defs.get_repository_def()
    for name in NEW_SENSORS:
        sensor = repo.get_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, name
        assert sensor.minimum_interval_seconds == 30
        assert repo.has_job(name.replace("_sensor", "_check_job")), name
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert {"wraparound", "long_transactions", "replication_slots", "invalid_indexes", "vacuum_health", "deadlocks",
            "standby_conflicts"} <= checks


def test_the_new_alert_rules_have_the_anchors_defaults():
    s = Settings()
    assert s.alert_threshold("HighConnectionCount") == 80  # the seed's rule is unchanged
    assert s.alert_threshold("HighConnectionUsage") == 80
    wrap = s.alert_rule("TransactionIdWraparound")
    assert (wrap.threshold, wrap.critical_threshold) == (1_000_000_000, 1_500_000_000)
    assert s.alert_threshold("LongTransaction") == 300_000 and s.alert_threshold("IdleInTransaction") == 60_000
    assert s.alert_threshold("ReplicationSlotRetainedWal") == 1024 ** 3
    assert s.alert_threshold("ReplicationSlotInactive") == 30 * 60_000
    assert s.alert_threshold("VacuumBacklog") == 3_600_000
    assert s.alert_threshold("Deadlocks") == 5 and s.alert_threshold("StandbyConflicts") == 0
    assert s.monitoring.pipeline_sessions["wedefi-pipelines:adopt"] == 24 * 3_600_000
    assert s.monitoring.healthcheck_tolerance_s == 300


@pytest.mark.parametrize("rule, key", [
    ({"name": "ReplicationSlotRetainedWal", "condition": "retained_wal > 1 parsec"}, "alerts.0"),
    ({"name": "LongTransaction", "condition": "transaction_age > 5MB"}, "alerts.0"),
    ({"name": "Deadlocks", "condition": "deadlocks_per_minute > 5s"}, "alerts.0"),
    ({"name": "TransactionIdWraparound", "condition": "xid_age > 100", "critical": "xid_age > 50"}, "alerts.0"),
    ({"name": "InvalidIndex", "condition": "invalid_indexes < 1"}, "alerts.0"),
])
def test_a_bad_new_rule_fails_at_load_time_naming_the_key(rule, key):
    with pytest.raises(SettingsError, match=key):
        parse_settings({"alerts": [rule]})


def test_pipeline_session_limits_parse_durations_and_null():
    s = parse_settings({"monitoring": {"pipeline_sessions": {"wedefi-pipelines": "90m", "wedefi-pipelines:adopt": None}}})
    assert s.monitoring.pipeline_sessions == {"wedefi-pipelines": 5_400_000, "wedefi-pipelines:adopt": None}
    with pytest.raises(SettingsError, match="monitoring.pipeline_sessions"):
        parse_settings({"monitoring": {"pipeline_sessions": {"wedefi-pipelines": "soon"}}})


def test_connections_are_judged_as_a_share_of_what_ordinary_roles_may_open():
    counts = ConnectionCounts(79, 100, 3, ())  # 81% of 97, under the absolute 80
    finding = rules.connection_finding("primary", counts, 80, 80)
    assert finding.breached and finding.rule == "HighConnectionUsage" and "81% of the 97 available" in finding.summary
    assert not rules.connection_finding("primary", counts, 80, None).breached  # the seed's rule alone
    both = rules.connection_finding("primary", ConnectionCounts(90, 100, 3, ()), 80, 80)
    assert both.rule == "HighConnectionCount" and both.alert_severity == "critical"


def _tx(pid, app, age_s, idle_s=None):
    return OpenTransaction(pid, "u", app, "idle in transaction" if idle_s else "active", NOW - timedelta(seconds=age_s),
                           age_s * 1000.0, None if idle_s is None else idle_s * 1000.0, 3, "SELECT 1")


def test_the_pipelines_own_sessions_are_held_to_their_own_limits():
    limits = {"wedefi-pipelines": 7_200_000.0, "wedefi-pipelines:adopt": None}
    assert rules.pipeline_limit("wedefi-pipelines:archive-export", limits) == ("wedefi-pipelines", 7_200_000.0)
    assert rules.pipeline_limit("wedefi-pipelines:adopt", limits) == ("wedefi-pipelines:adopt", None)
    assert rules.pipeline_limit("wedefi-api", limits) == (None, None)
    found = rules.transaction_findings("primary", [
        _tx(1, "wedefi-api", 400),                      # an app transaction over 5 min
        _tx(2, "wedefi-pipelines:primary", 3_600),      # a warm rewrite: under its 2 h
        _tx(3, "wedefi-pipelines:primary", 8_000),      # over its 2 h
        _tx(4, "wedefi-pipelines:adopt", 90_000, 90_000),  # never alerted on
        _tx(5, None, 100, idle_s=70),                   # idle in transaction over 1 min
    ], 300_000, 60_000, limits)
    long, idle = found
    assert [t["pid"] for t in long.evidence["transactions"]] == [3, 1]
    assert [t["pid"] for t in idle.evidence["transactions"]] == [5]
    assert sorted(t["pid"] for t in long.evidence["pipeline_sessions_within_limits"]) == [2, 4]
    assert "oldest pid 3 (u, wedefi-pipelines:primary, started" in long.summary and "2.2 h" in long.summary


def test_wraparound_is_critical_past_its_second_threshold():
    age = DatabaseAge("wedefi", 1_600_000_000, 20, (("public.t", 1_600_000_000, 20),))
    xid, mxid = rules.wraparound_findings("primary", age, rules.Threshold(1e9, 1.5e9), rules.Threshold(1e9, 1.5e9))
    assert xid.breached and xid.alert_severity == "critical" and "547,483,647 left" in xid.summary
    assert not mxid.breached
    assert xid.evidence["oldest_tables"] == [{"table": "public.t", "xid_age": 1_600_000_000, "multixact_age": 20}]


def _table(dead, reltuples=1000.0, options=()):
    return TableDeadTuples(1, "public", "t", dead, 10, reltuples, tuple(options), None, None)


def test_the_autovacuum_threshold_is_postgresqls_own():
    av = AutovacuumSettings(True, 50, 0.2, None)
    assert rules.autovacuum_threshold(_table(0, 1000), av) == 250
    assert rules.autovacuum_threshold(_table(0, -1), av) == 50  # never analyzed: empty
    assert rules.autovacuum_threshold(_table(0, 1000, ["autovacuum_vacuum_scale_factor=0.01"]), av) == 60
    assert rules.autovacuum_threshold(_table(0, 1000, ["autovacuum_vacuum_threshold=5"]), av) == 205
    capped = AutovacuumSettings(True, 50, 0.2, 100_000_000)  # PostgreSQL 18's autovacuum_vacuum_max_threshold
    assert rules.autovacuum_threshold(_table(0, 1e10), capped) == 100_000_000


def test_a_table_must_stay_above_its_threshold_for_the_setting_before_it_counts():
    av = AutovacuumSettings(True, 50, 0.2, None)
    first, baseline = rules.vacuum_finding("primary", av, [_table(500)], None, NOW, 3_600_000)
    assert not first.breached and baseline == {"over_since": {"public.t": NOW.isoformat()}}
    later, baseline = rules.vacuum_finding("primary", av, [_table(500)], baseline, NOW + timedelta(hours=2), 3_600_000)
    assert later.breached and later.evidence["tables"][0]["over_threshold_since"] == NOW.isoformat()
    cleared, baseline = rules.vacuum_finding("primary", av, [_table(100)], baseline, NOW + timedelta(hours=3), 3_600_000)
    assert not cleared.breached and baseline == {"over_since": {}}


def _slot(active=False, retained=1000, status="reserved", since=None):
    return ReplicationSlot("s1", "physical", active, False, status, retained, None, since, None)


def test_a_slot_inactive_past_its_limit_counts_from_when_it_was_first_seen_inactive():
    findings, baseline = rules.slot_findings("primary", [_slot()], None, NOW, 1e9, 600_000)
    assert not findings[0].breached and findings[0].incident == "health.replication_slot.primary.s1"
    later, _ = rules.slot_findings("primary", [_slot()], baseline, NOW + timedelta(minutes=11), 1e9, 600_000)
    assert later[0].breached and later[0].rule == "ReplicationSlotInactive"
    since = NOW - timedelta(hours=1)  # PostgreSQL 17+ says since when itself
    pg17, _ = rules.slot_findings("primary", [_slot(since=since)], None, NOW, 1e9, 600_000)
    assert pg17[0].breached
    lost, _ = rules.slot_findings("primary", [_slot(active=True, retained=None, status="lost")], None, NOW, 1e9, 600_000)
    assert lost[0].breached and lost[0].alert_severity == "critical"
    none, _ = rules.slot_findings("replica", [], None, NOW, 1e9, 600_000)
    assert [(f.subject, f.breached) for f in none] == [("replica", False)]


def test_counters_are_judged_since_the_previous_evaluation_and_restart_after_a_reset():
    reset = NOW - timedelta(days=1)
    first = DatabaseCounters(4, {"lock": 2, "snapshot": 0}, reset)
    assert not rules.deadlock_finding("primary", first, None, NOW, 5).breached  # no window yet
    baseline = rules.counter_baseline(first, NOW)
    later = DatabaseCounters(10, {"lock": 3, "snapshot": 0}, reset)
    deadlocks = rules.deadlock_finding("primary", later, baseline, NOW + timedelta(seconds=30), 5)
    assert deadlocks.breached and deadlocks.evidence["per_minute"] == 12.0
    conflicts = rules.conflict_finding("read_replica", later, baseline, NOW + timedelta(seconds=30), 0)
    assert conflicts.breached and conflicts.evidence["by_cause"] == {"lock": 1}
    after_reset = DatabaseCounters(1, {"lock": 0, "snapshot": 0}, NOW)
    assert not rules.deadlock_finding("primary", after_reset, baseline, NOW + timedelta(seconds=30), 0).breached
