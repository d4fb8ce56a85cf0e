"""Reading the rollups: a token's chart at 1h or 1d resolution (`wedefi-pipelines history
--resolution`), and bucket closes for asset_correlations at 60 and 1,440 minutes.

Rollups are kept after their raw months are archived, so these reads never touch S3 and
read a year as 8,760 (hourly) or 365 (daily) rows per token, whatever tier the raw rows
are in. A bucket is reported when its "bucketStart" is in [start, end).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.rollups.tables import PRICE_DAILY, PRICE_HOURLY, RESOLUTIONS

WORKLOAD = "user_dashboard"  # a chart is a user-facing read: the read replica, as the seed routes it
CHART_COLUMNS = ("bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd", "averageUsd", "sampleCount")
INTERVAL_TABLES = {timedelta(minutes=60): PRICE_HOURLY, timedelta(minutes=1440): PRICE_DAILY}


@dataclass
class Chart:
    resolution: str
    rows: list[tuple]  # CHART_COLUMNS
    server: str


def price_chart(db: Database, token_id: str, start: datetime, end: datetime, resolution: str) -> Chart:
    """The token's buckets with start <= "bucketStart" < end, oldest first."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution!r} is not one of {', '.join(RESOLUTIONS)}")
    start, end = p.to_utc_naive(start), p.to_utc_naive(end)
    if end <= start:
        raise ValueError(f"the end ({end}) must be after the start ({start})")
    query = sql.SQL("""SELECT "bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd",
                              round("sumUsd" / "sampleCount", 18), "sampleCount"
                         FROM {} WHERE "tokenId" = %s AND "bucketStart" >= %s AND "bucketStart" < %s
                        ORDER BY "bucketStart" """).format(sql.Identifier(RESOLUTIONS[resolution].name))
    with db.connection(WORKLOAD) as conn:
        rows = conn.execute(query, (token_id, start, end)).fetchall()
    return Chart(resolution, rows, db.route(WORKLOAD).server)


def bucket_closes(conn: psycopg.Connection, tokens: list[str], since: datetime, until: datetime,
                  interval: timedelta) -> list[tuple]:
    """(tokenId, bucket, close as float8) of every bucket with a price in (since, until]:
    what correlations.bucket_prices reads from raw rows, from the rollup of `interval`.
    The last bucket's close is the bucket's, which is the raw path's when `until` is a
    bucket boundary or now."""
    table = INTERVAL_TABLES[interval]
    query = sql.SQL("""SELECT "tokenId", "bucketStart", "closeUsd"::float8 FROM {}
                        WHERE "tokenId" = ANY(%s) AND "bucketStart" > %s AND "bucketStart" <= %s
                          AND "lastAt" > %s AND "firstAt" <= %s""").format(sql.Identifier(table.name))
    return conn.execute(query, (tokens, since - interval, until, since, until)).fetchall()
