"""Shared helpers for the Iceberg tests (no tests here): the archive's catalog opened the way
an outside user would (pyiceberg's own SqlCatalog, not the archive's subclass), and what
it holds per month."""

from __future__ import annotations

from datetime import date

import psycopg
from psycopg import sql
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hashes
from wedefi_pipelines.tiering.iceberg import CATALOG_NAME, DelayedOpenFileIO, catalog_uri, month_of_partition

NAMESPACE = "wedefi"


def plain_catalog(db, store: ArchiveStore) -> SqlCatalog:
    """pyiceberg's SqlCatalog on the app's database, as the docs tell a user to open it."""
    return SqlCatalog(CATALOG_NAME, uri=catalog_uri(db.url), init_catalog_tables="false",
                      **{"py-io-impl": f"{DelayedOpenFileIO.__module__}.{DelayedOpenFileIO.__name__}"},
                      **store.iceberg_properties())


def month_files(tbl: Table) -> dict[date, dict[str, int]]:
    """{month: {file path: rows}} of the table's current snapshot."""
    found: dict[date, dict[str, int]] = {}
    for task in tbl.scan().plan_files():
        found.setdefault(month_of_partition(task.file.partition[0]), {})[task.file.file_path] = task.file.record_count
    return found


def iceberg_content(tbl: Table, table: str, month: date, kinds: dict[str, str]) -> ContentHash:
    """Count and content hash of the month's rows read through the Iceberg table."""
    from wedefi_pipelines.tiering.iceberg import months_filter

    rows = tbl.scan(row_filter=months_filter(p.range_table(table), [month])).to_arrow()
    return ContentHash.of(row_hashes(rows, kinds))


def catalog_row(db, table: str) -> tuple[str | None, str | None]:
    with psycopg.connect(db.url) as conn:
        row = conn.execute("SELECT metadata_location, previous_metadata_location FROM iceberg_catalog.iceberg_tables "
                           "WHERE table_name = %s", (table,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


def snapshot_ids(db, table: str) -> list[int | None]:
    with psycopg.connect(db.url) as conn:
        return [r[0] for r in conn.execute(sql.SQL("SELECT iceberg_snapshot_id FROM {} ORDER BY month_year, part").format(
            sql.Identifier(p.archive_objects_name(table))))]
