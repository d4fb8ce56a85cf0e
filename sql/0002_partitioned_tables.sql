-- WeDefiDaily's time-series and balance tables, partitioned. Column names, types and
-- defaults are the app's; what partitioning forces is listed in README ("Differences
-- from the app's schema"):
--   * every PK/unique key includes every partition column;
--   * PortfolioSnapshot has UNIQUE NULLS NOT DISTINCT (id, "capturedAt", "walletId")
--     instead of a PK, because a PK would make the nullable "walletId" NOT NULL and
--     forbid the app's all-wallets rows;
--   * PositionSnapshot gains "capturedAt" (copied from its PortfolioSnapshot) so it can
--     be range-partitioned and archived with its portfolio month;
--   * id columns default to gen_random_uuid()::text so bulk loads need not send ids
--     (Prisma still sends its own);
--   * the app's secondary indexes on range-partitioned tables are created per monthly
--     child by provisioning (wedefi_pipelines.partitioning), not on the parent, so the
--     warm tier can replace them child by child.
-- Monthly children are created by provisioning; only the default partitions live here.

CREATE TABLE IF NOT EXISTS "TokenBalance" (
    "id" TEXT NOT NULL DEFAULT gen_random_uuid()::text,
    "walletId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "rawBalance" TEXT NOT NULL,
    "quantity" DECIMAL(65,30) NOT NULL DEFAULT 0,
    "usdValue" DECIMAL(36,18),
    "blockNumber" BIGINT,
    "fetchedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "TokenBalance_pkey" PRIMARY KEY ("id", "walletId"),
    CONSTRAINT "TokenBalance_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id")
        ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT "TokenBalance_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id")
        ON DELETE CASCADE ON UPDATE CASCADE
) PARTITION BY HASH ("walletId");
CREATE UNIQUE INDEX IF NOT EXISTS "token_balance_wallet_token_unique" ON "TokenBalance"("walletId", "tokenId");
CREATE INDEX IF NOT EXISTS "TokenBalance_tokenId_idx" ON "TokenBalance"("tokenId");
CREATE INDEX IF NOT EXISTS "TokenBalance_walletId_idx" ON "TokenBalance"("walletId");
CREATE TABLE IF NOT EXISTS "TokenBalance_part_0" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 0);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_1" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 1);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_2" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 2);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_3" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 3);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_4" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 4);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_5" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 5);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_6" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 6);
CREATE TABLE IF NOT EXISTS "TokenBalance_part_7" PARTITION OF "TokenBalance" FOR VALUES WITH (MODULUS 8, REMAINDER 7);

CREATE TABLE IF NOT EXISTS "PriceSnapshot" (
    "id" TEXT NOT NULL DEFAULT gen_random_uuid()::text,
    "tokenId" TEXT NOT NULL,
    "priceUsd" DECIMAL(36,18) NOT NULL,
    "source" VARCHAR(32) NOT NULL,
    "recordedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PriceSnapshot_pkey" PRIMARY KEY ("id", "recordedAt"),
    CONSTRAINT "PriceSnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id")
        ON DELETE CASCADE ON UPDATE CASCADE
) PARTITION BY RANGE ("recordedAt");
CREATE TABLE IF NOT EXISTS "PriceSnapshot_default" PARTITION OF "PriceSnapshot" DEFAULT;
CREATE INDEX IF NOT EXISTS "PriceSnapshot_default_tokenId_recordedAt_idx"
    ON "PriceSnapshot_default"("tokenId", "recordedAt");
CREATE INDEX IF NOT EXISTS "PriceSnapshot_default_recordedAt_idx"
    ON "PriceSnapshot_default"("recordedAt");

CREATE TABLE IF NOT EXISTS "PortfolioSnapshot" (
    "id" TEXT NOT NULL DEFAULT gen_random_uuid()::text,
    "walletId" TEXT,
    "totalUsdValue" DECIMAL(36,18) NOT NULL,
    "totalUsdValueChange24h" DECIMAL(36,18),
    "totalUsdValueChange7d" DECIMAL(36,18),
    "totalUsdValueChange30d" DECIMAL(36,18),
    "tokensTracked" INTEGER NOT NULL,
    "averageApr" DECIMAL(36,18),
    "metadata" JSONB,
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PortfolioSnapshot_id_capturedAt_walletId_key"
        UNIQUE NULLS NOT DISTINCT ("id", "capturedAt", "walletId"),
    CONSTRAINT "PortfolioSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id")
        ON DELETE CASCADE ON UPDATE CASCADE
) PARTITION BY RANGE ("capturedAt");
CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_default" PARTITION OF "PortfolioSnapshot" DEFAULT;
CREATE INDEX IF NOT EXISTS "PortfolioSnapshot_default_walletId_capturedAt_idx"
    ON "PortfolioSnapshot_default"("walletId", "capturedAt");
CREATE INDEX IF NOT EXISTS "PortfolioSnapshot_default_capturedAt_idx"
    ON "PortfolioSnapshot_default"("capturedAt");

-- No database FK to PortfolioSnapshot: see README. The write path inserts a tick's
-- positions with their portfolio rows, and an asset check proves every position has
-- its portfolio row.
CREATE TABLE IF NOT EXISTS "PositionSnapshot" (
    "id" TEXT NOT NULL DEFAULT gen_random_uuid()::text,
    "portfolioSnapshotId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "quantity" DECIMAL(36,18) NOT NULL,
    "usdValue" DECIMAL(36,18) NOT NULL,
    "priceUsd" DECIMAL(36,18) NOT NULL,
    "costBasisUsd" DECIMAL(36,18),
    "unrealizedPnlUsd" DECIMAL(36,18),
    "unrealizedPnlPercent" DECIMAL(36,18),
    "positionType" VARCHAR(32) NOT NULL,
    "protocolId" TEXT,
    "metadata" JSONB,
    "capturedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "PositionSnapshot_pkey" PRIMARY KEY ("id", "capturedAt"),
    CONSTRAINT "PositionSnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id")
        ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT "PositionSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id")
        ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT "PositionSnapshot_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id")
        ON DELETE SET NULL ON UPDATE CASCADE
) PARTITION BY RANGE ("capturedAt");
CREATE TABLE IF NOT EXISTS "PositionSnapshot_default" PARTITION OF "PositionSnapshot" DEFAULT;
CREATE INDEX IF NOT EXISTS "PositionSnapshot_default_portfolioSnapshotId_idx"
    ON "PositionSnapshot_default"("portfolioSnapshotId");
CREATE INDEX IF NOT EXISTS "PositionSnapshot_default_capturedAt_idx"
    ON "PositionSnapshot_default"("capturedAt");
