"""The set-based reads behind every cached value, shared by the refresh asset, the API-side
CacheManager and invalidation, so a value means the same thing whoever computed it.

Each function takes an open psycopg connection (the caller picks the server through the
database's workload routing) and returns contract values by id (contract.py: a price's
text, or what Prisma's findMany returns). Many ids cost one statement (`= ANY(%s)` or an
id range), never one per id: the seed's N+1 fix. PostgreSQL formats decimals
(`trim_scale(x)::text`, exact) and times (`Date.toJSON()`'s form), so no float is
involved and Python builds the JSON without parsing a number or a date.

The latest price carries a lower time bound (`since`) so the planner prunes every older
monthly child (DESIGN.md section 6): per token an index-driven LATERAL
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
from psycopg.rows import dict_row

from wedefi_pipelines.cache import contract as c


def window_start(lookback_days: int, now: datetime | None = None) -> datetime:
    """The lower bound of "latest" lookups, as naive UTC (the columns' convention)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc).replace(tzinfo=None)
    return now - timedelta(days=lookback_days)


LATEST_PRICES = """
SELECT t.id, p.price
  FROM "Token" t
 CROSS JOIN LATERAL (
        SELECT trim_scale(s."priceUsd")::text AS price
          FROM "PriceSnapshot" s
         WHERE s."tokenId" = t.id AND s."recordedAt" >= %(since)s
         ORDER BY s."recordedAt" DESC, s.source DESC
         LIMIT 1) p
{where}
 ORDER BY t.id
"""


def latest_prices(conn: psycopg.Connection, since: datetime, token_ids: Sequence[str] | None = None) -> dict[str, str]:
    """Each token's newest "priceUsd" recorded at or after `since`, as plain decimal text
    (all tokens when `token_ids` is None).

    A token with no price inside the window has no entry. Ties on "recordedAt" (two
    sources) resolve to the greatest source name, deterministically.
    """
    where = sql.SQL("WHERE t.id = ANY(%(ids)s)") if token_ids is not None else sql.SQL("")
    query = sql.SQL(LATEST_PRICES).format(where=where)
    rows = conn.execute(query, {"since": since, "ids": list(token_ids or [])})
    return {tid: price for tid, price in rows}


def _iso(column: str) -> str:
    """SQL formatting a timestamp(3) column (UTC) the way JavaScript's Date.toJSON() does."""
    return f"""to_char({column}, 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


# The seed's getPortfolioSummary: `wallet.findMany({ where: { id }, include: { balances: {
# include: { token: true }, where: { usdValue: { gt: 0 } } } } })`, for a chunk of wallets
# in one pass over their balances (every hash partition of "TokenBalance" visited once).
PORTFOLIO_SUMMARIES = f"""
SELECT w.id AS w_id, w.address AS w_address, w."chainId" AS w_chain, w.label AS w_label, w.metadata AS w_metadata,
       {_iso('w."createdAt"')} AS w_created, {_iso('w."updatedAt"')} AS w_updated,
       b.id, b."walletId", b."tokenId", b."rawBalance",
       trim_scale(b.quantity)::text AS quantity, trim_scale(b."usdValue")::text AS "usdValue", b."blockNumber",
       {_iso('b."fetchedAt"')} AS "fetchedAt", {_iso('b."createdAt"')} AS "createdAt",
       {_iso('b."updatedAt"')} AS "updatedAt",
       t.id AS t_id, t."chainId" AS t_chain, t.address AS t_address, t.symbol, t.name, t.decimals, t."isNative",
       t.metadata AS t_metadata, {_iso('t."createdAt"')} AS t_created, {_iso('t."updatedAt"')} AS t_updated
  FROM "Wallet" w
  LEFT JOIN ("TokenBalance" b JOIN "Token" t ON t.id = b."tokenId")
         ON b."walletId" = w.id AND b."usdValue" > 0 AND {{balance_filter}}
 WHERE {{wallet_filter}}
 ORDER BY w.id, b."usdValue" DESC, b."tokenId"
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


def portfolio_summaries(conn: psycopg.Connection, wallets: Wallets) -> dict[str, list[dict]]:
    """`getPortfolioSummary(walletId)`'s result for every existing wallet among `wallets`:
    a one-element array (unknown ids are absent; the app would read `[]` for them).

    Balances are listed by "usdValue", largest first, then token id (Prisma's query has no
    order; readers compare them as a set)."""
    if not isinstance(wallets, WalletRange) and not wallets:
        return {}
    balance_filter, params = _wallet_filter(sql.Identifier("b", "walletId"), wallets)
    wallet_filter, _ = _wallet_filter(sql.Identifier("w", "id"), wallets)
    query = sql.SQL(PORTFOLIO_SUMMARIES).format(balance_filter=balance_filter, wallet_filter=wallet_filter)
    out: dict[str, list[dict]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(query, params):
            wid = row["w_id"]
            entry = out.get(wid)
            if entry is None:
                entry = out[wid] = [c.wallet_value({
                    "id": wid, "address": row["w_address"], "chainId": row["w_chain"], "label": row["w_label"],
                    "metadata": row["w_metadata"], "createdAt": row["w_created"], "updatedAt": row["w_updated"]}, [])]
            if row["id"] is not None:
                token = c.token_value({
                    "id": row["t_id"], "chainId": row["t_chain"], "address": row["t_address"], "symbol": row["symbol"],
                    "name": row["name"], "decimals": row["decimals"], "isNative": row["isNative"],
                    "metadata": row["t_metadata"], "createdAt": row["t_created"], "updatedAt": row["t_updated"]})
                entry[0]["balances"].append(c.balance_value(row, token))
    return out


GOVERNANCE_LOCKS = f"""
SELECT w.id AS w_id, g.id, g."protocolId", g."walletId",
       trim_scale(g."lockAmount")::text AS "lockAmount", trim_scale(g."votingPower")::text AS "votingPower",
       trim_scale(g."boostMultiplier")::text AS "boostMultiplier", {_iso('g."lockEndsAt"')} AS "lockEndsAt",
       {_iso('g."lastRefreshedAt"')} AS "lastRefreshedAt", g.metadata,
       {_iso('g."createdAt"')} AS "createdAt", {_iso('g."updatedAt"')} AS "updatedAt"
  FROM "Wallet" w
  LEFT JOIN "GovernanceLock" g ON g."walletId" = w.id
 WHERE {{wallet_filter}}
 ORDER BY w.id, g."protocolId", g.id
"""


def governance_locks(conn: psycopg.Connection, wallets: Wallets) -> dict[str, list[dict]]:
    """`governanceLock.findMany({ where: { walletId } })` for every existing wallet among
    `wallets` (an empty array when it has none; unknown ids are absent), by protocol id."""
    if not isinstance(wallets, WalletRange) and not wallets:
        return {}
    wallet_filter, params = _wallet_filter(sql.Identifier("w", "id"), wallets)
    out: dict[str, list[dict]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(sql.SQL(GOVERNANCE_LOCKS).format(wallet_filter=wallet_filter), params):
            locks = out.setdefault(row["w_id"], [])
            if row["id"] is not None:
                locks.append(c.lock_value(row))
    return out


def wallet_ids_after(conn: psycopg.Connection, after: str | None, limit: int) -> list[str]:
    """The next `limit` wallet ids after `after`, in id order (keyset over the primary key)."""
    if after is None:
        rows = conn.execute('SELECT id FROM "Wallet" ORDER BY id LIMIT %s', (limit,))
    else:
        rows = conn.execute('SELECT id FROM "Wallet" WHERE id > %s ORDER BY id LIMIT %s', (after, limit))
    return [r[0] for r in rows]


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
