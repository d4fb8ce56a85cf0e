"""Export one frozen table of a month to a zstd Parquet file, hashing every row on the way.

The rows are streamed with COPY (ORDER BY the table's export order inside the query, so
memory stays bounded; read by a helper process, copy_out) into Arrow record batches with
the archive's types (columns.py: the type policy every engine reads alike), while
PostgreSQL computes every row's 64-bit hash in the same query (content_hash). The file
holds fixed-size row groups, its sort order declared in the footer, column statistics
(Iceberg's add_files needs them to place the file in its month), and the content hash and
format version in its key-value metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import ARCHIVE_FORMAT
from wedefi_pipelines.resources.archive import FileDigest
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import (ROW_HASH, ExportConversionError, UnrepresentableValue,
                                               copy_batches_apart, find_unrepresentable, select_sql)
from wedefi_pipelines.tiering.columns import ArchiveColumn, arrow_schema, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql
from wedefi_pipelines.tiering.copy_out import CopyOutError

HASH_FORMAT = "wedefi-rowhash-1"
UNIQUE_COLUMNS = ("id",)  # one value per row: a dictionary would only be tried and dropped


class ArchiveError(RuntimeError):
    """The archive of a month cannot go on; its rows are still in PostgreSQL."""


@dataclass
class Part:
    """One object of the run: a frozen table (or an empty month) exported to one file."""

    table: p.RangeTable
    month: date
    part: int
    key: str
    relation: str | None  # None: the table had nothing for the month (recorded with 0 rows)
    path: Path | None = None
    rows: int = 0
    pg_hash: ContentHash = field(default_factory=ContentHash)
    min_time: datetime | None = None
    max_time: datetime | None = None
    digest: FileDigest | None = None


def time_range(batch: pa.RecordBatch, column: str) -> tuple[datetime | None, datetime | None]:
    if batch.num_rows == 0:
        return None, None
    bounds = pc.min_max(batch.column(column).cast(pa.timestamp(batch.schema.field(column).type.unit)))
    return bounds["min"].as_py(), bounds["max"].as_py()


def widen(current: tuple, new: tuple) -> tuple:
    lows = [x for x in (current[0], new[0]) if x is not None]
    highs = [x for x in (current[1], new[1]) if x is not None]
    return (min(lows) if lows else None), (max(highs) if highs else None)


def parquet_writer(path: Path, table: p.RangeTable, month: date, columns: list[ArchiveColumn],
                   settings: Settings) -> pq.ParquetWriter:
    """zstd Parquet, its sort order declared in the footer. Encodings chosen for these tables
    (measured, docs/tiering.md): dictionaries for repeated values (token, wallet, source...),
    delta encoding for the timestamps (sorted by key then time, consecutive values differ by
    one tick), DELTA_LENGTH_BYTE_ARRAY for the unique text id (its bytes compress apart
    from their lengths: 18.5 B/row against 19.8 plain), plain for the decimals, compressed
    harder (`archive.decimal_zstd_level`: random low digits, 7.6 B/row at level 9 against 8.0
    at 1). Every encoding here is Parquet 2.x that Spark 3.3+, Trino, DuckDB, polars and
    pyarrow read; BYTE_STREAM_SPLIT is not (yet) everywhere, so it is not used."""
    schema = file_schema(columns).with_metadata({
        "wedefi.table": table.name, "wedefi.month": p.month_year(month), "wedefi.format_version": str(ARCHIVE_FORMAT)})
    cfg = settings.archive
    names = [c.name for c in columns]
    encodings = {c.name: "DELTA_BINARY_PACKED" for c in columns if c.kind == "timestamp"}
    encodings.update({c.name: "DELTA_LENGTH_BYTE_ARRAY" for c in columns if c.name in UNIQUE_COLUMNS and c.kind == "text"})
    return pq.ParquetWriter(
        path, schema, compression="zstd",
        compression_level={c.name: cfg.decimal_zstd_level if c.kind == "numeric" else cfg.zstd_level for c in columns},
        write_statistics=True, write_page_index=True,
        use_dictionary=[c.name for c in columns if c.kind not in ("numeric", "timestamp") and c.name not in UNIQUE_COLUMNS],
        column_encoding=encodings,
        sorting_columns=[pq.SortingColumn(names.index(c)) for c in table.export_order],
    )


def file_schema(columns: list[ArchiveColumn]) -> pa.Schema:
    """The Parquet file's Arrow schema: the columns' archive types, in table order."""
    return arrow_schema(columns)


def export_relation(conn: psycopg.Connection, url: str, table: p.RangeTable, month: date, relation: str,
                    columns: list[ArchiveColumn], path: Path, settings: Settings) -> tuple[int, ContentHash, tuple]:
    """Stream `relation` (read by a helper process on `url`; `conn` is a connection to the
    same server) into a zstd Parquet file sorted by EXPORT_ORDER, in row groups of
    `archive.row_group_rows`. Returns (rows, PostgreSQL's content hash, (min, max) time)."""
    query = select_sql(relation, columns, table.export_order, row_hash_sql(hash_kinds(columns)))
    prelude = [sql.SQL("SET work_mem = {}").format(sql.Literal(f"{settings.archive.export_work_mem_mb}MB"))]
    target_rows = settings.archive.row_group_rows
    total = ContentHash()
    span: tuple = (None, None)
    writer = parquet_writer(path, table, month, columns, settings)
    try:
        pending: list[pa.Table] = []
        pending_rows = 0
        for batch in copy_batches_apart(url, conn, query, columns, prelude, with_row_hash=True):
            total = total + ContentHash.of(batch.column(ROW_HASH).to_numpy())
            data = pa.Table.from_batches([batch.drop_columns([ROW_HASH])])
            span = widen(span, time_range(batch, table.time_column))
            pending.append(data)
            pending_rows += data.num_rows
            while pending_rows >= target_rows:
                merged = pa.concat_tables(pending).combine_chunks()
                writer.write_table(merged.slice(0, target_rows), row_group_size=target_rows)
                rest = merged.slice(target_rows)
                pending, pending_rows = [rest], rest.num_rows
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=target_rows)
        writer.add_key_value_metadata({"wedefi.rows": str(total.count), "wedefi.content_hash": str(total.total),
                                       "wedefi.hash_format": HASH_FORMAT})
        writer.close()
    except (ExportConversionError, CopyOutError) as exc:
        writer.close()
        if isinstance(exc, CopyOutError) and not (exc.sqlstate or "").startswith("22"):
            raise  # not about a value (a lost connection, a recovery conflict...): the caller decides
        with conn.transaction():
            culprit = find_unrepresentable(conn, relation, columns, table.row_key)
        if culprit:
            raise UnrepresentableValue(culprit) from exc
        raise
    return total.count, total, span
