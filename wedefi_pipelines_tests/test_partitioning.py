"""Pure partition logic: names, bounds and DDL across year ends, leap years and time zones."""

from datetime import date, datetime, timedelta, timezone

import pytest
from psycopg import sql

from wedefi_pipelines import partitioning as p


@pytest.mark.parametrize(
    "moment, expected",
    [
        (date(2025, 1, 31), date(2025, 1, 1)),
        (datetime(2024, 12, 31, 23, 59, 59, 999000), date(2024, 12, 1)),
        # 23:30 on Dec 31 at UTC-5 is already January in UTC
        (datetime(2024, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5))), date(2025, 1, 1)),
        # 00:30 on Mar 1 at UTC+2 is still February (leap day) in UTC
        (datetime(2024, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))), date(2024, 2, 1)),
        (datetime(2025, 6, 15, 12, 0), date(2025, 6, 1)),
    ],
)
def test_month_of_is_the_utc_month(moment, expected):
    assert p.month_of(moment) == expected


@pytest.mark.parametrize(
    "month, start, end",
    [
        (date(2024, 2, 1), datetime(2024, 2, 1), datetime(2024, 3, 1)),  # leap year: 29 days
        (date(2023, 2, 1), datetime(2023, 2, 1), datetime(2023, 3, 1)),
        (date(2024, 12, 1), datetime(2024, 12, 1), datetime(2025, 1, 1)),  # year end
        (date(2025, 1, 17), datetime(2025, 1, 1), datetime(2025, 2, 1)),  # any day of the month
    ],
)
def test_month_bounds_are_half_open_utc(month, start, end):
    assert p.month_bounds(month) == (start, end)


def test_month_lengths_follow_the_calendar():
    lengths = {m: (p.month_bounds(m)[1] - p.month_bounds(m)[0]).days for m in p.months_between(date(2024, 1, 1), date(2024, 12, 1))}
    assert lengths[date(2024, 2, 1)] == 29
    assert sum(lengths.values()) == 366
    assert (p.month_bounds(date(2100, 2, 1))[1] - p.month_bounds(date(2100, 2, 1))[0]).days == 28  # not a leap year


def test_add_months_and_ranges_cross_year_ends():
    assert p.add_months(date(2024, 11, 1), 3) == date(2025, 2, 1)
    assert p.add_months(date(2025, 1, 1), -1) == date(2024, 12, 1)
    assert p.months_between(date(2024, 11, 20), date(2025, 2, 3)) == [
        date(2024, 11, 1), date(2024, 12, 1), date(2025, 1, 1), date(2025, 2, 1)
    ]
    assert p.months_between(date(2025, 2, 1), date(2025, 1, 1)) == []
    assert p.horizon_months(datetime(2024, 12, 31, 23, 0), 6)[-1] == date(2025, 6, 1)
    assert len(p.horizon_months(date(2024, 12, 31), 6)) == 7


def test_names_and_keys():
    jan = date(2025, 1, 1)
    assert p.child_name(p.PRICE_SNAPSHOT, jan) == "PriceSnapshot_2025_01"
    assert p.subpartition_name(p.PORTFOLIO_SNAPSHOT, jan, 0) == "PortfolioSnapshot_2025_01_part_0"
    assert p.default_name(p.PRICE_SNAPSHOT) == "PriceSnapshot_default"
    assert p.partition_key(jan) == "2025-01-01"
    assert p.month_year(jan) == "2025-01"
    assert p.s3_month_path(jan) == "year=2025/month=01"
    assert p.leaf_names(p.PORTFOLIO_SNAPSHOT, jan) == [f"PortfolioSnapshot_2025_01_part_{r}" for r in range(4)]
    assert p.leaf_names(p.POSITION_SNAPSHOT, jan) == ["PositionSnapshot_2025_01"]


@pytest.mark.parametrize(
    "relname, expected",
    [
        ("PriceSnapshot_2025_01", date(2025, 1, 1)),
        ("PriceSnapshot_default", None),
        ("PriceSnapshot_2025_13", None),
        ("PriceSnapshot_2025_01_part_0", None),
        ("PortfolioSnapshot_2025_01", None),  # another table's child
    ],
)
def test_parse_child_name(relname, expected):
    assert p.parse_child_name(p.PRICE_SNAPSHOT, relname) == expected


@pytest.mark.parametrize("text, expected", [("2025-01", date(2025, 1, 1)), ("2025-01-01", date(2025, 1, 1)), ("2024_02", date(2024, 2, 1))])
def test_parse_month(text, expected):
    assert p.parse_month(text) == expected


@pytest.mark.parametrize("bad", ["2025-13", "2025-01-02", "january", "2025"])
def test_parse_month_rejects_non_months(bad):
    with pytest.raises(ValueError, match="not a month"):
        p.parse_month(bad)


def test_child_ddl_quotes_names_and_bounds():
    statements = [s.as_string(None) for s in p.create_child_sql(p.PORTFOLIO_SNAPSHOT, date(2024, 12, 1))]
    assert statements[0] == (
        'CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_2024_12" PARTITION OF "PortfolioSnapshot" '
        "FOR VALUES FROM ('2024-12-01 00:00:00') TO ('2025-01-01 00:00:00') PARTITION BY HASH (\"walletId\")"
    )
    assert statements[1:5] == [
        f'CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_2024_12_part_{r}" PARTITION OF "PortfolioSnapshot_2024_12" '
        f"FOR VALUES WITH (MODULUS 4, REMAINDER {r})"
        for r in range(4)
    ]
    assert 'CREATE INDEX IF NOT EXISTS "PortfolioSnapshot_2024_12_walletId_capturedAt_idx" ON "PortfolioSnapshot_2024_12" USING btree ("walletId", "capturedAt")' in statements
    price = [s.as_string(None) for s in p.create_child_sql(p.PRICE_SNAPSHOT, date(2024, 2, 1))]
    assert "TO ('2024-03-01 00:00:00')" in price[0] and "PARTITION BY" not in price[0]
    assert any(s.startswith('CREATE UNIQUE INDEX IF NOT EXISTS "PriceSnapshot_2024_02_tokenId_recordedAt_source_key"') for s in price)
    assert all(isinstance(s, sql.Composed) for s in p.create_child_sql(p.PRICE_SNAPSHOT, date(2024, 2, 1)))


def test_every_generated_index_name_fits_postgres_limit():
    for table in p.RANGE_TABLES:
        for index in table.child_indexes:
            assert len(p.index_name(table, date(2099, 12, 1), index).encode()) <= 63


def test_unknown_table_is_named_in_the_error():
    with pytest.raises(ValueError, match="'Prices'"):
        p.range_table("Prices")
