"""Read/write routing over a real primary and two real streaming replicas."""

import logging
import time

import psycopg
import pytest

from wedefi_pipelines import devstack
from wedefi_pipelines.settings import parse_settings

WHOAMI = "SELECT pg_is_in_recovery(), (SELECT conninfo FROM pg_stat_wal_receiver LIMIT 1)"


def served_by(conn: psycopg.Connection) -> str:
    in_recovery, conninfo = conn.execute(WHOAMI).fetchone()
    if not in_recovery:
        return "primary"
    return psycopg.conninfo.conninfo_to_dict(conninfo)["application_name"]


def test_a_row_written_on_the_primary_is_read_back_from_each_replica(db):
    with db.connect() as conn:
        conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (8453, 'Base', now())""")
    db.wait_replicas()
    for route in ("read", "analytics"):
        with db.connect(route) as replica:
            assert replica.execute('SELECT name FROM "Chain" WHERE id = 8453').fetchone() == ("Base",)


def test_each_workload_goes_to_the_seeds_server(db):
    with db.database() as database:
        expected = {
            "portfolio_queries": devstack.READ_REPLICA,
            "user_dashboard": devstack.READ_REPLICA,
            "balance_sync": "primary",
            "alert_processing": "primary",
            "risk_analytics": devstack.ANALYTICS_REPLICA,
        }
        for workload, server in expected.items():
            with database.connection(workload) as conn:
                assert served_by(conn) == server, workload


def test_unset_replica_urls_fall_back_to_the_primary(db):
    from wedefi_pipelines.resources.database import Database

    with Database(db.url) as database:
        for workload in ("portfolio_queries", "risk_analytics"):
            with database.connection(workload) as conn:
                assert served_by(conn) == "primary"


@pytest.fixture
def analytics_replica(stack):
    replica = stack.replica("analytics")
    yield replica
    if not replica.running:
        replica.start()
        stack.wait_for_replica(replica.name)


def test_a_stopped_replica_is_skipped_for_the_primary_and_logged(db, analytics_replica, caplog):
    with db.database() as database:
        with database.connection("risk_analytics") as conn:
            assert served_by(conn) == devstack.ANALYTICS_REPLICA
        analytics_replica.stop()
        database._health.clear()
        with caplog.at_level(logging.WARNING):
            with database.connection("risk_analytics") as conn:
                assert served_by(conn) == "primary"
            # still answered while the replica stays down, logged once, not per query
            with database.connection("risk_analytics") as conn:
                assert served_by(conn) == "primary"
        warnings = [r.getMessage() for r in caplog.records if "risk_analytics" in r.getMessage()]
        assert len(warnings) == 1 and "served by the primary" in warnings[0]
        # the read replica is unaffected
        with database.connection("portfolio_queries") as conn:
            assert served_by(conn) == devstack.READ_REPLICA


@pytest.fixture
def paused_read_replica(stack):
    replica = stack.replica("read")
    with psycopg.connect(replica.url("postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            yield replica
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")


def test_a_replica_lagging_past_its_threshold_is_skipped_until_it_catches_up(db, paused_read_replica, caplog):
    settings = parse_settings({"database": {"read_replica": {"lag_threshold": "50ms"}, "lag_check_interval_s": 0}})
    with db.database(settings) as database, db.connect() as primary:
        primary.execute("CREATE TABLE lag_probe (i int)")
        deadline = time.monotonic() + 20
        while True:  # write until the paused replica is measurably behind
            primary.execute("INSERT INTO lag_probe SELECT generate_series(1, 1000)")
            health = database.replica_health("read")
            if not health.usable or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not health.usable and health.lag_ms > 50, health
        assert devstack.READ_REPLICA in health.reason
        with caplog.at_level(logging.WARNING):
            with database.connection("portfolio_queries") as conn:
                assert served_by(conn) == "primary"
        assert any("lags" in r.getMessage() for r in caplog.records)
        with psycopg.connect(paused_read_replica.url("postgres"), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        db.wait_replicas()
        deadline = time.monotonic() + 20
        while not database.replica_health("read").usable and time.monotonic() < deadline:
            time.sleep(0.1)
        with database.connection("portfolio_queries") as conn:
            assert served_by(conn) == devstack.READ_REPLICA
