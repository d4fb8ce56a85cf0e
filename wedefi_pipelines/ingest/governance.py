"""Governance locks: bulk upsert of "GovernanceLock" keyed by ("protocolId","walletId").

Same shape as the balance sync: COPY into a temporary table, one `INSERT ... ON CONFLICT
DO UPDATE ... WHERE <something changed>`, so a refresh that finds a lock unchanged does
not rewrite it ("lastRefreshedAt" is when its values last changed). Rows for unknown
wallets or protocols are counted and left out. Returns the wallets whose locks changed:
the hook for the governance cache (`governance:<walletId>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import psycopg
import pyarrow as pa
from psycopg import sql

from wedefi_pipelines import locks as advisory
from wedefi_pipelines.ingest.pgcopy import copy_table
from wedefi_pipelines.ingest.validation import require_columns
from wedefi_pipelines.partitioning import to_utc_naive

COLUMNS = ("walletId", "protocolId", "lockAmount", "votingPower", "boostMultiplier", "lockEndsAt")
_STAGE = "wedefi_governance_stage"


@dataclass
class GovernanceSyncResult:
    at: datetime
    received: int
    changed: int
    unchanged: int
    skipped: int
    changed_wallet_ids: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        return {"at": self.at.isoformat(sep=" "), "received": self.received, "changed_rows": self.changed,
                "unchanged_rows": self.unchanged, "skipped_rows (unknown wallet or protocol)": self.skipped,
                "changed_wallets": len(self.changed_wallet_ids),
                "changed_wallets_sample": self.changed_wallet_ids[:20]}


_UPSERT = """
WITH candidates AS (
    SELECT DISTINCT ON (s."protocolId", s."walletId") s.*
      FROM {stage} s
      JOIN "Wallet" w ON w.id = s."walletId"
      JOIN "Protocol" pr ON pr.id = s."protocolId"
     ORDER BY s."protocolId", s."walletId", s.ord DESC
), upserted AS (
    INSERT INTO "GovernanceLock" AS g
           (id, "protocolId", "walletId", "lockAmount", "votingPower", "boostMultiplier", "lockEndsAt",
            "lastRefreshedAt", "updatedAt")
    SELECT md5(c."protocolId" || '/' || c."walletId")::uuid::text, c."protocolId", c."walletId", c."lockAmount",
           c."votingPower", c."boostMultiplier", c."lockEndsAt", {at}, {at}
      FROM candidates c
    ON CONFLICT ("protocolId", "walletId") DO UPDATE
       SET "lockAmount" = excluded."lockAmount", "votingPower" = excluded."votingPower",
           "boostMultiplier" = excluded."boostMultiplier", "lockEndsAt" = excluded."lockEndsAt",
           "lastRefreshedAt" = excluded."lastRefreshedAt", "updatedAt" = excluded."updatedAt"
     WHERE (g."lockAmount", g."votingPower", g."boostMultiplier", g."lockEndsAt")
           IS DISTINCT FROM (excluded."lockAmount", excluded."votingPower", excluded."boostMultiplier",
                             excluded."lockEndsAt")
    RETURNING g."walletId"
)
SELECT (SELECT count(*) FROM candidates), count(*),
       coalesce(array_agg(DISTINCT "walletId" ORDER BY "walletId"), '{{}}') FROM upserted
"""


def sync_governance_locks(conn: psycopg.Connection, locks: pa.Table, at: datetime) -> GovernanceSyncResult:
    at = to_utc_naive(at)
    require_columns(locks, COLUMNS, "governance lock rows")
    with conn.transaction():
        advisory.xact_lock(conn, "ingest.governance")
        conn.execute(sql.SQL(
            'CREATE TEMP TABLE {} (ord bigserial, "walletId" text, "protocolId" text, "lockAmount" numeric(36,18) '
            'NOT NULL, "votingPower" numeric(36,18) NOT NULL, "boostMultiplier" numeric(36,18), '
            '"lockEndsAt" timestamp(3)) ON COMMIT DROP').format(sql.Identifier(_STAGE)))
        copy_table(conn, _STAGE, locks.select(list(COLUMNS)))
        candidates, changed, wallets = conn.execute(sql.SQL(_UPSERT).format(
            stage=sql.Identifier(_STAGE), at=sql.Literal(at))).fetchone()
    return GovernanceSyncResult(at=at, received=locks.num_rows, changed=changed, unchanged=candidates - changed,
                                skipped=locks.num_rows - candidates, changed_wallet_ids=list(wallets))
