"""PostgreSQL <-> Arrow, streamed through COPY in CSV, with exact types.

`COPY (SELECT ...) TO STDOUT` is the fastest way out of PostgreSQL (DESIGN.md section 8:
6 s for a month, against 24 s through pandas.read_sql), and pyarrow's streaming CSV
reader turns it into typed record batches without holding more than a block in memory.
CSV (not COPY's text format) because its quoting tells an empty string from NULL.
Decimals are parsed straight into decimal128(p,s): a value with more digits than the
scale, NaN or an infinite timestamp fails the conversion instead of being rounded, and
`find_unrepresentable` then names the row.
"""

from __future__ import annotations

import io
from typing import Iterator

import psycopg
import pyarrow as pa
import pyarrow.csv as pcsv
from psycopg import sql

from wedefi_pipelines.tiering.columns import ArchiveColumn, arrow_schema

ROW_HASH = "__row_hash"
_BLOCK_BYTES = 16 * 1024 * 1024


class ExportConversionError(ValueError):
    """A value PostgreSQL sent cannot be converted exactly; see find_unrepresentable."""


class UnrepresentableValue(ValueError):
    """A row holds a value the archive cannot store exactly; the message names the row."""


class _CopyStream(io.RawIOBase):
    """A running COPY ... TO STDOUT as a readable byte stream.

    pyarrow reads a whole block per call: read(n) gathers COPY's small chunks up to n
    bytes (RawIOBase's default would allocate n bytes for every few-kB chunk)."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunks, have = [self._pending] if self._pending else [], len(self._pending)
        while (size < 0 or have < size) and not self._done:
            chunk = self._copy.read()
            if not chunk:
                self._done = True
                break
            chunks.append(bytes(chunk))
            have += len(chunk)
        data = b"".join(chunks)
        if size < 0 or len(data) <= size:
            self._pending = b""
            return data
        self._pending = data[size:]
        return data[:size]

    def empty(self) -> bool:
        """True when COPY sent no data at all (pyarrow refuses an empty CSV)."""
        while not self._pending and not self._done:
            chunk = self._copy.read()
            if not chunk:
                self._done = True
            self._pending = bytes(chunk)
        return not self._pending

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


def copy_batches(
    conn: psycopg.Connection, query: sql.Composable, columns: list[ArchiveColumn], with_row_hash: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Stream the query's rows as record batches of the columns' exact Arrow types
    (plus an int64 ROW_HASH column when `with_row_hash`)."""
    names = [c.name for c in columns] + ([ROW_HASH] if with_row_hash else [])
    types = {c.name: c.csv_type for c in columns}
    if with_row_hash:
        types[ROW_HASH] = pa.int64()
    target = arrow_schema(columns)
    if with_row_hash:
        target = target.append(pa.field(ROW_HASH, pa.int64(), nullable=False))
    copy_sql = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv)").format(query)  # values as sql.Literal: COPY binds none
    conn.execute("SET DateStyle = 'ISO, YMD'")
    with conn.cursor().copy(copy_sql) as copy:
        stream = _CopyStream(copy)
        if stream.empty():
            return
        try:
            reader = pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(column_names=names, block_size=_BLOCK_BYTES, use_threads=False),
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


def copy_in_csv(batch: pa.RecordBatch | pa.Table) -> bytes:
    """A batch as CSV that COPY ... FROM STDIN (FORMAT csv) reads back to the same values:
    every non-null value quoted, so an empty string stays distinct from NULL."""
    naive = []
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_timestamp(field.type) and field.type.tz is not None:
            column = column.cast(pa.timestamp(field.type.unit))
        naive.append(column)
    table = pa.Table.from_arrays(naive, names=batch.schema.names)
    sink = io.BytesIO()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style="all_valid"))
    return sink.getvalue()
