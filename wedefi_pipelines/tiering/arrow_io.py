"""PostgreSQL <-> Arrow, streamed through COPY in CSV, with exact types.

`COPY (SELECT ...) TO STDOUT` is the fastest way out of PostgreSQL (DESIGN.md section 8),
and pyarrow's streaming CSV
reader turns it into typed record batches without holding more than a block in memory.
CSV (not COPY's text format) because its quoting tells an empty string from NULL.
Decimals are parsed straight into decimal128(p,s): a value with more digits than the
scale, NaN or an infinite timestamp fails the conversion instead of being rounded, and
`find_unrepresentable` then names the row.
"""

from __future__ import annotations

import io
import subprocess
from typing import Iterator

import numpy as np

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from psycopg import sql

from wedefi_pipelines.tiering import copy_out
from wedefi_pipelines.tiering.columns import ArchiveColumn, arrow_schema

ROW_HASH = "__row_hash"
_BLOCK_BYTES = 16 * 1024 * 1024


class ExportConversionError(ValueError):
    """A value PostgreSQL sent cannot be converted exactly; see find_unrepresentable."""


class UnrepresentableValue(ValueError):
    """A row holds a value the archive cannot store exactly; the message names the row."""


class _CopyStream(io.RawIOBase):
    """A running COPY ... TO STDOUT (in this process) as a readable byte stream, for small
    reads; the archive's export reads through a helper process instead (copy_out)."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def empty(self) -> bool:
        """True when COPY sent no data at all (pyarrow refuses an empty CSV)."""
        while not self._pending and not self._done:
            chunk = self._copy.read()
            if not chunk:
                self._done = True
            self._pending = bytes(chunk)
        return not self._pending

    def read(self, size: int = -1) -> bytes:
        """Gather COPY's row-sized chunks up to `size` bytes: pyarrow asks for whole blocks."""
        chunks, have = ([self._pending] if self._pending else []), len(self._pending)
        self._pending = b""
        while (size < 0 or have < size) and not self._done:
            chunk = self._copy.read()
            if not chunk:
                self._done = True
                break
            chunks.append(bytes(chunk))
            have += len(chunk)
        data = b"".join(chunks)
        if size < 0 or len(data) <= size:
            return data
        self._pending = data[size:]
        return data[:size]

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def select_sql(relation: str, columns: list[ArchiveColumn], order_by: tuple[str, ...] = (),
               row_hash: sql.Composable | None = None, where: sql.Composable | None = None) -> sql.Composed:
    """SELECT the columns in table order (+ the row hash), optionally filtered and ordered."""
    items = [sql.Identifier(c.name) for c in columns]
    if row_hash is not None:
        items.append(sql.SQL("{} AS {}").format(row_hash, sql.Identifier(ROW_HASH)))
    query = sql.SQL("SELECT {items} FROM {rel}").format(items=sql.SQL(", ").join(items), rel=sql.Identifier(relation))
    if where is not None:
        query += sql.SQL(" WHERE ") + where
    if order_by:
        query += sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(sql.Identifier(c) for c in order_by))
    return query


def _csv_batches(stream, columns: list[ArchiveColumn], with_row_hash: bool) -> Iterator[pa.RecordBatch]:
    names = [c.name for c in columns] + ([ROW_HASH] if with_row_hash else [])
    types = {c.name: c.csv_type for c in columns}
    target = arrow_schema(columns)
    if with_row_hash:
        types[ROW_HASH] = pa.int64()
        target = target.append(pa.field(ROW_HASH, pa.int64(), nullable=False))
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(column_names=names, block_size=_BLOCK_BYTES, use_threads=True),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False,
                null_values=[""], true_values=["t"], false_values=["f"],
            ),
        )
        for batch in reader:
            yield batch.cast(target)
    except pa.ArrowInvalid as exc:
        raise ExportConversionError(str(exc)) from exc


def copy_sql(query: sql.Composable) -> sql.Composed:
    return sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(query)  # values as sql.Literal: COPY binds none


def copy_batches(
    conn: psycopg.Connection, query: sql.Composable, columns: list[ArchiveColumn], with_row_hash: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Stream the query's rows, read in this process, as record batches of the columns'
    exact Arrow types (plus an int64 ROW_HASH column when `with_row_hash`)."""
    conn.execute("SET DateStyle = 'ISO, YMD'")
    with conn.cursor().copy(copy_sql(query)) as copy:
        stream = _CopyStream(copy)
        if stream.empty():
            return
        yield from _csv_batches(stream, columns, with_row_hash)


def copy_batches_apart(
    url: str, conn: psycopg.Connection, query: sql.Composable, columns: list[ArchiveColumn],
    prelude: list[sql.Composable], with_row_hash: bool = False,
) -> Iterator[pa.RecordBatch]:
    """The same, with the COPY read by a helper process on `url` (copy_out): for the
    archive's big exports. `conn` (same server) only renders the SQL. A database error in
    the helper raises copy_out.CopyOutError with its SQLSTATE."""
    statements = [sql.SQL("SET DateStyle = 'ISO, YMD'").as_string(conn)] + [s.as_string(conn) for s in prelude]
    proc = copy_out.start(url, statements, copy_sql(query).as_string(conn))
    try:
        if proc.stdout.peek(1):
            yield from _csv_batches(proc.stdout, columns, with_row_hash)
    except BaseException:
        try:
            failed = proc.wait(timeout=0.5) != 0  # a truncated stream: did the helper fail first?
        except subprocess.TimeoutExpired:
            failed = False
        if failed:
            copy_out.finish(proc)  # raises its error, which says why
        copy_out.finish(proc, abandon=True)
        raise
    copy_out.finish(proc)


def read_table(conn: psycopg.Connection, query: sql.Composable, columns: list[ArchiveColumn]) -> pa.Table:
    batches = list(copy_batches(conn, query, columns))
    return pa.Table.from_batches(batches, schema=arrow_schema(columns))


def find_unrepresentable(conn: psycopg.Connection, relation: str, columns: list[ArchiveColumn],
                         key_columns: tuple[str, ...]) -> str | None:
    """The first row holding a value with no exact Arrow form, described by its key; None if none."""
    for column in columns:
        col = sql.Identifier(column.name)
        if column.kind == "numeric":
            bad = sql.SQL("{} = 'NaN'::numeric").format(col)
        elif column.kind == "timestamp":
            bad = sql.SQL("NOT isfinite({c}) OR {c} < '0001-01-01' OR {c} >= '10000-01-01'").format(c=col)
        else:
            continue
        keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key_columns)
        row = conn.execute(sql.SQL("SELECT {keys}, {col}::text FROM {rel} WHERE {bad} LIMIT 1").format(
            keys=keys, col=col, rel=sql.Identifier(relation), bad=bad)).fetchone()
        if row is not None:
            described = ", ".join(f"{k}={v}" for k, v in zip(key_columns, row))
            return (f'"{relation}" row {described}: "{column.name}" = {row[-1]} cannot be stored exactly as '
                    f"{column.arrow_type} in Parquet; correct or delete that row, then re-run")
    return None


# -- objects of the first archive format (before issue 14) ------------------------------------------
# They stored the row key "id" as Parquet UUID when every value of the file was a canonical
# UUID (Spark refuses that type, polars reads 16 raw bytes) and timestamps as UTC-adjusted
# milliseconds (engines then shift rows by their session's time zone). They are still read
# (restore, the upgrade that rewrites them, the cross-tier read until then) by converting
# them to the current types here.

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_AT = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def is_uuid(dtype: pa.DataType) -> bool:
    return isinstance(dtype, pa.BaseExtensionType) and dtype.extension_name == "arrow.uuid"


def uuids_to_text(values: pa.Array) -> pa.Array:
    """arrow.uuid values as their canonical lowercase text (nulls stay null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    storage = values.storage if isinstance(values, pa.ExtensionArray) else values
    n = len(storage)
    raw = np.frombuffer(storage.buffers()[1], dtype=np.uint8)[16 * storage.offset:16 * (storage.offset + n)].reshape(n, 16)
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    text[:, _HEX_AT[0::2]] = _HEX[raw >> 4]
    text[:, _HEX_AT[1::2]] = _HEX[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * 36
    printed = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text.tobytes()))
    if storage.null_count:
        printed = pc.if_else(pc.is_valid(storage), printed, pa.scalar(None, pa.string()))
    return printed


def text_columns(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """The batch with every arrow.uuid column printed back to text."""
    arrays = [uuids_to_text(col) if is_uuid(field.type) else col for field, col in zip(batch.schema, batch.columns)]
    return pa.Table.from_arrays(arrays, names=batch.schema.names)


def current_types(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch of any archive format as the current one (`schema`): UUIDs printed back to
    text, UTC-adjusted timestamps made naive (the same UTC wall time) in microseconds."""
    batch = text_columns(batch)
    arrays = []
    for target in schema:
        column = batch.column(target.name)
        if pa.types.is_timestamp(column.type) and column.type.tz is not None:
            column = column.cast(pa.timestamp(column.type.unit))
        arrays.append(column.cast(target.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def copy_in_csv(batch: pa.RecordBatch | pa.Table) -> bytes:
    """A batch as CSV that COPY ... FROM STDIN (FORMAT csv) reads back to the same values:
    every non-null value quoted, so an empty string stays distinct from NULL."""
    batch = text_columns(batch)
    naive = []
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_timestamp(field.type) and field.type.tz is not None:
            column = column.cast(pa.timestamp(field.type.unit))
        naive.append(column)
    table = pa.Table.from_arrays(naive, names=batch.schema.names)
    sink = io.BytesIO()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style="all_valid"))
    return sink.getvalue()
