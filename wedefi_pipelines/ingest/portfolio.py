"""Portfolio and position ticks: set-based, one transaction per tick, idempotent.

A tick is a moment on a fixed grid (every 5 minutes by default): "capturedAt" is the run's
scheduled time truncated to the grid, so re-running a tick finds it already captured and
changes nothing. Each tick, in one transaction under an advisory lock for that tick:

1. each token's latest price as of the tick (bounded LATERAL lookups, newest child only);
2. one `INSERT ... SELECT` writing every wallet's "PortfolioSnapshot" row: the total of
   quantity x latest price over its "TokenBalance" rows, the number of priced tokens, and
   its change against its own row at the reference tick 24 h / 7 d / 30 d earlier (the
   newest all-wallets tick at or before then, within one hour: three index probes, then
   plain joins on ("walletId","capturedAt"));
3. the app's all-wallets row ("walletId" NULL), summed from the rows just written;
4. "PositionSnapshot" rows for the same "capturedAt": one 'liquid' position per priced
   balance and the source's DeFi positions, each pointing at its wallet's
   PortfolioSnapshot row of this tick. There is no database FK (see sql/0002), so writing
   them in the portfolio rows' transaction is what keeps them consistent, and an asset
   check proves it.

Ids are derived from the natural key (md5 formatted as a UUID): cheap, unlike
gen_random_uuid() on the embedded build, and identical if a tick is ever rebuilt.
The all-wallets row is written last, so its presence marks a complete tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg
import pyarrow as pa
from psycopg import sql

from wedefi_pipelines import locks, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.ingest.latest_prices import LATEST_PRICE_TABLE, stage_latest_prices
from wedefi_pipelines.ingest.pgcopy import copy_table
from wedefi_pipelines.settings import divides_a_day

CHANGE_INTERVALS = (("24h", timedelta(hours=24)), ("7d", timedelta(days=7)), ("30d", timedelta(days=30)))
REFERENCE_TOLERANCE = timedelta(hours=1)
POSITION_COLUMNS = ("walletId", "tokenId", "protocolId", "positionType", "quantity", "costBasisUsd")
_POSITION_STAGE = "wedefi_position_stage"


class TickError(RuntimeError):
    """A tick cannot be written as asked; the message says what to run first."""


def truncate_to_tick(moment: datetime, minutes: int) -> datetime:
    """`moment` (UTC) floored to the grid of `minutes` (which divides a day) since midnight."""
    divides_a_day(minutes)
    moment = p.to_utc_naive(moment)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = int((moment - midnight).total_seconds() // 60)
    return midnight + timedelta(minutes=elapsed - elapsed % minutes)


def tick_lock_key(tick: datetime) -> int:
    return int((p.to_utc_naive(tick) - datetime(1970, 1, 1)).total_seconds() // 60)


@dataclass
class TickResult:
    tick: datetime
    priced_tokens: int = 0
    wallet_rows: int = 0
    all_wallets_row: bool = False
    total_usd: Decimal | None = None
    positions: int = 0
    defi_positions: int = 0
    reference_ticks: dict[str, datetime | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def portfolio_metadata(self) -> dict:
        return {
            "capturedAt": self.tick.isoformat(sep=" "),
            "wallet_rows": self.wallet_rows,
            "all_wallets_row_written": self.all_wallets_row,
            "total_usd": str(self.total_usd) if self.total_usd is not None else None,
            "tokens_with_price": self.priced_tokens,
            "reference_ticks": {k: (v.isoformat(sep=" ") if v else None) for k, v in self.reference_ticks.items()},
            "notes": self.notes,
        }

    def position_metadata(self) -> dict:
        return {"capturedAt": self.tick.isoformat(sep=" "), "positions": self.positions,
                "defi_positions": self.defi_positions, "notes": self.notes}


_REFERENCE = """
SELECT max("capturedAt") FROM "PortfolioSnapshot"
 WHERE "walletId" IS NULL AND "capturedAt" <= %s AND "capturedAt" > %s
"""

_WALLET_ROWS = """
INSERT INTO "PortfolioSnapshot"
       (id, "walletId", "totalUsdValue", "totalUsdValueChange24h", "totalUsdValueChange7d", "totalUsdValueChange30d",
        "tokensTracked", "capturedAt")
SELECT md5(w.id || '@' || {tick_text})::uuid::text, w.id, coalesce(t.total, 0),
       coalesce(t.total, 0) - r24."totalUsdValue", coalesce(t.total, 0) - r7."totalUsdValue",
       coalesce(t.total, 0) - r30."totalUsdValue", coalesce(t.tracked, 0), {tick}
  FROM "Wallet" w
  LEFT JOIN (SELECT b."walletId", sum(b.quantity * lp."priceUsd") AS total, count(*) AS tracked
               FROM "TokenBalance" b
               JOIN {latest} lp ON lp."tokenId" = b."tokenId"
              WHERE b.quantity > 0
              GROUP BY b."walletId") t ON t."walletId" = w.id
  LEFT JOIN "PortfolioSnapshot" r24 ON r24."walletId" = w.id AND r24."capturedAt" = {ref_24h}
  LEFT JOIN "PortfolioSnapshot" r7 ON r7."walletId" = w.id AND r7."capturedAt" = {ref_7d}
  LEFT JOIN "PortfolioSnapshot" r30 ON r30."walletId" = w.id AND r30."capturedAt" = {ref_30d}
"""

_ALL_WALLETS_ROW = """
INSERT INTO "PortfolioSnapshot"
       (id, "walletId", "totalUsdValue", "totalUsdValueChange24h", "totalUsdValueChange7d", "totalUsdValueChange30d",
        "tokensTracked", metadata, "capturedAt")
SELECT md5('all-wallets@' || {tick_text})::uuid::text, NULL, a.total,
       a.total - (SELECT "totalUsdValue" FROM "PortfolioSnapshot" WHERE "walletId" IS NULL AND "capturedAt" = {ref_24h}),
       a.total - (SELECT "totalUsdValue" FROM "PortfolioSnapshot" WHERE "walletId" IS NULL AND "capturedAt" = {ref_7d}),
       a.total - (SELECT "totalUsdValue" FROM "PortfolioSnapshot" WHERE "walletId" IS NULL AND "capturedAt" = {ref_30d}),
       a.tracked, jsonb_build_object('walletsCount', a.wallets, 'captureType', 'combined'), {tick}
  FROM (SELECT coalesce(sum("totalUsdValue"), 0) AS total, coalesce(sum("tokensTracked"), 0) AS tracked,
               count(*) AS wallets
          FROM "PortfolioSnapshot" WHERE "walletId" IS NOT NULL AND "capturedAt" = {tick}) a
RETURNING "totalUsdValue"
"""

_LIQUID_POSITIONS = """
INSERT INTO "PositionSnapshot"
       (id, "portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue", "priceUsd", "positionType", "capturedAt")
SELECT md5(ps.id || '/' || b."tokenId" || '/liquid')::uuid::text, ps.id, b."tokenId", b."walletId", b.quantity,
       b.quantity * lp."priceUsd", lp."priceUsd", 'liquid', {tick}
  FROM "TokenBalance" b
  JOIN {latest} lp ON lp."tokenId" = b."tokenId"
  JOIN "PortfolioSnapshot" ps ON ps."walletId" = b."walletId" AND ps."capturedAt" = {tick}
 WHERE b.quantity > 0 AND b.quantity < 1e18
"""

_DEFI_POSITIONS = """
INSERT INTO "PositionSnapshot"
       (id, "portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue", "priceUsd", "costBasisUsd",
        "unrealizedPnlUsd", "unrealizedPnlPercent", "positionType", "protocolId", "capturedAt")
SELECT md5(ps.id || '/' || s.ord)::uuid::text, ps.id, s."tokenId", s."walletId", s.quantity, v.usd, lp."priceUsd",
       s."costBasisUsd", v.usd - s."costBasisUsd", round((v.usd - s."costBasisUsd") / nullif(s."costBasisUsd", 0) * 100, 18),
       s."positionType", s."protocolId", {tick}
  FROM {stage} s
  JOIN {latest} lp ON lp."tokenId" = s."tokenId"
  JOIN "PortfolioSnapshot" ps ON ps."walletId" = s."walletId" AND ps."capturedAt" = {tick}
  LEFT JOIN "Protocol" pr ON pr.id = s."protocolId"
 CROSS JOIN LATERAL (SELECT round(s.quantity * lp."priceUsd", 18) AS usd) v
 WHERE s.quantity >= 0 AND s.quantity < 1e18 AND (s."protocolId" IS NULL OR pr.id IS NOT NULL)
"""


def _exists(conn: psycopg.Connection, query: str, tick: datetime) -> bool:
    return conn.execute(query, (tick,)).fetchone()[0]


def tick_captured(conn: psycopg.Connection, tick: datetime) -> bool:
    return _exists(conn, 'SELECT EXISTS (SELECT 1 FROM "PortfolioSnapshot" WHERE "walletId" IS NULL '
                         'AND "capturedAt" = %s)', tick)


def positions_captured(conn: psycopg.Connection, tick: datetime) -> bool:
    return _exists(conn, 'SELECT EXISTS (SELECT 1 FROM "PositionSnapshot" WHERE "capturedAt" = %s)', tick)


def provision_tick(conn: psycopg.Connection, tick: datetime) -> None:
    """The tick's monthly children, each created in its own short transaction (autocommit conn)."""
    month = p.month_of(tick)
    provisioning.ensure_months(conn, p.PORTFOLIO_SNAPSHOT, [month])
    provisioning.ensure_months(conn, p.POSITION_SNAPSHOT, [month])


def capture_tick(
    conn: psycopg.Connection,
    tick: datetime,
    *,
    portfolio: bool = True,
    positions: bool = True,
    defi_positions: pa.Table | None = None,
    lookback: timedelta = timedelta(hours=48),
) -> TickResult:
    """Write the tick's portfolio rows and/or position rows in one transaction."""
    tick = p.to_utc_naive(tick)
    result = TickResult(tick=tick)
    with conn.transaction():
        locks.xact_lock(conn, "ingest.portfolio_tick", tick_lock_key(tick))
        result.priced_tokens = stage_latest_prices(conn, tick, lookback)
        names = {"tick": sql.Literal(tick), "tick_text": sql.Literal(tick.isoformat(sep=" ")),
                 "latest": sql.Identifier(LATEST_PRICE_TABLE)}
        if portfolio:
            if tick_captured(conn, tick):
                result.notes.append("portfolio rows of this tick already captured: nothing to write")
            else:
                for label, interval in CHANGE_INTERVALS:
                    at = tick - interval
                    result.reference_ticks[label] = conn.execute(_REFERENCE, (at, at - REFERENCE_TOLERANCE)).fetchone()[0]
                refs = {f"ref_{label}": sql.Literal(result.reference_ticks[label]) for label, _ in CHANGE_INTERVALS}
                result.wallet_rows = conn.execute(sql.SQL(_WALLET_ROWS).format(**names, **refs)).rowcount
                result.total_usd = conn.execute(sql.SQL(_ALL_WALLETS_ROW).format(**names, **refs)).fetchone()[0]
                result.all_wallets_row = True
        if positions:
            if positions_captured(conn, tick):
                result.notes.append("positions of this tick already captured: nothing to write")
            elif not tick_captured(conn, tick):
                raise TickError(f"no PortfolioSnapshot rows at {tick}: positions must point at them; materialize "
                                "portfolio_snapshots for this tick first (or both together)")
            else:
                result.positions = conn.execute(sql.SQL(_LIQUID_POSITIONS).format(**names)).rowcount
                if defi_positions is not None and defi_positions.num_rows:
                    conn.execute(sql.SQL(
                        'CREATE TEMP TABLE {} (ord bigserial, "walletId" text, "tokenId" text, "protocolId" text, '
                        '"positionType" varchar(32), quantity numeric(65,30), "costBasisUsd" numeric(36,18)) '
                        'ON COMMIT DROP').format(sql.Identifier(_POSITION_STAGE)))
                    copy_table(conn, _POSITION_STAGE, defi_positions.select(list(POSITION_COLUMNS)))
                    result.defi_positions = conn.execute(sql.SQL(_DEFI_POSITIONS).format(
                        **names, stage=sql.Identifier(_POSITION_STAGE))).rowcount
                    result.positions += result.defi_positions
    return result


ORPHAN_POSITIONS = """
SELECT count(*), min(pos."capturedAt"), max(pos."capturedAt")
  FROM "PositionSnapshot" pos
 WHERE pos."capturedAt" >= %(since)s
   AND NOT EXISTS (SELECT 1 FROM "PortfolioSnapshot" ps
                    WHERE ps.id = pos."portfolioSnapshotId" AND ps."capturedAt" = pos."capturedAt"
                      AND ps."walletId" = pos."walletId")
"""


def orphan_positions(conn: psycopg.Connection, since: datetime) -> tuple[int, datetime | None, datetime | None]:
    """Positions captured at or after `since` without their PortfolioSnapshot row (same id,
    "capturedAt" and "walletId"): (count, first, last)."""
    return conn.execute(ORPHAN_POSITIONS, {"since": p.to_utc_naive(since)}).fetchone()


def parse_utc(text: str, field_name: str) -> datetime:
    """An ISO-8601 time from config ('2025-01-31T12:05:00Z', offsets converted, naive = UTC)."""
    try:
        return p.to_utc_naive(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(f"{field_name}: not an ISO-8601 time: {text!r} (e.g. 2025-01-31T12:05:00Z)") from None


def resolve_tick(configured: str | None, now: datetime, minutes: int, field_name: str = "tick") -> datetime:
    """The tick a run captures: the configured time (schedules pass their scheduled time),
    else now, truncated to the `minutes` grid."""
    return truncate_to_tick(parse_utc(configured, field_name) if configured else now, minutes)
