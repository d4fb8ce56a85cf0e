"""`wedefi-pipelines healthcheck`: the pure judgement, then the command against a real
`dagster-daemon` on this repository's dagster.yaml, which is then stopped.

The daemon part runs once (PostgreSQL 18): what it proves is Dagster's, not the server's.
"""

import subprocess
import sys
import time

import dagster as dg
import pytest
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import InstigatorStatus, TickData, TickStatus
from dagster._utils.error import SerializableErrorInfo

from wedefi_pipelines.health.healthcheck import Heartbeat, Instigator, judge
from wedefi_pipelines_tests.dagster_procs import dagster_setup, one_flavor, wait_for

NOW = 1_800_000_000.0
REQUIRED = ["SENSOR", "SCHEDULER"]


def _sensor(name="slow_query_sensor", ago=10.0, status="SKIPPED", running=True, interval=30.0, error=None):
    return Instigator("sensor", name, running, interval, None if ago is None else NOW - ago, status, error)


def test_fresh_heartbeats_and_ticking_sensors_are_healthy():
    beats = [Heartbeat("SENSOR", NOW - 5), Heartbeat("SCHEDULER", NOW - 40)]
    schedules = [Instigator("schedule", "tiering_daily", True, None, NOW - 86_000, "SUCCESS")]
    assert judge(beats, REQUIRED, [_sensor(), *schedules], NOW, tolerance_s=300) == []


def test_each_problem_is_named():
    beats = [Heartbeat("SENSOR", NOW - 400)]  # SCHEDULER never beat
    found = [
        _sensor("late_sensor", ago=400),
        _sensor("failing_sensor", status="FAILURE", error="psycopg.OperationalError: connection refused\nTraceback"),
        _sensor("never_sensor", ago=None, status=None),
        _sensor("stopped_sensor", ago=10_000, running=False),
        Instigator("schedule", "tiering_daily", True, None, NOW - 60, "FAILURE", "KeyError: 'x'"),
        Instigator("schedule", "stopped_schedule", False, None, NOW - 60, "FAILURE", "ignored"),
    ]
    problems = [str(p) for p in judge(beats, REQUIRED, found, NOW, tolerance_s=300)]
    assert problems == [
        "daemon SENSOR: last heartbeat 400 s ago, over 330 s: the daemon is down or stuck",
        "daemon SCHEDULER: no heartbeat in this instance: the daemon is not running (or runs against another "
        "DAGSTER_HOME)",
        "sensor late_sensor: last tick 400 s ago, over its 30 s interval + 300 s tolerance",
        "sensor failing_sensor: last tick failed (10 s ago): psycopg.OperationalError: connection refused",
        "sensor never_sensor: RUNNING but it has never ticked",
        "schedule tiering_daily: last tick failed (60 s ago): KeyError: 'x'",
    ]


def test_liveness_judges_heartbeats_only_and_ignores_their_errors():
    beats = [Heartbeat("SENSOR", NOW - 5, ("user code failed to load",)), Heartbeat("SCHEDULER", NOW - 5)]
    broken = [_sensor(status="FAILURE", error="boom"), _sensor("late", ago=4000)]
    assert judge(beats, REQUIRED, broken, NOW, 300, liveness=True) == []
    assert [p.subject for p in judge(beats, REQUIRED, broken, NOW, 300)] == ["daemon SENSOR", "sensor slow_query_sensor",
                                                                            "sensor late"]


def test_a_sensor_just_turned_on_is_not_late_before_its_first_interval():
    fresh = Instigator("sensor", "new", True, 30.0, None, None, None, started_at=NOW - 10)
    assert judge([], [], [fresh], NOW, 60) == []
    old = Instigator("sensor", "new", True, 30.0, None, None, None, started_at=NOW - 100)
    assert [str(p) for p in judge([], [], [old], NOW, 60)] == ["sensor new: RUNNING but it has never ticked"]


# -- against a real daemon ------------------------------------------------------------------------

TOLERANCE_S = 20  # sensors tick every 30 s: stale 50 s after the daemon stops


def _healthcheck(setup, *args: str) -> subprocess.CompletedProcess:
    return setup.cli(sys.executable, "-m", "wedefi_pipelines.cli", "healthcheck", *args, timeout=180)


@one_flavor()
@pytest.mark.slow
def test_healthcheck_against_a_real_daemon_that_is_then_stopped(stack, db, artifacts_dir, monkeypatch):
    settings = {"monitoring": {"healthcheck_tolerance_s": TOLERANCE_S}}
    with dagster_setup(stack, db.env, artifacts_dir / "test_healthcheck", settings=settings) as setup:
        before = _healthcheck(setup)
        assert before.returncode == 1 and "daemon SENSOR: no heartbeat in this instance" in before.stdout, before

        daemon = setup.start_daemon()
        last = {}

        def healthy():
            daemon.assert_running()
            last["result"] = _healthcheck(setup)
            return last["result"].returncode == 0

        wait_for("`healthcheck` to pass with the daemon up", healthy, 300, interval=3,
                 diagnose=lambda: f"{last.get('result')}\n{daemon.log_tail()}")
        assert "running sensor(s) ticking" in last["result"].stdout
        assert _healthcheck(setup, "--liveness").returncode == 0

        # A schedule whose last tick failed (schedules tick at their cron time only, so the
        # failed tick is recorded here as the scheduler daemon would record it).
        with setup.instance(monkeypatch) as instance:
            state = wait_for("the scheduler to record health_reports_schedule", lambda: next(
                (s for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
                 if s.instigator_name == "health_reports_schedule"), None), 120, interval=2)
            assert state.status in (InstigatorStatus.DECLARED_IN_CODE, InstigatorStatus.RUNNING)
            instance.create_tick(TickData(
                instigator_origin_id=state.instigator_origin_id, instigator_name=state.instigator_name,
                instigator_type=InstigatorType.SCHEDULE, status=TickStatus.FAILURE, timestamp=time.time(),
                selector_id=state.selector_id,
                error=SerializableErrorInfo("ConnectionError: the report's server is gone\n", [], "ConnectionError"),
            ))
        failing = _healthcheck(setup)
        assert failing.returncode == 1
        assert failing.stdout.splitlines() == [
            line for line in failing.stdout.splitlines() if line.startswith("schedule health_reports_schedule")]
        assert "last tick failed" in failing.stdout and "the report's server is gone" in failing.stdout
        assert _healthcheck(setup, "--liveness").returncode == 0  # a user-code failure: the daemon stays

        stopped = daemon.stop(timeout=90)
        assert stopped.returncode == 0, daemon.log_tail()

        def liveness_fails():
            result = _healthcheck(setup, "--liveness")
            last["result"] = result
            # the daemon's threads heartbeat at their own times: wait until the sensor daemon's is stale too
            return result if result.returncode == 1 and "daemon SENSOR: last heartbeat" in result.stdout else None

        dead = wait_for("`healthcheck --liveness` to see the stale heartbeat", liveness_fails, 240, interval=5,
                        diagnose=lambda: str(last.get("result")))
        assert "daemon SENSOR: last heartbeat" in dead.stdout and "the daemon is down or stuck" in dead.stdout
        assert not any(line.startswith("sensor ") for line in dead.stdout.splitlines())

        def sensors_late():
            result = _healthcheck(setup)
            last["result"] = result
            return result if "sensor slow_query_sensor: last tick" in result.stdout else None

        full = wait_for("`healthcheck` to name the sensors that stopped ticking", sensors_late, 120, interval=5,
                        diagnose=lambda: str(last.get("result")))
        assert full.returncode == 1
        assert f"over its 30 s interval + {TOLERANCE_S} s tolerance" in full.stdout
        assert "schedule health_reports_schedule: last tick failed" in full.stdout


def test_healthcheck_without_an_instance_says_what_to_set(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "wedefi_pipelines.cli", "healthcheck"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "DAGSTER_HOME is not set" in result.stderr


def test_the_internal_dagster_types_it_reads_still_exist():
    """dagster_state.py imports these from dagster._core: an upgrade that moves them fails here."""
    from wedefi_pipelines.health import dagster_state

    assert dagster_state.InstigatorStatus.DECLARED_IN_CODE and dagster_state.InstigatorType.SENSOR
    assert {"get_daemon_heartbeats", "get_required_daemon_types", "all_instigator_state", "get_ticks"} <= set(
        dir(dg.DagsterInstance))
