"""The `dagster_run_retention` job (scheduled daily by `dagster_run_retention_daily`)
deletes old finished runs from this repository's PostgreSQL instance storage, keeps
recent ones and runs that materialized partitions, and leaves its own run in place."""

import dagster as dg
import pytest

from wedefi_pipelines.defs.maintenance.retention import RETENTION_DAYS, dagster_run_retention
from wedefi_pipelines_tests.cli_defs import MARKER_DIR_ENV, cli_daily, cli_ok
from wedefi_pipelines_tests.dagster_procs import dagster_setup, one_flavor

@one_flavor()
def test_the_retention_job_deletes_old_runs_only(stack, artifacts_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(MARKER_DIR_ENV, str(tmp_path))
    with dagster_setup(stack, {}, artifacts_dir / "test_daemon_retention") as setup:
        with setup.instance(monkeypatch) as instance:
            old = dg.materialize([cli_ok], instance=instance).run_id
            old_partition = dg.materialize([cli_daily], partition_key="2025-01-02", instance=instance).run_id
            recent = dg.materialize([cli_ok], instance=instance).run_id
            with setup.connect() as conn:  # age two runs past the retention
                conn.execute("UPDATE runs SET update_timestamp = update_timestamp - make_interval(days => %s) "
                             "WHERE run_id = ANY(%s)", (RETENTION_DAYS + 1, [old, old_partition]))

            result = dagster_run_retention.execute_in_process(instance=instance)
            assert result.success
            assert instance.get_run_by_id(old) is None
            assert instance.get_run_by_id(old_partition) is not None  # its events are the partition's status
            assert instance.get_run_by_id(recent) is not None
            assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
            messages = [e.user_message for e in instance.all_logs(result.run_id)]
            assert any("deleted 1 run(s)" in m and "kept 1 partition run(s)" in m for m in messages), messages

@pytest.mark.parametrize("days", [0, 3651])
def test_a_retention_out_of_range_fails_the_step_before_any_purge(days):
    result = dagster_run_retention.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        run_config={"ops": {"purge_old_runs": {"config": {"older_than_days": days}}}})
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "older_than_days" in str(failure.step_failure_data.error)
