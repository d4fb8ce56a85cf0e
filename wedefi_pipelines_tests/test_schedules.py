"""Every schedule in `defs`, evaluated for a given tick with `build_schedule_context`.

The schedules are enumerated from `wedefi_pipelines.definitions.defs`, so a new one is
covered without editing this file: its crons must be valid and at least a minute apart,
and its tick must make run requests the daemon can launch (an existing job, run config
the job accepts, a partition key of the job's partitions). The schedules known today
also have their exact requests checked. Schedules that read the database (they take
resources) are evaluated against a real one holding 14 months of history.
"""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._core.definitions.schedule_definition import ScheduleExecutionData
from dagster._utils.schedules import cron_string_iterator, is_valid_cron_string

from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.definitions import defs

REPO = defs.get_repository_def()
SCHEDULES = {s.name: s for s in REPO.schedule_defs}
# A tick is evaluated at each schedule's first cron time after this moment.
ANCHOR = datetime(2025, 3, 14, 10, 7, tzinfo=timezone.utc)
HISTORY = p.months_between(date(2024, 1, 1), date(2025, 2, 1))  # seeded for schedules that read the database


def _crons(schedule: dg.ScheduleDefinition) -> list[str]:
    cron = schedule.cron_schedule
    return [cron] if isinstance(cron, str) else list(cron)


def _ticks(schedule: dg.ScheduleDefinition, after: datetime, count: int) -> list[datetime]:
    """The schedule's next `count` tick times after `after` (all its crons merged)."""
    times = set()
    for cron in _crons(schedule):
        iterator = cron_string_iterator(after.timestamp() + 1, cron, schedule.execution_timezone or "UTC")
        times.update(next(iterator) for _ in range(count))
    return sorted(times)[:count]


def _tick(name: str) -> datetime:
    return _ticks(SCHEDULES[name], ANCHOR, 1)[0].astimezone(timezone.utc)


def _seed_history(db) -> None:
    """Monthly children for HISTORY (plus the tick's month) and one price row per month."""
    with db.connect() as conn:
        outcomes = provisioning.provision_months(conn, [*HISTORY, date(2025, 3, 1)])
        assert not [o for results in outcomes.values() for o in results if o.action == "failed"]
        conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
        conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                        VALUES ('tok-1', 1, '0x1', 'ONE', 'One', 18, now())""")
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        SELECT 'tok-1', 1.5, 'synthetic', m + interval '14 days'
                          FROM unnest(%s::timestamp[]) AS m""", ([p.month_bounds(m)[0] for m in HISTORY],))


def _evaluate(schedule: dg.ScheduleDefinition, at: datetime) -> ScheduleExecutionData:
    top = REPO.get_top_level_resources()
    resources = {key: top[key] for key in schedule.required_resource_keys}
    with dg.build_schedule_context(scheduled_execution_time=at, repository_def=REPO, resources=resources) as context:
        return schedule.evaluate_tick(context)


@pytest.fixture
def history(db_env):
    """The contract's variables point at a database holding HISTORY, for schedules that read it."""
    _seed_history(db_env)
    return db_env


def _requests(data: ScheduleExecutionData) -> list[dg.RunRequest]:
    return list(data.run_requests or [])


# -- every schedule -----------------------------------------------------------------------------


def test_defs_has_the_schedules_this_file_checks_exactly():
    known = {*EXACT, "tiering_daily"}
    assert known <= set(SCHEDULES), f"missing schedules: {sorted(known - set(SCHEDULES))}"


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_crons_are_valid_and_ticks_at_least_a_minute_apart(name):
    schedule = SCHEDULES[name]
    assert all(is_valid_cron_string(c) for c in _crons(schedule)), _crons(schedule)
    ticks = _ticks(schedule, ANCHOR, 200)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) >= timedelta(minutes=1), f"{name}: ticks {min(gaps)} apart"


PURE = sorted(n for n, s in SCHEDULES.items() if not s.required_resource_keys)
READING = sorted(n for n, s in SCHEDULES.items() if s.required_resource_keys)


@pytest.mark.parametrize("name", PURE)
def test_a_tick_makes_run_requests_the_daemon_can_launch(name):
    _check_tick(name)


@pytest.mark.parametrize("name", READING)
def test_a_tick_of_a_schedule_reading_the_database_makes_launchable_run_requests(name, history):
    _check_tick(name)


def _check_tick(name: str) -> None:
    schedule = SCHEDULES[name]
    at = _tick(name)
    data = _evaluate(schedule, at)
    requests = _requests(data)
    assert requests, f"{name} made no run request at {at.isoformat()}: {data.skip_message}"
    job = REPO.get_job(schedule.job_name)
    keys = [r.run_key for r in requests if r.run_key]
    assert len(keys) == len(set(keys)), f"duplicate run keys: {keys}"
    for request in requests:
        assert request.job_name in (None, schedule.job_name)
        dg.validate_run_config(job, request.run_config)  # raises naming what the job rejects
        assert all(isinstance(v, str) for v in request.tags.values()), request.tags
        if job.partitions_def is None:
            assert request.partition_key is None, request
        else:
            assert request.partition_key in job.partitions_def.get_partition_keys(current_time=at), request
            assert request.tags["dagster/partition"] == request.partition_key


# -- the schedules known today, exactly -----------------------------------------------------------


def _tick_config(at: datetime, *ops: str) -> dict:
    return {"ops": {op: {"config": {"tick": at.isoformat()}} for op in ops}}


EXACT = {
    # name: (first tick after ANCHOR, its run requests as (partition key, run config, some tags))
    "partition_horizon_monthly": (datetime(2025, 4, 1, 0, 5), [(None, {}, {})]),
    "partition_horizon_daily": (datetime(2025, 3, 15, 3, 5), [(None, {}, {})]),
    "price_snapshots_every_15_minutes": (
        datetime(2025, 3, 14, 10, 15), [("2025-03-14", {}, {"wedefi/tick": "2025-03-14T10:15:00+00:00"})]),
    "portfolio_tick_every_5_minutes": (
        datetime(2025, 3, 14, 10, 10),
        [(None, _tick_config(datetime(2025, 3, 14, 10, 10, tzinfo=timezone.utc), "token_balances", "portfolio_tick"),
          {})]),
    "governance_locks_every_30_minutes": (
        datetime(2025, 3, 14, 10, 30),
        [(None, _tick_config(datetime(2025, 3, 14, 10, 30, tzinfo=timezone.utc), "governance_locks"), {})]),
    "asset_correlations_daily": (
        datetime(2025, 3, 15, 0, 30),
        [(None, {"ops": {"asset_correlations": {"config": {"as_of": "2025-03-15T00:30:00+00:00"}}}}, {})]),
    "health_reports_schedule": (datetime(2025, 3, 15, 6, 30), [(None, {}, {})]),
    "dagster_run_retention_daily": (datetime(2025, 3, 15, 4, 45), [(None, {}, {})]),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_the_known_schedules_request_exactly(name):
    tick, expected = EXACT[name]
    at = _tick(name)
    assert at == tick.replace(tzinfo=timezone.utc)
    requests = _requests(_evaluate(SCHEDULES[name], at))
    assert len(requests) == len(expected)
    for request, (partition_key, run_config, tags) in zip(requests, expected):
        assert request.partition_key == partition_key
        assert request.run_config == run_config
        assert request.tags.items() >= {**tags, "dagster/schedule_name": name}.items()


def test_tiering_daily_requests_the_months_due_on_its_day(history):
    at = _tick("tiering_daily")
    assert at == datetime(2025, 3, 15, 3, 30, tzinfo=timezone.utc)
    requests = _requests(_evaluate(SCHEDULES["tiering_daily"], at))
    by_asset: dict[str, set[str]] = {}
    for request in requests:
        (asset,) = request.asset_selection
        by_asset.setdefault(asset.to_user_string(), set()).add(request.partition_key)
        assert request.run_key == f"{asset.to_user_string()}:{request.partition_key}:2025-03-15"
    # a year past its month (cold_days 365) goes cold; two months past (hot_days 30) turns warm
    assert "2024-01-01" in by_asset.get("cold_archive", set()), by_asset
    assert "2025-01-01" in by_asset.get("warm_tier", set()), by_asset
    # the newest history month is still hot, the tick's own month too
    assert not {"2025-02-01", "2025-03-01"} & set().union(*by_asset.values()), by_asset
