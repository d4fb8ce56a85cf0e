-- Rollups, issue 16: hourly and daily aggregates that outlive the raw months.
--
-- Filled only by the pipeline (wedefi_pipelines/rollups/), read by the app's charts, by
-- asset_correlations at 60 and 1,440 minutes and by `wedefi-pipelines history
-- --resolution 1h|1d`. Buckets are UTC: "bucketStart" is date_trunc('hour'|'day') of the
-- raw row's "recordedAt"/"capturedAt" (timestamp(3) holding UTC, like the sources).
-- Monthly range partitions on "bucketStart", created by the refresh for the months it
-- writes. "PriceRollupHourly" is tiered like "PriceSnapshot" (warm, then cold through the
-- same verified archive: its default partition, which nothing writes to, and its archive
-- tables are the tiering code's); the daily tables stay hot. Prices are numeric(36,18)
-- like "PriceSnapshot"."priceUsd"; "sumUsd" is numeric(38,18) (a day's 288 samples of
-- any price fit, and 38 is the widest decimal Athena and Spark read).
--
-- "PortfolioRollupDaily" keeps the all-wallets row ("walletId" NULL, as in
-- "PortfolioSnapshot"): its key is UNIQUE NULLS NOT DISTINCT ("walletId", "bucketStart")
-- (PostgreSQL 15+). Prisma needs a key of required columns, so the table also has "id",
-- md5("walletId" or '', "bucketStart") as a uuid, written by the refresh.
--
-- wedefi_rollup_watermark: per family ('price', 'portfolio') and UTC day, what the last
-- refresh folded in: the greatest "createdAt" and the number of raw rows. A day whose raw
-- rows now show a greater "createdAt" or more rows (the app's own inserts, drains of the
-- default partition, late rows, restores) is stale; cold_archive refuses a month with a
-- stale day once a family has any watermark.

CREATE TABLE IF NOT EXISTS "PriceRollupHourly" (
    "tokenId" text NOT NULL,
    "bucketStart" timestamp(3) NOT NULL,
    "openUsd" numeric(36, 18) NOT NULL,
    "highUsd" numeric(36, 18) NOT NULL,
    "lowUsd" numeric(36, 18) NOT NULL,
    "closeUsd" numeric(36, 18) NOT NULL,
    "sumUsd" numeric(38, 18) NOT NULL,
    "sampleCount" integer NOT NULL,
    "firstAt" timestamp(3) NOT NULL,
    "lastAt" timestamp(3) NOT NULL,
    "updatedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PriceRollupHourly_pkey" PRIMARY KEY ("tokenId", "bucketStart")
) PARTITION BY RANGE ("bucketStart");

CREATE TABLE IF NOT EXISTS "PriceRollupHourly_default" PARTITION OF "PriceRollupHourly" DEFAULT;
CREATE TABLE IF NOT EXISTS "PriceRollupHourly_archive_metadata" (LIKE "PriceSnapshot_archive_metadata" INCLUDING ALL);
CREATE TABLE IF NOT EXISTS "PriceRollupHourly_archive_objects" (LIKE "PriceSnapshot_archive_objects" INCLUDING ALL);

-- the same columns, one row per token and UTC day
CREATE TABLE IF NOT EXISTS "PriceRollupDaily" (
    LIKE "PriceRollupHourly" INCLUDING DEFAULTS,
    CONSTRAINT "PriceRollupDaily_pkey" PRIMARY KEY ("tokenId", "bucketStart")
) PARTITION BY RANGE ("bucketStart");

CREATE TABLE IF NOT EXISTS "PortfolioRollupDaily" (
    id text NOT NULL,
    "walletId" text,
    "bucketStart" timestamp(3) NOT NULL,
    "openUsd" numeric(36, 18) NOT NULL,
    "closeUsd" numeric(36, 18) NOT NULL,
    "minUsd" numeric(36, 18) NOT NULL,
    "maxUsd" numeric(36, 18) NOT NULL,
    "sampleCount" integer NOT NULL,
    "firstAt" timestamp(3) NOT NULL,
    "lastAt" timestamp(3) NOT NULL,
    "updatedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PortfolioRollupDaily_pkey" PRIMARY KEY (id, "bucketStart"),
    CONSTRAINT "PortfolioRollupDaily_walletId_bucketStart_key" UNIQUE NULLS NOT DISTINCT ("walletId", "bucketStart")
) PARTITION BY RANGE ("bucketStart");

CREATE TABLE IF NOT EXISTS wedefi_rollup_watermark (
    family text NOT NULL CHECK (family IN ('price', 'portfolio')),
    day date NOT NULL,
    max_created_at timestamp(3) NOT NULL,
    raw_rows bigint NOT NULL CHECK (raw_rows >= 0),
    source text NOT NULL CHECK (source IN ('postgres', 'archive')),
    refreshed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (family, day)
);
