"""The provisioning assets, checks and schedules, run by Dagster against the real stack."""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._utils.schedules import cron_string_iterator

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning as pv
from wedefi_pipelines.definitions import defs
from wedefi_pipelines.defs.provisioning.assets import partition_horizon, table_partitions
from wedefi_pipelines.defs.provisioning.checks import checks
from wedefi_pipelines.defs.provisioning.schedules import (
    partition_horizon_daily,
    partition_horizon_job,
    partition_horizon_monthly,
)
from wedefi_pipelines.defs.time_partitions import monthly_partitions
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines_tests.test_provisioning import archive, catalog, insert_prices, seed_reference

RESOURCES = {"database": DatabaseResource()}
TABLES = [t.name for t in p.RANGE_TABLES]


def this_month() -> date:
    return p.month_of(datetime.now(timezone.utc))


def horizon_config(months_ahead) -> dict:
    return {"ops": {"partition_horizon": {"config": {"months_ahead": months_ahead}}}}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def run_checks() -> dict[str, dg.AssetCheckEvaluation]:
    result = dg.materialize([partition_horizon, *checks], resources=RESOURCES,
                            selection=dg.AssetSelection.checks(*checks))
    return check_results(result)


def test_the_daily_schedule_tick_runs_the_horizon_and_its_checks_go_green(db_env):
    tick = partition_horizon_daily.evaluate_tick(dg.build_schedule_context(
        scheduled_execution_time=datetime.now(timezone.utc).replace(hour=3, minute=5)))
    [request] = tick.run_requests
    job = defs.resolve_job_def(partition_horizon_job.name)
    result = job.execute_in_process(run_config=request.run_config, tags=request.tags,
                                    instance=dg.DagsterInstance.ephemeral())

    assert result.success
    expected = p.months_between(this_month(), p.add_months(this_month(), 6))
    with db_env.connect() as conn:
        for table in TABLES:
            assert month_ops.attached_months(conn, p.range_table(table)) == expected
    metadata = result.asset_materializations_for_node("partition_horizon")[0].metadata
    assert metadata["months_created"].value == 21
    assert metadata["tables"].value["PortfolioSnapshot"]["newest"] == p.month_year(expected[-1])
    assert metadata["TokenBalance"].value["present"] == list(range(8))
    evaluations = check_results(result)
    assert set(evaluations) == {"horizon_covered", "no_partition_gaps", "default_partitions_empty"}
    assert all(e.passed for e in evaluations.values())


@pytest.mark.parametrize("bad", [0, 61, -3])
def test_a_months_ahead_outside_1_to_60_fails_naming_the_field_and_changes_nothing(db_env, bad):
    with db_env.connect() as conn:
        before = catalog(conn)
    result = dg.materialize([partition_horizon], resources=RESOURCES, run_config=horizon_config(bad),
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert f"months_ahead must be an integer from 1 to 60, got {bad}" in str(failure.event_specific_data.error)
    with db_env.connect() as conn:
        assert catalog(conn) == before


def test_a_months_ahead_of_the_wrong_type_is_refused_before_the_run(db_env):
    with pytest.raises(dg.DagsterInvalidConfigError, match="months_ahead"):
        dg.materialize([partition_horizon], resources=RESOURCES, run_config=horizon_config("six"))


def test_months_ahead_from_config_is_honoured(db_env):
    result = dg.materialize([partition_horizon], resources=RESOURCES, run_config=horizon_config(12))
    assert result.success
    with db_env.connect() as conn:
        assert len(month_ops.attached_months(conn, p.PRICE_SNAPSHOT)) == 13


def test_a_backfill_of_a_month_range_creates_exactly_those_months_in_one_run(db_env):
    with db_env.connect() as conn:
        seed_reference(conn)
        insert_prices(conn, "2024-12-24 18:00")  # waits in the default until its month is made
        archive(conn, "PositionSnapshot", "2024-12")
    result = dg.materialize([table_partitions], resources=RESOURCES, tags={
        "dagster/asset_partition_range_start": "2024-11-01",
        "dagster/asset_partition_range_end": "2025-02-01",
    })
    assert result.success
    materialized = {m.partition for m in result.asset_materializations_for_node("table_partitions")}
    assert materialized == {"2024-11-01", "2024-12-01", "2025-01-01", "2025-02-01"}
    every = p.months_between(date(2024, 11, 1), date(2025, 2, 1))
    with db_env.connect() as conn:
        assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == every
        # archived with its PositionSnapshot pair: PortfolioSnapshot's December is covered, not recreated
        for table in (p.PORTFOLIO_SNAPSHOT, p.POSITION_SNAPSHOT):
            assert month_ops.attached_months(conn, table) == [m for m in every if m != date(2024, 12, 1)]
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_2024_12"').fetchone()[0] == 1
    metadata = result.asset_materializations_for_node("table_partitions")[0].metadata
    assert metadata["months_created"].value == 10 and metadata["rows_moved_from_default"].value == 1
    assert metadata["tables"].value["PortfolioSnapshot"]["archived"] == ["2024-12"]


def test_checks_are_red_with_evidence_then_green_after_the_horizon(db_env):
    with db_env.connect() as conn:
        seed_reference(conn)
        current = this_month()
        pv.ensure_months(conn, "PriceSnapshot", [p.add_months(current, -2), current])  # a gap at current - 1
        insert_prices(conn, p.add_months(current, -1).isoformat() + " 12:00")
        insert_prices(conn, p.add_months(current, -1).isoformat() + " 13:00")

    red = run_checks()
    assert not any(e.passed for e in red.values())
    assert all(e.severity == dg.AssetCheckSeverity.ERROR for e in red.values())
    gap = p.month_year(p.add_months(current, -1))
    assert red["no_partition_gaps"].metadata["gaps"].value == {"PriceSnapshot": [gap]}
    assert red["default_partitions_empty"].metadata["rows_by_table_and_month"].value == {"PriceSnapshot": {gap: 2}}
    missing = red["horizon_covered"].metadata["missing_months"].value
    assert set(missing) == set(TABLES) and len(missing["PriceSnapshot"]) == 6

    assert dg.materialize([partition_horizon], resources=RESOURCES).success
    green = run_checks()
    assert all(e.passed for e in green.values()), {k: e.description for k, e in green.items()}


def test_a_failed_horizon_fails_the_run_with_the_problem_and_keeps_what_it_did(db_env):
    with db_env.connect() as conn:
        conn.execute('ALTER TABLE "TokenBalance" DETACH PARTITION "TokenBalance_part_2"')
    result = dg.materialize([partition_horizon], resources=RESOURCES, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "TokenBalance_part_2 exists unattached" in str(failure.event_specific_data.error)
    with db_env.connect() as conn:
        assert len(month_ops.attached_months(conn, p.PRICE_SNAPSHOT)) == 7


def test_schedules_target_the_horizon_job_monthly_on_the_first_and_daily_otherwise():
    for schedule in (partition_horizon_monthly, partition_horizon_daily):
        tick = schedule.evaluate_tick(dg.build_schedule_context(
            scheduled_execution_time=datetime(2025, 3, 1, tzinfo=timezone.utc)))
        assert len(tick.run_requests) == 1 and schedule.job_name == "partition_horizon_job"
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        assert schedule.execution_timezone == "UTC"
    start = datetime(2024, 12, 31, tzinfo=timezone.utc).timestamp()
    end = datetime(2025, 3, 2, tzinfo=timezone.utc)

    def ticks(schedule) -> list[datetime]:
        found = []
        for moment in cron_string_iterator(start, schedule.cron_schedule, "UTC"):
            if moment >= end:
                return found
            found.append(moment)

    monthly, daily = ticks(partition_horizon_monthly), ticks(partition_horizon_daily)
    assert [m.date() for m in monthly] == [date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)]
    every_day = {date(2024, 12, 31) + timedelta(days=i) for i in range(61)}
    assert sorted(m.date() for m in monthly + daily) == sorted(every_day)  # one run a day, no day twice


def test_table_partitions_shares_the_monthly_partitions_and_runs_a_backfill_once():
    assert table_partitions.partitions_def == monthly_partitions
    assert table_partitions.backfill_policy == dg.BackfillPolicy.single_run()
