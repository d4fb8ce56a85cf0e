"""Pure tiering logic: tier decisions, due months, layouts, column mapping, hashing helpers."""

from datetime import date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.locks import advisory_key
from wedefi_pipelines.settings import Settings, SettingsError, TierAges, parse_settings
from wedefi_pipelines.tiering import content_hash as ch
from wedefi_pipelines.tiering.columns import UnsupportedColumn, column_spec
from wedefi_pipelines.tiering.policy import (EXPORT_ORDER, WARM_LAYOUTS, Action, MonthState, Tier, bounds_decide,
                                             classify, decide, decide_group, due_months, group_tables, needs_newest,
                                             tier_of_age)

AGES = TierAges(hot_days=30, cold_days=365)
NOW = datetime(2026, 6, 15, 12, 0)


@pytest.mark.parametrize("days, tier", [(0, Tier.HOT), (29.9, Tier.HOT), (30, Tier.WARM), (365, Tier.WARM),
                                        (365.01, Tier.COLD), (900, Tier.COLD)])
def test_tier_of_age_uses_the_configured_thresholds(days, tier):
    assert tier_of_age(timedelta(days=days), AGES) is tier


def test_a_month_is_cold_only_when_its_newest_row_is_older_than_the_threshold():
    month = date(2025, 6, 1)  # ends 2025-07-01, 349.5 days before NOW: its bounds do not decide
    assert bounds_decide(month, NOW, AGES) is None
    assert classify(month, datetime(2025, 6, 30, 23, 0), NOW, AGES).tier is Tier.WARM
    early = classify(month, datetime(2025, 6, 10), NOW, AGES)  # the data stopped early
    assert early.tier is Tier.COLD and "newest row" in early.reason and "> 365 days" in early.reason


def test_an_empty_month_ages_from_its_upper_bound():
    assert classify(date(2025, 6, 1), None, NOW, AGES).tier is Tier.WARM
    assert classify(date(2025, 5, 1), None, NOW, AGES).tier is Tier.COLD
    assert "the month is empty" in classify(date(2025, 5, 1), None, NOW, AGES).reason


@pytest.mark.parametrize("month, expected", [
    (date(2026, 6, 1), Tier.HOT), (date(2026, 7, 1), Tier.HOT), (date(2026, 3, 1), Tier.WARM),
    (date(2025, 5, 1), Tier.COLD), (date(2026, 5, 1), None), (date(2025, 6, 1), None)])
def test_bounds_decide_only_when_both_ends_agree(month, expected):
    assert bounds_decide(month, NOW, AGES) is expected


def test_thresholds_are_per_table_and_validated():
    settings = parse_settings({"tiers": {"PriceSnapshot": {"hot_days": 7, "cold_days": 90}}})
    assert settings.tiers.for_table("PriceSnapshot").cold_days == 90
    assert settings.tiers.for_table("PortfolioSnapshot").cold_days == 365
    with pytest.raises(SettingsError, match="tiers.PriceSnapshot"):
        parse_settings({"tiers": {"PriceSnapshot": {"hot_days": 90, "cold_days": 30}}})
    with pytest.raises(SettingsError, match="tiers.PortfolioSnapshot|together"):
        parse_settings({"tiers": {"PortfolioSnapshot": {"cold_days": 100}}})
    with pytest.raises(SettingsError, match="archive.zstd_level"):
        parse_settings({"archive": {"zstd_level": 40}})


def test_due_months_ask_for_what_each_month_needs():
    m = [date(2025, 1, 1), date(2025, 2, 1), date(2026, 2, 1), date(2026, 3, 1), date(2026, 6, 1), date(2024, 9, 1)]
    states = [
        MonthState("PriceSnapshot", m[0], child="attached"),  # cold
        MonthState("PriceSnapshot", m[1], archive_status="archived", default_rows=3),  # late rows wait
        MonthState("PriceSnapshot", m[2], child="attached", rewritten=True, vacuumed=True),  # warm and converted
        MonthState("PriceSnapshot", m[3], child="attached"),  # warm, not converted
        MonthState("PriceSnapshot", m[4], child="attached"),  # hot
        MonthState("PriceSnapshot", m[5], child="attached", archive_status="restored"),  # restored: left alone
        MonthState("PortfolioSnapshot", m[2], child="detached"),  # an archive run stopped half-way
    ]
    due = due_months(states, NOW, Settings())
    assert due.warm == [m[3]]
    assert due.cold == [m[0], m[1], m[2]]
    assert "late row" in due.reasons[("PriceSnapshot", m[1])]
    assert "half-way" in due.reasons[("PortfolioSnapshot", m[2])]


def test_layouts_and_groups():
    assert [t.name for t in group_tables("PositionSnapshot")] == ["PortfolioSnapshot", "PositionSnapshot"]
    assert [t.name for t in group_tables(p.PRICE_SNAPSHOT)] == ["PriceSnapshot"]
    for table in p.RANGE_TABLES:
        layout = WARM_LAYOUTS[table.name]
        assert layout.brin_name(table, date(2025, 12, 1)).endswith("_brin")
        assert set(layout.replaces) <= {i.suffix for i in table.child_indexes}
        assert EXPORT_ORDER[table.name][:2] == layout.order
    assert advisory_key("tiering.month", "PriceSnapshot", "2025-01") != advisory_key("tiering.month", "PriceSnapshot", "2025-02")
    assert all(-2**31 <= k < 2**31 for k in advisory_key("tiering.month", "PortfolioSnapshot", "2025-01"))


def _typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


def test_columns_map_to_exact_arrow_types_or_are_refused_by_name():
    assert column_spec("T", "p", "numeric", _typmod(36, 18), "numeric(36,18)", True).arrow_type == pa.decimal128(36, 18)
    ts = column_spec("T", "t", "timestamp", 3, "timestamp(3) without time zone", False)
    # the type policy: microseconds without time-zone adjustment (Iceberg's `timestamp`), whatever the precision
    assert ts.arrow_type == pa.timestamp("us") and ts.nullable and ts.csv_type == pa.timestamp("us")
    assert column_spec("T", "t", "timestamp", -1, "timestamp", True).arrow_type == pa.timestamp("us")
    assert column_spec("T", "s", "int2", -1, "smallint", True).arrow_type == pa.int32()  # Iceberg has no int16
    assert column_spec("T", "m", "jsonb", -1, "jsonb", False).kind == "jsonb"
    with pytest.raises(UnsupportedColumn, match='"T"."x" \\(numeric\\): numeric without precision'):
        column_spec("T", "x", "numeric", -1, "numeric", False)
    with pytest.raises(UnsupportedColumn, match="numeric\\(65,30\\)"):
        column_spec("T", "q", "numeric", _typmod(65, 30), "numeric(65,30)", False)
    with pytest.raises(UnsupportedColumn, match="no exact Parquet mapping for type float8"):
        column_spec("T", "f", "float8", -1, "double precision", False)


def test_content_hash_sums_exactly_and_duplicates_do_not_cancel():
    big = np.array([2**63 - 1, 2**63 - 1, -2**63], dtype=np.int64)
    assert ch.ContentHash.of(big) == ch.ContentHash(3, 2 * (2**63 - 1) - 2**63)
    row = np.array([12345], dtype=np.int64)
    assert ch.ContentHash.of(np.concatenate([row, row])) != ch.ContentHash.of(np.array([], dtype=np.int64))
    assert ch.ContentHash.of(row) + ch.ContentHash.of(row) == ch.ContentHash(2, 24690)


@pytest.mark.parametrize("length", [0, 1, 4, 8, 11, 12, 13, 24, 100, 1500])
def test_the_vectorised_text_hash_equals_the_scalar_one(length):
    values = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(length)) + ("é" if i % 3 == 0 else "")
              for i in range(50)]
    seeds = np.array([(i * 0x9E3779B97F4A7C15) % 2**64 - 2**63 for i in range(50)], dtype=np.int64)
    seeds[0] = 0  # seed 0 skips the perturbation, as in PostgreSQL
    vector = ch.hash_text_extended(pa.array(values), seeds)
    scalar = [ch._scalar_hash_bytes(v.encode(), int(s)) for v, s in zip(values, seeds)]
    assert list(vector) == scalar


def test_numeric_text_prints_what_postgresql_prints():
    from decimal import Decimal

    values = pa.array([Decimal("0"), Decimal("1E-18"), Decimal("-0.000000000000000123"), Decimal("1.5"),
                       Decimal("-123456789012345678.123456789012345678"), None], pa.decimal128(36, 18))
    assert ch.numeric_text(values).to_pylist() == [
        "0.000000000000000000", "0.000000000000000001", "-0.000000000000000123", "1.500000000000000000",
        "-123456789012345678.123456789012345678", None]


# -- where two copies of the tier decision disagreed before the month catalog -------------------

def test_cold_rows_waiting_in_the_default_with_no_child_are_archived_by_the_schedule_too():
    """The archiver archived them on a manual run, the schedule never asked: now both do."""
    month = date(2024, 9, 1)
    state = MonthState("PriceSnapshot", month, default_rows=5, default_newest=datetime(2024, 9, 3))
    decision = decide(state, NOW, Settings())
    assert decision.action is Action.ARCHIVE and decision.scheduled and "default partition" in decision.reason
    assert due_months([state], NOW, Settings()).cold == [month]
    young = MonthState("PriceSnapshot", date(2026, 5, 1), default_rows=5, default_newest=datetime(2026, 5, 3))
    assert decide(young, NOW, Settings()).reason.startswith("not cold yet: rows in the default partition")


def test_an_archive_group_is_cold_only_when_its_newest_row_over_every_member_is():
    """The schedule judged each member by its own newest row, the archiver the group's:
    now both judge the group (PortfolioSnapshot and PositionSnapshot archive together)."""
    month = date(2025, 6, 1)  # straddles the cold threshold at NOW: the newest rows decide
    portfolio = MonthState("PortfolioSnapshot", month, child="attached", newest=datetime(2025, 6, 5), newest_read=True)
    positions = MonthState("PositionSnapshot", month, child="attached", newest=datetime(2025, 6, 30), newest_read=True)
    assert decide(portfolio, NOW, Settings()).action is Action.ARCHIVE  # alone, it would be cold
    group = decide_group([portfolio, positions], NOW, Settings())
    assert group.action is not Action.ARCHIVE and group.tier is Tier.WARM
    assert due_months([portfolio, positions], NOW, Settings()).cold == []


def test_a_restored_month_is_left_to_a_manual_run_by_the_schedule():
    month = date(2024, 9, 1)
    state = MonthState("PriceSnapshot", month, child="attached", archive_status="restored")
    decision = decide(state, NOW, Settings())
    assert decision.action is Action.ARCHIVE and not decision.scheduled  # cold_archive by hand archives it again
    assert due_months([state], NOW, Settings()).cold == []


def test_a_straddling_month_needs_its_newest_row_read():
    state = MonthState("PriceSnapshot", date(2025, 6, 1), child="attached")
    with pytest.raises(ValueError, match="did not read its newest row"):
        decide(state, NOW, Settings())
    assert needs_newest(NOW, Settings())(p.PRICE_SNAPSHOT, date(2025, 6, 1))
    assert not needs_newest(NOW, Settings())(p.PRICE_SNAPSHOT, date(2025, 1, 1))


def test_archived_months_with_objects_to_upgrade_or_register_are_due_for_the_schedule():
    """Format-1 objects (issue 14) and objects missing from the Iceberg table make the
    month's cold_archive due; empty objects and registered ones do not."""
    from wedefi_pipelines.catalog import ArchiveObject

    month = date(2024, 9, 1)

    def obj(part, rows, version=2, snapshot=None):
        return ArchiveObject(f"k/{part}", part, rows, 10, "s", "c", format_version=version, iceberg_snapshot_id=snapshot)

    def state(*objects, table="PriceSnapshot"):
        return MonthState(table, month, archive_status="archived", archived_rows=1, objects=objects)

    done = state(obj(0, 5, snapshot=7), obj(1, 0))  # an empty part is never registered: nothing to count
    assert decide(done, NOW, Settings()).action is Action.NONE
    legacy = state(obj(0, 5, version=1), obj(1, 2, snapshot=7))
    assert legacy.legacy_objects == [obj(0, 5, version=1)] and legacy.unregistered_objects == []
    decision = decide(legacy, NOW, Settings())
    assert decision.action is Action.ARCHIVE and decision.scheduled and "format-1" in decision.reason
    pending = state(obj(0, 5, snapshot=7), obj(1, 2))
    assert "not in the Iceberg table yet" in decide(pending, NOW, Settings()).reason
    assert due_months([done, legacy], NOW, Settings()).cold == [month]
    # a group is due when any member has work left
    portfolio, positions = state(obj(0, 5, snapshot=7), table="PortfolioSnapshot"), state(obj(0, 3), table="PositionSnapshot")
    assert decide_group([portfolio, positions], NOW, Settings()).action is Action.ARCHIVE
    restored = MonthState("PriceSnapshot", month, child="attached", archive_status="restored", objects=(obj(0, 5),))
    assert restored.unregistered_objects == []  # a restored month's objects are out of the table on purpose
