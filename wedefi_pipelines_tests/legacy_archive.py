"""An archive as the release before issue 14 left it (format 1), for the upgrade tests (no tests here).

It writes what that release's export wrote: the month's rows in the export order, "id" as
Parquet UUID when every id of the file is a canonical lowercase UUID (else text),
timestamps as UTC-adjusted milliseconds, zstd; uploads it with the same checksums; records
it in "<Table>_archive_objects" (format_version keeps its default, 1) and
"<Table>_archive_metadata" with PostgreSQL's count and content hash; and drops the month's
child, as that release's record step did.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import date
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore, file_digest
from wedefi_pipelines.tiering.arrow_io import read_table, select_sql
from wedefi_pipelines.tiering.columns import archive_columns
from wedefi_pipelines.tiering.restore import pg_content_hash

_CANONICAL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def legacy_file(rows: pa.Table, path: Path) -> None:
    arrays, fields = [], []
    for field, column in zip(rows.schema, rows.columns):
        if field.name == "id" and all(_CANONICAL.match(v) for v in column.to_pylist()) and len(column):
            storage = pa.array([uuid.UUID(v).bytes for v in column.to_pylist()], pa.binary(16))
            column, field = pa.ExtensionArray.from_storage(pa.uuid(), storage), pa.field("id", pa.uuid(), False)
        elif pa.types.is_timestamp(field.type):
            column = column.cast(pa.timestamp("ms")).cast(pa.timestamp("ms", tz="UTC"))
            field = pa.field(field.name, pa.timestamp("ms", tz="UTC"), field.nullable)
        arrays.append(column)
        fields.append(field)
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path, compression="zstd",
                   row_group_size=131_072)


def archive_in_format_1(db, store: ArchiveStore, table: str, month: date, workdir: Path) -> str:
    """Archive one table's month as format 1 (the caller archives a group's members together)."""
    rt = p.range_table(table)
    child = p.child_name(rt, month)
    key = store.object_key(table, month, 0)
    local = Path(workdir) / f"legacy-{table}.parquet"
    with psycopg.connect(db.url) as conn:
        columns = archive_columns(conn, table)
        rows = read_table(conn, select_sql(child, columns, rt.export_order), columns)
        content = pg_content_hash(conn, child, table)
    legacy_file(rows, local)
    digest = file_digest(local)
    store.upload(local, key, digest, {"wedefi-table": table, "wedefi-month": p.month_year(month)})
    times = rows.column(rt.time_column)
    low, high = (pc.min(times).as_py(), pc.max(times).as_py()) if rows.num_rows else (None, None)
    with psycopg.connect(db.url) as conn:
        month_ops.detach_child(conn, rt, month)
        conn.execute(sql.SQL(
            """INSERT INTO {} (object_key, month_year, part, record_count, size_bytes, sha256, crc64nvme, content_hash,
                               min_time, max_time) VALUES (%s, %s, 0, %s, %s, %s, %s, %s, %s, %s)""").format(
            sql.Identifier(p.archive_objects_name(rt))),
            (key, p.month_year(month), content.count, digest.size, digest.sha256, digest.crc64nvme, content.total,
             low, high))
        conn.execute(sql.SQL(
            """INSERT INTO {} (month_year, record_count, file_path, compressed_size, sha256, min_time, max_time,
                               content_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""").format(
            sql.Identifier(p.archive_metadata_name(rt))),
            (p.month_year(month), content.count, store.uri(store.month_prefix(table, month)), digest.size,
             hashlib.sha256(f"{key} {digest.sha256}".encode()).hexdigest(), low, high, content.total))
        month_ops.drop_relation(conn, child)
    return key
