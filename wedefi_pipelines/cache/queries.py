"""The set-based reads behind every cached value, shared by the refresh asset, the API-side
CacheManager and invalidation, so a value means the same thing whoever computed it.

Each function takes an open psycopg connection (the caller picks the server through the
database's workload routing) and returns contract-shaped `data` by id. Many ids cost one
statement (`= ANY(%s)`), never one per id: the seed's N+1 fix. Decimals are turned into
exact text by PostgreSQL (`trim_scale(x)::text`), so no float is ever involved.

"Latest" lookups carry a lower time bound (`since`) so the planner prunes every older
monthly child (DESIGN.md section 6): per token or per wallet, an index-driven LATERAL
`ORDER BY ... DESC LIMIT 1` over the children inside the window.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Sequence, Union

import psycopg
from psycopg import sql

from wedefi_pipelines.cache import contract as c


def window_start(lookback_days: int, now: datetime | None = None) -> datetime:
    """The lower bound of "latest" lookups, as naive UTC (the columns' convention)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc).replace(tzinfo=None)
    return now - timedelta(days=lookback_days)


LATEST_PRICES = """
SELECT t.id, p.price, p.source, p."recordedAt"
  FROM "Token" t
 CROSS JOIN LATERAL (
        SELECT trim_scale(s."priceUsd")::text AS price, s.source, s."recordedAt"
          FROM "PriceSnapshot" s
         WHERE s."tokenId" = t.id AND s."recordedAt" >= %(since)s
         ORDER BY s."recordedAt" DESC, s.source DESC
         LIMIT 1) p
{where}
 ORDER BY t.id
"""


def latest_prices(conn: psycopg.Connection, since: datetime, token_ids: Sequence[str] | None = None) -> dict[str, dict]:
    """Each token's newest price recorded at or after `since` (all tokens when `token_ids` is None).

    A token with no price inside the window has no entry. Ties on "recordedAt" (two
    sources) resolve to the greatest source name, deterministically.
    """
    where = sql.SQL("WHERE t.id = ANY(%(ids)s)") if token_ids is not None else sql.SQL("")
    query = sql.SQL(LATEST_PRICES).format(where=where)
    rows = conn.execute(query, {"since": since, "ids": list(token_ids or [])})
    return {tid: c.price_data(tid, price, source, at) for tid, price, source, at in rows}


# One pass over the chunk's balances (every hash partition visited once, not once per
# wallet): window functions give each wallet's total and count on every row and rank its
# balances by value, so positives come first; the lateral picks each wallet's newest
# snapshot inside the window through the per-child ("walletId", "capturedAt") index.
PORTFOLIO_SUMMARIES = """
WITH bal AS (
    SELECT b."walletId", b."tokenId", b.quantity, b."rawBalance", b."usdValue",
           sum(b."usdValue") OVER per_wallet AS total,
           count(*) OVER per_wallet AS n,
           row_number() OVER (PARTITION BY b."walletId" ORDER BY b."usdValue" DESC NULLS LAST, b."tokenId") AS rn
      FROM "TokenBalance" b
     WHERE {balance_filter}
    WINDOW per_wallet AS (PARTITION BY b."walletId")
)
SELECT w.id, w.address, w.label, w."chainId", ch.name,
       trim_scale(coalesce(bal.total, 0))::text, coalesce(bal.n, 0),
       snap."capturedAt", snap.total, snap.d24h, snap.d7d, snap.d30d,
       bal."usdValue" > 0, bal."tokenId", t.symbol, t.name, t.decimals, t."isNative",
       trim_scale(bal.quantity)::text, bal."rawBalance", trim_scale(bal."usdValue")::text
  FROM "Wallet" w
  JOIN "Chain" ch ON ch.id = w."chainId"
  LEFT JOIN bal ON bal."walletId" = w.id AND bal.rn <= %(top)s
  LEFT JOIN "Token" t ON t.id = bal."tokenId"
  LEFT JOIN LATERAL (
        SELECT s."capturedAt",
               trim_scale(s."totalUsdValue")::text AS total,
               trim_scale(s."totalUsdValueChange24h")::text AS d24h,
               trim_scale(s."totalUsdValueChange7d")::text AS d7d,
               trim_scale(s."totalUsdValueChange30d")::text AS d30d
          FROM "PortfolioSnapshot" s
         WHERE s."walletId" = w.id AND s."capturedAt" >= %(since)s
         ORDER BY s."capturedAt" DESC
         LIMIT 1) snap ON true
 WHERE {wallet_filter}
 ORDER BY w.id, bal.rn
"""


@dataclass(frozen=True)
class WalletRange:
    """Every wallet with first <= id <= last: a keyset chunk of the refresh. Read as a
    range, each hash partition of "TokenBalance" is one index range scan instead of one
    probe per id per partition (~25% faster per chunk than `= ANY(ids)`, measured)."""

    first: str
    last: str


Wallets = Union[Sequence[str], WalletRange]


def _wallet_filter(column: sql.Identifier, wallets: Wallets) -> tuple[sql.Composable, dict]:
    if isinstance(wallets, WalletRange):
        return sql.SQL("{} BETWEEN %(first)s AND %(last)s").format(column), {"first": wallets.first, "last": wallets.last}
    return sql.SQL("{} = ANY(%(ids)s)").format(column), {"ids": list(wallets)}


def portfolio_summaries(conn: psycopg.Connection, wallets: Wallets, since: datetime, top: int) -> dict[str, dict]:
    """The portfolio summary of every existing wallet among `wallets` (unknown ids are absent)."""
    if not isinstance(wallets, WalletRange) and not wallets:
        return {}
    balance_filter, params = _wallet_filter(sql.Identifier("b", "walletId"), wallets)
    wallet_filter, _ = _wallet_filter(sql.Identifier("w", "id"), wallets)
    query = sql.SQL(PORTFOLIO_SUMMARIES).format(balance_filter=balance_filter, wallet_filter=wallet_filter)
    out: dict[str, dict] = {}
    holdings: list[dict] = []
    current = None
    rows = conn.execute(query, {**params, "since": since, "top": top}).fetchall()
    for row in rows:
        (wid, address, label, chain_id, chain_name, total, count,
         captured_at, snap_total, d24h, d7d, d30d,
         holding, token_id, symbol, name, decimals, is_native, quantity, raw, usd) = row
        if wid != current:
            current, holdings = wid, []
            snapshot = None if captured_at is None else c.snapshot_data(captured_at, snap_total, d24h, d7d, d30d)
            out[wid] = c.portfolio_data(
                c.wallet_data(wid, address, label, chain_id, chain_name), total, count, holdings, snapshot,
            )
        if holding:
            holdings.append(c.holding_data(token_id, symbol, name, decimals, is_native, quantity, raw, usd))
    return out


GOVERNANCE_LOCKS = """
SELECT w.id, g."protocolId", p.slug, p.name,
       trim_scale(g."lockAmount")::text, trim_scale(g."votingPower")::text,
       trim_scale(g."boostMultiplier")::text, g."lockEndsAt", g."lastRefreshedAt"
  FROM "Wallet" w
  LEFT JOIN "GovernanceLock" g ON g."walletId" = w.id
  LEFT JOIN "Protocol" p ON p.id = g."protocolId"
 WHERE {wallet_filter}
 ORDER BY w.id, p.slug, g."protocolId"
"""


def governance_locks(conn: psycopg.Connection, wallets: Wallets) -> dict[str, dict]:
    """Every existing wallet's "GovernanceLock" rows, by protocol slug (empty list when none)."""
    if not isinstance(wallets, WalletRange) and not wallets:
        return {}
    wallet_filter, params = _wallet_filter(sql.Identifier("w", "id"), wallets)
    out: dict[str, dict] = {}
    for wid, protocol_id, slug, pname, amount, power, boost, ends, refreshed in conn.execute(
        sql.SQL(GOVERNANCE_LOCKS).format(wallet_filter=wallet_filter), params
    ):
        locks = out.setdefault(wid, c.governance_data(wid, []))["locks"]
        if protocol_id is not None:
            locks.append(c.lock_data(protocol_id, slug, pname, amount, power, boost, ends, refreshed))
    return out


def wallet_ids_after(conn: psycopg.Connection, after: str | None, limit: int) -> list[str]:
    """The next `limit` wallet ids after `after`, in id order (keyset over the primary key)."""
    if after is None:
        rows = conn.execute('SELECT id FROM "Wallet" ORDER BY id LIMIT %s', (limit,))
    else:
        rows = conn.execute('SELECT id FROM "Wallet" WHERE id > %s ORDER BY id LIMIT %s', (after, limit))
    return [r[0] for r in rows]


def existing_wallets(conn: psycopg.Connection, wallet_ids: Sequence[str]) -> set[str]:
    rows = conn.execute('SELECT id FROM "Wallet" WHERE id = ANY(%s)', (list(wallet_ids),))
    return {r[0] for r in rows}


# -- paging (the seed's getPagedPortfolioData, plus keyset) --------------------------------------

@dataclass(frozen=True)
class PageFilter:
    """The seed's filters: one wallet, and/or wallets holding a balance worth >= min_value USD."""

    wallet_id: str | None = None
    min_value: Decimal | None = None

    def where(self) -> list[sql.Composable]:
        clauses: list[sql.Composable] = []
        if self.wallet_id is not None:
            clauses.append(sql.SQL("w.id = {}").format(sql.Literal(self.wallet_id)))
        if self.min_value is not None:
            clauses.append(sql.SQL(
                'EXISTS (SELECT 1 FROM "TokenBalance" b WHERE b."walletId" = w.id AND b."usdValue" >= {})'
            ).format(sql.Literal(Decimal(self.min_value))))
        return clauses


def encode_cursor(created_at: datetime, wallet_id: str) -> str:
    """An opaque keyset cursor: the last row's ("createdAt", id)."""
    raw = json.dumps([created_at.isoformat(), wallet_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, wallet_id = json.loads(raw)
        return datetime.fromisoformat(created), str(wallet_id)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cursor {cursor!r} is not one this API returned ({exc})") from None


def _where(clauses: list[sql.Composable]) -> sql.Composable:
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")


def page_wallets(
    conn: psycopg.Connection, limit: int, filters: PageFilter = PageFilter(),
    offset: int | None = None, after: tuple[datetime, str] | None = None,
) -> list[tuple[str, datetime]]:
    """One page of (wallet id, "createdAt") in the seed's order ("createdAt", then id).

    With `after` (keyset) the page starts right after that row, so rows inserted or
    deleted elsewhere never shift it: every wallet present throughout is seen exactly
    once. With `offset` it is the seed's skip/take.
    """
    clauses = filters.where()
    if after is not None:
        clauses.append(sql.SQL('(w."createdAt", w.id) > ({}, {})').format(sql.Literal(after[0]), sql.Literal(after[1])))
    query = sql.SQL('SELECT w.id, w."createdAt" FROM "Wallet" w {where} ORDER BY w."createdAt", w.id LIMIT {limit}').format(
        where=_where(clauses), limit=sql.Literal(limit),
    )
    if offset:
        query += sql.SQL(" OFFSET {}").format(sql.Literal(offset))
    return [(r[0], r[1]) for r in conn.execute(query)]


def count_wallets(conn: psycopg.Connection, filters: PageFilter = PageFilter()) -> int:
    query = sql.SQL('SELECT count(*) FROM "Wallet" w {}').format(_where(filters.where()))
    return conn.execute(query).fetchone()[0]
