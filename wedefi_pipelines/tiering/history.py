"""A token's price history across tiers (the `wedefi-pipelines history` command prints it).

Hot and warm months (and late rows waiting in the default partition) are read from
PostgreSQL through the read replica route; months whose metadata says 'archived' are read
from their recorded Parquet objects on S3 with a pyarrow dataset, so the token and time
filter is pushed down to row-group statistics (a sorted month keeps one token in one or
two row groups). The archive metadata and the PostgreSQL rows are read in one REPEATABLE
READ snapshot: an archive run commits its metadata and its DROP together, so a month is
read from exactly one side. Tables frozen by an unfinished archive run are read too.
The result has the archive's exact types and is ordered by ("recordedAt", source, id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering.arrow_io import read_table, select_sql, text_columns
from wedefi_pipelines.tiering.columns import archive_columns, arrow_schema

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


def _window(token_id: str, start: datetime, end: datetime) -> sql.Composed:
    return sql.SQL("{tok} = {v} AND {t} >= {a} AND {t} < {b}").format(
        tok=sql.Identifier("tokenId"), v=sql.Literal(token_id), t=sql.Identifier(TABLE.time_column),
        a=sql.Literal(start), b=sql.Literal(end))


def price_history(db: Database, store: ArchiveStore, token_id: str, start: datetime, end: datetime) -> HistoryResult:
    """Every "PriceSnapshot" row of `token_id` with start <= "recordedAt" < end, from any tier."""
    start, end = p.to_utc_naive(start), p.to_utc_naive(end)
    if end <= start:
        raise ValueError(f"the end ({end}) must be after the start ({start})")
    months = [m for m in p.months_between(start, end) if p.month_bounds(m)[0] < end]
    route = db.route(WORKLOAD)
    with db.connection(WORKLOAD) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        columns = archive_columns(conn, TABLE.name)
        states = catalog.read_table(conn, TABLE, months=months, default_rows="skip").months.values()
        archived = {s.month for s in states if s.archived}
        keys = sorted(o.key for s in states if s.archived for o in s.objects)
        pieces = [read_table(conn, select_sql(TABLE.name, columns, where=_window(token_id, start, end)), columns)]
        for relation in (r for s in states for r in s.frozen_relations):
            pieces.append(read_table(conn, select_sql(relation, columns, where=_window(token_id, start, end)), columns))
    from_postgres = sum(t.num_rows for t in pieces)
    schema = arrow_schema(columns)
    if keys:
        filesystem = store.arrow_filesystem()
        utc = schema.field(TABLE.time_column).type
        expr = ((ds.field("tokenId") == token_id)
                & (ds.field(TABLE.time_column) >= pa.scalar(start.replace(tzinfo=timezone.utc), utc))
                & (ds.field(TABLE.time_column) < pa.scalar(end.replace(tzinfo=timezone.utc), utc)))
        for key in keys:  # one dataset per object: a month may store "id" as UUID, another as text
            dataset = ds.dataset(f"{store.bucket}/{key}", format="parquet", filesystem=filesystem)
            pieces.append(text_columns(dataset.to_table(filter=expr)))
    merged = pa.concat_tables([t.select(schema.names).cast(schema) for t in pieces])
    merged = merged.take(pc.sort_indices(merged, sort_keys=[(c, "ascending") for c in ORDER]))
    return HistoryResult(merged, from_postgres, merged.num_rows - from_postgres, sorted(archived), route.server)
