"""Reading the rollups: a token's chart at 1h or 1d resolution (`wedefi-pipelines history
--resolution`), and bucket closes for asset_correlations at 60 and 1,440 minutes.

Rollups are kept after their raw months are archived, so these reads never read raw
rows and read a year as 8,760 (hourly) or 365 (daily) rows per token, whatever tier the
raw rows are in. The hourly rollup is tiered itself, later than its source
(tiers.PriceRollupHourly: cold after 730 days); an hourly chart over its archived months
reads them from its own archive. A bucket is reported when its "bucketStart" is in
[start, end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.rollups.tables import RESOLUTIONS

WORKLOAD = "user_dashboard"  # a chart is a user-facing read: the read replica, as the seed routes it
CHART_COLUMNS = ("bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd", "averageUsd", "sampleCount")
INTERVAL_TABLES = {timedelta(minutes=60): p.PRICE_ROLLUP_HOURLY, timedelta(minutes=1440): p.PRICE_ROLLUP_DAILY}


@dataclass
class Chart:
    resolution: str
    rows: list[tuple]  # CHART_COLUMNS
    server: str
    archived_months: list[date] = field(default_factory=list)  # read from the hourly rollup's own archive


def _with_average(bucket, open_, high, low, close, total, count) -> tuple:
    """A chart row; the average is "sumUsd" / "sampleCount" to 18 places, half even."""
    with localcontext() as exact:
        exact.prec = 80
        average = (total / count).quantize(Decimal("1e-18"), rounding=ROUND_HALF_EVEN)
    return bucket, open_, high, low, close, average, count


def price_chart(db: Database, token_id: str, start: datetime, end: datetime, resolution: str,
                store: ArchiveStore | None = None) -> Chart:
    """The token's buckets with start <= "bucketStart" < end, oldest first. Daily rows are
    always in PostgreSQL; hourly months past tiers.PriceRollupHourly's cold age are read
    from its archive (through its Iceberg table, as the raw history is), which needs `store`."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution!r} is not one of {', '.join(RESOLUTIONS)}")
    start, end = p.to_utc_naive(start), p.to_utc_naive(end)
    if end <= start:
        raise ValueError(f"the end ({end}) must be after the start ({start})")
    table = RESOLUTIONS[resolution]
    months = set(p.months_between(start, end - timedelta(microseconds=1)))
    with db.connection(WORKLOAD) as conn:
        archived = sorted(months & catalog.archived_months(conn, table)) if table in p.TIERED_TABLES else []
        if not archived:
            rows = conn.execute(sql.SQL("""SELECT "bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd",
                                                  "sampleCount"
                                             FROM {} WHERE "tokenId" = %s AND "bucketStart" >= %s AND "bucketStart" < %s
                                            ORDER BY "bucketStart" """).format(sql.Identifier(table.name)),
                                (token_id, start, end)).fetchall()
            return Chart(resolution, [_with_average(*r) for r in rows], db.route(WORKLOAD).server)
    if store is None:
        raise ValueError(f"{table.name} months {', '.join(p.month_year(m) for m in archived)} are archived: an "
                         f"{resolution} chart over them reads the archive (set ARCHIVE_BUCKET and ARCHIVE_PREFIX), "
                         "or use --resolution 1d")
    from wedefi_pipelines.tiering.history import rows_across_tiers  # pyarrow and pyiceberg: only here

    found = rows_across_tiers(db, store, table, "tokenId", token_id, start, end, ("bucketStart",)).rows
    columns = [found.column(c).to_pylist() for c in ("bucketStart", "openUsd", "highUsd", "lowUsd", "closeUsd",
                                                     "sumUsd", "sampleCount")]
    return Chart(resolution, [_with_average(*r) for r in zip(*columns)], db.route(WORKLOAD).server, archived)


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
