"""Independent readers of the cold tier: every archived table read by pyarrow, DuckDB, polars,
pyiceberg (through the catalog in PostgreSQL), Spark (local mode, on the downloaded objects
in their Hive folders) and DuckDB's iceberg extension, each in a non-UTC time zone, must
give the rows PostgreSQL held: the same count and values, ids as text, decimals exact,
and every row in the month PostgreSQL had it in.

The months hold rows at both edges (00:00:00.000 on the first, 23:59:59.999 on the last
day): an engine that shifted timestamps by its session's zone would move them into a
neighbouring month.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.columns import archive_columns
from wedefi_pipelines_tests.conftest import TEMPLATE_DB, TestDatabase
from wedefi_pipelines_tests.iceberg_support import NAMESPACE, catalog_row, plain_catalog
from wedefi_pipelines_tests.test_tiering_support import (load_portfolio, load_prices, months_ago, seed_reference,
                                                         store_for)

TABLES = ("PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot")
NEW_YORK, KOLKATA = "America/New_York", "Asia/Kolkata"  # behind and ahead of UTC


class Archived:
    """The archived months, PostgreSQL's rows as they were, and the objects downloaded locally."""

    def __init__(self, db: TestDatabase, store, months: dict[str, object], expected: dict, columns: dict,
                 local: Path) -> None:
        self.db, self.store, self.months, self.expected, self.columns, self.local = (
            db, store, months, expected, columns, local)

    def folder(self, table: str) -> Path:
        return self.local / table


def _pg_rows(conn: psycopg.Connection, relation: str, columns) -> dict[str, tuple]:
    """id -> the row as Python values (jsonb as PostgreSQL's text), in table order."""
    items = [sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.kind == "jsonb" else sql.Identifier(c.name)
             for c in columns]
    rows = conn.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(items), sql.Identifier(relation)))
    return {row[0]: tuple(row) for row in rows}


@pytest.fixture(scope="module")
def archived(stack, tmp_path_factory) -> Archived:
    name = "t_" + uuid.uuid4().hex[:12]
    stack.create_database(name, template=TEMPLATE_DB)
    stack.wait_replicas_caught_up()
    db = TestDatabase(name=name, stack=stack)
    prices, portfolios = months_ago(15), months_ago(14)
    months = {"PriceSnapshot": prices, "PortfolioSnapshot": portfolios, "PositionSnapshot": portfolios}
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, prices)
        load_portfolio(conn, portfolios)
        start, end = p.month_bounds(prices)
        conn.execute("""INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt", "createdAt")
                        VALUES ('edge-last', 'tok-1', 99999999999999999.999999999999999999, 'edge', %s, %s),
                               ('EDGE-Upper', 'tok-2', -0.000000000000000001, 'edge', %s, %s)""",
                     (end - timedelta(milliseconds=1), end - timedelta(milliseconds=1), start, start))
        columns = {t: archive_columns(conn, t) for t in TABLES}
        expected = {t: _pg_rows(conn, p.child_name(p.range_table(t), m), columns[t]) for t, m in months.items()}
    store = store_for(db)
    with db.database() as database:
        for group in ("PriceSnapshot", "PortfolioSnapshot"):
            assert Archiver(database, store).archive_month(group, months[group]).action == "archived"
    local = tmp_path_factory.mktemp("archive")
    for table, month in months.items():
        for key in store.list_keys(store.month_prefix(table, month)):  # the Hive layout, as it is on S3
            target = local / key[len(store.prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download(key, target)
    yield Archived(db, store, months, expected, columns, local)
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def process_zone(monkeypatch):
    """The test process in a non-UTC zone (what a reader without a session zone uses)."""
    monkeypatch.setenv("TZ", KOLKATA)
    time.tzset()
    yield KOLKATA
    monkeypatch.undo()
    time.tzset()


def _same_rows(archived: Archived, table: str, got: dict[str, tuple], reader: str) -> None:
    expected = archived.expected[table]
    assert len(got) == len(expected) > 0, f"{reader} {table}: {len(got)} rows, PostgreSQL held {len(expected)}"
    assert set(got) == set(expected), f"{reader} {table}: ids differ"
    names = [c.name for c in archived.columns[table]]
    for row_id, row in expected.items():
        for name, want, have in zip(names, row, got[row_id]):
            assert type(have) is type(want) or want is None, (reader, table, name, want, have)
            assert have == want, f"{reader} {table} id={row_id} {name}: {have!r}, PostgreSQL held {want!r}"
            if isinstance(want, Decimal):  # exact, scale included: no float on the way
                assert have.as_tuple() == want.as_tuple(), f"{reader} {table} id={row_id} {name}: {have!r}"


def _in_month(archived: Archived, table: str, months_seen: set[tuple[int, int]], reader: str) -> None:
    month = archived.months[table]
    assert months_seen == {(month.year, month.month)}, f"{reader} {table}: rows fall in {sorted(months_seen)}"


def _from_arrow(archived: Archived, table: str, data: pa.Table) -> dict[str, tuple]:
    names = [c.name for c in archived.columns[table]]
    rows = data.select(names).to_pylist()
    return {r["id"]: tuple(r[n] for n in names) for r in rows}


# -- the readers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("table", TABLES)
def test_pyarrow_reads_the_hive_folders(archived, table, process_zone):
    data = pq.read_table(archived.folder(table))  # partition columns year, month from the folder names
    schema = data.schema
    assert schema.field("id").type == pa.string()
    assert schema.field(p.range_table(table).time_column).type == pa.timestamp("us")
    _same_rows(archived, table, _from_arrow(archived, table, data), "pyarrow")
    times = data.column(p.range_table(table).time_column).to_pylist()
    _in_month(archived, table, {(t.year, t.month) for t in times}, "pyarrow")


@pytest.mark.parametrize("table", TABLES)
def test_duckdb_reads_the_hive_folders_in_another_time_zone(archived, table):
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'America/New_York'")
    path = str(archived.folder(table) / "**" / "*.parquet")
    relation = con.read_parquet(path, hive_partitioning=True)
    types = dict(zip(relation.columns, [str(t) for t in relation.types]))
    assert types["id"] == "VARCHAR" and types[p.range_table(table).time_column] == "TIMESTAMP"
    names = [c.name for c in archived.columns[table]]
    rows = relation.select(*[duckdb.ColumnExpression(n) for n in names]).fetchall()
    _same_rows(archived, table, {r[0]: tuple(r) for r in rows}, "duckdb")
    time_column = duckdb.ColumnExpression(p.range_table(table).time_column)
    seen = relation.select(duckdb.FunctionExpression("year", time_column),
                           duckdb.FunctionExpression("month", time_column)).distinct().fetchall()
    _in_month(archived, table, set(seen), "duckdb")


@pytest.mark.parametrize("table", TABLES)
def test_polars_reads_the_hive_folders(archived, table, process_zone):
    import polars as pl

    frame = pl.read_parquet(archived.folder(table) / "**" / "*.parquet", hive_partitioning=True)
    assert frame.schema["id"] == pl.String
    assert frame.schema[p.range_table(table).time_column] == pl.Datetime("us")
    names = [c.name for c in archived.columns[table]]
    got = {row[0]: tuple(row) for row in frame.select(names).iter_rows()}
    _same_rows(archived, table, got, "polars")
    column = pl.col(p.range_table(table).time_column)
    seen = frame.select(column.dt.year().alias("y"), column.dt.month().alias("m")).unique().iter_rows()
    _in_month(archived, table, set(seen), "polars")


def test_polars_joins_positions_to_their_portfolios(archived):
    """The join the first archive format broke (binary ids against text)."""
    import polars as pl

    portfolios = pl.read_parquet(archived.folder("PortfolioSnapshot") / "**" / "*.parquet")
    positions = pl.read_parquet(archived.folder("PositionSnapshot") / "**" / "*.parquet")
    joined = positions.join(portfolios.select(pl.col("id").alias("portfolioSnapshotId"), "totalUsdValue"),
                            on="portfolioSnapshotId", how="inner")
    assert joined.height == positions.height == len(archived.expected["PositionSnapshot"])


@pytest.mark.parametrize("table", TABLES)
def test_pyiceberg_reads_through_the_catalog_in_postgresql(archived, table, process_zone):
    tbl = plain_catalog(archived.db, archived.store).load_table((NAMESPACE, table))
    data = tbl.scan().to_arrow()
    _same_rows(archived, table, _from_arrow(archived, table, data), "pyiceberg")
    times = data.column(p.range_table(table).time_column).to_pylist()
    _in_month(archived, table, {(t.year, t.month) for t in times}, "pyiceberg")


@pytest.fixture(scope="session")
def spark():
    """PySpark in local mode (its wheel brings no S3 or Iceberg jars: it reads local files)."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("wedefi-archive-readers")
               .config("spark.sql.session.timeZone", NEW_YORK)
               .config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.driver.host", "127.0.0.1").config("spark.sql.shuffle.partitions", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.spark
@pytest.mark.parametrize("table", TABLES)
def test_spark_reads_the_hive_folders_in_another_time_zone(archived, table, spark):
    from pyspark.sql import functions as F
    from pyspark.sql.types import DecimalType, StringType, TimestampNTZType

    frame = spark.read.parquet(str(archived.folder(table)))  # discovers year=/month= partitions
    types = {f.name: f.dataType for f in frame.schema.fields}
    assert types["id"] == StringType() and types[p.range_table(table).time_column] == TimestampNTZType()
    assert all(types[c.name] == DecimalType(c.arrow_type.precision, c.arrow_type.scale)
               for c in archived.columns[table] if c.kind == "numeric")
    names = [c.name for c in archived.columns[table]]
    got = {row[0]: tuple(row) for row in frame.select(*names).collect()}
    _same_rows(archived, table, got, "spark")
    time_column = F.col(p.range_table(table).time_column)
    seen = frame.select(F.year(time_column), F.month(time_column)).distinct().collect()
    _in_month(archived, table, {tuple(r) for r in seen}, "spark")
    folder = frame.select("year", "month").distinct().collect()  # the Hive folder agrees with the rows
    _in_month(archived, table, {tuple(r) for r in folder}, "spark (folders)")


def test_duckdb_iceberg_extension_reads_the_metadata_file(archived):
    """DuckDB 1.4.4's iceberg extension from PyPI (duckdb-ext-iceberg, -avro, -httpfs), loaded
    offline, reading the table at the metadata.json the catalog points to, over S3."""
    from urllib.parse import urlparse

    import duckdb

    extensions = Path(duckdb.__file__).parent.parent / "duckdb_ext" / "extensions"
    con = duckdb.connect(config={"extension_directory": str(extensions), "autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    for extension in ("httpfs", "avro", "iceberg"):
        con.load_extension(extension)
    endpoint = urlparse(archived.store.endpoint_url)
    con.execute("CREATE SECRET archive (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, URL_STYLE 'path', "
                "USE_SSL false)", ["testing", "testing", archived.store.region, endpoint.netloc])
    con.execute("SET TimeZone = 'America/New_York'")
    for table in TABLES:
        location, _ = catalog_row(archived.db, table)
        names = [c.name for c in archived.columns[table]]
        rows = con.execute("SELECT * FROM iceberg_scan(?)", [location]).fetchall()
        columns = [d[0] for d in con.description]
        got = {r[columns.index("id")]: tuple(r[columns.index(n)] for n in names) for r in rows}
        _same_rows(archived, table, got, "duckdb iceberg_scan")
