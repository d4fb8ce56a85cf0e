"""The cold tier as Apache Iceberg tables, catalogued in the app's own PostgreSQL.

One Iceberg table per archived table ("wedefi"."PriceSnapshot", ...: named after it, its
columns keeping PostgreSQL's names), partitioned by month of the time column, its metadata
under s3://$ARCHIVE_BUCKET/$ARCHIVE_PREFIX/_iceberg/<Table>/ (beside the Hive table folders,
not in them). Its data files are the archive's own verified objects, added as they are
(pyiceberg's `add_files`: each file's column statistics place it in its month); the table
never writes, rewrites or deletes data (`gc.enabled=false`: the archive metadata owns the
files, so no engine's snapshot expiry may delete one).

The catalog is pyiceberg's `SqlCatalog` over tables that migration 0011 creates in the
schema `iceberg_catalog` (reached through the connection's search_path; pyiceberg never
creates them: `init_catalog_tables` off). Because it lives in the same database as the
archive metadata, every change we make to a table commits in *our* transaction:
`ArchiveCatalog.joined(conn)` makes pyiceberg's commit write the new metadata file, then
swap the table's `metadata_location` with a compare-and-set UPDATE on `conn`, under the
table's advisory lock ("iceberg.table"). So the archive's record step (metadata rows,
DROP of the frozen tables, registration), a restore (rows attached, files removed from the
table) and an upgrade (object swapped, registered) each change PostgreSQL and the
Iceberg table together or not at all: a reader of either never counts a month twice or
not at all. A crash after the metadata file is written and before the commit leaves an
unreferenced metadata file under `_iceberg/` (a few kB), never a half-registered month.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Iterable, Iterator, Sequence

import psycopg
from psycopg import sql
from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.table import StaticTable, Table

from wedefi_pipelines import locks
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import ArchiveObject
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.columns import archive_columns
from wedefi_pipelines.tiering.iceberg_catalog import (  # noqa: F401 (importable from here)
    ArchiveCatalog, CATALOG_NAME, CATALOG_SCHEMA, DelayedOpenFileIO, EPOCH, IcebergError, TABLES,
    TABLE_PROPERTIES, _iceberg_type, _key, catalog_properties, catalog_uri, current_location, iceberg_schema,
    month_of_partition, months_filter, partition_spec,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredFile:
    path: str
    month: date
    rows: int


class ArchiveTables:
    """The archive's Iceberg tables: created on first use, changed only inside the caller's
    PostgreSQL transaction (registration, removal, snapshot expiry), read at a location
    read in the caller's snapshot."""

    def __init__(self, db: Database, store: ArchiveStore, settings: Settings | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.db = db
        self.store = store
        self.settings = settings or db.settings
        self.namespace = self.settings.archive.iceberg_namespace
        self.log = logger or log
        self._properties: dict[str, str] | None = None
        self._catalog: ArchiveCatalog | None = None

    @property
    def properties(self) -> dict[str, str]:
        """The catalog's and FileIO's properties (S3 credentials resolved on first use)."""
        if self._properties is None:
            self._properties = catalog_properties(self.db, self.store)
        return self._properties

    @property
    def catalog(self) -> ArchiveCatalog:
        """The SQL catalog (its SQLAlchemy engine connects on first use: writers only)."""
        if self._catalog is None:
            self._catalog = ArchiveCatalog(CATALOG_NAME, **self.properties)
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.engine.dispose()
            self._catalog = None

    def __enter__(self) -> "ArchiveTables":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def identifier(self, table: p.RangeTable | str) -> tuple[str, str]:
        return self.namespace, p.range_table(table).name

    # -- creation ----------------------------------------------------------------------------
    def ensure(self, table: p.RangeTable | str) -> None:
        """Create the table's Iceberg table if it does not exist (its own short transaction)."""
        table = p.range_table(table)
        catalog = self.catalog
        try:
            catalog.create_namespace(self.namespace)
        except NamespaceAlreadyExistsError:
            pass
        with self.db.connect("primary") as conn:
            if current_location(conn, self.identifier(table)) is not None:
                return
            columns = archive_columns(conn, table.name)
        schema = iceberg_schema(columns)
        try:
            catalog.create_table(
                self.identifier(table), schema, location=self.store.iceberg_location(table.name),
                partition_spec=partition_spec(schema, table),
                properties={**TABLE_PROPERTIES, "schema.name-mapping.default": schema.name_mapping.model_dump_json()})
            self.log.info("created the Iceberg table %s.%s at %s", self.namespace, table.name,
                          self.store.iceberg_location(table.name))
        except TableAlreadyExistsError:
            pass  # another run created it meanwhile

    # -- changes, in the caller's transaction ----------------------------------------------
    @contextmanager
    def _locked(self, conn: psycopg.Connection, table: p.RangeTable) -> Iterator[Table]:
        with self.catalog.joined(conn):
            locks.xact_lock(conn, "iceberg.table", table.name)
            yield self.catalog.load_table(self.identifier(table))

    def files(self, tbl: Table, table: p.RangeTable, months: Iterable[date] | None = None) -> list:
        """The table's data files (pyiceberg DataFile), pruned to `months` by partition."""
        scan = tbl.scan(row_filter=months_filter(table, months)) if months is not None else tbl.scan()
        return [task.file for task in scan.plan_files()]

    def register(self, conn: psycopg.Connection, table: p.RangeTable | str, month: date,
                 objects: Sequence[ArchiveObject]) -> int | None:
        """Add the month's verified objects to its Iceberg table, in `conn`'s transaction,
        and record the snapshot on each object's row. An object the table already holds
        (pyiceberg's duplicate-file error) counts as registered, never twice. Returns the
        snapshot id that holds them, None when there was nothing to add."""
        table = p.range_table(table)
        objects = [o for o in objects if o.rows > 0]
        if not objects:
            return None
        uris = {self.store.uri(o.key): o for o in objects}
        with self._locked(conn, table) as tbl:
            self._evolve(conn, tbl, table)
            pending = list(uris)
            try:
                tbl.add_files(pending, snapshot_properties={"wedefi.month": p.month_year(month)})
            except ValueError as exc:
                if "already referenced" not in str(exc):
                    raise
                held = {f.file_path for f in self.files(tbl, table, [month])}
                pending = [u for u in uris if u not in held]
                self.log.warning("%s %s: %d object(s) were already in the Iceberg table (registered by an earlier "
                                 "run): not added again", table.name, p.month_year(month), len(uris) - len(pending))
                if pending:
                    tbl.add_files(pending, snapshot_properties={"wedefi.month": p.month_year(month)})
            snapshot = tbl.current_snapshot()
            found = {f.file_path: f for f in self.files(tbl, table, [month])}
            for uri, obj in uris.items():
                data_file = found.get(uri)
                if data_file is None or data_file.record_count != obj.rows:
                    raise IcebergError(f"{uri}: after add_files the table holds "
                                       f"{'no such file' if data_file is None else f'{data_file.record_count} rows'} "
                                       f"in {p.month_year(month)}, the archive recorded {obj.rows} rows")
            conn.execute(sql.SQL("UPDATE {} SET iceberg_snapshot_id = %s WHERE object_key = ANY(%s)").format(
                sql.Identifier(p.archive_objects_name(table))), (snapshot.snapshot_id, [o.key for o in objects]))
            return snapshot.snapshot_id

    def _evolve(self, conn: psycopg.Connection, tbl: Table, table: p.RangeTable) -> None:
        """Columns added to the PostgreSQL table since the Iceberg table was created join its
        schema (pyiceberg's union by name; older files read them as null) before a file that
        has them is added. A change Iceberg cannot express (a type narrowed, a column
        dropped) fails here, naming the columns, and the archive's transaction with it."""
        columns = archive_columns(conn, table.name)
        if [f.name for f in tbl.schema().fields] == [c.name for c in columns]:
            return
        with tbl.update_schema() as update:
            update.union_by_name(iceberg_schema(columns))
        missing = {c.name for c in columns} - {f.name for f in tbl.schema().fields}
        if missing:
            raise IcebergError(f"{table.name}: the Iceberg table's schema could not take the columns {sorted(missing)}")
        self.log.info("%s: the Iceberg table's schema now has %s", table.name, [f.name for f in tbl.schema().fields])

    def unregister(self, conn: psycopg.Connection, table: p.RangeTable | str, month: date) -> int:
        """Remove the month's files from its Iceberg table, in `conn`'s transaction (a
        restore: the rows are back in PostgreSQL), and clear the objects' snapshot ids.
        Returns how many rows left the table. The files stay on S3, recorded."""
        table = p.range_table(table)
        with self._locked(conn, table) as tbl:
            files = self.files(tbl, table, [month])
            if files:
                transaction = tbl.transaction()
                with transaction.update_snapshot(snapshot_properties={"wedefi.month": p.month_year(month)}
                                                 ).overwrite() as overwrite:
                    for data_file in files:
                        overwrite.delete_data_file(data_file)
                transaction.commit_transaction()
                left = self.files(tbl, table, [month])
                if left:
                    raise IcebergError(f"{table.name} {p.month_year(month)}: {len(left)} file(s) still in the Iceberg "
                                       "table after removing them")
            conn.execute(sql.SQL("UPDATE {} SET iceberg_snapshot_id = NULL WHERE month_year = %s").format(
                sql.Identifier(p.archive_objects_name(table))), (p.month_year(month),))
            return sum(f.record_count for f in files)

    def forget(self, conn: psycopg.Connection, table: p.RangeTable | str, keys: Sequence[str]) -> list[int]:
        """Expire every snapshot that still references one of `keys` (objects about to be
        deleted from S3: a restored month's superseded parts), in `conn`'s transaction, so
        no snapshot ever points at a deleted file. The current snapshot never does (the
        restore removed them from it). Returns the expired snapshot ids."""
        table = p.range_table(table)
        doomed = {self.store.uri(k) for k in keys}
        with self._locked(conn, table) as tbl:
            current = tbl.current_snapshot()
            seen: dict[str, bool] = {}
            expired = []
            for snapshot in tbl.snapshots():
                if current is not None and snapshot.snapshot_id == current.snapshot_id:
                    continue
                hits = False
                for manifest in snapshot.manifests(tbl.io):
                    if manifest.manifest_path not in seen:
                        seen[manifest.manifest_path] = any(
                            entry.data_file.file_path in doomed for entry in manifest.fetch_manifest_entry(tbl.io))
                    hits = hits or seen[manifest.manifest_path]
                if hits:
                    expired.append(snapshot.snapshot_id)
            if current is not None and any(f.file_path in doomed for f in self.files(tbl, table)):
                raise IcebergError(f"{table.name}: the current Iceberg snapshot still holds objects about to be deleted")
            if expired:
                tbl.maintenance.expire_snapshots().by_ids(expired).commit()
            return expired

    # -- reads -------------------------------------------------------------------------------
    def table_in(self, conn: psycopg.Connection, table: p.RangeTable | str) -> Table | None:
        """The Iceberg table as `conn`'s snapshot sees it (a REPEATABLE READ transaction
        reads it consistently with the archive metadata); None if it does not exist yet."""
        location = current_location(conn, self.identifier(table))
        return None if location is None else self.static_table(location)

    def static_table(self, metadata_location: str) -> StaticTable:
        """A read-only table at a metadata file (no catalog round trip: the caller read the location)."""
        return StaticTable.from_metadata(metadata_location, properties=self.properties)

    def month_files(self, tbl: Table | None, table: p.RangeTable | str) -> dict[date, list[RegisteredFile]]:
        """The table's data files by month (its partition value)."""
        table = p.range_table(table)
        found: dict[date, list[RegisteredFile]] = {}
        if tbl is None or tbl.current_snapshot() is None:
            return found
        for data_file in self.files(tbl, table):
            month = month_of_partition(data_file.partition[0])
            found.setdefault(month, []).append(RegisteredFile(data_file.file_path, month, data_file.record_count))
        return found
