"""The platform's own health (issue 15, item 2), judged from the month catalog on the real
stack: the horizon, rows stuck in a default partition, months past their tier, and archive
runs left half-way; plus one alert opened and resolved end to end through the sensor."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from wedefi_pipelines import locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning as pv
from wedefi_pipelines.defs.health import sensors
from wedefi_pipelines.health.monitor import HealthMonitor
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines_tests.test_tiering_support import load_prices, months_ago, seed_reference, store_for

from .test_health import fail_and_alert
from .test_health_conditions import one_alert, resolves, tick_until_request
from .test_health_support import Ticker, alerts, health_settings, instance  # noqa: F401 (fixtures)


def _findings(db, condition: str) -> dict[str, object]:
    with db.database() as database:
        evaluation = HealthMonitor(database).platform()
    return {f.subject: f for f in evaluation.findings if f.condition == condition}


def _horizon(db) -> None:
    with db.connect() as conn:
        pv.run_horizon(conn, 6, earliest=Settings().partitions.start)


def test_the_horizon_is_judged_per_table(db):
    found = _findings(db, "partition_horizon")
    assert set(found) == {"PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot"}
    assert all(f.breached and f.alert_severity == "critical" for f in found.values())  # not even this month
    _horizon(db)
    assert not any(f.breached for f in _findings(db, "partition_horizon").values())


def test_rows_stuck_in_a_default_partition_are_judged_but_late_rows_of_archived_months_are_not(db):
    _horizon(db)
    far = p.add_months(p.month_of(datetime.now(timezone.utc)), 20)
    with db.connect() as conn:
        seed_reference(conn)
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        VALUES ('tok-1', 1, 'late', %s)""", (p.month_bounds(far)[0],))
    stuck = _findings(db, "default_rows")["PriceSnapshot"]
    assert stuck.breached and stuck.evidence["months"] == {p.month_year(far): 1}
    assert not _findings(db, "default_rows")["PortfolioSnapshot"].breached


def test_months_past_their_tier_and_half_way_archives(db):
    _horizon(db)
    cold, warm = months_ago(14), months_ago(3)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, cold)
        load_prices(conn, warm)
    overdue = _findings(db, "tier_overdue")["PriceSnapshot"]
    assert overdue.breached
    assert overdue.evidence["cold_overdue"] == [p.month_year(cold)]
    assert overdue.evidence["warm_overdue"] == [p.month_year(warm)]
    assert not _findings(db, "archive_unfinished")["PriceSnapshot"].breached

    def crash(step, parts):
        if step == "frozen":
            raise RuntimeError("crashed after the freeze")

    with db.database() as database, pytest.raises(RuntimeError, match="crashed after the freeze"):
        Archiver(database, store_for(db), on_step=crash).archive_month("PriceSnapshot", cold)
    left = _findings(db, "archive_unfinished")["PriceSnapshot"]
    assert left.breached and left.evidence["frozen"] == {p.month_year(cold): [p.child_name(p.PRICE_SNAPSHOT, cold)]}
    with db.connect() as conn:  # a run holding the month's lock is at work, not stopped
        with locks.session_lock(conn, "tiering.month", "PriceSnapshot", p.month_year(cold), wait_s=1):
            assert not _findings(db, "archive_unfinished")["PriceSnapshot"].breached


def test_a_missing_horizon_opens_one_alert_and_resolves_once_provisioned(db_env, instance, health_settings):
    health_settings({})
    horizon = p.horizon_months(datetime.now(timezone.utc), Settings().partitions.horizon_months)
    with db_env.connect() as conn:  # every table but PriceSnapshot has its horizon
        for table in (p.PORTFOLIO_SNAPSHOT, p.POSITION_SNAPSHOT):
            pv.ensure_months(conn, table, horizon)
    ticker = Ticker(sensors.platform_health_sensor, instance)
    request = tick_until_request(ticker, "the platform sensor to see the missing horizon")
    assert request.tags["wedefi/incident"] == "health.partition_horizon.PriceSnapshot"
    evaluation = fail_and_alert("platform_health_check_job", request, instance)
    assert "not provisioned" in evaluation.description
    one_alert(db_env, "partition_horizon")
    _horizon(db_env)
    assert resolves(ticker, db_env, "the horizon alert to resolve")["status"] == "resolved"
    assert len(alerts(db_env)) == 1


def test_a_long_statement_of_the_pipelines_own_session_is_not_a_slow_query(db_env, health_settings):
    """Adoption's verify read or an archive export runs for long: within its
    monitoring.pipeline_sessions limit it is the pipeline's work, not an incident."""
    import threading
    import time

    settings = health_settings({"alerts": [{"name": "SlowQueryDetected", "condition": "query_duration > 300ms"}]})

    def sleep_as(application_name: str) -> threading.Thread:
        def run():
            with psycopg.connect(db_env.url, application_name=application_name) as conn:
                conn.execute("SELECT pg_sleep(3)")
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def running_apps() -> list[str]:
        with db_env.database(settings) as database:
            finding = next(f for f in HealthMonitor(database).slow_queries().findings if f.subject == "primary")
        return [q["application_name"] for q in finding.evidence.get("running", [])]

    own = sleep_as("wedefi-pipelines:adopt")
    time.sleep(1)
    assert "wedefi-pipelines:adopt" not in running_apps()
    app = sleep_as("wedefi-api")
    time.sleep(1)
    assert "wedefi-api" in running_apps()
    own.join()
    app.join()
