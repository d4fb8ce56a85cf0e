-- WeDefiDaily's own writes succeed unchanged on the partitioned layout (issue 12).
--
-- 1. "PositionSnapshot"."capturedAt" becomes nullable. The app's schema has no such column
--    (apps/api/src/jobs/sync-performance.ts creates positions without it); a PRIMARY KEY
--    forces NOT NULL on its columns, so the key ("id", "capturedAt") becomes a UNIQUE
--    constraint, NULLS NOT DISTINCT so two waiting rows still cannot share an id. A row
--    written without "capturedAt" routes to "PositionSnapshot_default" (a NULL range key
--    matches no month); the `complete_positions` job later copies its PortfolioSnapshot's
--    "capturedAt" into it and moves it into its month. A BEFORE ROW trigger cannot fill the
--    key on the way in: PostgreSQL refuses to move a row to another partition from one
--    ("moving row to another partition during a BEFORE FOR EACH ROW trigger is not
--    supported") once the month's child exists.
--
-- 2. The app's relation PositionSnapshot.portfolioSnapshot says onDelete: Cascade and
--    (Prisma's default) onUpdate: Cascade. There is no database FK ("PortfolioSnapshot" is
--    partitioned, see 0002), so two triggers on "PortfolioSnapshot" do what the FK would:
--    * AFTER DELETE, once per statement (transition table: one set-based delete however
--      many rows the statement removed): delete the positions of every removed id of which
--      no row remains anywhere in "PortfolioSnapshot". A cross-partition move done as
--      INSERT-then-DELETE (the pipeline's row mover, archive and restore) therefore never
--      deletes positions; those also set the transaction-local `wedefi.row_move` to 'on'
--      (set_config('wedefi.row_move', 'on', true)), which turns both triggers off.
--      A statement trigger fires for statements on the parent, which is how the app (and
--      every Prisma call) deletes; a DELETE aimed at one partition directly does not
--      cascade (only this project's own row movers do that). An UPDATE that moves a row
--      across partitions fires no DELETE statement trigger, so it cannot cascade either.
--    * AFTER UPDATE OF id, per row, only when the id changes: re-point the positions.
--    Every other relation of the app's schema touching the partitioned tables is a real FK
--    with the app's actions (0002: TokenBalance, PriceSnapshot, PortfolioSnapshot and
--    PositionSnapshot -> Wallet/Token/Protocol); see README "Pointing WeDefiDaily at a
--    database this project manages".

-- 1. ------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = '"PositionSnapshot"'::regclass
                      AND conname = 'PositionSnapshot_id_capturedAt_key') THEN
        -- built on every attached child (and attached to future children by ATTACH/CREATE ... PARTITION OF)
        ALTER TABLE "PositionSnapshot"
            ADD CONSTRAINT "PositionSnapshot_id_capturedAt_key" UNIQUE NULLS NOT DISTINCT ("id", "capturedAt");
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint
                WHERE conrelid = '"PositionSnapshot"'::regclass AND conname = 'PositionSnapshot_pkey') THEN
        ALTER TABLE "PositionSnapshot" DROP CONSTRAINT "PositionSnapshot_pkey";
    END IF;
END
$$;
-- Recurses to every child; a monthly child's partition bound still rejects NULL.
ALTER TABLE "PositionSnapshot" ALTER COLUMN "capturedAt" DROP NOT NULL;

-- 2. ------------------------------------------------------------------------------------------
-- The functions name the tables unqualified and resolve them with the session's search_path
-- (the app's: public), so `wedefi-pipelines adopt`, which builds the new tables in a staging
-- schema and swaps them in, gets triggers that follow the tables they fire on.
CREATE OR REPLACE FUNCTION wedefi_portfolio_snapshot_delete_positions() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('wedefi.row_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
    DELETE FROM "PositionSnapshot" pos
     USING (SELECT DISTINCT o.id
              FROM removed_portfolio_snapshots o
             WHERE NOT EXISTS (SELECT 1 FROM "PortfolioSnapshot" s WHERE s.id = o.id)) gone
     WHERE pos."portfolioSnapshotId" = gone.id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER "PortfolioSnapshot_delete_positions"
    AFTER DELETE ON "PortfolioSnapshot"
    REFERENCING OLD TABLE AS removed_portfolio_snapshots
    FOR EACH STATEMENT
    EXECUTE FUNCTION wedefi_portfolio_snapshot_delete_positions();

CREATE OR REPLACE FUNCTION wedefi_portfolio_snapshot_update_positions() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    gone TEXT[];
    added TEXT[];
BEGIN
    IF current_setting('wedefi.row_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- ids the statement replaced and of which no row remains (usually none: ids rarely change)
    SELECT array_agg(DISTINCT o.id) INTO gone
      FROM old_portfolio_snapshots o
     WHERE NOT EXISTS (SELECT 1 FROM new_portfolio_snapshots n WHERE n.id = o.id)
       AND NOT EXISTS (SELECT 1 FROM "PortfolioSnapshot" s WHERE s.id = o.id);
    IF gone IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(DISTINCT n.id) INTO added
      FROM new_portfolio_snapshots n
     WHERE NOT EXISTS (SELECT 1 FROM old_portfolio_snapshots o WHERE o.id = n.id);
    IF cardinality(added) = 1 THEN
        UPDATE "PositionSnapshot" SET "portfolioSnapshotId" = added[1] WHERE "portfolioSnapshotId" = ANY (gone);
    ELSIF EXISTS (SELECT 1 FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = ANY (gone)) THEN
        RAISE EXCEPTION 'PortfolioSnapshot: one UPDATE changed % ids into % new ids; their positions cannot follow',
            cardinality(gone), coalesce(cardinality(added), 0)
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Change one PortfolioSnapshot id per statement (PositionSnapshot.portfolioSnapshot is onUpdate: Cascade).';
    END IF;
    RETURN NULL;
END
$$;

-- A column list (AFTER UPDATE OF id) cannot go with transition tables; the function returns
-- after one hash anti-join when no id changed. Statement level, because an UPDATE that moves
-- a row to another partition fires no row-level UPDATE trigger (it is a DELETE plus an INSERT).
CREATE OR REPLACE TRIGGER "PortfolioSnapshot_update_positions"
    AFTER UPDATE ON "PortfolioSnapshot"
    REFERENCING OLD TABLE AS old_portfolio_snapshots NEW TABLE AS new_portfolio_snapshots
    FOR EACH STATEMENT
    EXECUTE FUNCTION wedefi_portfolio_snapshot_update_positions();
