-- Cold tier, issue 14: what each archived object is, beyond its bytes.
--
-- format_version: the Parquet layout the object was written in (docs/tiering.md, "Type
-- policy"). 1 = before issue 14 (ids that look like UUIDs as Parquet UUID, timestamps as
-- UTC-adjusted milliseconds); 2 = ids as text, timestamps as microseconds without time-zone
-- adjustment (Iceberg's `timestamp`). Existing rows are format 1; an upgrade step rewrites
-- them (tiering/upgrade.py) and sets 2. The default stays 1, so a writer that does not know
-- the column (an older release during a rolling deploy) labels its objects correctly.
--
-- iceberg_snapshot_id: the snapshot of the table's Apache Iceberg table (schema
-- iceberg_catalog, migration 0011) that added the object; NULL while it is not in the
-- table (format 1, an empty object, or a restored month, whose objects leave the table).
-- It is set in the transaction that swaps the Iceberg table's metadata_location.

ALTER TABLE "PriceSnapshot_archive_objects"
    ADD COLUMN IF NOT EXISTS format_version SMALLINT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS iceberg_snapshot_id BIGINT;
ALTER TABLE "PortfolioSnapshot_archive_objects"
    ADD COLUMN IF NOT EXISTS format_version SMALLINT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS iceberg_snapshot_id BIGINT;
ALTER TABLE "PositionSnapshot_archive_objects"
    ADD COLUMN IF NOT EXISTS format_version SMALLINT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS iceberg_snapshot_id BIGINT;

ALTER TABLE "PriceSnapshot_archive_objects" DROP CONSTRAINT IF EXISTS "PriceSnapshot_archive_objects_format_check";
ALTER TABLE "PriceSnapshot_archive_objects"
    ADD CONSTRAINT "PriceSnapshot_archive_objects_format_check" CHECK (format_version IN (1, 2));
ALTER TABLE "PortfolioSnapshot_archive_objects" DROP CONSTRAINT IF EXISTS "PortfolioSnapshot_archive_objects_format_check";
ALTER TABLE "PortfolioSnapshot_archive_objects"
    ADD CONSTRAINT "PortfolioSnapshot_archive_objects_format_check" CHECK (format_version IN (1, 2));
ALTER TABLE "PositionSnapshot_archive_objects" DROP CONSTRAINT IF EXISTS "PositionSnapshot_archive_objects_format_check";
ALTER TABLE "PositionSnapshot_archive_objects"
    ADD CONSTRAINT "PositionSnapshot_archive_objects_format_check" CHECK (format_version IN (1, 2));
