"""The root dagster.yaml instance: settings, PostgreSQL storage proven by reading events back,
the SQLite fallback rules of wedefi_pipelines/instance.py, pool limits and run retention.

An instance that merely loads proves nothing (with SQLAlchemy 2.1 `dagster instance info`
passes while every event write fails), so the PostgreSQL tests materialize through the
real CLI into a fresh `dagster` database and read the events back with SQL and through
the instance API.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.scheduler.instigation import TickStatus
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from psycopg import sql

from wedefi_pipelines import instance as wedefi_instance
from wedefi_pipelines.instance import RunInfo, is_purgeable, purge_runs
from wedefi_pipelines_tests.cli_defs import MARKER_DIR_ENV, cli_daily, cli_ok

REPO = Path(__file__).resolve().parent.parent
DAGSTER_VARS = ("DAGSTER_HOME", "DAGSTER_PG_URL", "DAGSTER_IS_DEV_CLI", wedefi_instance.ENV_THROWAWAY)


def _home_with_root_config(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", path / "dagster.yaml")
    return path


def _load(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in DAGSTER_VARS}
    return subprocess.run([sys.executable, "-m", "dagster", *args], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def no_dagster_env(monkeypatch, tmp_path):
    for var in DAGSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    # Keep the fallback's throwaway folder inside the test's tmp_path, not in this process's env for good.
    monkeypatch.setenv(wedefi_instance.ENV_THROWAWAY, str(tmp_path / "throwaway"))


# -- fallback rules ---------------------------------------------------------------------


def test_the_url_wins_whenever_it_is_set(no_dagster_env, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "/somewhere")
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql://u@h/dagster")
    assert wedefi_instance.instance_postgres_url() == "postgresql://u@h/dagster"


@pytest.mark.parametrize("var", ["DAGSTER_HOME", "DAGSTER_IS_DEV_CLI"])
def test_a_persistent_instance_without_the_url_is_an_error_naming_it(no_dagster_env, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(wedefi_instance.DagsterStorageConfigError, match="DAGSTER_PG_URL is not set"):
        wedefi_instance.instance_postgres_url()


def test_a_one_shot_command_without_any_environment_gets_a_throwaway_instance(no_dagster_env):
    assert wedefi_instance.instance_postgres_url() is None


def test_the_cli_with_dagster_home_but_no_url_fails_naming_dagster_pg_url(tmp_path):
    home = _home_with_root_config(tmp_path / "home")
    result = _cli({"DAGSTER_HOME": str(home), MARKER_DIR_ENV: str(tmp_path)},
                  "asset", "materialize", "-m", "wedefi_pipelines_tests.cli_defs", "--select", "cli_ok")
    assert result.returncode != 0
    assert "DAGSTER_PG_URL is not set" in result.stderr
    assert not (tmp_path / "cli_ok").exists()


# -- the root dagster.yaml's settings ------------------------------------------------------


def test_root_dagster_yaml_settings(no_dagster_env, tmp_path):
    with _load(_home_with_root_config(tmp_path / "home")) as instance:
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.nux_enabled is False
        assert instance.run_monitoring_enabled
        sensor_retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
        assert sensor_retention[TickStatus.SKIPPED] == 3 and sensor_retention[TickStatus.SUCCESS] == 30
        assert set(instance.get_tick_retention_settings(InstigatorType.SCHEDULE).values()) == {90}
        limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
        assert limits == {"wedefi_archive": 1, "wedefi_ddl": 1, "wedefi_warm": 1}


# -- run retention (pure rule) --------------------------------------------------------------

CUTOFF = datetime(2025, 6, 1, tzinfo=timezone.utc)
OLD = CUTOFF - timedelta(days=1)


@pytest.mark.parametrize(
    ("run", "purge"),
    [
        (RunInfo("a", "SUCCESS", OLD, {}), True),
        (RunInfo("b", "FAILURE", OLD, {"dagster/sensor_name": "health"}), True),
        (RunInfo("c", "CANCELED", OLD, {}), True),
        (RunInfo("d", "SUCCESS", CUTOFF + timedelta(seconds=1), {}), False),
        (RunInfo("e", "STARTED", OLD, {}), False),
        (RunInfo("f", "QUEUED", OLD, {}), False),
        (RunInfo("g", "SUCCESS", OLD, {"dagster/partition": "2025-01-01"}), False),
        (RunInfo("h", "SUCCESS", OLD, {"dagster/asset_partition_range_start": "2025-01-01",
                                       "dagster/asset_partition_range_end": "2025-01-31"}), False),
    ],
    ids=["old-success", "old-failure", "old-canceled", "recent", "running", "queued", "partition", "range"],
)
def test_only_old_finished_runs_without_partitions_are_purgeable(run, purge):
    assert is_purgeable(run, CUTOFF) is purge


def test_purge_refuses_a_zero_day_retention(no_dagster_env, tmp_path):
    with _load(_home_with_root_config(tmp_path / "home")) as instance:
        with pytest.raises(ValueError, match="older_than_days"):
            purge_runs(instance, 0)


# -- on PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def dagster_pg(stack, monkeypatch, tmp_path):
    """A fresh, empty `dagster` database on the stack's primary and a DAGSTER_HOME using the root dagster.yaml."""
    name = "dagster_" + uuid.uuid4().hex[:10]
    stack.create_database(name)
    url = stack.primary.url(name)
    home = _home_with_root_config(tmp_path / "dagster_home")
    for var in DAGSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_URL", url)
    try:
        yield home, url
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _events(url: str, run_id: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT dagster_event_type, asset_key FROM event_logs WHERE run_id = %s ORDER BY id", (run_id,)
        ).fetchall()


def test_cli_materialization_through_this_instance_is_stored_in_postgresql(db, dagster_pg, tmp_path):
    home, url = dagster_pg
    env = {**db.env, "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": url, MARKER_DIR_ENV: str(tmp_path)}

    with _load(home):  # creates the storage's tables once, so the two commands below can run at once
        pass
    with ThreadPoolExecutor(max_workers=2) as pool:
        result, failed = pool.map(lambda args: _cli(env, "asset", "materialize", "-m", *args), [
            ("wedefi_pipelines.definitions", "--select", "database_schema"),
            ("wedefi_pipelines_tests.cli_defs", "--select", "cli_broken"),
        ])
    assert result.returncode == 0, result.stderr
    assert failed.returncode != 0

    # Read back with SQL: both runs, their final status and the events the run workers wrote.
    with psycopg.connect(url) as conn:
        runs = dict(conn.execute("SELECT pipeline_name || ':' || status, run_id FROM runs").fetchall())
        pools = dict(conn.execute('SELECT concurrency_key, "limit" FROM concurrency_limits').fetchall())
    assert set(runs) == {"__ASSET_JOB:SUCCESS", "__ASSET_JOB:FAILURE"}
    assert pools == {"wedefi_archive": 1, "wedefi_ddl": 1, "wedefi_warm": 1}
    good = _events(url, runs["__ASSET_JOB:SUCCESS"])
    assert ("ASSET_MATERIALIZATION", json.dumps(["database_schema"])) in good
    assert good[-1][0] == dg.DagsterEventType.RUN_SUCCESS.value  # stored as PIPELINE_SUCCESS
    bad = _events(url, runs["__ASSET_JOB:FAILURE"])
    assert [e for e, _ in bad].count("STEP_FAILURE") == 1 and bad[-1][0] == dg.DagsterEventType.RUN_FAILURE.value

    # ... and through the instance API, on the same storage.
    with _load(home) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        event = instance.get_latest_materialization_event(dg.AssetKey("database_schema"))
        assert event is not None and event.run_id == runs["__ASSET_JOB:SUCCESS"]
        assert "0001_reference_tables.sql" in event.asset_materialization.metadata["migrations"].value
        failure = instance.get_run_by_id(runs["__ASSET_JOB:FAILURE"])
        assert failure.status == dg.DagsterRunStatus.FAILURE


def test_pool_limits_follow_dagster_yaml(dagster_pg):
    home, url = dagster_pg
    with _load(home) as instance:
        instance.event_log_storage.set_concurrency_slots("wedefi_archive", 5)  # e.g. changed in the UI
    with _load(home) as instance:  # the next process to start puts the file's limit back
        limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
    assert limits["wedefi_archive"] == 1


def test_purge_runs_deletes_old_runs_with_their_events_and_logs_but_keeps_partition_runs(dagster_pg, tmp_path,
                                                                                           monkeypatch):
    home, url = dagster_pg
    monkeypatch.setenv(MARKER_DIR_ENV, str(tmp_path))
    with _load(home) as instance:
        plain = dg.materialize([cli_ok], instance=instance).run_id
        partition = dg.materialize([cli_daily], partition_key="2025-01-02", instance=instance).run_id
        logs_dir = Path(instance.compute_log_manager._base_dir, plain)  # noqa: SLF001 (where its step logs are)
        assert logs_dir.is_dir()

        recent = purge_runs(instance, 90)
        assert recent.deleted == [] and recent.kept_for_partitions == 0  # nothing is old yet
        command = subprocess.run([sys.executable, "-m", "wedefi_pipelines.instance", "purge-runs",
                                  "--older-than-days", "1", "--dry-run"], capture_output=True, text=True, timeout=120)
        assert command.returncode == 0, command.stderr
        assert "would delete 0 run(s)" in command.stdout

        later = datetime.now(timezone.utc) + timedelta(days=91)
        dry = purge_runs(instance, 90, now=later, dry_run=True)
        assert dry.deleted == [plain] and instance.get_run_by_id(plain) is not None

        result = purge_runs(instance, 90, now=later)
        assert result.deleted == [plain] and result.kept_for_partitions == 1
        assert instance.get_run_by_id(plain) is None and not logs_dir.exists()
        assert _events(url, plain) == []
        assert _events(url, partition)  # the partition's status still has its events
        status = instance.get_latest_materialization_event(dg.AssetKey("cli_daily"))
        assert status is not None and status.run_id == partition

        assert purge_runs(instance, 90, now=later).deleted == []  # re-running is a no-op
