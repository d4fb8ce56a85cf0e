"""Issue 15's conditions provoked on the real stack (PostgreSQL 18 and 15): each opens
exactly one "Alert" through its sensor, its failing check run and the run-failure sensor,
and the sensor resolves it once the condition is cleared.

The stack is shared by the whole session: every server setting changed here is put back
and every slot created is dropped, whatever happens (a leftover slot retains WAL forever).
"""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines.defs.health import sensors
from wedefi_pipelines.health import maintenance_probes
from wedefi_pipelines.health.monitor import HealthMonitor

from .test_health import fail_and_alert, only_request, wait_until
from .test_health_support import Ticker, alerts, health_settings, instance  # noqa: F401 (fixtures)


def tick_until_request(ticker: Ticker, what: str, between=None, timeout: float = 60.0):
    """Tick (as the daemon would, keeping the cursor) until the sensor requests a run; the
    sensor must never request more than one."""
    found = []

    def requested():
        if between is not None:
            between()
        result = ticker.tick()
        if result.run_requests:
            assert len(result.run_requests) == 1, result.run_requests
            found.append(result.run_requests[0])
        return bool(found)

    wait_until(requested, what, timeout=timeout, interval=0.2)
    return found[0]


def resolves(ticker: Ticker, db, what: str) -> dict:
    """Tick until the one alert of the test is resolved; returns it."""
    def resolved():
        ticker.tick()
        rows = alerts(db)
        assert len(rows) == 1, [(a["type"], a["title"]) for a in rows]
        return rows[0] if rows[0]["status"] == "resolved" else None

    return wait_until(resolved, what, interval=0.2)


def one_alert(db, alert_type: str) -> dict:
    rows = alerts(db)
    assert [(a["type"], a["status"]) for a in rows] == [(alert_type, "pending")], [(a["type"], a["title"]) for a in rows]
    return rows[0]


@pytest.fixture
def server_setting(stack):
    """ALTER SYSTEM SET on a server of the stack for one test, reset and reloaded afterwards."""
    changed = []

    def apply(url: str, name: str, value: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            changed.append((url, name))
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")

        def reloaded():  # a new session reads the reloaded file
            with psycopg.connect(url, autocommit=True) as fresh:
                return fresh.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] == value

        wait_until(reloaded, f"{name} = {value} to be reloaded")

    yield apply
    for url, name in reversed(changed):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
            conn.execute("SELECT pg_reload_conf()")


# -- long and idle transactions ----------------------------------------------------------------


def test_a_session_idle_in_transaction_opens_one_alert_but_the_pipelines_own_session_does_not(
        db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "IdleInTransaction", "condition": "idle_in_transaction_age > 500ms"}]})
    ticker = Ticker(sensors.long_transactions_sensor, instance)
    assert not ticker.tick().run_requests
    app = psycopg.connect(db_env.url, application_name="wedefi-api")
    own = psycopg.connect(db_env.url, application_name="wedefi-pipelines:archive-export")
    try:
        app.execute("SELECT 1")  # psycopg opens a transaction: both sessions are now idle in it
        own.execute("SELECT 1")
        request = tick_until_request(ticker, "the idle session to pass 500 ms")
        assert request.tags["wedefi/incident"] == "health.idle_in_transaction.primary"
        assert request.tags["wedefi/alert_type"] == "idle_in_transaction"
        evaluation = fail_and_alert("long_transactions_check_job", request, instance)
        evidence = evaluation.metadata["evidence"].value[0]
        assert [t["pid"] for t in evidence["transactions"]] == [app.info.backend_pid]
        assert evidence["transactions"][0]["application_name"] == "wedefi-api"
        assert evidence["transactions"][0]["idle_ms"] > 500
        held = {t["pid"]: t["pipeline_session"] for t in evidence["pipeline_sessions_within_limits"]}
        assert held == {own.info.backend_pid: "wedefi-pipelines:archive-export"}
        alert = one_alert(db_env, "idle_in_transaction")
        assert f"pid {app.info.backend_pid} (postgres, wedefi-api, started" in alert["title"]
        assert "What to do (end_long_transactions" in alert["description"]
        assert not ticker.tick().run_requests  # the breach lasts: nothing more
    finally:
        app.close()
        own.close()
    assert resolves(ticker, db_env, "the idle-in-transaction alert to resolve")["metadata"]["resolvedAt"]


def test_a_long_transaction_opens_one_alert_naming_its_session(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "LongTransaction", "condition": "transaction_age > 1s"}]})
    ticker = Ticker(sensors.long_transactions_sensor, instance)
    assert not ticker.tick().run_requests
    worker = psycopg.connect(db_env.url, application_name="risk-report")
    adopt = psycopg.connect(db_env.url, application_name="wedefi-pipelines:adopt")
    adopt.execute("SELECT 1")  # a pipeline transaction, long on purpose: its own limit is 24 h
    errors = []

    def long_statement():
        try:
            worker.execute("SELECT pg_sleep(120)")  # inside a transaction: it stays active
        except psycopg.errors.QueryCanceled as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_statement)
    thread.start()
    try:
        request = tick_until_request(ticker, "the transaction to pass 1 s")
        assert request.tags["wedefi/incident"] == "health.long_transaction.primary"
        evaluation = fail_and_alert("long_transactions_check_job", request, instance)
        evidence = evaluation.metadata["evidence"].value[0]
        [tx] = evidence["transactions"]
        assert (tx["pid"], tx["application_name"], tx["state"]) == (worker.info.backend_pid, "risk-report", "active")
        assert "pg_sleep(120)" in tx["query"] and tx["age_ms"] > 1000
        assert [t["pipeline_session"] for t in evidence["pipeline_sessions_within_limits"]] == ["wedefi-pipelines:adopt"]
        alert = one_alert(db_env, "long_transaction")
        assert f"pid {worker.info.backend_pid}" in alert["title"] and "risk-report" in alert["title"]
    finally:
        with db_env.connect() as conn:
            conn.execute("SELECT pg_cancel_backend(%s)", (worker.info.backend_pid,))
        thread.join(30)
        worker.close()
        adopt.close()
    assert errors, "the long statement was not cancelled"
    resolves(ticker, db_env, "the long-transaction alert to resolve")


# -- replication slots -------------------------------------------------------------------------


def test_a_slot_without_consumer_retaining_wal_opens_one_critical_alert(db_env, stack, instance, health_settings,
                                                                        server_setting):
    health_settings({"alerts": [{"name": "ReplicationSlotRetainedWal", "condition": "retained_wal > 1MB"}]})
    admin_url = stack.primary.url("postgres")
    server_setting(admin_url, "max_slot_wal_keep_size", "1MB")  # wal_status needs it; 1 MB: unreserved at once
    slot = f"wedefi_test_{uuid.uuid4().hex[:8]}"
    ticker = Ticker(sensors.replication_slots_sensor, instance)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        try:
            admin.execute("CHECKPOINT")  # the slot reserves WAL from the last checkpoint's redo point
            admin.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            assert not ticker.tick().run_requests
            with db_env.connect() as writer:
                writer.execute("CREATE TABLE slot_writes (i int, pad text)")

                def write():  # the primary keeps writing; each switch starts a new WAL segment
                    writer.execute("INSERT INTO slot_writes SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
                    writer.execute("SELECT pg_switch_wal()")

                request = tick_until_request(ticker, "the slot to retain over 1 MB", between=write)
            incident = f"health.replication_slot.primary.{slot}"
            assert request.tags["wedefi/incident"] == incident
            assert request.tags["wedefi/severity"] == "critical"  # unreserved (or lost): its consumer is broken
            evaluation = fail_and_alert("replication_slots_check_job", request, instance)
            finding = evaluation.metadata["evidence"].value[0]
            assert finding["slot"] == slot and not finding["active"] and finding["slot_type"] == "physical"
            assert finding["wal_status"] in ("unreserved", "lost")
            assert finding["retained_bytes"] is None or finding["retained_bytes"] > 1024 * 1024
            alert = one_alert(db_env, "replication_slot")
            assert alert["severity"] == "critical" and slot in alert["title"]
            assert "What to do (fix_replication_slot" in alert["description"]
        finally:
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                          (slot,))
    resolves(ticker, db_env, "the slot alert to resolve once the slot is dropped")


# -- invalid indexes ---------------------------------------------------------------------------


def test_an_index_left_invalid_by_a_cancelled_concurrent_build_opens_one_alert(db_env, instance, health_settings):
    health_settings({})
    ticker = Ticker(sensors.invalid_indexes_sensor, instance)
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE ix_probe (id int, v int)")
        conn.execute("INSERT INTO ix_probe SELECT g, g FROM generate_series(1, 1000) g")
    assert not ticker.tick().run_requests
    # An open repeatable-read snapshot: CREATE INDEX CONCURRENTLY waits for it, and is cancelled
    # by its statement_timeout while waiting, after the index was created (invalid).
    snapshot = psycopg.connect(db_env.url)
    snapshot.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    snapshot.execute("SELECT 1")
    try:
        with db_env.connect() as conn:
            conn.execute("SET statement_timeout = '1s'")
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("CREATE INDEX CONCURRENTLY ix_probe_v ON ix_probe (v)")
    finally:
        snapshot.close()
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.invalid_index.primary"
    evaluation = fail_and_alert("invalid_indexes_check_job", request, instance)
    [index] = evaluation.metadata["evidence"].value[0]["indexes"]
    assert index["index"] == "public.ix_probe_v" and index["table"] == "public.ix_probe"
    assert "CREATE INDEX ix_probe_v ON public.ix_probe USING btree (v)" == index["definition"]
    alert = one_alert(db_env, "invalid_index")
    assert "public.ix_probe_v" in alert["title"]
    with db_env.connect() as conn:
        conn.execute("DROP INDEX CONCURRENTLY ix_probe_v")
    resolves(ticker, db_env, "the invalid-index alert to resolve")


def test_an_index_being_built_concurrently_is_not_invalid_yet(db_env, health_settings):
    health_settings({})
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE ix_building (id int, v int)")
        conn.execute("INSERT INTO ix_building SELECT g, g FROM generate_series(1, 1000) g")
    snapshot = psycopg.connect(db_env.url)
    snapshot.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    snapshot.execute("SELECT 1")
    builder = psycopg.connect(db_env.url, autocommit=True, application_name="wedefi-pipelines:adopt")
    thread = threading.Thread(target=lambda: builder.execute("CREATE INDEX CONCURRENTLY ix_building_v ON ix_building (v)"))
    thread.start()
    try:
        with db_env.connect() as conn:
            def waiting():  # the build is past its first phase: the invalid index exists
                return conn.execute("SELECT count(*) FROM pg_index WHERE indexrelid = 'ix_building_v'::regclass "
                                    "AND NOT indisvalid").fetchone()[0] if conn.execute(
                    "SELECT to_regclass('ix_building_v')").fetchone()[0] else 0
            wait_until(waiting, "the concurrent build to create its index")
            assert maintenance_probes.invalid_indexes(conn) == []
            with db_env.database() as database:
                assert not HealthMonitor(database).invalid_indexes().breached
    finally:
        snapshot.close()  # the build finishes
        thread.join(30)
        builder.close()
    with db_env.connect() as conn:
        assert maintenance_probes.invalid_indexes(conn) == []


# -- vacuum ------------------------------------------------------------------------------------


def test_dead_tuples_left_with_autovacuum_off_open_one_alert_until_vacuumed(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "VacuumBacklog", "condition": "dead_tuples_over_threshold_for > 0s"}]})
    ticker = Ticker(sensors.vacuum_health_sensor, instance)
    assert not ticker.tick().run_requests
    with db_env.connect() as conn:  # the session's end flushes its statistics
        conn.execute("CREATE TABLE vac_probe (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = false)")
        conn.execute("INSERT INTO vac_probe SELECT g, 0 FROM generate_series(1, 5000) g")
        conn.execute("ANALYZE vac_probe")  # reltuples 5000: its threshold is 50 + 0.2 x 5000
        conn.execute("UPDATE vac_probe SET v = 1")
    request = tick_until_request(ticker, "the dead tuples to be seen over the threshold")
    assert request.tags["wedefi/incident"] == "health.vacuum_backlog.primary"
    evaluation = fail_and_alert("vacuum_health_check_job", request, instance)
    [table] = evaluation.metadata["evidence"].value[0]["tables"]
    assert table["table"] == "public.vac_probe" and table["dead_tuples"] == 5000
    assert table["autovacuum_threshold"] == 1050 and table["autovacuum_enabled"] is False
    alert = one_alert(db_env, "vacuum_backlog")
    assert "public.vac_probe has 5,000 dead tuples" in alert["title"] and "autovacuum is off" in alert["title"]
    with db_env.connect() as conn:
        conn.execute("VACUUM vac_probe")
    resolves(ticker, db_env, "the vacuum alert to resolve")


# -- deadlocks ---------------------------------------------------------------------------------


def test_a_deadlock_between_two_sessions_opens_one_alert(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "Deadlocks", "condition": "deadlocks_per_minute > 0"}]})
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE dl_probe (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO dl_probe VALUES (1, 0), (2, 0)")
        before = maintenance_probes.database_counters(conn).deadlocks
    ticker = Ticker(sensors.deadlocks_sensor, instance)
    assert not ticker.tick().run_requests  # the baseline
    first, second = psycopg.connect(db_env.url), psycopg.connect(db_env.url)
    first.execute("UPDATE dl_probe SET v = 1 WHERE id = 1")
    second.execute("UPDATE dl_probe SET v = 1 WHERE id = 2")
    outcomes: dict[str, BaseException | None] = {}

    def update(name, conn, row):
        try:
            conn.execute("UPDATE dl_probe SET v = 2 WHERE id = %s", (row,))
            outcomes[name] = None
        except psycopg.Error as exc:
            outcomes[name] = exc
        conn.rollback()

    threads = [threading.Thread(target=update, args=("first", first, 2)),
               threading.Thread(target=update, args=("second", second, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    first.close()
    second.close()
    assert sorted(type(e).__name__ for e in outcomes.values()) == ["DeadlockDetected", "NoneType"], outcomes
    with db_env.connect() as conn:
        wait_until(lambda: maintenance_probes.database_counters(conn).deadlocks > before, "the deadlock to reach the statistics")
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.deadlocks.primary"
    evaluation = fail_and_alert("deadlocks_check_job", request, instance)
    assert evaluation.metadata["deadlocks"].value == 1
    alert = one_alert(db_env, "deadlocks")
    assert alert["title"].startswith("1 deadlock(s) on the primary in the last")
    resolves(ticker, db_env, "the deadlock alert to resolve on a quiet tick")


# -- standby conflicts -------------------------------------------------------------------------


def test_a_query_the_replica_cancels_for_replay_opens_one_alert(db_env, stack, instance, health_settings,
                                                                server_setting):
    health_settings({})
    replica = stack.replica("read")
    server_setting(replica.url("postgres"), "max_standby_streaming_delay", "100ms")
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE conflict_probe (id int)")
        conn.execute("INSERT INTO conflict_probe SELECT generate_series(1, 100)")
    db_env.wait_replicas()
    ticker = Ticker(sensors.standby_conflicts_sensor, instance)
    assert not ticker.tick().run_requests  # the baseline, per replica
    reader = psycopg.connect(db_env.replica_url("read"))
    try:
        assert reader.execute("SELECT count(*) FROM conflict_probe").fetchone()[0] == 100  # holds its lock
        with db_env.connect() as conn:
            conn.execute("TRUNCATE conflict_probe")  # an ACCESS EXCLUSIVE lock the replica must replay
        with db_env.connect("read") as conn:
            wait_until(lambda: maintenance_probes.database_counters(conn).conflicts.get("lock", 0) > 0,
                       "the replica to cancel the reader")
    finally:
        reader.close()
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.standby_conflict.read_replica"
    evaluation = fail_and_alert("standby_conflicts_check_job", request, instance)
    finding = evaluation.metadata["evidence"].value[0]
    assert finding["by_cause"] == {"lock": 1}
    alert = one_alert(db_env, "standby_conflicts")
    assert "read replica" in alert["title"] and "1 lock" in alert["title"]
    resolves(ticker, db_env, "the standby-conflict alert to resolve")


# -- wraparound --------------------------------------------------------------------------------


def test_transaction_id_age_past_a_low_threshold_opens_one_alert_until_frozen(db_env, instance, health_settings):
    health_settings({"alerts": [{"name": "TransactionIdWraparound", "condition": "xid_age > 100"}]})
    with db_env.connect() as conn:
        for _ in range(120):  # each statement is a transaction of its own with a new ID
            conn.execute("SELECT pg_current_xact_id()")
    ticker = Ticker(sensors.wraparound_sensor, instance)
    request = only_request(ticker.tick())
    assert request.tags["wedefi/incident"] == "health.xid_wraparound.primary"
    assert request.tags["wedefi/rule"] == "TransactionIdWraparound"
    evaluation = fail_and_alert("wraparound_check_job", request, instance)
    finding = evaluation.metadata["evidence"].value[0]
    assert finding["age"] > 100 and finding["database"] == db_env.name and finding["oldest_tables"]
    alert = one_alert(db_env, "transaction_id_wraparound")
    assert alert["severity"] == "warning" and "over the 100 threshold" in alert["title"]
    with db_env.connect() as conn:
        conn.execute("VACUUM (FREEZE)")
        assert maintenance_probes.database_age(conn).xid_age < 100
    resolves(ticker, db_env, "the wraparound alert to resolve once frozen")
