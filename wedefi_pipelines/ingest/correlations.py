"""Risk analytics: pairwise correlation of returns for the top K tokens ("AssetCorrelation").

Read side (the analytics replica, as the seed routes risk_analytics): the top K tokens by
total holdings value ("TokenBalance"."usdValue"), then, per timeframe, the last price of
each token in each interval bucket over the timeframe: from the hourly or daily rollup
when the interval is 60 or 1,440 minutes, else from raw rows (`date_bin`, PostgreSQL 14+),
bounded in time so only the months it covers are read. Pure part (`correlation_pairs`):
log returns per bucket, Pearson correlation over the pairwise-complete samples, and the
two-sided p-value of r = 0 from Student's t with n - 2 degrees of freedom. Write side (the
primary): one upsert per (token1, token2, timeframe), "token1Id" < "token2Id".

The seed's `calculateRiskMetrics(timeframe)` reads it back: `risk_metrics()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql
from scipy import stats

from wedefi_pipelines.partitioning import to_utc_naive
from wedefi_pipelines.rollups.reads import INTERVAL_TABLES, bucket_closes
from wedefi_pipelines.rollups.refresh import in_use as rollups_in_use

TIMEFRAMES = {"7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90), "1y": timedelta(days=365)}
MIN_SAMPLES = 3


@dataclass(frozen=True)
class Pair:
    token1: str
    token2: str
    correlation: float
    p_value: float | None
    samples: int


def correlation_pairs(prices: pd.DataFrame, min_samples: int = MIN_SAMPLES) -> list[Pair]:
    """Pairs (token1 < token2) from a frame of prices: one column per token, one row per
    bucket in time order (NaN where a token has no price). Pairs with fewer than
    `min_samples` common returns, or a constant series, are left out."""
    tokens = sorted(prices.columns)
    returns = np.log(prices[tokens].astype(float)).diff().iloc[1:]
    values = returns.to_numpy()
    present = ~np.isnan(values)
    pairs = []
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            both = present[:, i] & present[:, j]
            n = int(both.sum())
            if n < min_samples:
                continue
            x, y = values[both, i], values[both, j]
            if np.std(x) == 0 or np.std(y) == 0:
                continue
            r = float(np.clip(np.corrcoef(x, y)[0, 1], -1.0, 1.0))
            pairs.append(Pair(tokens[i], tokens[j], r, p_value(r, n), n))
    return pairs


def p_value(r: float, n: int) -> float | None:
    """Two-sided p-value of a Pearson r over n samples (t-test with n - 2 degrees of freedom)."""
    if n < 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    t = r * np.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * stats.t.sf(abs(t), n - 2))


_TOP_TOKENS = """
SELECT t.id
  FROM "Token" t
  LEFT JOIN (SELECT "tokenId", sum("usdValue") AS held FROM "TokenBalance"
              WHERE "usdValue" > 0 GROUP BY "tokenId") h ON h."tokenId" = t.id
 WHERE EXISTS (SELECT 1 FROM "PriceSnapshot" p
                WHERE p."tokenId" = t.id AND p."recordedAt" > %(since)s AND p."recordedAt" <= %(until)s)
 ORDER BY h.held DESC NULLS LAST, t.id
 LIMIT %(k)s
"""

_BUCKETS = """
SELECT DISTINCT ON ("tokenId", bucket) "tokenId", date_bin({interval}, "recordedAt", {origin}) AS bucket,
       "priceUsd"::float8
  FROM "PriceSnapshot"
 WHERE "tokenId" = ANY(%(tokens)s) AND "recordedAt" > %(since)s AND "recordedAt" <= %(until)s
 ORDER BY "tokenId", bucket, "recordedAt" DESC
"""


def top_tokens(conn: psycopg.Connection, k: int, since: datetime, until: datetime) -> list[str]:
    """The k tokens with the largest total holdings value that have a price in (since, until]."""
    return [r[0] for r in conn.execute(_TOP_TOKENS, {"since": since, "until": until, "k": k})]


def bucket_prices(conn: psycopg.Connection, tokens: list[str], since: datetime, until: datetime,
                  interval: timedelta) -> pd.DataFrame:
    """The last price of each token in each bucket: from the hourly or daily rollup at 60
    or 1,440 minutes once rollups are in use (rollups/reads.py; no raw row is read,
    archived months included), from raw rows otherwise."""
    if interval in INTERVAL_TABLES and rollups_in_use(conn, "price"):
        rows = bucket_closes(conn, tokens, since, until, interval)
    else:
        query = sql.SQL(_BUCKETS).format(interval=sql.Literal(interval), origin=sql.Literal(datetime(2000, 1, 1)))
        rows = conn.execute(query, {"tokens": tokens, "since": since, "until": until}).fetchall()
    frame = pd.DataFrame(rows, columns=["tokenId", "bucket", "price"])
    if frame.empty:
        return pd.DataFrame(columns=tokens, dtype=float)
    return frame.pivot(index="bucket", columns="tokenId", values="price").sort_index()


@dataclass
class CorrelationResult:
    as_of: datetime
    tokens: int
    pairs_by_timeframe: dict[str, int]
    written: int

    def metadata(self) -> dict:
        return {"computedAt": self.as_of.isoformat(sep=" "), "tokens": self.tokens,
                "pairs_by_timeframe": self.pairs_by_timeframe, "rows_upserted": self.written}


def compute_correlations(read_conn: psycopg.Connection, as_of: datetime, top_k: int,
                         timeframes: Iterable[str], interval: timedelta) -> tuple[list[str], dict[str, list[Pair]]]:
    """Read prices (from the analytics replica) and compute every timeframe's pairs."""
    as_of = to_utc_naive(as_of)
    timeframes = list(timeframes)
    longest = max(TIMEFRAMES[tf] for tf in timeframes)
    tokens = top_tokens(read_conn, top_k, as_of - longest, as_of)
    result = {}
    for timeframe in timeframes:
        frame = bucket_prices(read_conn, tokens, as_of - TIMEFRAMES[timeframe], as_of, interval)
        result[timeframe] = correlation_pairs(frame) if len(tokens) >= 2 else []
    return tokens, result


_UPSERT = """
INSERT INTO "AssetCorrelation" AS a (id, "token1Id", "token2Id", timeframe, correlation, "pValue", "sampleSize",
                                     "computedAt")
SELECT md5(token1 || '/' || token2 || '/' || timeframe)::uuid::text, token1, token2, timeframe,
       round(correlation::numeric, 8), round(p_value::numeric, 8), samples, %(at)s
  FROM unnest(%(token1)s::text[], %(token2)s::text[], %(timeframe)s::text[], %(correlation)s::float8[],
              %(p_value)s::float8[], %(samples)s::int[]) AS u(token1, token2, timeframe, correlation, p_value, samples)
ON CONFLICT ("token1Id", "token2Id", timeframe) DO UPDATE
   SET correlation = excluded.correlation, "pValue" = excluded."pValue", "sampleSize" = excluded."sampleSize",
       "computedAt" = excluded."computedAt"
"""


def write_correlations(conn: psycopg.Connection, pairs: dict[str, list[Pair]], as_of: datetime) -> int:
    rows = [(pair.token1, pair.token2, tf, pair.correlation, pair.p_value, pair.samples)
            for tf, items in pairs.items() for pair in items]
    if not rows:
        return 0
    columns = list(zip(*rows))
    with conn.transaction():
        return conn.execute(_UPSERT, {
            "at": to_utc_naive(as_of), "token1": list(columns[0]), "token2": list(columns[1]),
            "timeframe": list(columns[2]), "correlation": list(columns[3]), "p_value": list(columns[4]),
            "samples": list(columns[5]),
        }).rowcount


def risk_metrics(conn: psycopg.Connection, timeframe: str, now: datetime) -> list[dict]:
    """The seed's calculateRiskMetrics: this timeframe's correlations computed in the last day."""
    cur = conn.execute(
        'SELECT "token1Id", "token2Id", timeframe, correlation, "pValue", "sampleSize", "computedAt" '
        'FROM "AssetCorrelation" WHERE timeframe = %s AND "computedAt" >= %s ORDER BY "token1Id", "token2Id"',
        (timeframe, to_utc_naive(now) - timedelta(days=1)))
    names = [c.name for c in cur.description]
    return [dict(zip(names, row)) for row in cur]
