"""The daemon proof: `dagster-daemon run` on this repository's dagster.yaml (PostgreSQL
instance storage on the test stack) ticks `partition_safety_sensor`, a sensor RUNNING by
default, which launches a `partition_horizon_job` run through the run queue; the run
succeeds and changes the app database. `dagster-daemon liveness-check` reports the
daemon alive meanwhile, and SIGTERM stops it cleanly: exit code 0, nothing it started
left running.

Runs once (PostgreSQL 18): what it proves is Dagster's, not the server's.
"""

import time
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import TickStatus

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.maintenance.sensors import HORIZON_JOB
from wedefi_pipelines.settings import current_settings
from wedefi_pipelines_tests.dagster_procs import dagster_setup, one_flavor, script, wait_for

pytestmark = [one_flavor(), pytest.mark.slow]

SENSOR = "partition_safety_sensor"
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _late_price_row(conn, at: datetime) -> None:
    """A price of a month that has no child yet: it lands in "PriceSnapshot_default"."""
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
    conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    VALUES ('tok-late', 1, '0xlate', 'LATE', 'Late', 18, now())""")
    conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                    VALUES ('tok-late', 1.25, 'synthetic', %s)""", (at,))


def _sensor_ticks(instance: dg.DagsterInstance) -> list:
    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
              if s.instigator_name == SENSOR]
    return [t for s in states for t in instance.get_ticks(s.instigator_origin_id, s.selector_id)]


def _failure_details(instance: dg.DagsterInstance, run_id: str) -> str:
    records = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE,
                                                 dg.DagsterEventType.ENGINE_EVENT})
    return "\n".join(r.message or str(r.dagster_event.event_specific_data) for r in records)


def test_the_daemon_ticks_a_default_running_sensor_whose_run_changes_the_database(stack, db, artifacts_dir,
                                                                                 monkeypatch):
    now = datetime.now(timezone.utc)
    ahead = current_settings().partitions.horizon_months
    current = p.month_of(now)
    late_month = p.add_months(current, -2)
    late_at = p.month_bounds(late_month)[0] + timedelta(days=3, hours=7)
    with db.connect() as conn:
        _late_price_row(conn, late_at)
        assert all(month_ops.attached_months(conn, t) == [] for t in p.RANGE_TABLES)  # the template has no month
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 1

    with dagster_setup(stack, db.env, artifacts_dir / "test_daemon") as setup:
        started, started_at = time.monotonic(), datetime.now(timezone.utc)
        daemon = setup.start_daemon()

        def alive() -> bool:
            daemon.assert_running()
            return setup.cli(script("dagster-daemon"), "liveness-check").returncode == 0

        def daemon_log() -> str:
            return daemon.log_tail()

        wait_for("`dagster-daemon liveness-check` to report the daemon alive", alive, 240, interval=2,
                 diagnose=daemon_log)

        with setup.instance(monkeypatch) as instance:
            def sensor_runs() -> list[dg.DagsterRun]:
                records = instance.get_run_records(dg.RunsFilter(job_name=HORIZON_JOB,
                                                                 tags={"dagster/sensor_name": SENSOR}))
                return [r.dagster_run for r in records]

            def requested_run():
                daemon.assert_running()
                requested = [r for r in sensor_runs() if "dagster/parent_run_id" not in r.tags]
                return requested[0] if requested else None

            run = wait_for(f"{SENSOR} to request a {HORIZON_JOB} run", requested_run, 240, diagnose=daemon_log)
            created = instance.get_run_record_by_id(run.run_id).create_timestamp
            requested_after = (created - started_at).total_seconds()
            daemon.note_children()  # the code server, and the run worker if already started

            def succeeded():
                """The sensor's run, or its retry (run_retries: a launch that failed under load)."""
                daemon.assert_running()
                daemon.note_children()
                runs = sensor_runs()
                done = [r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]
                failed = [r for r in runs if r.status in FINISHED - {dg.DagsterRunStatus.SUCCESS}]
                if not done and len(failed) > 1:  # the run and its one retry
                    pytest.fail("\n".join(_failure_details(instance, r.run_id) for r in failed))
                return done[0] if done else None

            wait_for(f"run {run.run_id} (or its retry) to succeed", succeeded, 300, diagnose=daemon_log)
            assert run.tags["dagster/run_key"].startswith(f"partition_safety:{now.date().isoformat()}:")
            assert "PriceSnapshot: create" in run.tags["wedefi/partition_safety"]

            # The tick that requested it is recorded as a success naming the run.
            ticks = _sensor_ticks(instance)
            assert any(t.status == TickStatus.SUCCESS and run.run_id in t.run_ids for t in ticks), ticks
            materialized = instance.get_latest_materialization_event(dg.AssetKey("partition_horizon"))
            assert materialized.run_id in {r.run_id for r in sensor_runs()}

        # The run changed the app database: the horizon exists, the late row moved into its month.
        with db.connect() as conn:
            horizon = p.months_between(current, p.add_months(current, ahead))
            assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == p.months_between(late_month, horizon[-1])
            for table in (p.PORTFOLIO_SNAPSHOT, p.POSITION_SNAPSHOT):
                assert month_ops.attached_months(conn, table) == horizon
            where = conn.execute('SELECT tableoid::regclass::text FROM "PriceSnapshot" WHERE "tokenId" = %s',
                                 ("tok-late",)).fetchall()
            assert where == [(f'"{p.child_name(p.PRICE_SNAPSHOT, late_month)}"',)]
            assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 0

        assert alive(), "liveness-check failed after the run"
        children = daemon.note_children()
        assert any("grpc" in c.cmdline or "api" in c.cmdline for c in children), (
            f"expected the daemon's code server among its children: {children}")

        stopped = daemon.stop(timeout=90)
        print(f"\n{SENSOR} requested its run {requested_after:.1f} s after the daemon process started; "
              f"whole test {time.monotonic() - started:.1f} s")
        assert stopped.returncode == 0, f"dagster-daemon exited with {stopped.returncode} on SIGTERM\n{daemon_log()}"
        assert stopped.leftovers == [], f"processes left running after the daemon stopped: {stopped.leftovers}"
