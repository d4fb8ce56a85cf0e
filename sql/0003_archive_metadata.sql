-- Cold-tier bookkeeping (wedefi_pipelines.tiering). One pair of tables per archived table.
--
-- "<Table>_archive_metadata": one row per archived month. The seed's columns (month_year
-- PK like '2025-01', record_count = every archived row of the month, file_path = the
-- month's S3 prefix s3://bucket/prefix/<Table>/year=YYYY/month=MM/, compressed_size =
-- bytes of its objects, archived_at) plus ours: sha256 of the month's object manifest
-- ("<key> <sha256>" lines in key order), min/max time, content_hash (sum of the rows'
-- 64-bit hashes, see tiering/content_hash.py; with record_count it proves the rows), and
-- status: 'archived' (the rows live only in S3), 'restored' (the restore job reloaded them
-- into an attached child; the objects stay in S3 until the month is archived again).
--
-- "<Table>_archive_objects": one row per verified Parquet object. Late rows archived after
-- the month add an object (the next part number); the month's row is the sum of its objects.
-- Only recorded objects are ever read; an object under the prefix with no row here is a
-- leftover of an interrupted run and is deleted by the next run of that month.

CREATE TABLE IF NOT EXISTS "PriceSnapshot_archive_metadata" (
    month_year VARCHAR(7) PRIMARY KEY,
    record_count BIGINT NOT NULL,
    file_path TEXT NOT NULL,
    compressed_size BIGINT NOT NULL,
    archived_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    sha256 TEXT NOT NULL,
    min_time TIMESTAMP(3),
    max_time TIMESTAMP(3),
    content_hash NUMERIC(40,0) NOT NULL,
    status VARCHAR(16) NOT NULL DEFAULT 'archived',
    restored_at TIMESTAMP(3),
    CONSTRAINT "PriceSnapshot_archive_metadata_month_year_check" CHECK (month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    CONSTRAINT "PriceSnapshot_archive_metadata_status_check" CHECK (status IN ('archived', 'restored')),
    CONSTRAINT "PriceSnapshot_archive_metadata_count_check" CHECK (record_count >= 0 AND compressed_size >= 0)
);
CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_archive_metadata"
    (LIKE "PriceSnapshot_archive_metadata" INCLUDING ALL);
CREATE TABLE IF NOT EXISTS "PositionSnapshot_archive_metadata"
    (LIKE "PriceSnapshot_archive_metadata" INCLUDING ALL);

CREATE TABLE IF NOT EXISTS "PriceSnapshot_archive_objects" (
    object_key TEXT PRIMARY KEY,
    month_year VARCHAR(7) NOT NULL,
    part INTEGER NOT NULL,
    record_count BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    crc64nvme TEXT NOT NULL,
    content_hash NUMERIC(40,0) NOT NULL,
    min_time TIMESTAMP(3),
    max_time TIMESTAMP(3),
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "PriceSnapshot_archive_objects_month_year_part_key" UNIQUE (month_year, part)
);
CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_archive_objects"
    (LIKE "PriceSnapshot_archive_objects" INCLUDING ALL);
CREATE TABLE IF NOT EXISTS "PositionSnapshot_archive_objects"
    (LIKE "PriceSnapshot_archive_objects" INCLUDING ALL);
