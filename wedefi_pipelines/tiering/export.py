"""Export one frozen table of a month to a zstd Parquet file, hashing every row on the way.

The rows are streamed with COPY (ORDER BY the table's export order inside the query, so
memory stays bounded; read by a helper process, copy_out) into Arrow record batches with
exact types, while PostgreSQL computes every row's 64-bit hash in the same query
(content_hash). The file holds fixed-size row groups, its sort order declared in the
footer, and the content hash in its key-value metadata.
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
from wedefi_pipelines.resources.archive import FileDigest
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import (ROW_HASH, UUID_COLUMNS, ExportConversionError, UnrepresentableValue,
                                               copy_batches_apart, find_unrepresentable, select_sql, uuid_type,
                                               uuids_from_text)
from wedefi_pipelines.tiering.columns import ArchiveColumn, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql
from wedefi_pipelines.tiering.copy_out import CopyOutError

HASH_FORMAT = "wedefi-rowhash-1"


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
    uuid_columns: tuple[str, ...] = ()


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
                   settings: Settings, uuid_columns: tuple[str, ...] = ()) -> pq.ParquetWriter:
    """zstd Parquet, its sort order declared in the footer. Encodings chosen for these tables:
    dictionaries for repeated values (token, wallet, source...), delta encoding for the
    timestamps (sorted by key then time, consecutive values differ by one tick), plain for
    the unique id and the decimals (a dictionary would only be tried and dropped)."""
    schema = file_schema(columns, uuid_columns).with_metadata({
        "wedefi.table": table.name, "wedefi.month": p.month_year(month), "wedefi.uuid_columns": ",".join(uuid_columns)})
    order = table.export_order
    names = [c.name for c in columns]
    return pq.ParquetWriter(
        path, schema, compression="zstd", compression_level=settings.archive.zstd_level,
        write_statistics=True, write_page_index=True,
        use_dictionary=[c.name for c in columns if c.kind not in ("numeric", "timestamp") and c.name not in UUID_COLUMNS],
        column_encoding={c.name: "DELTA_BINARY_PACKED" for c in columns if c.kind == "timestamp"},
        sorting_columns=[pq.SortingColumn(names.index(c)) for c in order],
    )


def file_schema(columns: list[ArchiveColumn], uuid_columns: tuple[str, ...] = ()) -> pa.Schema:
    """The Parquet file's Arrow schema: the columns' exact types, UUID where chosen."""
    fields = [pa.field(c.name, uuid_type(), nullable=c.nullable) if c.name in uuid_columns else c.field
              for c in columns]
    return pa.schema(fields)


class _NotUuidAfterAll(Exception):
    """A later batch holds an id that is not a canonical UUID: export the file again as text."""


def export_relation(conn: psycopg.Connection, url: str, table: p.RangeTable, month: date, relation: str,
                    columns: list[ArchiveColumn], path: Path, settings: Settings,
                    try_uuid: bool = True) -> tuple[int, ContentHash, tuple, tuple[str, ...]]:
    """Stream `relation` (read by a helper process on `url`; `conn` is a connection to the
    same server) into a zstd Parquet file sorted by EXPORT_ORDER, in row groups of
    `archive.row_group_rows`. Returns (rows, PostgreSQL's content hash, (min, max) time,
    the columns stored as UUID)."""
    query = select_sql(relation, columns, table.export_order, row_hash_sql(hash_kinds(columns)))
    prelude = [sql.SQL("SET work_mem = {}").format(sql.Literal(f"{settings.archive.export_work_mem_mb}MB"))]
    target_rows = settings.archive.row_group_rows
    candidates = [c.name for c in columns if c.name in UUID_COLUMNS and c.kind == "text"] if try_uuid else []
    total = ContentHash()
    span: tuple = (None, None)
    writer = None
    uuid_columns: tuple[str, ...] = ()
    try:
        pending: list[pa.Table] = []
        pending_rows = 0
        for batch in copy_batches_apart(url, conn, query, columns, prelude, with_row_hash=True):
            total = total + ContentHash.of(batch.column(ROW_HASH).to_numpy())
            data = pa.Table.from_batches([batch.drop_columns([ROW_HASH])])
            span = widen(span, time_range(batch, table.time_column))
            if writer is None:
                uuid_columns = tuple(c for c in candidates if uuids_from_text(data.column(c).slice(0, 1000)) is not None)
                writer = parquet_writer(path, table, month, columns, settings, uuid_columns)
            for name in uuid_columns:
                converted = uuids_from_text(data.column(name))
                if converted is None:
                    raise _NotUuidAfterAll(name)
                data = data.set_column(data.schema.get_field_index(name), pa.field(name, uuid_type(), nullable=False),
                                       converted)
            pending.append(data)
            pending_rows += data.num_rows
            while pending_rows >= target_rows:
                merged = pa.concat_tables(pending).combine_chunks()
                writer.write_table(merged.slice(0, target_rows), row_group_size=target_rows)
                rest = merged.slice(target_rows)
                pending, pending_rows = [rest], rest.num_rows
        if writer is None:
            writer = parquet_writer(path, table, month, columns, settings)
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=target_rows)
        writer.add_key_value_metadata({"wedefi.rows": str(total.count), "wedefi.content_hash": str(total.total),
                                       "wedefi.hash_format": HASH_FORMAT})
        writer.close()
    except _NotUuidAfterAll:
        writer.close()
        return export_relation(conn, url, table, month, relation, columns, path, settings, try_uuid=False)
    except (ExportConversionError, CopyOutError) as exc:
        if writer is not None:
            writer.close()
        if isinstance(exc, CopyOutError) and not (exc.sqlstate or "").startswith("22"):
            raise  # not about a value (a lost connection, a recovery conflict...): the caller decides
        with conn.transaction():
            culprit = find_unrepresentable(conn, relation, columns, table.row_key)
        if culprit:
            raise UnrepresentableValue(culprit) from exc
        raise
    return total.count, total, span, uuid_columns
