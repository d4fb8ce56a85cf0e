"""Provisioning's pure decisions: which months the horizon ensures, which default rows it
leaves alone, gaps, coverage, transaction units, lock keys. No database."""

from datetime import date, datetime, timedelta, timezone

import pytest

from wedefi_pipelines import migrations
from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning as pv
from wedefi_pipelines.provisioning.ensure import _units

START = date(2024, 1, 1)


def months(first: str, last: str) -> list[date]:
    return p.months_between(p.parse_month(first), p.parse_month(last))


def test_an_empty_database_gets_the_current_month_and_the_next_n_across_the_year_end():
    plan = pv.plan_horizon(date(2025, 11, 15), 6, [], [], [], START)
    assert list(plan.horizon) == months("2025-11", "2026-05")
    assert list(plan.ensure) == months("2025-11", "2026-05")
    assert plan.left_in_default == {}


def test_after_an_outage_every_month_up_to_the_horizon_is_filled_and_waiting_rows_drained():
    attached = months("2024-01", "2024-06")
    plan = pv.plan_horizon(date(2025, 2, 3), 6, attached, [], [date(2024, 9, 1), date(2025, 1, 1)], START)
    assert list(plan.ensure) == months("2024-07", "2025-08")
    assert plan.left_in_default == {}


def test_nothing_to_do_when_the_horizon_and_history_are_complete():
    plan = pv.plan_horizon(date(2025, 3, 1), 6, months("2024-01", "2025-09"), [], [], START)
    assert plan.ensure == ()


def test_archived_months_count_as_covered_and_keep_their_late_rows_in_the_default():
    attached = [date(2024, 1, 1), date(2024, 3, 1)] + months("2025-03", "2025-09")
    archived = [date(2024, 2, 1)]
    plan = pv.plan_horizon(date(2025, 3, 1), 6, attached, archived, [date(2024, 2, 1)], START)
    assert date(2024, 2, 1) not in plan.ensure
    assert list(plan.ensure) == months("2024-04", "2025-02")  # the real gap is filled
    assert "archived" in plan.left_in_default[date(2024, 2, 1)]


def test_default_rows_far_outside_the_data_do_not_conjure_decades_of_children():
    waiting = [date(1999, 1, 1), date(2099, 1, 1), date(2023, 12, 1)]
    plan = pv.plan_horizon(date(2025, 3, 1), 6, [], [], waiting, START)
    assert list(plan.ensure) == months("2025-03", "2025-09")
    assert set(plan.left_in_default) == set(waiting)
    assert "partitions.start" in plan.left_in_default[date(1999, 1, 1)]
    assert "partitions.start" in plan.left_in_default[date(2023, 12, 1)]
    assert "60 months ahead" in plan.left_in_default[date(2099, 1, 1)]


def test_rows_up_to_sixty_months_ahead_are_drained_with_every_month_between():
    plan = pv.plan_horizon(date(2025, 3, 1), 6, [], [], [date(2030, 3, 1)], START)
    assert list(plan.ensure) == months("2025-03", "2030-03")
    assert date(2030, 4, 1) in pv.plan_horizon(date(2025, 3, 1), 6, [], [], [date(2030, 4, 1)], START).left_in_default


def test_rows_older_than_the_oldest_child_but_after_start_are_drained_without_a_gap():
    plan = pv.plan_horizon(date(2025, 3, 1), 6, months("2025-01", "2025-09"), [], [date(2024, 10, 1)], START)
    assert list(plan.ensure) == months("2024-10", "2024-12")


def test_history_older_than_start_still_counts_when_children_exist_there():
    plan = pv.plan_horizon(date(2025, 3, 1), 6, [date(2023, 1, 1)], [], [date(2023, 5, 1)], START)
    assert plan.left_in_default == {}
    assert list(plan.ensure) == months("2023-02", "2025-09")


def test_rows_stuck_in_the_default_of_an_attached_month_are_planned_for_a_move():
    attached = months("2025-01", "2025-09")
    plan = pv.plan_horizon(date(2025, 3, 1), 6, attached, [], [date(2025, 2, 1)], START)
    assert list(plan.ensure) == [date(2025, 2, 1)]


@pytest.mark.parametrize(
    "today, current",
    [
        (date(2024, 2, 29), date(2024, 2, 1)),  # leap day
        (datetime(2024, 12, 31, 23, 59, 59, 999000), date(2024, 12, 1)),
        # 00:30 on New Year's Day in UTC+2 is still December in UTC
        (datetime(2025, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))), date(2024, 12, 1)),
        # 20:00 on 31 January in UTC-5 is already February in UTC
        (datetime(2025, 1, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5))), date(2025, 2, 1)),
    ],
)
def test_the_current_month_is_the_utc_month(today, current):
    plan = pv.plan_horizon(today, 1, [], [], [], START)
    assert plan.horizon == (current, p.add_months(current, 1))


@pytest.mark.parametrize("value", [0, 61, -1, True, 6.5, "6", None])
def test_months_ahead_outside_1_to_60_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"months_ahead must be an integer from 1 to 60"):
        pv.validate_months_ahead(value)
    with pytest.raises(ValueError, match="months_ahead"):
        pv.plan_horizon(date(2025, 1, 1), value, [], [], [], START)


@pytest.mark.parametrize("value", [1, 6, 60])
def test_months_ahead_inside_the_range_is_accepted(value):
    assert len(pv.plan_horizon(date(2025, 1, 1), value, [], [], [], START).horizon) == value + 1


def test_gap_months_and_missing_horizon_months():
    covered = {date(2024, 11, 1), date(2025, 2, 1), date(2025, 3, 1)}
    assert pv.gap_months(covered) == [date(2024, 12, 1), date(2025, 1, 1)]
    assert pv.gap_months(set()) == []
    assert pv.missing_horizon_months(covered, date(2025, 2, 10), 2) == [date(2025, 4, 1)]


def test_units_chunk_empty_months_and_isolate_months_with_rows():
    ms = months("2025-01", "2025-07")
    units = _units(ms, {date(2025, 3, 1)}, per_transaction=3)
    assert units == [ms[0:2], [ms[2]], ms[3:6], [ms[6]]]


def test_lock_keys_are_stable_distinct_and_not_the_migrations_key():
    keys = [pv.table_lock_key(t) for t in p.RANGE_TABLES]
    assert keys == [pv.table_lock_key(t.name) for t in p.RANGE_TABLES]
    assert len(set(keys + [pv.RUN_LOCK_KEY, migrations.ADVISORY_LOCK_KEY])) == len(keys) + 2
    assert all(-(2**63) <= k < 2**63 for k in keys)


def test_backoff_grows_and_is_capped():
    policy = pv.LockPolicy(backoff_s=0.2, max_backoff_s=1.0)
    assert 0.1 <= policy.backoff(1) <= 0.2
    assert 0.5 <= policy.backoff(10) <= 1.0
