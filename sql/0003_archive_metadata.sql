-- Cold-tier bookkeeping. "<Table>_archive_metadata" keeps the seed's columns
-- (month_year PK, record_count, file_path, compressed_size, archived_at) plus ours:
-- sha256 (of the month's object checksums, in key order), min/max time, content hash,
-- status. "<Table>_archive_objects" has one row per verified Parquet object; a month
-- that received late rows after archiving gets an additional object.
-- status: 'archived' (rows only in S3), 'restored' (reloaded into a child by the
-- restore job; the objects stay in S3).

CREATE TABLE IF NOT EXISTS "PriceSnapshot_archive_metadata" (
    month_year VARCHAR(7) PRIMARY KEY,
    record_count BIGINT NOT NULL,
    file_path TEXT NOT NULL,
    compressed_size BIGINT NOT NULL,
    archived_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    sha256 TEXT,
    min_time TIMESTAMP(3),
    max_time TIMESTAMP(3),
    content_hash NUMERIC(40,0),
    status VARCHAR(16) NOT NULL DEFAULT 'archived',
    CONSTRAINT "PriceSnapshot_archive_metadata_month_year_check" CHECK (month_year ~ '^[0-9]{4}-[0-9]{2}$')
);
CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_archive_metadata"
    (LIKE "PriceSnapshot_archive_metadata" INCLUDING ALL);
CREATE TABLE IF NOT EXISTS "PositionSnapshot_archive_metadata"
    (LIKE "PriceSnapshot_archive_metadata" INCLUDING ALL);

CREATE TABLE IF NOT EXISTS "PriceSnapshot_archive_objects" (
    object_key TEXT PRIMARY KEY,
    month_year VARCHAR(7) NOT NULL,
    record_count BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    crc64nvme TEXT NOT NULL,
    content_hash NUMERIC(40,0) NOT NULL,
    min_time TIMESTAMP(3),
    max_time TIMESTAMP(3),
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS "PriceSnapshot_archive_objects_month_year_idx"
    ON "PriceSnapshot_archive_objects"(month_year);
CREATE TABLE IF NOT EXISTS "PortfolioSnapshot_archive_objects"
    (LIKE "PriceSnapshot_archive_objects" INCLUDING ALL);
CREATE TABLE IF NOT EXISTS "PositionSnapshot_archive_objects"
    (LIKE "PriceSnapshot_archive_objects" INCLUDING ALL);
