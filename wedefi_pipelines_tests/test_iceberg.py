"""The archive's Apache Iceberg tables on the real stack: registered in the archive's record
transaction, counted once, removed by a restore in the restore's own transaction, swapped
with a compare-and-set, and checked against the archive metadata."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.transforms import MonthTransform
from pyiceberg.types import DecimalType, StringType, TimestampType

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.tiering.checks import iceberg_tables_match_archive
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.columns import archive_columns, hash_kinds
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines.tiering.iceberg import CATALOG_NAME, ArchiveCatalog, ArchiveTables
from wedefi_pipelines.tiering.restore import pg_content_hash, restore_month
from wedefi_pipelines_tests.iceberg_support import (NAMESPACE, catalog_row, iceberg_content, month_files,
                                                    plain_catalog, snapshot_ids)
from wedefi_pipelines_tests.test_tiering_support import (load_portfolio, load_prices, metadata_rows, month_content,
                                                         months_ago, rows_of, seed_reference, store_for)

REPO = Path(__file__).resolve().parent.parent
# Restores argv[1]'s month argv[2] and kills itself (SIGKILL) right after step argv[3], inside its transaction.
RESTORE_RUNNER = (
    "import os, signal, sys; from datetime import date; from wedefi_pipelines.resources.database import Database; "
    "from wedefi_pipelines.resources.archive import ArchiveStore; from wedefi_pipelines.tiering.restore import restore_month; "
    "kill = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == sys.argv[3] else None; "
    "restore_month(Database.from_env(), ArchiveStore.from_env(), sys.argv[1], date.fromisoformat(sys.argv[2]), "
    "on_step=kill)")


@pytest.fixture
def archived(db):
    """Two cold months of prices and one of portfolios/positions, archived."""
    first, second = months_ago(15), months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        for month in (first, second):
            load_prices(conn, month)
        load_portfolio(conn, second)
        hashes = {(t, m): pg_content_hash(conn, p.child_name(p.range_table(t), m), t)
                  for t, m in (("PriceSnapshot", first), ("PriceSnapshot", second), ("PortfolioSnapshot", second),
                               ("PositionSnapshot", second))}
    store = store_for(db)
    with db.database() as database:
        for group, month in (("PriceSnapshot", first), ("PriceSnapshot", second), ("PortfolioSnapshot", second)):
            assert Archiver(database, store).archive_month(group, month).action == "archived"
    return first, second, hashes, store


def test_each_archived_table_is_an_iceberg_table_holding_exactly_its_archived_rows(db, archived):
    first, second, hashes, store = archived
    catalog = plain_catalog(db, store)
    assert sorted(t[1] for t in catalog.list_tables(NAMESPACE)) == ["PortfolioSnapshot", "PositionSnapshot",
                                                                     "PriceSnapshot"]
    with psycopg.connect(db.url) as conn:
        columns = {t: archive_columns(conn, t) for t in ("PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot")}
    for (table, month), expected in hashes.items():
        tbl = catalog.load_table((NAMESPACE, table))
        assert tbl.location() == store.iceberg_location(table) == f"s3://{store.bucket}/t/{db.name}/_iceberg/{table}"
        assert tbl.metadata_location.startswith(store.iceberg_location(table) + "/metadata/")
        assert [f.name for f in tbl.schema().fields] == [c.name for c in columns[table]]  # PostgreSQL's names
        [field] = tbl.spec().fields
        assert isinstance(field.transform, MonthTransform)
        assert tbl.schema().find_field(field.source_id).name == p.range_table(table).time_column
        assert tbl.properties["gc.enabled"] == "false"
        assert iceberg_content(tbl, table, month, hash_kinds(columns[table])) == expected
    prices = catalog.load_table((NAMESPACE, "PriceSnapshot"))
    types = {f.name: f.field_type for f in prices.schema().fields}
    assert types["id"] == StringType() and types["priceUsd"] == DecimalType(36, 18)
    assert types["recordedAt"] == TimestampType()
    files = month_files(prices)
    assert sorted(files) == [first, second]
    assert all(store.key_of(path) in store.list_keys(store.month_prefix("PriceSnapshot", m))
               for m, paths in files.items() for path in paths)  # the archive's own objects, added as they are
    # the Hive table folders hold only the objects: metadata lives beside them
    assert all(k.endswith(".parquet") for k in store.list_keys(f"{store.prefix}/PriceSnapshot/"))
    assert set(snapshot_ids(db, "PriceSnapshot")) <= {s.snapshot_id for s in prices.snapshots()}
    with db.database() as database:
        check = iceberg_tables_match_archive(database, store)
    assert check.passed, check.metadata


def test_late_rows_archived_as_a_second_object_are_registered_and_counted_once(db, archived):
    first, _, hashes, store = archived
    with psycopg.connect(db.url) as conn:
        conn.execute("""INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt")
                        VALUES ('late-1', 'tok-1', 7.5, 'late', %s), ('late-2', 'tok-2', 8.5, 'late', %s)""",
                     (p.month_bounds(first)[0].replace(day=3, hour=1), p.month_bounds(first)[0].replace(day=9, minute=7)))
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PriceSnapshot", first)
        assert outcome.reason == "late rows of an archived month" and outcome.registered == {"PriceSnapshot": 1}
        assert Archiver(database, store).archive_month("PriceSnapshot", first).action == "skipped"
    tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
    files = month_files(tbl)[first]
    with psycopg.connect(db.url) as conn:
        [meta] = [m for m in metadata_rows(conn, "PriceSnapshot") if m[0] == p.month_year(first)]
    assert len(files) == 2 and sorted(files.values())[0] == 2
    assert sum(files.values()) == meta[1] == hashes[("PriceSnapshot", first)].count + 2
    assert tbl.scan(row_filter="source = 'late'").to_arrow().num_rows == 2


def test_an_object_the_table_already_holds_is_not_registered_twice(db, archived):
    """A registration that happened but was not recorded (here: its marks erased) is found
    by pyiceberg's duplicate-file check on the re-run and counted as registered."""
    first, _, hashes, store = archived
    with psycopg.connect(db.url) as conn:
        conn.execute('UPDATE "PriceSnapshot_archive_objects" SET iceberg_snapshot_id = NULL')
    with db.database() as database:
        check = iceberg_tables_match_archive(database, store)
        assert not check.passed and check.metadata["problems"].value  # the table holds what the marks deny
        outcome = Archiver(database, store).archive_month("PriceSnapshot", first)
    assert outcome.action == "registered" and outcome.registered == {"PriceSnapshot": 1}
    tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
    assert sum(month_files(tbl)[first].values()) == hashes[("PriceSnapshot", first)].count
    assert len(month_files(tbl)[first]) == 1
    assert snapshot_ids(db, "PriceSnapshot")[0] is not None


def test_the_metadata_location_swap_is_a_compare_and_set(db, archived):
    """A writer outside our lock (here pyiceberg's own catalog) commits after our commit read
    the table and before it swaps: the swap finds another location and fails, instead of
    overwriting that change, and our transaction fails with it."""
    store = archived[3]
    outsider = plain_catalog(db, store)

    class Racing(ArchiveCatalog):
        raced = False

        def _write_metadata(self, metadata, io, metadata_path):
            super()._write_metadata(metadata, io, metadata_path)
            if not Racing.raced:  # in the window between our read of metadata_location and our swap
                Racing.raced = True
                outsider.load_table((NAMESPACE, "PriceSnapshot")).transaction().set_properties(
                    owner="someone-else").commit_transaction()

    with db.database() as database, ArchiveTables(database, store) as tables:
        tables._catalog = Racing(CATALOG_NAME, **tables.properties)
        with pytest.raises(CommitFailedException, match="metadata_location changed"):
            with database.connect("primary") as conn, tables.catalog.joined(conn):
                ours = tables.catalog.load_table((NAMESPACE, "PriceSnapshot"))
                ours.transaction().set_properties(owner="us").commit_transaction()
    assert Racing.raced
    assert outsider.load_table((NAMESPACE, "PriceSnapshot")).properties["owner"] == "someone-else"


def test_a_restore_takes_the_month_out_of_the_iceberg_table_and_a_re_archive_puts_it_back(db, archived):
    first, second, hashes, store = archived
    location_before, _ = catalog_row(db, "PriceSnapshot")
    old_keys = store.list_keys(store.month_prefix("PriceSnapshot", first))
    with psycopg.connect(db.url) as conn:
        columns = archive_columns(conn, "PriceSnapshot")
    with db.database() as database:
        outcome = restore_month(database, store, "PriceSnapshot", first)
        assert outcome.left_iceberg == {"PriceSnapshot": hashes[("PriceSnapshot", first)].count}
        location_after, previous = catalog_row(db, "PriceSnapshot")
        assert previous == location_before != location_after  # one swap, from the location the restore read
        tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
        assert sorted(month_files(tbl)) == [second]
        assert snapshot_ids(db, "PriceSnapshot")[0] is None
        with psycopg.connect(db.url) as conn:
            assert month_content(conn, "PriceSnapshot", first) == hashes[("PriceSnapshot", first)]
        assert iceberg_tables_match_archive(database, store).passed
        db.wait_replicas()
        start, end = p.month_bounds(first)[0], p.month_bounds(second)[1]
        history = price_history(database, store, "tok-1", start, end)
        assert history.archived_months == [second] and history.from_postgres > 0 and history.from_archive > 0
        # archived again: new parts join the table; the superseded ones leave S3 only after every
        # snapshot that still named them is expired
        again = Archiver(database, store).archive_month("PriceSnapshot", first)
        assert again.action == "archived" and again.registered == {"PriceSnapshot": 1}
        assert set(again.swept) == set(old_keys)
        tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
        assert iceberg_content(tbl, "PriceSnapshot", first, hash_kinds(columns)) == hashes[("PriceSnapshot", first)]
        for snapshot in tbl.snapshots():  # time travel never meets a deleted file
            for task in tbl.scan(snapshot_id=snapshot.snapshot_id).plan_files():
                assert store.head(store.key_of(task.file.file_path)) is not None, (snapshot, task.file.file_path)
        assert iceberg_tables_match_archive(database, store).passed


def test_a_restore_killed_inside_its_transaction_changes_neither_postgresql_nor_the_catalog(db, archived):
    first, _, hashes, store = archived
    location_before, _ = catalog_row(db, "PriceSnapshot")
    env = {**os.environ, **db.env, "ARCHIVE_PREFIX": f"t/{db.name}"}
    killed = subprocess.run([sys.executable, "-c", RESTORE_RUNNER, "PriceSnapshot", first.isoformat(), "unregistered"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert catalog_row(db, "PriceSnapshot")[0] == location_before  # the swap died with the transaction
    with psycopg.connect(db.url) as conn:
        assert [m[2] for m in metadata_rows(conn, "PriceSnapshot")] == ["archived", "archived"]
        assert rows_of(conn, "PriceSnapshot", first) == []
    tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
    assert sum(month_files(tbl)[first].values()) == hashes[("PriceSnapshot", first)].count
    with db.database() as database:
        assert restore_month(database, store, "PriceSnapshot", first).action == "restored"
        assert iceberg_tables_match_archive(database, store).passed


def _remove_month(tbl, month) -> None:
    """What an outside writer might do: drop a month's files from the table."""
    transaction = tbl.transaction()
    with transaction.update_snapshot().overwrite() as overwrite:
        for task in tbl.scan().plan_files():
            if f"/{p.s3_month_path(month)}/" in task.file.file_path:
                overwrite.delete_data_file(task.file)
    transaction.commit_transaction()


def test_the_check_tells_a_table_changed_behind_the_archives_back_from_pending_work(db, archived):
    first, second, hashes, store = archived
    catalog = plain_catalog(db, store)
    with db.database() as database:
        # the second month's object leaves the table and its mark: a registration still to do (WARN)
        _remove_month(catalog.load_table((NAMESPACE, "PriceSnapshot")), second)
        with psycopg.connect(db.url) as conn:
            conn.execute('UPDATE "PriceSnapshot_archive_objects" SET iceberg_snapshot_id = NULL WHERE month_year = %s',
                         (p.month_year(second),))
        pending = iceberg_tables_match_archive(database, store)
        assert not pending.passed and pending.severity.value == "WARN" and not pending.metadata["problems"].value
        assert f"PriceSnapshot {p.month_year(second)}: 1 object(s)" in pending.metadata["pending"].value[0]
        # the first month's files removed by someone else while the archive says they are there (ERROR)
        _remove_month(catalog.load_table((NAMESPACE, "PriceSnapshot")), first)
        broken = iceberg_tables_match_archive(database, store)
        assert not broken.passed and broken.severity.value == "ERROR"
        assert f"PriceSnapshot {p.month_year(first)}: the Iceberg table holds {{}}" in broken.metadata["problems"].value[0]
        # the daily schedule's re-run registers the pending object
        assert Archiver(database, store).archive_month("PriceSnapshot", second).action == "registered"
    tbl = catalog.load_table((NAMESPACE, "PriceSnapshot"))
    assert sum(month_files(tbl)[second].values()) == hashes[("PriceSnapshot", second)].count


def test_a_column_added_to_postgresql_joins_the_iceberg_schema_before_files_that_have_it(db, archived):
    first, second, hashes, store = archived
    later = months_ago(13)
    with psycopg.connect(db.url) as conn:
        conn.execute('ALTER TABLE "PriceSnapshot" ADD COLUMN "venue" varchar(16)')
        load_prices(conn, later)
        conn.execute('UPDATE "PriceSnapshot" SET "venue" = \'dex\' WHERE "tokenId" = \'tok-1\'')
        count = conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0]
    with db.database() as database:
        assert Archiver(database, store).archive_month("PriceSnapshot", later).registered == {"PriceSnapshot": 1}
        assert iceberg_tables_match_archive(database, store).passed
    tbl = plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))
    assert tbl.schema().fields[-1].name == "venue"
    rows = tbl.scan().to_arrow()
    assert rows.num_rows == count + hashes[("PriceSnapshot", first)].count + hashes[("PriceSnapshot", second)].count
    venues = rows.group_by("venue").aggregate([("id", "count")]).to_pylist()
    assert {v["venue"] for v in venues} == {None, "dex"}  # older months read the new column as null


@pytest.mark.parametrize("url, expected", [
    ("postgresql://postgres@127.0.0.1:5432/wedefi",
     {"user": "postgres", "host": "127.0.0.1", "port": "5432", "dbname": "wedefi"}),
    ("postgresql://u:p%40ss@h/db?sslmode=require&options=-c%20statement_timeout%3D5s",
     {"user": "u", "password": "p@ss", "host": "h", "dbname": "db", "sslmode": "require",
      "options": "-c statement_timeout=5s -c search_path=iceberg_catalog"}),
    ("host=/run/postgresql port=5433 dbname=x user=y", {"host": "/run/postgresql", "port": "5433", "dbname": "x"}),
])
def test_the_catalog_connects_to_the_same_database_through_psycopg_3_in_its_own_schema(url, expected):
    import sqlalchemy

    from wedefi_pipelines.tiering.iceberg import catalog_uri

    engine = sqlalchemy.create_engine(catalog_uri(url))
    assert engine.dialect.driver == "psycopg"  # psycopg 3: the project's one PostgreSQL driver
    args = {k: str(v) for k, v in engine.dialect.create_connect_args(engine.url)[1].items() if k != "context"}
    assert {k: args.get(k) for k in expected} == expected
    assert args["options"].endswith("-c search_path=iceberg_catalog")
