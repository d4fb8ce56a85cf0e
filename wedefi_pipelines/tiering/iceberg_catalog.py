"""The Iceberg side of the cold tier's catalog: column types, the month partition spec, the
SQL catalog in the app's PostgreSQL and its compare-and-set commit (see iceberg.py)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import date, datetime
from typing import Iterable, Iterator, Sequence

import psycopg
import pyarrow.fs as pafs
from psycopg import sql
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
from pyiceberg.expressions import AlwaysFalse, And, BooleanExpression, GreaterThanOrEqual, LessThan, Or
from pyiceberg.io import load_file_io
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.serializers import FromInputFile
from pyiceberg.table import CommitTableResponse, Table
from pyiceberg.transforms import MonthTransform
from pyiceberg.types import (BooleanType, DecimalType, IcebergType, IntegerType, LongType, NestedField, StringType,
                             TimestampType)

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering.columns import ArchiveColumn

log = logging.getLogger(__name__)

CATALOG_NAME = "wedefi"
CATALOG_SCHEMA = "iceberg_catalog"  # created by sql/0011_iceberg_catalog.sql
TABLES = sql.Identifier(CATALOG_SCHEMA, "iceberg_tables")
EPOCH = date(1970, 1, 1)
TABLE_PROPERTIES = {
    "format-version": "2",
    "gc.enabled": "false",  # the archive owns the data files: expiring snapshots must never delete one
    "write.parquet.compression-codec": "zstd",
}


class IcebergError(RuntimeError):
    """The Iceberg table disagrees with what the archive asked of it; the message says how."""


# -- PostgreSQL types as Iceberg types (the archive's type policy, columns.py) --------------------

def _iceberg_type(column: ArchiveColumn) -> IcebergType:
    if column.kind in ("text", "jsonb"):
        return StringType()
    if column.kind == "numeric":
        return DecimalType(column.arrow_type.precision, column.arrow_type.scale)
    if column.kind in ("int2", "int4"):
        return IntegerType()
    if column.kind == "int8":
        return LongType()
    if column.kind == "bool":
        return BooleanType()
    if column.kind == "timestamp":
        return TimestampType()  # microseconds, no time zone: PostgreSQL's timestamp(3), UTC by convention
    raise IcebergError(f"column {column.name!r}: no Iceberg type for kind {column.kind!r}")


def iceberg_schema(columns: Sequence[ArchiveColumn]) -> Schema:
    return Schema(*(NestedField(i, c.name, _iceberg_type(c), required=not c.nullable)
                    for i, c in enumerate(columns, start=1)))


def partition_spec(schema: Schema, table: p.RangeTable) -> PartitionSpec:
    source = schema.find_field(table.time_column).field_id
    return PartitionSpec(PartitionField(source_id=source, field_id=1000, transform=MonthTransform(),
                                        name=f"{table.time_column}_month"))


def month_of_partition(value: int) -> date:
    """Iceberg's month transform (months since 1970-01) as the first of the month."""
    return p.add_months(EPOCH, int(value))


def months_filter(table: p.RangeTable, months: Iterable[date], start: datetime | None = None,
                  end: datetime | None = None) -> BooleanExpression:
    """time column within the given months (consecutive months merged), clipped to [start, end)."""
    ranges: list[list[datetime]] = []
    for month in sorted(set(months)):
        low, high = p.month_bounds(month)
        if ranges and ranges[-1][1] == low:
            ranges[-1][1] = high
        else:
            ranges.append([low, high])
    expr: BooleanExpression = AlwaysFalse()
    for low, high in ranges:
        low, high = max(low, start) if start else low, min(high, end) if end else high
        if low < high:
            term = And(GreaterThanOrEqual(table.time_column, low), LessThan(table.time_column, high))
            expr = term if isinstance(expr, AlwaysFalse) else Or(expr, term)
    return expr


# -- the catalog ---------------------------------------------------------------------------------

class DelayedOpenFileIO(PyArrowFileIO):
    """pyarrow's FileIO with `allow_delayed_open`: a small file (every metadata file we
    write) is sent as one PutObject instead of a multipart upload. One round trip instead of
    three, and the S3 test server (moto) rejects the multipart completions of the AWS C++
    SDK that pyarrow 26 ships (a CRC64NVME trailer on the part, none in the completion)."""

    def _initialize_s3_fs(self, netloc: str | None) -> pafs.FileSystem:
        base = super()._initialize_s3_fs(netloc)
        options = base.__reduce__()[1][0]  # the filesystem's own constructor arguments
        options["allow_delayed_open"] = True
        return pafs.S3FileSystem(**options)


def catalog_uri(database_url: str) -> str:
    """The SQLAlchemy URL of the catalog: the same database through psycopg 3, its
    search_path set to the catalog's schema (a URL or a key=value conninfo; a socket
    directory as host stays a query parameter)."""
    from sqlalchemy.engine import URL

    params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(database_url).items()}
    params["options"] = " ".join(x for x in (params.get("options"), f"-c search_path={CATALOG_SCHEMA}") if x)
    host = params.pop("host", None)
    if host and (host.startswith("/") or "," in host):
        params["host"], host = host, None
    return URL.create(
        "postgresql+psycopg", username=params.pop("user", None), password=params.pop("password", None), host=host,
        port=int(params.pop("port")) if params.get("port") and host else None,
        database=params.pop("dbname", None), query=params,
    ).render_as_string(hide_password=False)


def catalog_properties(db: Database, store: ArchiveStore) -> dict[str, str]:
    return {"uri": catalog_uri(db.urls["primary"]), "init_catalog_tables": "false", "warehouse": store.iceberg_location(),
            "py-io-impl": f"{DelayedOpenFileIO.__module__}.{DelayedOpenFileIO.__name__}", **store.iceberg_properties()}


def _key(catalog_name: str, identifier: str | tuple) -> tuple[str, str, str]:
    return (catalog_name, Catalog.namespace_to_string(Catalog.namespace_from(identifier)),
            Catalog.table_name_from(identifier))


def current_location(conn: psycopg.Connection, identifier: str | tuple) -> str | None:
    """The table's metadata_location as `conn`'s transaction sees it (None: no such table)."""
    row = conn.execute(sql.SQL("SELECT metadata_location FROM {} WHERE catalog_name = %s AND table_namespace = %s"
                               " AND table_name = %s").format(TABLES), _key(CATALOG_NAME, identifier)).fetchone()
    return row[0] if row else None


class ArchiveCatalog(SqlCatalog):
    """pyiceberg's SQL catalog whose commits can join a caller's PostgreSQL transaction.

    Inside `joined(conn)`, loading a table reads its metadata_location on `conn`, and a
    commit writes the new metadata file then swaps metadata_location on `conn` with a
    compare-and-set (the row must still hold the location the commit started from): the
    swap commits or rolls back with the caller's transaction. Outside it, this is
    pyiceberg's SqlCatalog (its own SQLAlchemy session per operation).
    """

    _conn: psycopg.Connection | None = None

    @contextmanager
    def joined(self, conn: psycopg.Connection) -> Iterator["ArchiveCatalog"]:
        """Commits inside this block swap metadata_location in `conn`'s open transaction."""
        if conn.autocommit:
            raise ValueError("joined() needs a connection in a transaction: the swap must commit with it")
        previous, self._conn = self._conn, conn
        try:
            yield self
        finally:
            self._conn = previous

    def _key(self, identifier: str | tuple) -> tuple[str, str, str]:
        return _key(self.name, identifier)

    def table_at(self, identifier: str | tuple, metadata_location: str) -> Table:
        io = load_file_io(properties=self.properties, location=metadata_location)
        metadata = FromInputFile.table_metadata(io.new_input(metadata_location))
        return Table(identifier=Catalog.identifier_to_tuple(identifier), metadata=metadata,
                     metadata_location=metadata_location, io=self._load_file_io(metadata.properties, metadata_location),
                     catalog=self)

    def load_table(self, identifier: str | tuple) -> Table:
        if self._conn is None:
            return super().load_table(identifier)
        location = current_location(self._conn, identifier)
        if location is None:
            raise NoSuchTableError(f"Table does not exist: {'.'.join(self._key(identifier)[1:])}")
        return self.table_at(identifier, location)

    def commit_table(self, table: Table, requirements, updates) -> CommitTableResponse:
        conn = self._conn
        if conn is None:
            return super().commit_table(table, requirements, updates)
        key = self._key(table.name())
        current = self.load_table(table.name())
        staged = self._update_and_stage_table(current, table.name(), requirements, updates)
        if staged.metadata == current.metadata:
            return CommitTableResponse(metadata=current.metadata, metadata_location=current.metadata_location)
        self._write_metadata(metadata=staged.metadata, io=staged.io, metadata_path=staged.metadata_location)
        swapped = conn.execute(sql.SQL(
            "UPDATE {} SET metadata_location = %s, previous_metadata_location = %s WHERE catalog_name = %s"
            " AND table_namespace = %s AND table_name = %s AND metadata_location = %s").format(TABLES),
            (staged.metadata_location, current.metadata_location, *key, current.metadata_location)).rowcount
        if swapped != 1:
            raise CommitFailedException(f"{key[1]}.{key[2]}: metadata_location changed under us (another writer)")
        return CommitTableResponse(metadata=staged.metadata, metadata_location=staged.metadata_location)


# -- what the archive asks of its Iceberg tables --------------------------------------------------
