"""Exact Parquet types for PostgreSQL columns, read from the catalog: the archive's type policy.

The archive never rounds, and every engine (Spark, Trino/Athena, DuckDB, polars, pyarrow,
and Iceberg readers) must read the same values (docs/tiering.md has the table):
numeric(p,s) becomes decimal128(p,s) (p <= 38: Athena's and Spark's limit); `timestamp(3)`
a timestamp in microseconds *without* time-zone adjustment (Parquet isAdjustedToUTC=false,
Iceberg's `timestamp`): PostgreSQL's naive wall time, which already holds UTC, so no
engine shifts it by its session's time zone and every row stays in the month PostgreSQL
had it in; text and ids stay text; jsonb keeps PostgreSQL's own text; int2 widens to
int32 (Iceberg has no 16-bit integer). A column type with no exact Arrow equivalent
(unconstrained numeric, float, ...) is refused by name before anything is exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql


class UnsupportedColumn(ValueError):
    """A column whose values cannot be archived exactly; the message names it."""


@dataclass(frozen=True)
class ArchiveColumn:
    name: str
    pg_type: str  # as format_type() prints it
    kind: str  # how the content hash reads it (content_hash.row_hash_sql)
    arrow_type: pa.DataType
    nullable: bool

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.arrow_type, nullable=self.nullable)

    @property
    def csv_type(self) -> pa.DataType:
        """What the CSV reader parses the column into."""
        return self.arrow_type


_SIMPLE = {
    "text": ("text", pa.string()),
    "varchar": ("text", pa.string()),
    "jsonb": ("jsonb", pa.string()),
    "json": ("jsonb", pa.string()),
    "int2": ("int2", pa.int32()),  # widened: Iceberg and Athena have no 16-bit integer
    "int4": ("int4", pa.int32()),
    "int8": ("int8", pa.int64()),
    "bool": ("bool", pa.bool_()),
}


def column_spec(table: str, name: str, typname: str, typmod: int, pg_type: str, not_null: bool) -> ArchiveColumn:
    """The exact Arrow type and hash kind of one column, or UnsupportedColumn naming it."""
    where = f'"{table}"."{name}" ({pg_type})'
    if typname in _SIMPLE:
        kind, arrow_type = _SIMPLE[typname]
    elif typname == "numeric":
        if typmod < 0:
            raise UnsupportedColumn(f"{where}: numeric without precision and scale has no exact Parquet decimal type")
        precision = ((typmod - 4) >> 16) & 0xFFFF
        scale = (typmod - 4) & 0x7FF
        if scale > 0x3FF:
            scale -= 0x800  # PostgreSQL 15 allows negative scales, stored in 11 bits
        if not 0 <= scale <= precision or precision > 38:
            raise UnsupportedColumn(f"{where}: only numeric(p,s) with 0 <= s <= p <= 38 maps exactly to decimal128")
        kind, arrow_type = "numeric", pa.decimal128(precision, scale)
    elif typname == "timestamp":
        kind, arrow_type = "timestamp", pa.timestamp("us")  # wall time as PostgreSQL holds it (UTC by convention)
    else:
        raise UnsupportedColumn(f"{where}: no exact Parquet mapping for type {typname}")
    return ArchiveColumn(name, pg_type, kind, arrow_type, nullable=not not_null)


_COLUMNS = """
SELECT a.attname, t.typname, a.atttypmod, format_type(a.atttypid, a.atttypmod), a.attnotnull
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


def archive_columns(conn: psycopg.Connection, table: str) -> list[ArchiveColumn]:
    """The parent table's columns in table order, each with its exact Arrow type."""
    query = sql.SQL(_COLUMNS).format(rel=sql.Literal(sql.Identifier(table).as_string(conn)))
    rows = conn.execute(query).fetchall()
    if not rows:
        raise UnsupportedColumn(f'"{table}" has no columns (does it exist?)')
    return [column_spec(table, *row) for row in rows]


def arrow_schema(columns: list[ArchiveColumn], metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema([c.field for c in columns], metadata=metadata)


def hash_kinds(columns: list[ArchiveColumn]) -> dict[str, str]:
    return {c.name: c.kind for c in columns}
