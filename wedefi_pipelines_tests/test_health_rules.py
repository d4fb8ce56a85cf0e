"""Pure health logic: verdicts, deltas of cumulative counters, episodes and the cursor."""

from datetime import datetime, timedelta, timezone

import pytest

from wedefi_pipelines.health import rules
from wedefi_pipelines.health.alerting import AlertRow, IncidentReport, context_hash, slack_payload
from wedefi_pipelines.health.probes import (ConnectionCounts, IndexIO, IndexUsage, RunningQuery, StatementSnapshot,
                                            StatementStat)
from wedefi_pipelines.health.rules import Evaluation, Finding
from wedefi_pipelines.replication import ReplicaLag

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
RESET = datetime(2025, 1, 1, tzinfo=timezone.utc)


def stat(queryid, calls=1, total=10.0, max_ms=10.0, hit=0, read=0, read_time=0.0):
    return StatementStat(queryid, calls, total, max_ms, calls, hit, read, read_time)


def snap(*stats, reset=RESET):
    return StatementSnapshot(reset, {s.queryid: s for s in stats})


def finding(subject, breached, condition="connection_count"):
    return Finding(condition, subject, breached, f"{subject} {'bad' if breached else 'ok'}")


# -- episodes ---------------------------------------------------------------------------------

def test_a_lasting_breach_is_one_episode_and_a_new_breach_a_new_one():
    first = rules.track_episodes({}, Evaluation((finding("primary", True),)), T0)
    assert [e.run_key for _f, e in first.opened] == ["health.connection_count.primary.20250301T120000Z"]
    later = rules.track_episodes(first.open, Evaluation((finding("primary", True),)), T0 + timedelta(seconds=30))
    assert later.opened == () and [e.id for _f, e in later.ongoing] == ["20250301T120000Z"]
    cleared = rules.track_episodes(later.open, Evaluation((finding("primary", False),)), T0 + timedelta(seconds=60))
    assert [e.incident for e in cleared.closed] == ["health.connection_count.primary"] and not cleared.open
    again = rules.track_episodes(cleared.open, Evaluation((finding("primary", True),)), T0 + timedelta(seconds=90))
    assert [e.run_key for _f, e in again.opened] == ["health.connection_count.primary.20250301T120130Z"]


def test_an_episode_closes_only_after_passing_for_the_hold_and_a_breach_during_it_continues_it():
    opened = rules.track_episodes({}, Evaluation((finding("primary", True),)), T0, clear_after_s=300)
    passing = rules.track_episodes(opened.open, Evaluation((finding("primary", False),)), T0 + timedelta(seconds=30),
                                   clear_after_s=300)
    assert not passing.closed and passing.open["health.connection_count.primary"].passing_since
    rebreach = rules.track_episodes(passing.open, Evaluation((finding("primary", True),)), T0 + timedelta(seconds=60),
                                    clear_after_s=300)
    assert rebreach.opened == () and rebreach.open["health.connection_count.primary"].passing_since is None
    quiet = rebreach.open
    for seconds in (90, 200, 389):
        quiet = rules.track_episodes(quiet, Evaluation((finding("primary", False),)), T0 + timedelta(seconds=seconds),
                                     clear_after_s=300).open
    assert "health.connection_count.primary" in quiet  # 299 s of passing: still held
    done = rules.track_episodes(quiet, Evaluation((finding("primary", False),)), T0 + timedelta(seconds=390),
                                clear_after_s=300)
    assert [e.id for e in done.closed] == ["20250301T120000Z"]


def test_an_unknown_subject_keeps_its_episode_and_a_vanished_one_closes():
    state = rules.track_episodes(
        {}, Evaluation((finding("primary", True), finding("read_replica", True))), T0).open
    unknown = rules.incident_key("connection_count", "read_replica")
    changes = rules.track_episodes(state, Evaluation((), unknown=frozenset({unknown})), T0 + timedelta(seconds=30))
    assert set(changes.open) == {unknown}
    assert [e.incident for e in changes.closed] == ["health.connection_count.primary"]


def test_the_cursor_round_trips_and_a_damaged_one_is_refused():
    changes = rules.track_episodes({}, Evaluation((finding("primary", True),)), T0)
    state = rules.CursorState(changes.open, {"primary": {"hit": 1, "read": 2, "reset": None}})
    assert rules.parse_cursor(rules.dump_cursor(state)) == state
    assert rules.parse_cursor(None) == rules.CursorState()
    assert rules.parse_cursor('{"v": 0, "anything": 1}') == rules.CursorState()  # older format: start afresh
    with pytest.raises(ValueError, match="not JSON"):
        rules.parse_cursor("{")
    with pytest.raises(ValueError, match="damaged episode"):
        rules.parse_cursor('{"v": 1, "episodes": {"k": {"since": "x"}}}')


def test_subjects_are_made_safe_for_run_keys_and_conditions_are_checked():
    assert rules.incident_key("replication_lag", "replica one/b") == "health.replication_lag.replica_one_b"
    with pytest.raises(ValueError, match="unknown health condition"):
        rules.incident_key("disk_full", "primary")


# -- replication ------------------------------------------------------------------------------

def lag(name, byte_lag, replay_ms):
    return ReplicaLag(name, "127.0.0.1", "streaming", byte_lag, replay_ms)


def test_replication_lag_breaches_on_lag_and_a_stale_replay_lag_with_no_bytes_behind_does_not():
    expected = [rules.ExpectedReplica("read_replica", "r1", None, "h:1/db")]
    found = rules.replication_findings({"r1": lag("r1", 2_000_000, 1500.0), "r2": lag("r2", 0, 4000.0)},
                                       expected, 1000)
    by = {f.incident: f for f in found}
    assert by["health.replication_lag.r1"].breached
    assert by["health.replication_lag.r1"].evidence["server"] == "read_replica"
    assert "1,500 ms" in by["health.replication_lag.r1"].summary and "2,000,000 bytes" in by["health.replication_lag.r1"].summary
    assert not by["health.replication_lag.r2"].breached  # byte lag 0 means lag 0
    assert not by["health.replica_missing.read_replica"].breached


def test_an_expected_replica_absent_from_the_primary_or_unreachable_is_missing():
    found = rules.replication_findings(
        {"r1": lag("r1", 0, None)},
        [rules.ExpectedReplica("read_replica", "r1", None, "h:1/db"),
         rules.ExpectedReplica("analytics_replica", "r2", None, "h:2/db"),
         rules.ExpectedReplica("analytics_replica", "r3", "connection refused", "h:3/db")],
        1000,
    )
    missing = [f for f in found if f.condition == "replica_missing" and f.breached]
    assert [f.evidence["replica"] for f in missing] == ["r2", "r3"]
    assert "not in the primary's pg_stat_replication" in missing[0].summary
    assert "connection refused" in missing[1].summary and missing[1].alert_severity == "critical"


# -- slow queries -----------------------------------------------------------------------------

def test_an_execution_past_the_threshold_is_found_once_per_growth_of_its_max():
    first = snap(stat(1, max_ms=6000.0004), stat(2, max_ms=10))
    assert [s.queryid for s, _b in rules.grown_statements(first, None, 5000)] == [1]  # no baseline: since reset
    baseline = rules.statement_baseline(first, 5000)
    assert baseline["max"] == {"1": 6000.0004}  # only statements past the threshold are kept, exactly
    assert rules.grown_statements(snap(stat(1, 2, max_ms=6000.0004), stat(2, max_ms=10)), baseline, 5000) == []
    grown = rules.grown_statements(snap(stat(1, max_ms=7000), stat(2, max_ms=5500)), baseline, 5000)
    assert [(s.queryid, before) for s, before in grown] == [(1, 6000.0004), (2, None)]


def test_a_statistics_reset_invalidates_the_statement_baseline():
    baseline = rules.statement_baseline(snap(stat(1, max_ms=6000)), 5000)
    after_reset = snap(stat(1, max_ms=5200), reset=RESET + timedelta(days=1))
    assert [s.queryid for s, _b in rules.grown_statements(after_reset, baseline, 5000)] == [1]


def test_the_slow_query_finding_names_statements_and_running_queries():
    grown = [(stat(7, calls=3, total=19000, max_ms=9000), None)]
    running = [RunningQuery(42, "app", "api", 6100.0, "SELECT pg_sleep(10)")]
    f = rules.slow_query_finding("primary", grown, running, {7: "SELECT pg_sleep($1)"}, 5000)
    assert f.breached and f.incident == "health.slow_query.primary"
    assert f.evidence["statements"][0]["query"] == "SELECT pg_sleep($1)"
    assert f.evidence["running"][0]["pid"] == 42
    assert "9,000 ms" in f.summary and "pid 42" in f.summary
    assert not rules.slow_query_finding("primary", [], [], {}, 5000).breached


def test_statement_deltas_subtract_the_previous_figures_and_restart_evicted_statements():
    before = snap(stat(1, calls=10, total=100.0, hit=90, read=10), stat(2, calls=5, total=50.0), stat(3, calls=4))
    now = snap(stat(1, calls=14, total=900.0, hit=100, read=30), stat(2, calls=5, total=50.0), stat(3, calls=2),
               stat(4, calls=1, total=300.0))
    deltas = rules.statement_deltas(now, before)
    assert set(deltas) == {1, 3, 4}  # 2 did not run in the window
    assert (deltas[1].calls, deltas[1].total_exec_ms, deltas[1].mean_exec_ms) == (4, 800.0, 200.0)
    assert (deltas[1].shared_blks_hit, deltas[1].shared_blks_read) == (10, 20)
    assert deltas[3].calls == 2  # fewer calls than before: evicted and re-added
    assert rules.statement_deltas(now, snap(stat(1, calls=1), reset=None)) == now.statements  # reset: all of it


def test_the_report_keeps_statements_over_the_mean_slowest_first_up_to_top():
    deltas = {q: stat(q, calls=2, total=2 * mean) for q, mean in ((1, 150.0), (2, 99.0), (3, 400.0), (4, 120.0))}
    assert [s.queryid for s in rules.slow_statement_report(deltas, 100, 2)] == [3, 1]
    assert rules.hit_percent(95, 5) == 95.0 and rules.hit_percent(0, 0) is None


# -- index hit ratio --------------------------------------------------------------------------

def test_the_index_hit_ratio_is_judged_over_the_window_since_the_baseline():
    base = rules.index_io_baseline(IndexIO(1_000_000, 100, RESET))
    cold = rules.index_hit_finding("primary", IndexIO(1_000_100, 2_100, RESET), base, 95, 1000)
    assert cold.breached and cold.evidence["blks_read"] == 2000 and cold.evidence["hit_ratio_pct"] == pytest.approx(4.76, abs=0.01)
    # the same counters judged cumulatively would look healthy: the window is what matters
    assert not rules.index_hit_finding("primary", IndexIO(1_000_100, 2_100, RESET), None, 95, 1000).breached
    small = rules.index_hit_finding("primary", IndexIO(1_000_010, 190, RESET), base, 95, 1000)
    assert not small.breached and "too few" in small.summary
    after_reset = rules.index_hit_finding("primary", IndexIO(10, 5000, RESET + timedelta(1)), base, 95, 1000)
    assert after_reset.breached and after_reset.evidence["window"] == "since the statistics were reset"


# -- connections ------------------------------------------------------------------------------

def test_connections_count_idle_ones_and_grade_severity_by_max_connections():
    counts = ConnectionCounts(85, 100, 3, (("app", "idle", "api", 80), ("app", "active", "api", 5)))
    f = rules.connection_finding("primary", counts, 80)
    assert f.breached and f.alert_severity == "warning" and "80 idle" in f.summary
    assert rules.connection_finding("primary", ConnectionCounts(90, 100, 3, ()), 80).alert_severity == "critical"
    assert not rules.connection_finding("primary", ConnectionCounts(80, 100, 3, ()), 80).breached


# -- index usage across servers ---------------------------------------------------------------

def ix(name, scans, constraint=False, size=8192):
    return IndexUsage("public", "T", name, scans, 0, size, 0, 0, constraint)


def test_an_index_is_unused_only_if_no_server_scanned_it_and_it_enforces_nothing():
    rows = rules.unused_indexes({
        "primary": [ix("a", 0), ix("b", 0), ix("pk", 0, constraint=True)],
        "read_replica": [ix("a", 12), ix("b", 0), ix("pk", 0, constraint=True)],
    })
    by = {r["index"]: r for r in rows}
    assert by["b"]["unused"] and not by["a"]["unused"] and by["a"]["scans"] == {"primary": 0, "read_replica": 12}
    assert by["pk"]["never_scanned"] and not by["pk"]["unused"]
    incomplete = rules.unused_indexes({"primary": [ix("b", 0)], "read_replica": None})
    assert not incomplete[0]["unused"]  # a server that did not answer might use it


# -- alerts ------------------------------------------------------------------------------------

def test_context_hashes_differ_per_opening_and_the_slack_payload_carries_the_alert():
    assert context_hash("health.x.y", T0) != context_hash("health.x.y", T0 + timedelta(seconds=1))
    alert = AlertRow("id-1", "c" * 64, "health.replication_lag.r1", "replication_lag", "warning",
                     "replica r1 lags 1,500 ms", "details", "pending", T0.replace(tzinfo=None),
                     {"occurrences": 2, "firstSeenAt": T0.isoformat(), "runs": [{"job": "j", "runId": "r"}]})
    payload = slack_payload(alert)
    assert payload["text"].endswith("REPLICATION LAG:* replica r1 lags 1,500 ms")
    assert payload["attachments"][0]["color"] == "#f59e0b"
    assert {"title": "Occurrences", "value": "2", "short": True} in payload["attachments"][0]["fields"]
    assert slack_payload(alert, "resolved")["text"].startswith("*\u2705 RESOLVED")


def test_an_incident_report_refuses_an_unknown_severity():
    with pytest.raises(ValueError, match="severity"):
        IncidentReport("run.j", "pipeline_run_failed", "urgent", "t", "d")


def test_every_condition_has_a_runbook_line_and_incidents_name_their_condition():
    assert set(rules.RUNBOOK) == set(rules.CONDITIONS)
    assert rules.condition_of("health.replica_missing.analytics_replica") == "replica_missing"
    assert rules.condition_of("run.ingest_prices_job") is None
    assert rules.condition_of("health.disk_full.primary") is None
