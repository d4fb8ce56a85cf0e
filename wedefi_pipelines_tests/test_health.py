"""The health sensors end to end on the real stack: a breach requests one check run per
episode, the run fails with the evidence, the run-failure sensor writes one pending
"Alert", later ticks add nothing, and the alert resolves when the probe passes again."""

import threading
import time

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import devstack
from wedefi_pipelines.defs.health import sensors
from wedefi_pipelines.health.monitor import HealthMonitor

from .test_routing import analytics_replica, paused_read_replica  # noqa: F401 (fixtures: pause/stop, then restore)
from .test_health_support import (Ticker, WebhookServer, alerts, check_evaluations, deliveries, execute,  # noqa: F401
                                  health_settings, instance, report_failure)


def wait_until(predicate, what: str, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def only_request(result: dg.SensorResult) -> dg.RunRequest:
    assert result.run_requests and len(result.run_requests) == 1, result
    return result.run_requests[0]


def fail_and_alert(job_name, request, instance):
    run = execute(job_name, request, instance)
    assert not run.success
    [evaluation] = check_evaluations(run)
    assert not evaluation.passed
    report_failure(run, instance)
    return evaluation


def test_a_lagging_replica_raises_one_alert_routes_reads_away_and_resolves_on_catch_up(
        db_env, stack, instance, health_settings, paused_read_replica):
    health_settings({"alerts": [{"name": "ReplicationLag", "condition": "replica_lag > 300ms"}],
                     "database": {"lag_check_interval_s": 0}})
    ticker = Ticker(sensors.replication_lag_sensor, instance)
    with db_env.database() as database, db_env.connect() as primary:
        monitor = HealthMonitor(database)
        primary.execute("CREATE TABLE lag_writes (i int)")

        def lagging():
            primary.execute("INSERT INTO lag_writes SELECT generate_series(1, 2000)")
            lag = next((f for f in monitor.replication().breached if f.condition == "replication_lag"), None)
            return lag

        wait_until(lagging, "the paused replica to lag past 300 ms")
        request = only_request(ticker.tick())
        assert request.run_key.startswith(f"health.replication_lag.{devstack.READ_REPLICA}.")
        assert request.tags["wedefi/incident"] == f"health.replication_lag.{devstack.READ_REPLICA}"

        # the routing link: the read routing skips the replica whose lag alert is opening
        route = database.route("portfolio_queries")
        assert route.server == "primary" and devstack.READ_REPLICA in route.reason

        evaluation = fail_and_alert("replication_lag_check_job", request, instance)
        assert evaluation.metadata["replica"].value == devstack.READ_REPLICA
        assert evaluation.metadata["lag_ms"].value > 300 and evaluation.metadata["byte_lag"].value > 0

        [alert] = alerts(db_env)
        assert (alert["status"], alert["type"], alert["severity"]) == ("pending", "replication_lag", "warning")
        assert devstack.READ_REPLICA in alert["title"] and "ms" in alert["title"]
        assert "What to do (investigate_replication" in alert["description"]
        finding = alert["metadata"]["evidence"]["findings"][0]
        assert finding["replica"] == devstack.READ_REPLICA and finding["lag_ms"] > 300
        assert alert["metadata"]["rule"] == "ReplicationLag" and len(alert["contextHash"]) == 64

        for _ in range(2):  # the breach lasts: no more runs, no more rows
            result = ticker.tick()
            assert not result.run_requests and "ongoing" in result.skip_reason.skip_message
        assert len(alerts(db_env)) == 1

        with psycopg.connect(paused_read_replica.url("postgres"), autocommit=True) as replica:
            replica.execute("SELECT pg_wal_replay_resume()")
        db_env.wait_replicas()
        ticker.tick()
        [alert] = alerts(db_env)
        assert alert["status"] == "resolved" and alert["metadata"]["resolvedAt"]
        # routing probes afresh (no cached verdict) and takes the caught-up replica back; the
        # alert rows just written are WAL the replica still has to replay, hence the wait
        wait_until(lambda: database.replica_health("read", max_age_s=0).usable, "routing to take the replica back")
        assert database.route("portfolio_queries").server == "read"


def test_a_stopped_replica_is_a_missing_replica_incident_of_its_own(db_env, stack, instance, health_settings,
                                                                     analytics_replica):
    health_settings({})
    ticker = Ticker(sensors.replication_lag_sensor, instance)
    assert not ticker.tick().run_requests  # learns each replica's name while all stream
    analytics_replica.stop()
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.replica_missing.analytics_replica"
    assert request.tags["wedefi/severity"] == "critical"
    fail_and_alert("replication_lag_check_job", request, instance)
    [alert] = alerts(db_env)
    assert (alert["type"], alert["severity"], alert["status"]) == ("replica_missing", "critical", "pending")
    assert devstack.ANALYTICS_REPLICA in alert["title"]  # named although it cannot answer any more

    analytics_replica.start()
    stack.wait_for_replica(analytics_replica.name)
    assert not ticker.tick().run_requests
    assert [a["status"] for a in alerts(db_env)] == ["resolved"]


def test_a_slow_execution_on_any_server_raises_its_own_alert(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "SlowQueryDetected", "condition": "query_duration > 300ms"}]})
    ticker = Ticker(sensors.slow_query_sensor, instance)
    assert not ticker.tick().run_requests
    with db_env.connect() as primary, db_env.connect("read") as replica:
        primary.execute("SELECT pg_sleep(0.4)")
        replica.execute("SELECT pg_sleep(0.35)")  # statistics are per server: the replica's own
    result = ticker.tick()
    requests = {r.tags["wedefi/incident"]: r for r in result.run_requests}
    assert set(requests) == {"health.slow_query.primary", "health.slow_query.read_replica"}

    evaluation = fail_and_alert("slow_query_check_job", requests["health.slow_query.primary"], instance)
    [statement] = evaluation.metadata["evidence"].value[0]["statements"]
    assert statement["query"] == "SELECT pg_sleep($1)" and statement["max_exec_ms"] >= 400
    [alert] = alerts(db_env)
    assert alert["type"] == "slow_query" and "pg_sleep" in alert["title"]

    assert not ticker.tick().run_requests  # the same executions are not found twice
    assert [a["status"] for a in alerts(db_env)] == ["resolved"]  # clear_after_s is 0 in this test


def test_a_query_still_running_past_the_threshold_is_caught_before_it_ends(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "SlowQueryDetected", "condition": "query_duration > 300ms"}]})
    ticker = Ticker(sensors.slow_query_sensor, instance)
    ticker.tick()
    sleeper = psycopg.connect(db_env.url, autocommit=True)
    pid = sleeper.info.backend_pid
    thread = threading.Thread(target=lambda: pytest.raises(psycopg.errors.QueryCanceled,
                                                           sleeper.execute, "SELECT pg_sleep(30)"))
    thread.start()
    try:
        with db_env.database() as database:
            wait_until(lambda: HealthMonitor(database).slow_queries(None).breached, "the query to run 300 ms")
        request = only_request(ticker.tick())
        evaluation = fail_and_alert("slow_query_check_job", request, instance)
        running = evaluation.metadata["evidence"].value[0]["running"]
        assert running[0]["pid"] == pid and "pg_sleep(30)" in running[0]["query"]
    finally:
        with db_env.connect() as conn:
            conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join(10)
        sleeper.close()
    assert alerts(db_env)[0]["type"] == "slow_query"


@pytest.fixture
def restartable_primary(stack):
    yield stack.primary
    if not stack.primary.running:
        stack.primary.start()
    for name in stack.replica_servers:
        stack.wait_for_replica(name)


def test_a_cold_buffer_cache_and_a_large_index_scan_trip_the_hit_ratio(db_env, instance, health_settings,
                                                                        restartable_primary):
    health_settings({"monitoring": {"index_hit_min_blocks": 100}})
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE hit_probe (k int, pad text)")
        conn.execute("INSERT INTO hit_probe SELECT g, 'x' FROM generate_series(1, 200000) g")
        conn.execute("CREATE INDEX hit_probe_k ON hit_probe (k)")
        conn.execute("ANALYZE hit_probe")
    ticker = Ticker(sensors.index_hit_ratio_sensor, instance)
    assert not ticker.tick().run_requests
    restartable_primary.restart()  # shared buffers start empty
    with db_env.connect() as conn:  # the session's end flushes its statistics
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        assert conn.execute("SELECT count(*) FROM hit_probe WHERE k > 0").fetchone()[0] == 200000
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.index_hit_ratio.primary"
    evaluation = fail_and_alert("index_hit_ratio_check_job", request, instance)
    assert evaluation.metadata["hit_ratio_pct"].value < 95 and evaluation.metadata["blks_read"].value >= 100
    reads = evaluation.metadata["evidence"].value[0]["top_index_reads_cumulative"]
    assert reads[0]["index"] == "public.hit_probe_k"
    [alert] = alerts(db_env)
    assert alert["type"] == "index_scan_efficiency" and "below 95%" in alert["title"]


def test_idle_connections_past_the_threshold_trip_the_connection_sensor(db_env, instance, health_settings):
    with db_env.database() as database:
        baseline = HealthMonitor(database).connections().findings[0].evidence["client_backends"]
    health_settings({"alerts": [{"name": "HighConnectionCount", "condition": f"active_connections > {baseline + 3}"}]})
    with WebhookServer().running() as hook:
        ticker = Ticker(sensors.connection_count_sensor, instance, webhook_url=hook.url)
        assert not ticker.tick().run_requests
        idle = [psycopg.connect(db_env.url, autocommit=True) for _ in range(6)]
        try:
            request = only_request(ticker.tick())
            assert request.tags["wedefi/incident"] == "health.connection_count.primary"
            run = execute("connection_count_check_job", request, instance)
            [evaluation] = check_evaluations(run)
            assert not run.success and not evaluation.passed
            assert evaluation.metadata["client_backends"].value > baseline + 3
            assert evaluation.metadata["max_connections"].value == 200
            report_failure(run, instance, webhook_url=hook.url)
            assert alerts(db_env)[0]["type"] == "high_connection_count"
            assert not ticker.tick().run_requests
        finally:
            for conn in idle:
                conn.close()
        ticker.tick()
    assert [a["status"] for a in alerts(db_env)] == ["resolved"]
    assert [p["text"].split(":*")[0] for p in hook.posts] == ["*\u26a0\ufe0f HIGH CONNECTION COUNT",
                                                             "*\u2705 RESOLVED HIGH CONNECTION COUNT"]
    assert [d["metadata"]["event"] for d in deliveries(db_env)] == ["opened", "resolved"]


def test_a_check_run_after_the_breach_cleared_passes_and_raises_nothing(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "HighConnectionCount", "condition": "active_connections > 1000"}]})
    request = dg.RunRequest(run_key="manual", tags={"wedefi/incident": "health.connection_count.primary"},
                            run_config={"ops": {"database_health_connection_count": {"config": {
                                "subject": "health.connection_count.primary"}}}})
    run = execute("connection_count_check_job", request, instance)
    assert run.success and check_evaluations(run)[0].passed
    assert alerts(db_env) == []


def test_the_health_sensors_and_the_reports_schedule_run_by_default():
    from wedefi_pipelines.definitions import defs

    repo = defs.get_repository_def()
    names = ["replication_lag_sensor", "slow_query_sensor", "index_hit_ratio_sensor", "connection_count_sensor",
             "alert_on_run_failure"]
    for name in names:
        assert repo.get_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING, name
    assert repo.get_sensor_def("replication_lag_sensor").minimum_interval_seconds == 30
    assert repo.get_schedule_def("health_reports_schedule").default_status == dg.DefaultScheduleStatus.RUNNING
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert {"replication_lag", "slow_queries", "index_hit_ratio", "connection_count"} <= checks
