"""The cold archive on the real stack: PostgreSQL primary + replicas, moto S3 over HTTP."""

import json
from datetime import datetime, timedelta

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.tiering.archive import Archiver, UnrepresentableValue
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines.tiering.restore import RestoreError, pg_content_hash, restore_month
from wedefi_pipelines_tests.test_tiering_support import (load_portfolio, load_prices, metadata_rows, months_ago,
                                                         object_rows, rows_of, seed_reference, store_for)


@pytest.fixture
def cold_price_month(db):
    month = months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        rows = load_prices(conn, month)
    return month, rows


def test_a_cold_month_is_exported_verified_recorded_and_dropped(db, cold_price_month):
    month, rows = cold_price_month
    with db.connect() as conn:
        before = rows_of(conn, "PriceSnapshot", month)
        expected_hash = pg_content_hash(conn, p.child_name(p.PRICE_SNAPSHOT, month), "PriceSnapshot")
    db.wait_replicas()
    store = store_for(db)
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PriceSnapshot", month)
    assert outcome.action == "archived" and outcome.rows == rows == len(before)
    assert outcome.exported_from == "analytics replica"
    key = f"t/{db.name}/PriceSnapshot/{p.s3_month_path(month)}/part-00000.parquet"
    assert [x.key for x in outcome.parts] == [key]
    with db.connect() as conn:
        assert not month_ops.relation_exists(conn, p.child_name(p.PRICE_SNAPSHOT, month))
        assert rows_of(conn, "PriceSnapshot", month) == []
        [(month_year, count, status, file_path, size)] = metadata_rows(conn, "PriceSnapshot")
        assert (month_year, count, status) == (p.month_year(month), rows, "archived")
        assert file_path == f"s3://{store.bucket}/t/{db.name}/PriceSnapshot/{p.s3_month_path(month)}/"
        meta_hash = conn.execute('SELECT content_hash FROM "PriceSnapshot_archive_metadata"').fetchone()[0]
        assert int(meta_hash) == expected_hash.total
        assert [r[0] for r in object_rows(conn, "PriceSnapshot")] == [key]
    head = store.head(key)
    assert head.size == size and head.crc64nvme and head.metadata["sha256"]
    local = store.download(key, f"/tmp/{db.name}.parquet")
    parquet = pq.ParquetFile(f"/tmp/{db.name}.parquet")
    schema = parquet.schema_arrow
    assert schema.field("priceUsd").type == pa.decimal128(36, 18)
    assert schema.field("recordedAt").type == pa.timestamp("us")  # no time zone: PostgreSQL's wall time
    assert schema.field("id").type == pa.string() and not schema.field("id").nullable
    logical = json.loads(parquet.schema.column(schema.get_field_index("recordedAt")).logical_type.to_json())
    assert (logical["Type"], logical["isAdjustedToUTC"], logical["timeUnit"]) == ("Timestamp", False, "microseconds")
    assert parquet.schema_arrow.metadata[b"wedefi.format_version"] == b"2"
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    assert parquet.metadata.num_rows == rows and local.size == size
    table = parquet.read()
    assert table.column("tokenId").to_pylist() == sorted(table.column("tokenId").to_pylist())  # the ORDER BY
    assert sorted(table.column("priceUsd").to_pylist())[-1] == __import__("decimal").Decimal(
        "123456789012345678.123456789012345678")


def test_rerunning_an_archived_month_changes_nothing(db, cold_price_month):
    month, _ = cold_price_month
    store = store_for(db)
    with db.database() as database:
        Archiver(database, store).archive_month("PriceSnapshot", month)
        again = Archiver(database, store).archive_month("PriceSnapshot", month)
    assert again.action == "skipped" and again.reason.startswith("already archived")
    with db.connect() as conn:
        assert len(object_rows(conn, "PriceSnapshot")) == 1 and len(metadata_rows(conn, "PriceSnapshot")) == 1
    assert len(store.list_keys(store.month_prefix("PriceSnapshot", month))) == 1


def test_a_month_that_is_not_cold_is_skipped_and_untouched(db):
    month = months_ago(3)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month)
        before = rows_of(conn, "PriceSnapshot", month)
    with db.database() as database:
        outcome = Archiver(database, store_for(db)).archive_month("PriceSnapshot", month)
    assert outcome.action == "skipped" and outcome.reason.startswith("not cold yet")
    with db.connect() as conn:
        assert month_ops.is_attached(conn, p.PRICE_SNAPSHOT, month)
        assert rows_of(conn, "PriceSnapshot", month) == before
        assert metadata_rows(conn, "PriceSnapshot") == []


def test_an_empty_cold_month_is_recorded_with_zero_rows(db):
    month = months_ago(15)
    with psycopg.connect(db.url) as conn:
        for statement in p.create_child_sql(p.PRICE_SNAPSHOT, month):
            conn.execute(statement)
        conn.commit()
    store = store_for(db)
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PriceSnapshot", month)
    assert outcome.action == "archived" and outcome.rows == 0
    with db.connect() as conn:
        assert [m[:3] for m in metadata_rows(conn, "PriceSnapshot")] == [(p.month_year(month), 0, "archived")]
        assert not month_ops.relation_exists(conn, p.child_name(p.PRICE_SNAPSHOT, month))
    assert len(store.list_keys(store.month_prefix("PriceSnapshot", month))) == 1


def test_late_rows_of_an_archived_month_become_its_next_verified_object(db, cold_price_month):
    month, rows = cold_price_month
    store = store_for(db)
    start = p.month_bounds(month)[0]
    with db.database() as database:
        Archiver(database, store).archive_month("PriceSnapshot", month)
        with psycopg.connect(db.url) as conn:  # the child is gone: these rows go to the default partition
            conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                            VALUES ('tok-1', 7.5, 'late', %s), ('tok-2', 8.5, 'late', %s)""",
                         (start.replace(day=3, hour=1), start.replace(day=9, minute=7)))
        outcome = Archiver(database, store).archive_month("PriceSnapshot", month)
    assert outcome.action == "archived" and outcome.reason == "late rows of an archived month"
    assert [(x.part, x.rows) for x in outcome.parts] == [(1, 2)]
    with db.connect() as conn:
        assert [m[:3] for m in metadata_rows(conn, "PriceSnapshot")] == [(p.month_year(month), rows + 2, "archived")]
        assert [r[2:4] for r in object_rows(conn, "PriceSnapshot")] == [(0, rows), (1, 2)]
        assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 0
        assert not month_ops.relation_exists(conn, p.child_name(p.PRICE_SNAPSHOT, month) + "_late")


@pytest.mark.parametrize("column, value, shown", [("priceUsd", "NaN", "NaN"), ("createdAt", "infinity", "infinity")])
def test_a_value_parquet_cannot_hold_exactly_fails_naming_the_row_and_keeps_it(db, cold_price_month, column, value,
                                                                              shown):
    month, rows = cold_price_month
    start = p.month_bounds(month)[0]
    with psycopg.connect(db.url) as conn:
        values = {"id": "the-bad-row", "tokenId": "tok-1", "priceUsd": "1", "source": "bad",
                  "recordedAt": start.replace(day=2, minute=1), column: value}
        conn.execute(psycopg.sql.SQL('INSERT INTO "PriceSnapshot" ({}) VALUES ({})').format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, values)),
            psycopg.sql.SQL(", ").join(psycopg.sql.Placeholder() * len(values))), list(values.values()))
    with db.database() as database, pytest.raises(UnrepresentableValue, match=f"id=the-bad-row.*{column}.*{shown}"):
        Archiver(database, store_for(db)).archive_month("PriceSnapshot", month)
    with db.connect() as conn:  # frozen, nothing dropped or recorded
        frozen = p.child_name(p.PRICE_SNAPSHOT, month)
        assert conn.execute(f'SELECT count(*) FROM "{frozen}"').fetchone()[0] == rows + 1
        assert metadata_rows(conn, "PriceSnapshot") == []


def test_portfolio_and_position_months_archive_and_restore_together(db):
    month = months_ago(13)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        portfolios, positions = load_portfolio(conn, month)
        before = {t: rows_of(conn, t) for t in ("PortfolioSnapshot", "PositionSnapshot")}
    store = store_for(db)
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PositionSnapshot", month)
        assert outcome.group == "PortfolioSnapshot"
        assert {x.table.name: x.rows for x in outcome.parts} == {"PortfolioSnapshot": portfolios,
                                                                 "PositionSnapshot": positions}
        with db.connect() as conn:
            assert rows_of(conn, "PortfolioSnapshot") == rows_of(conn, "PositionSnapshot") == []
            assert metadata_rows(conn, "PortfolioSnapshot")[0][:3] == (p.month_year(month), portfolios, "archived")
            assert metadata_rows(conn, "PositionSnapshot")[0][:3] == (p.month_year(month), positions, "archived")
        restored = restore_month(database, store, "PortfolioSnapshot", month)
    assert restored.rows == {"PortfolioSnapshot": portfolios, "PositionSnapshot": positions}
    with db.connect() as conn:
        assert {t: rows_of(conn, t) for t in before} == before  # every column, byte for byte
        assert month_ops.is_attached(conn, p.PORTFOLIO_SNAPSHOT, month)
        assert conn.execute(f'SELECT count(*) FROM "{p.subpartition_name(p.PORTFOLIO_SNAPSHOT, month, 0)}" '
                            'WHERE "walletId" IS NULL').fetchone()[0] > 0
        assert {r[2] for r in metadata_rows(conn, "PortfolioSnapshot") + metadata_rows(conn, "PositionSnapshot")} == {"restored"}


def test_restore_is_byte_for_byte_and_takes_late_rows_then_a_new_archive_supersedes_it(db, cold_price_month):
    month, rows = cold_price_month
    store = store_for(db)
    with db.connect() as conn:
        before = rows_of(conn, "PriceSnapshot")
    with db.database() as database:
        with pytest.raises(RestoreError, match="not archived"):
            restore_month(database, store, "PriceSnapshot", month)
        Archiver(database, store).archive_month("PriceSnapshot", month)
        late = p.month_bounds(month)[0].replace(day=20, minute=3)
        with psycopg.connect(db.url) as conn:
            conn.execute("""INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt")
                            VALUES ('late-1', 'tok-3', 3.25, 'late', %s)""", (late,))
            only_late = rows_of(conn, "PriceSnapshot")  # the month's rows are in S3: only the late row shows
        assert len(only_late) == 1
        with_late = sorted(before + only_late)
        outcome = restore_month(database, store, "PriceSnapshot", month)
        assert outcome.rows == {"PriceSnapshot": rows} and outcome.late_rows == {"PriceSnapshot": 1}
        with db.connect() as conn:
            assert rows_of(conn, "PriceSnapshot") == with_late
            assert conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0] == 0
            assert month_ops.is_attached(conn, p.PRICE_SNAPSHOT, month)
        assert restore_month(database, store, "PriceSnapshot", month).action == "skipped"
        again = Archiver(database, store).archive_month("PriceSnapshot", month)
    assert again.action == "archived" and [x.part for x in again.parts] == [1]
    with db.connect() as conn:
        assert [m[:3] for m in metadata_rows(conn, "PriceSnapshot")] == [(p.month_year(month), rows + 1, "archived")]
        assert [r[2] for r in object_rows(conn, "PriceSnapshot")] == [1]
    assert store.list_keys(store.month_prefix("PriceSnapshot", month)) == [again.parts[0].key]


def test_cross_tier_history_equals_the_query_before_archiving(db):
    cold, warm = months_ago(14), months_ago(2)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, p.add_months(cold, -1))
        load_prices(conn, cold)
        load_prices(conn, warm)
    start = p.month_bounds(p.add_months(cold, -1))[0].replace(day=20)
    end = p.month_bounds(warm)[0].replace(day=10, hour=5)
    store = store_for(db)
    db.wait_replicas()
    with db.database() as database:
        expected = price_history(database, store, "tok-2", start, end)
        assert expected.from_archive == 0 and expected.rows.num_rows > 100
        for month in (p.add_months(cold, -1), cold):
            Archiver(database, store).archive_month("PriceSnapshot", month)
        db.wait_replicas()
        got = price_history(database, store, "tok-2", start, end)
    assert got.archived_months == [p.add_months(cold, -1), cold]
    assert got.from_archive > 0 and got.from_postgres > 0
    assert got.server == "read"
    assert got.rows.equals(expected.rows)
    assert got.rows.schema.field("priceUsd").type == pa.decimal128(36, 18)
    assert got.rows.column("recordedAt").to_pylist() == sorted(got.rows.column("recordedAt").to_pylist())
    assert all(t == "tok-2" for t in got.rows.column("tokenId").to_pylist())
    assert min(got.rows.column("recordedAt").to_pylist()).replace(tzinfo=None) >= start


def test_history_rejects_an_empty_range(db):
    with db.database() as database, pytest.raises(ValueError, match="must be after"):
        price_history(database, store_for(db), "tok-1", datetime(2025, 2, 1), datetime(2025, 1, 1))


def test_ids_are_archived_as_the_text_postgresql_holds(db):
    """Ids stay text whatever they look like (UUIDs, upper case, anything else): every engine
    reads and joins them as strings, and the restore brings back the same text."""
    month = months_ago(16)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month, step="1 hour")
        conn.execute("""INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt")
                        VALUES ('Not-A-UUID', 'tok-3', 1, 'zz', %s), ('5F0C0000-0000-4000-8000-00000000000A', 'tok-3',
                                2, 'zz', %s)""",
                     (p.month_bounds(month)[1] - timedelta(minutes=1), p.month_bounds(month)[0]))
        conn.commit()
        before = rows_of(conn, "PriceSnapshot")
        ids = sorted(r[0] for r in conn.execute('SELECT id FROM "PriceSnapshot"'))
    store = store_for(db)
    with db.database() as database:
        outcome = Archiver(database, store).archive_month("PriceSnapshot", month)
        store.download(outcome.parts[0].key, f"/tmp/{db.name}.parquet")
        table = pq.read_table(f"/tmp/{db.name}.parquet")
        assert table.schema.field("id").type == pa.string()
        assert sorted(table.column("id").to_pylist()) == ids
        restore_month(database, store, "PriceSnapshot", month)
    with db.connect() as conn:
        assert rows_of(conn, "PriceSnapshot") == before


def test_apply_due_moves_every_due_month_and_the_report_reads_it_back(db):
    """What the demo runs: warm and archive what is due, then print where each month lives."""
    from wedefi_pipelines.tiering.report import apply_due, format_tiers, month_tiers

    cold, warm, hot = months_ago(14), months_ago(2), months_ago(0)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        for month in (cold, warm, hot):
            load_prices(conn, month)
        load_portfolio(conn, cold)
    store = store_for(db)
    with db.database() as database:
        run = apply_due(database, store)
        assert [(o.table, o.action) for o in run.warmed] == [
            ("PriceSnapshot", "converted"), ("PortfolioSnapshot", "skipped"), ("PositionSnapshot", "skipped"),
            ("PriceRollupHourly", "skipped")]  # a tiered table too (issue 16): no month of it here
        assert {(o.group, o.action) for o in run.archived} == {("PriceSnapshot", "archived"),
                                                              ("PortfolioSnapshot", "archived"),
                                                              ("PriceRollupHourly", "skipped")}
        tiers = {(m.table, m.month): m for m in month_tiers(database, store)}
        again = apply_due(database, store)
    assert again.warmed == [] and again.archived == []
    assert tiers[("PriceSnapshot", hot)].tier == "hot"
    assert tiers[("PriceSnapshot", warm)].tier == "warm (rewritten, BRIN, frozen)"
    archived = tiers[("PriceSnapshot", cold)]
    assert archived.tier == "cold (Parquet on S3)" and archived.rows > 0
    assert archived.objects[0][0] == f"s3://{store.bucket}/" + store.object_key("PriceSnapshot", cold, 0)
    assert tiers[("PositionSnapshot", cold)].tier == "cold (Parquet on S3)"
    assert f"{p.month_year(cold)}" in format_tiers(list(tiers.values()))
