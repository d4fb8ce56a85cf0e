"""Checks that guard the ingested data."""

from datetime import timedelta

import dagster as dg

from wedefi_pipelines import positions
from wedefi_pipelines.ingest.portfolio import orphan_positions
from wedefi_pipelines.resources.database import DatabaseResource

CHECKED_WINDOW = timedelta(hours=24)


@dg.asset_check(asset="position_snapshots", blocking=False,
                description="Every PositionSnapshot of the newest 24 h of ticks has its PortfolioSnapshot row "
                            "(same id, capturedAt and walletId): the FK the database cannot hold across partitions.")
def positions_have_portfolio_rows(context: dg.AssetCheckExecutionContext,
                                  database: DatabaseResource) -> dg.AssetCheckResult:
    with database.db.connect("primary") as conn:
        newest = conn.execute(
            'SELECT max("capturedAt") FROM "PortfolioSnapshot" WHERE "walletId" IS NULL').fetchone()[0]
        if newest is None:
            return dg.AssetCheckResult(passed=True, description="no portfolio tick captured yet")
        since = newest - CHECKED_WINDOW
        orphans, first, last = orphan_positions(conn, since)
    return dg.AssetCheckResult(
        passed=orphans == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"checked_since": since.isoformat(sep=" "), "orphan_positions": orphans,
                  "first_orphan_tick": first.isoformat(sep=" ") if first else None,
                  "last_orphan_tick": last.isoformat(sep=" ") if last else None},
        description=f"{orphans} positions since {since:%Y-%m-%d %H:%M} without their PortfolioSnapshot row",
    )


@dg.asset_check(asset="position_snapshots", blocking=False,
                description='No "PositionSnapshot" row waits without "capturedAt" for a PortfolioSnapshot row that does '
                            "not exist (those complete_positions cannot place; they are kept in the default "
                            "partition). Rows waiting for their next complete_positions run are reported.")
def positions_completed(database: DatabaseResource) -> dg.AssetCheckResult:
    with database.db.connect("primary") as conn:
        waiting = positions.waiting(conn)
    return dg.AssetCheckResult(
        passed=waiting.orphaned == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"waiting_for_complete_positions": waiting.placeable,
                  "waiting_without_portfolio_row": waiting.orphaned},
        description=(f"{waiting.orphaned} position(s) without capturedAt point at no PortfolioSnapshot row: they stay "
                     'in "PositionSnapshot_default" until that row exists or someone corrects them'
                     if waiting.orphaned else f"{waiting.placeable} position(s) wait for complete_positions"),
    )


checks = [positions_have_portfolio_rows, positions_completed]
