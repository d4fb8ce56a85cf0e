"""Balance sync: bulk upsert of "TokenBalance" (the seed's `updateTokenBalance`, set-based).

COPY the source's balances into a temporary table, then one
`INSERT ... ON CONFLICT ("walletId","tokenId") DO UPDATE ... WHERE <something changed>`:
unchanged rows are not rewritten (no dead tuple, no WAL, nothing for the replicas), and
"usdValue" is refreshed from each token's latest price. "blockNumber" and "fetchedAt"
therefore tell when a row last changed. Rows for unknown wallets or tokens, or with a
negative quantity, are counted and left out rather than failing the whole sync.

Runs on the primary (the seed routes balance_sync there), under a transaction advisory
lock so two syncs serialize, and in ("walletId","tokenId") order so a concurrent app
writer cannot deadlock with it. The set of wallets whose balances changed is returned:
it is the hook for cache invalidation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
import pyarrow as pa
from psycopg import sql

from wedefi_pipelines.ingest.latest_prices import LATEST_PRICE_TABLE, stage_latest_prices
from wedefi_pipelines import locks
from wedefi_pipelines.ingest.pgcopy import copy_table
from wedefi_pipelines.ingest.validation import require_columns
from wedefi_pipelines.partitioning import to_utc_naive

_STAGE = "wedefi_balance_stage"
COLUMNS = ("walletId", "tokenId", "rawBalance", "quantity", "blockNumber")


@dataclass
class BalanceSyncResult:
    at: datetime
    received: int
    changed: int
    unchanged: int
    skipped: dict[str, int]
    unpriced_tokens: int
    changed_wallet_ids: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        return {
            "at": self.at.isoformat(sep=" "),
            "received": self.received,
            "changed_rows": self.changed,
            "unchanged_rows": self.unchanged,
            "skipped_rows": self.skipped,
            "tokens_without_recent_price": self.unpriced_tokens,
            "changed_wallets": len(self.changed_wallet_ids),
            "changed_wallets_sample": self.changed_wallet_ids[:20],
        }


_CLASSIFY = """
SELECT count(*) FILTER (WHERE w.id IS NULL) AS unknown_wallet,
       count(*) FILTER (WHERE w.id IS NOT NULL AND t.id IS NULL) AS unknown_token,
       count(*) FILTER (WHERE w.id IS NOT NULL AND t.id IS NOT NULL AND s.quantity < 0) AS negative_quantity,
       count(*) FILTER (WHERE t.id IS NOT NULL AND lp."tokenId" IS NULL) AS unpriced_rows,
       count(DISTINCT s."tokenId") FILTER (WHERE t.id IS NOT NULL AND lp."tokenId" IS NULL) AS unpriced_tokens,
       count(DISTINCT (s."walletId", s."tokenId"))
             FILTER (WHERE w.id IS NOT NULL AND t.id IS NOT NULL AND s.quantity >= 0) AS loadable
  FROM {stage} s
  LEFT JOIN "Wallet" w ON w.id = s."walletId"
  LEFT JOIN "Token" t ON t.id = s."tokenId"
  LEFT JOIN {latest} lp ON lp."tokenId" = s."tokenId"
"""

_UPSERT = """
WITH upserted AS (
    INSERT INTO "TokenBalance" AS b
           (id, "walletId", "tokenId", "rawBalance", quantity, "usdValue", "blockNumber", "fetchedAt", "updatedAt")
    SELECT DISTINCT ON (s."walletId", s."tokenId")
           md5(s."walletId" || '/' || s."tokenId")::uuid::text, s."walletId", s."tokenId", s."rawBalance",
           s.quantity, s.quantity * lp."priceUsd", s."blockNumber", {at}, {at}
      FROM {stage} s
      JOIN "Wallet" w ON w.id = s."walletId"
      JOIN "Token" t ON t.id = s."tokenId"
      LEFT JOIN {latest} lp ON lp."tokenId" = s."tokenId"
     WHERE s.quantity >= 0
     ORDER BY s."walletId", s."tokenId", s.ord DESC
    ON CONFLICT ("walletId", "tokenId") DO UPDATE
       SET "rawBalance" = excluded."rawBalance", quantity = excluded.quantity, "usdValue" = excluded."usdValue",
           "blockNumber" = excluded."blockNumber", "fetchedAt" = excluded."fetchedAt", "updatedAt" = excluded."updatedAt"
     WHERE (b."rawBalance", b.quantity, b."usdValue")
           IS DISTINCT FROM (excluded."rawBalance", excluded.quantity, excluded."usdValue")
    RETURNING b."walletId"
)
SELECT count(*), coalesce(array_agg(DISTINCT "walletId" ORDER BY "walletId"), '{{}}') FROM upserted
"""


def sync_balances(conn: psycopg.Connection, balances: pa.Table, at: datetime,
                  lookback: timedelta = timedelta(hours=48)) -> BalanceSyncResult:
    """Upsert `balances` (columns COLUMNS) as of `at`, in one transaction."""
    at = to_utc_naive(at)
    require_columns(balances, COLUMNS, "balance rows")
    with conn.transaction():
        locks.xact_lock(conn, "ingest.balances")
        stage_latest_prices(conn, at, lookback)
        conn.execute(sql.SQL(
            'CREATE TEMP TABLE {} (ord bigserial, "walletId" text, "tokenId" text, "rawBalance" text NOT NULL, '
            'quantity numeric(65,30) NOT NULL, "blockNumber" bigint) ON COMMIT DROP').format(sql.Identifier(_STAGE)))
        copy_table(conn, _STAGE, balances.select(list(COLUMNS)))
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(_STAGE)))
        names = {"stage": sql.Identifier(_STAGE), "latest": sql.Identifier(LATEST_PRICE_TABLE), "at": sql.Literal(at)}
        unknown_wallet, unknown_token, negative, _unpriced_rows, unpriced_tokens, loadable = conn.execute(
            sql.SQL(_CLASSIFY).format(**names)).fetchone()
        changed, wallets = conn.execute(sql.SQL(_UPSERT).format(**names)).fetchone()
    skipped = {k: v for k, v in (("unknown wallet", unknown_wallet), ("unknown token", unknown_token),
                                 ("negative quantity", negative)) if v}
    return BalanceSyncResult(at=at, received=balances.num_rows, changed=changed, unchanged=loadable - changed,
                             skipped=skipped, unpriced_tokens=unpriced_tokens, changed_wallet_ids=list(wallets))
