"""The rollups_match_raw checks: a random sample of rollup rows recomputed from raw rows.

Only rows whose raw rows are all still in PostgreSQL and folded in (the day's watermark
equals the day's raw rows: not stale, not archived, nothing deleted) are judged; the
recomputation is plain Python over the raw rows, independent of the refresh's SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, localcontext

import psycopg
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.rollups import statements as st
from wedefi_pipelines.rollups.refresh import day_stats, watermarks
from wedefi_pipelines.rollups.tables import Family

WIDTHS = {p.PRICE_ROLLUP_HOURLY.name: timedelta(hours=1), p.PRICE_ROLLUP_DAILY.name: timedelta(days=1),
          p.PORTFOLIO_ROLLUP_DAILY.name: timedelta(days=1)}


@dataclass
class Verification:
    checked: int = 0
    not_judged: int = 0  # sampled rows whose day is stale, archived or shrunk
    mismatches: list[dict] = field(default_factory=list)


def _open_close(rows: list[tuple]) -> tuple:
    """(open, close, first time, last time) of (value, tie-breaker, time) rows: the values
    at the earliest and latest time, ties broken by the greatest tie-breaker."""
    first, last = min(r[2] for r in rows), max(r[2] for r in rows)
    opening = max((r for r in rows if r[2] == first), key=lambda r: r[1])
    closing = max((r for r in rows if r[2] == last), key=lambda r: r[1])
    return opening[0], closing[0], first, last


def _price_values(rows: list[tuple]) -> tuple:
    """(open, high, low, close, sum, count, first, last) of (price, source, recordedAt) rows."""
    opening, closing, first, last = _open_close(rows)
    prices = [r[0] for r in rows]
    with localcontext() as exact:
        exact.prec = 80  # numeric(38, 18) sums exactly
        total = sum(prices, Decimal(0))
    return opening, max(prices), min(prices), closing, total, len(rows), first, last


def _portfolio_values(rows: list[tuple]) -> tuple:
    """(open, close, min, max, count, first, last) of (value, id, capturedAt) rows."""
    opening, closing, first, last = _open_close(rows)
    values = [r[0] for r in rows]
    return opening, closing, min(values), max(values), len(rows), first, last


def verify_sample(conn: psycopg.Connection, fam: Family, sample: int, since: datetime) -> Verification:
    """Judge up to `sample` rollup rows of each of the family's tables with "bucketStart" >= since."""
    result = Verification()
    key = "tokenId" if fam.name == "price" else "walletId"
    values = st.PRICE_VALUES if fam.name == "price" else st.PORTFOLIO_VALUES
    raw_columns = ("priceUsd", "source", "recordedAt") if fam.name == "price" else ("totalUsdValue", "id", "capturedAt")
    t = fam.source.time_column
    for table in fam.tables:
        picked = conn.execute(sql.SQL("SELECT {key}, \"bucketStart\", {values} FROM {table} WHERE \"bucketStart\" >= %s "
                                      "ORDER BY random() LIMIT %s").format(
            key=sql.Identifier(key), values=sql.SQL(", ").join(map(sql.Identifier, values)),
            table=sql.Identifier(table.name)), (since, sample)).fetchall()
        for row_key, bucket, *stored in picked:
            day = datetime(bucket.year, bucket.month, bucket.day)
            raw_day = day_stats(conn, fam.source.name, t, day, day + timedelta(days=1)).get(day.date())
            mark = watermarks(conn, fam, day.date(), day.date() + timedelta(days=1)).get(day.date())
            if raw_day is None or mark is None or (raw_day.rows, raw_day.newest) != (mark.rows, mark.newest):
                result.not_judged += 1
                continue
            raw = conn.execute(sql.SQL("SELECT {cols} FROM {src} WHERE {key} IS NOT DISTINCT FROM %s AND {t} >= %s "
                                       "AND {t} < %s").format(
                cols=sql.SQL(", ").join(map(sql.Identifier, raw_columns)), src=sql.Identifier(fam.source.name),
                key=sql.Identifier(key), t=sql.Identifier(t)), (row_key, bucket, bucket + WIDTHS[table.name])).fetchall()
            expected = (_price_values(raw) if fam.name == "price" else _portfolio_values(raw)) if raw else None
            result.checked += 1
            if expected is None or tuple(expected) != tuple(stored):
                result.mismatches.append({"table": table.name, key: row_key, "bucketStart": bucket.isoformat(),
                                          "stored": [str(v) for v in stored],
                                          "from_raw": [str(v) for v in expected] if expected else None})
    return result
