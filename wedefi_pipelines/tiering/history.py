"""A token's price history across tiers (the `wedefi-pipelines history` command prints it).

The same read serves any tiered table (`rows_across_tiers`: the hourly price rollup's
chart over its archived months). Hot and warm months (and late rows waiting in the default partition) are read from
PostgreSQL through the read replica route; months whose metadata says 'archived' are read
through the "PriceSnapshot" Iceberg table (iceberg.py) with the token and time filter:
the month partitions outside the range are pruned from its manifests, and within a month
the filter is pushed down to row-group statistics (a sorted month keeps one token in one
or two row groups). The archive metadata, the PostgreSQL rows and the Iceberg table's
metadata_location are read in one REPEATABLE READ snapshot: an archive run commits its
metadata, its registration and its DROP together (a restore likewise), so a month is
read from exactly one side. Objects not in the Iceberg table (the format-1 layout,
awaiting their upgrade) are read directly; tables frozen by an unfinished archive run
from PostgreSQL. The result has the archive's exact types and is ordered by
("recordedAt", source, id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from psycopg import sql
from pyiceberg.expressions import And, EqualTo
from pyiceberg.io.pyarrow import ArrowScan

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering.arrow_io import current_types, read_table, select_sql
from wedefi_pipelines.tiering.columns import archive_columns, arrow_schema
from wedefi_pipelines.tiering.iceberg import ArchiveTables, months_filter

TABLE = p.PRICE_SNAPSHOT
ORDER = ("recordedAt", "source", "id")
WORKLOAD = "user_dashboard"  # a user-facing read: the read replica, as the seed routes it


@dataclass
class HistoryResult:
    rows: pa.Table
    from_postgres: int = 0
    from_archive: int = 0
    archived_months: list[date] = field(default_factory=list)
    server: str = ""
    iceberg: str = ""  # "<namespace>.<table> snapshot <id>" when the cold part was read through it
    iceberg_files: int = 0  # data files the scan read after pruning


def _window(table: p.RangeTable, key_column: str, key: str, start: datetime, end: datetime) -> sql.Composed:
    return sql.SQL("{k} = {v} AND {t} >= {a} AND {t} < {b}").format(
        k=sql.Identifier(key_column), v=sql.Literal(key), t=sql.Identifier(table.time_column),
        a=sql.Literal(start), b=sql.Literal(end))


def price_history(db: Database, store: ArchiveStore, token_id: str, start: datetime, end: datetime) -> HistoryResult:
    """Every "PriceSnapshot" row of `token_id` with start <= "recordedAt" < end, from any tier."""
    return rows_across_tiers(db, store, TABLE, "tokenId", token_id, start, end, ORDER)


def rows_across_tiers(db: Database, store: ArchiveStore, table: p.RangeTable, key_column: str, key: str,
                      start: datetime, end: datetime, order: tuple[str, ...]) -> HistoryResult:
    """Every row of a tiered table with `key_column` = key and start <= time < end, from any
    tier, ordered by `order` ("PriceSnapshot" for the history, "PriceRollupHourly" for an
    hourly chart over its archived months)."""
    start, end = p.to_utc_naive(start), p.to_utc_naive(end)
    if end <= start:
        raise ValueError(f"the end ({end}) must be after the start ({start})")
    months = [m for m in p.months_between(start, end) if p.month_bounds(m)[0] < end]
    route = db.route(WORKLOAD)
    tables = ArchiveTables(db, store)
    with db.connection(WORKLOAD) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        columns = archive_columns(conn, table.name)
        states = [s for s in catalog.read_table(conn, table, months=months, default_rows="skip").months.values()]
        archived = [s for s in states if s.archived]
        registered = sorted({s.month for s in archived if any(o.registered for o in s.objects)})
        direct = sorted(o.key for s in archived for o in s.objects if not o.registered and o.rows > 0)
        iceberg = tables.table_in(conn, table) if registered else None
        where = _window(table, key_column, key, start, end)
        pieces = [read_table(conn, select_sql(table.name, columns, where=where), columns)]
        for relation in (r for s in states for r in s.frozen_relations):
            pieces.append(read_table(conn, select_sql(relation, columns, where=where), columns))
    from_postgres = sum(t.num_rows for t in pieces)
    schema = arrow_schema(columns)
    result = HistoryResult(pa.table({}), archived_months=sorted(s.month for s in archived), server=route.server)
    if registered:
        if iceberg is None:
            raise RuntimeError(f"{table.name}: the archive metadata says months {registered} are in the Iceberg "
                               "table, and the catalog has no such table")
        scan = iceberg.scan(row_filter=And(EqualTo(key_column, key), months_filter(table, registered, start, end)))
        tasks = list(scan.plan_files())
        result.iceberg = f"{'.'.join(tables.identifier(table))} snapshot {iceberg.current_snapshot().snapshot_id}"
        result.iceberg_files = len(tasks)
        pieces.append(ArrowScan(scan.table_metadata, scan.io, scan.projection(), scan.row_filter).to_table(tasks)
                      if tasks else schema.empty_table())
    if direct:  # objects of the format-1 layout, until their upgrade
        filesystem = store.arrow_filesystem()
        for object_key in direct:
            dataset = ds.dataset(f"{store.bucket}/{object_key}", format="parquet", filesystem=filesystem)
            rows = current_types(dataset.to_table(filter=ds.field(key_column) == key), schema)
            window = pc.and_(pc.and_(pc.equal(rows[key_column], key), pc.greater_equal(rows[table.time_column],
                             pa.scalar(start, rows.schema.field(table.time_column).type))),
                             pc.less(rows[table.time_column], pa.scalar(end, rows.schema.field(table.time_column).type)))
            pieces.append(rows.filter(window))
    merged = pa.concat_tables([t.select(schema.names).cast(schema) for t in pieces])
    merged = merged.take(pc.sort_indices(merged, sort_keys=[(c, "ascending") for c in order]))
    result.rows, result.from_postgres, result.from_archive = merged, from_postgres, merged.num_rows - from_postgres
    return result
