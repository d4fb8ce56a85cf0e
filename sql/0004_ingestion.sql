-- Ingestion (issue 4): price rows that failed validation, kept with their raw values.
--
-- One row per distinct rejected input row of a load: the raw values as received (text,
-- NULL when absent), the first check it failed, where it came from ("origin": 'synthetic',
-- 'http:<url>', 'file:<path>') and the window the load covered. "rowHash" (md5 of all of
-- these) makes a re-run of the same load idempotent: it bumps "seenCount" and
-- "lastSeenAt" instead of adding a copy. Not partitioned: rejects are few by design
-- (price_snapshots' asset check warns past 1% of a load).

CREATE TABLE IF NOT EXISTS "PriceSnapshot_rejects" (
    "id" BIGINT GENERATED ALWAYS AS IDENTITY,
    "tokenId" TEXT,
    "priceUsd" TEXT,
    "source" TEXT,
    "recordedAt" TEXT,
    "reason" TEXT NOT NULL,
    "origin" TEXT NOT NULL,
    "loadWindow" TEXT NOT NULL,
    "runId" TEXT,
    "rowHash" TEXT NOT NULL,
    "seenCount" INTEGER NOT NULL DEFAULT 1,
    "firstSeenAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lastSeenAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PriceSnapshot_rejects_pkey" PRIMARY KEY ("id")
);
CREATE UNIQUE INDEX IF NOT EXISTS "PriceSnapshot_rejects_rowHash_key" ON "PriceSnapshot_rejects"("rowHash");
CREATE INDEX IF NOT EXISTS "PriceSnapshot_rejects_lastSeenAt_idx" ON "PriceSnapshot_rejects"("lastSeenAt");
