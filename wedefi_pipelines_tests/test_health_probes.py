"""Each probe on real PostgreSQL (18 and 15), primary and replicas: per server, per database."""

import psycopg
import pytest

from wedefi_pipelines import devstack
from wedefi_pipelines.health import probes, rules
from wedefi_pipelines.health.monitor import HealthMonitor


def test_a_probe_runs_under_its_statement_timeout_and_leaves_the_session_alone(db):
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.QueryCanceled):
            with probes.bounded(conn, 100):
                conn.execute("SELECT pg_sleep(2)")
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"


def test_statements_are_those_of_this_database_only(db, stack):
    with db.connect() as conn:
        conn.execute("SELECT 42 AS health_probe_marker")
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as other:
        other.execute("SELECT 'elsewhere' AS other_database_marker")
    with db.connect() as conn:
        snapshot = probes.statement_snapshot(conn)
        texts = probes.statement_texts(conn, list(snapshot.statements))
    assert any("health_probe_marker" in t for t in texts.values())
    assert not any("other_database_marker" in t for t in texts.values())
    assert snapshot.stats_reset is not None


def test_the_sensor_snapshot_holds_only_statements_past_its_threshold(db):
    with db.connect() as conn:
        conn.execute("SELECT pg_sleep(0.12)")
        conn.execute("SELECT 1 AS quick")
        everything = probes.statement_snapshot(conn)
        slow = probes.statement_snapshot(conn, min_max_exec_ms=100)
        texts = probes.statement_texts(conn, list(slow.statements))
    assert list(texts.values()) == ["SELECT pg_sleep($1)"]
    assert len(everything.statements) > 1 and slow.stats_reset == everything.stats_reset


def test_block_read_time_comes_from_the_column_the_installed_extension_has(db):
    with db.connect() as conn:
        conn.execute("SELECT count(*) FROM pg_class")
        expected = "shared_blk_read_time" if conn.info.server_version >= 170000 else "blk_read_time"
        assert probes.block_read_time_column(conn) == expected
        snapshot = probes.statement_snapshot(conn, with_read_time=True)
    assert snapshot.statements and all(s.read_time_ms >= 0 for s in snapshot.statements.values())


def test_a_database_without_pg_stat_statements_gets_an_error_naming_the_fix(db):
    with db.connect() as conn:
        conn.execute("DROP EXTENSION pg_stat_statements")
        with pytest.raises(probes.ProbeError, match="CREATE EXTENSION pg_stat_statements"):
            probes.statement_snapshot(conn)


def test_each_replica_names_itself_and_the_primary_is_no_replica(db):
    with db.connect("read") as conn:
        assert probes.replica_identity(conn) == devstack.READ_REPLICA
    with db.connect("analytics") as conn:
        assert probes.replica_identity(conn) == devstack.ANALYTICS_REPLICA
    with db.connect() as conn:
        with pytest.raises(ValueError, match="not a replica"):
            probes.replica_identity(conn)
        lags = probes.replica_lags(conn)
    assert set(lags) == {devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA}


def test_idle_connections_count_and_show_in_the_breakdown(db):
    with db.connect() as conn:
        before = probes.connection_counts(conn)
        extra = [psycopg.connect(db.url, autocommit=True) for _ in range(3)]
        try:
            after = probes.connection_counts(conn)
        finally:
            for c in extra:
                c.close()
    assert after.total == before.total + 3
    assert after.max_connections == 200
    idle_here = sum(n for dbname, state, _app, n in after.breakdown if dbname == db.name and state == "idle")
    assert idle_here >= 3


def test_index_scans_on_a_replica_show_on_that_replica_only_so_the_index_is_not_unused(db):
    with db.connect() as conn:
        conn.execute("CREATE TABLE probe_t (id int, v int)")
        conn.execute("INSERT INTO probe_t SELECT g, g FROM generate_series(1, 1000) g")
        conn.execute("CREATE INDEX probe_t_v ON probe_t (v)")
        conn.execute("CREATE INDEX probe_t_never ON probe_t (id)")
        conn.execute("ANALYZE probe_t")
    db.wait_replicas()
    with db.connect("read") as replica:  # closing the session flushes its statistics
        replica.execute("SET enable_seqscan = off")
        replica.execute("SELECT v FROM probe_t WHERE v = 7").fetchall()
    usage = {}
    for server in ("primary", "read", "analytics"):
        with db.connect(server) as conn:
            usage[server] = [u for u in probes.index_usage(conn) if u.table == "probe_t"]
    scans = {s: {u.index: u.scans for u in usage[s]} for s in usage}
    assert scans["primary"]["probe_t_v"] == 0 and scans["read"]["probe_t_v"] >= 1
    rows = {r["index"]: r for r in rules.unused_indexes(usage)}
    assert not rows["probe_t_v"]["unused"] and rows["probe_t_never"]["unused"]
    assert rows["probe_t_never"]["size_bytes"] > 0


def test_the_monitor_probes_every_distinct_server_once(db):
    with db.database() as database:
        monitor = HealthMonitor(database)
        assert [label for label, _s in monitor.servers()] == ["primary", "read_replica", "analytics_replica"]
        evaluation = monitor.connections()
    assert [f.subject for f in evaluation.findings] == ["primary", "read_replica", "analytics_replica"]
    assert not evaluation.breached
