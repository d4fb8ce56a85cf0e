"""The rollups' set-based SQL, each statement over a source relation and a list of UTC days.

The source is the raw parent ("PriceSnapshot", "PortfolioSnapshot": its children and
default partition) or, for an archived month, a temporary table loaded from the month's
verified archive objects plus the rows still in PostgreSQL. Each rollup table is
refreshed by one statement: an upsert that rewrites a row only when a value changed (so
a refresh of an unchanged day writes nothing), and a delete of the refreshed days'
buckets no raw row falls into any more.
"""

from __future__ import annotations

from datetime import date, datetime

from psycopg import sql

from wedefi_pipelines import partitioning as p


WATERMARK = "wedefi_rollup_watermark"

_DAY_FILTER = sql.SQL("{t} >= {start} AND {t} < {end} AND date_trunc('day', {t}) = ANY({days}::timestamp[])")


def _filter(time_column: str, start: datetime, end: datetime, days: list[date]) -> sql.Composed:
    return _DAY_FILTER.format(t=sql.Identifier(time_column), start=sql.Literal(start), end=sql.Literal(end),
                              days=sql.Literal([datetime(d.year, d.month, d.day) for d in days]))


def day_stats(source: str, time_column: str, start: datetime, end: datetime) -> sql.Composed:
    """(day, greatest "createdAt", rows) of every day with raw rows in [start, end)."""
    return sql.SQL("""SELECT date_trunc('day', {t})::date, max("createdAt"), count(*) FROM {src}
                       WHERE {t} >= {start} AND {t} < {end} GROUP BY 1 ORDER BY 1""").format(
        t=sql.Identifier(time_column), src=sql.Identifier(source), start=sql.Literal(start), end=sql.Literal(end))


def _upsert_set(columns: tuple[str, ...]) -> sql.Composed:
    """SET the columns from excluded, only when one of them differs."""
    ids = [sql.Identifier(c) for c in columns]
    return sql.SQL("""DO UPDATE SET {sets}, "updatedAt" = CURRENT_TIMESTAMP
                      WHERE ({old}) IS DISTINCT FROM ({new})""").format(
        sets=sql.SQL(", ").join(sql.SQL("{} = excluded.{}").format(i, i) for i in ids),
        old=sql.SQL(", ").join(sql.SQL("r.{}").format(i) for i in ids),
        new=sql.SQL(", ").join(sql.SQL("excluded.{}").format(i) for i in ids))


def _refresh(table: str, key: str, columns: str, fresh: sql.Composable, conflict: str,
             values: tuple[str, ...], start: datetime, end: datetime, days: list[date]) -> sql.Composed:
    """One statement: upsert the freshly aggregated buckets of the days, delete the days'
    buckets that are no longer among them. Returns (rows written, rows deleted). The two
    touch disjoint rows. NOT IN over non-null values (`coalesce` keeps the NULL wallet
    equal) is a hashed subplan whatever the estimates: a NOT EXISTS planned from the CTE's
    estimate became a nested loop, 22 s for an unchanged day of 12,504 hours."""
    return sql.SQL("""
WITH fresh ({columns}) AS MATERIALIZED ({fresh}),
written AS (INSERT INTO {table} AS r ({columns}) SELECT * FROM fresh ON CONFLICT ({conflict}) {update} RETURNING 1),
gone AS (DELETE FROM {table} r WHERE {filter} AND (coalesce(r.{key}, ''), r."bucketStart") NOT IN (
             SELECT coalesce(f.{key}, ''), f."bucketStart" FROM fresh f) RETURNING 1)
SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM gone)""").format(
        columns=sql.SQL(columns), fresh=fresh, table=sql.Identifier(table), conflict=sql.SQL(conflict),
        update=_upsert_set(values), filter=_filter("bucketStart", start, end, days), key=sql.Identifier(key))


PRICE_VALUES = ("openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd", "sampleCount", "firstAt", "lastAt")
PORTFOLIO_VALUES = ("openUsd", "closeUsd", "minUsd", "maxUsd", "sampleCount", "firstAt", "lastAt")


_PRICE_COLUMNS = ('"tokenId", "bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd", "sampleCount", '
                  '"firstAt", "lastAt"')


def price_hourly(source: str, start: datetime, end: datetime, days: list[date]) -> sql.Composed:
    """Open and close are the prices at the earliest and latest "recordedAt", ties broken by
    the greatest source (the cache's latest-price rule)."""
    fresh = sql.SQL("""
SELECT "tokenId", date_trunc('hour', "recordedAt"),
       (array_agg("priceUsd" ORDER BY "recordedAt", source DESC))[1], max("priceUsd"), min("priceUsd"),
       (array_agg("priceUsd" ORDER BY "recordedAt" DESC, source DESC))[1], sum("priceUsd"), count(*),
       min("recordedAt"), max("recordedAt")
  FROM {src} WHERE {filter} GROUP BY 1, 2""").format(src=sql.Identifier(source),
                                                    filter=_filter("recordedAt", start, end, days))
    return _refresh(p.PRICE_ROLLUP_HOURLY.name, "tokenId", _PRICE_COLUMNS, fresh, '"tokenId", "bucketStart"',
                    PRICE_VALUES, start, end, days)


def price_daily(start: datetime, end: datetime, days: list[date]) -> sql.Composed:
    """A day from its hours: every row of the day's earliest (latest) "recordedAt" is in the
    earliest (latest) hour, so the day's open (close) is that hour's."""
    fresh = sql.SQL("""
SELECT "tokenId", date_trunc('day', "bucketStart"),
       (array_agg("openUsd" ORDER BY "bucketStart"))[1], max("highUsd"), min("lowUsd"),
       (array_agg("closeUsd" ORDER BY "bucketStart" DESC))[1], sum("sumUsd"), sum("sampleCount")::integer,
       min("firstAt"), max("lastAt")
  FROM {hourly} WHERE {filter} GROUP BY 1, 2""").format(hourly=sql.Identifier(p.PRICE_ROLLUP_HOURLY.name),
                                                       filter=_filter("bucketStart", start, end, days))
    return _refresh(p.PRICE_ROLLUP_DAILY.name, "tokenId", _PRICE_COLUMNS, fresh, '"tokenId", "bucketStart"',
                    PRICE_VALUES, start, end, days)


def portfolio_daily(source: str, start: datetime, end: datetime, days: list[date]) -> sql.Composed:
    """Per wallet and day, the all-wallets row ("walletId" NULL) included; open and close
    are the values at the earliest and latest "capturedAt", ties broken by the greatest id."""
    fresh = sql.SQL("""
SELECT md5(coalesce("walletId", '') || '/' || to_char(bucket, 'YYYY-MM-DD'))::uuid::text, "walletId", bucket,
       (array_agg("totalUsdValue" ORDER BY "capturedAt", id DESC))[1],
       (array_agg("totalUsdValue" ORDER BY "capturedAt" DESC, id DESC))[1],
       min("totalUsdValue"), max("totalUsdValue"), count(*), min("capturedAt"), max("capturedAt")
  FROM (SELECT id, "walletId", "totalUsdValue", "capturedAt", date_trunc('day', "capturedAt") AS bucket
          FROM {src} WHERE {filter}) raw
 GROUP BY "walletId", bucket""").format(src=sql.Identifier(source), filter=_filter("capturedAt", start, end, days))
    columns = ('id, "walletId", "bucketStart", "openUsd", "closeUsd", "minUsd", "maxUsd", "sampleCount", "firstAt", '
               '"lastAt"')
    return _refresh(p.PORTFOLIO_ROLLUP_DAILY.name, "walletId", columns, fresh, '"walletId", "bucketStart"',
                    PORTFOLIO_VALUES, start, end, days)


def save_watermarks(family: str, source_kind: str) -> sql.Composed:
    return sql.SQL("""
INSERT INTO {w} (family, day, max_created_at, raw_rows, source)
SELECT {family}, day, newest, n, {kind} FROM unnest(%s::date[], %s::timestamp[], %s::bigint[]) AS u(day, newest, n)
ON CONFLICT (family, day) DO UPDATE SET max_created_at = excluded.max_created_at, raw_rows = excluded.raw_rows,
                                        source = excluded.source, refreshed_at = now()""").format(
        w=sql.Identifier(WATERMARK), family=sql.Literal(family), kind=sql.Literal(source_kind))
