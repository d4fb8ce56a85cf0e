"""The tiering Dagster definitions on the real stack: assets per partition (due or not),
the restore job, the daily schedule's run requests, and configuration errors."""

from datetime import timedelta

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.defs.tiering.assets import cold_archive, warm_tier
from wedefi_pipelines.defs.tiering.jobs import restore_archived_month
from wedefi_pipelines.defs.tiering.schedules import tiering_daily
from wedefi_pipelines.resources.archive import ArchiveStoreResource
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines_tests.test_tiering_support import (load_prices, metadata_rows, months_ago, now_utc, rows_of,
                                                         seed_reference, store_for)


def _resources(db) -> dict:
    return {"database": DatabaseResource(), "archive": ArchiveStoreResource(prefix=f"t/{db.name}")}


@pytest.fixture
def history(db_env):
    """Prices for a cold, a warm and a hot month."""
    months = {"cold": months_ago(14), "warm": months_ago(3), "hot": months_ago(0)}
    with psycopg.connect(db_env.url) as conn:
        seed_reference(conn)
        for month in months.values():
            load_prices(conn, month)
    return months


def _meta(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


def test_a_month_range_of_both_assets_materializes_skipping_what_is_not_due(db_env, history):
    """What a UI backfill over a wide range does: one run per month, each green."""
    outcomes = {}
    for label, month in history.items():
        result = dg.materialize([warm_tier, cold_archive], partition_key=p.partition_key(month),
                                resources=_resources(db_env))
        assert result.success
        outcomes[label] = (_meta(result, "warm_tier")["PriceSnapshot"], _meta(result, "cold_archive")["PriceSnapshot"])
    assert outcomes["cold"][1]["action"] == "archived" and outcomes["cold"][0]["action"] == "skipped"
    assert outcomes["warm"][0]["action"] == "converted" and outcomes["warm"][1]["reason"].startswith("not cold yet")
    assert outcomes["hot"][0]["reason"].startswith("not warm yet") and outcomes["hot"][1]["action"] == "skipped"
    assert outcomes["cold"][1]["objects"][0].startswith(f"s3://wedefi-archive/t/{db_env.name}/PriceSnapshot/")
    with db_env.connect() as conn:
        assert [m[0] for m in metadata_rows(conn, "PriceSnapshot")] == [p.month_year(history["cold"])]
        assert month_ops.attached_months(conn, p.PRICE_SNAPSHOT) == [history["warm"], history["hot"]]
    checks = dg.materialize([cold_archive], partition_key=p.partition_key(history["cold"]), resources=_resources(db_env))
    evaluations = {c.check_name: c.passed for c in checks.get_asset_check_evaluations()}
    assert evaluations == {"archive_metadata_consistent": True, "archived_months_have_no_late_rows": True,
                           "iceberg_tables_match_archive": True}


def test_the_checks_turn_red_for_a_missing_object_and_late_rows_while_the_run_stays_green(db_env, history):
    resources = _resources(db_env)
    dg.materialize([cold_archive], partition_key=p.partition_key(history["cold"]), resources=resources)
    store = store_for(db_env)
    store.delete(store.list_keys(store.month_prefix("PriceSnapshot", history["cold"])))
    with psycopg.connect(db_env.url) as conn:  # the month's child is gone: this row waits in the default
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        VALUES ('tok-1', 1, 'late', %s)""", (p.month_bounds(history["cold"])[0],))
    # any month's run evaluates the checks over the whole archive; the hot month itself is skipped
    result = dg.materialize([cold_archive], partition_key=p.partition_key(history["hot"]), resources=resources)
    assert result.success
    evaluations = {c.check_name: c for c in result.get_asset_check_evaluations()}
    consistent, late = evaluations["archive_metadata_consistent"], evaluations["archived_months_have_no_late_rows"]
    assert not consistent.passed and "missing on S3" in str(consistent.metadata["problems"].value)
    assert not late.passed and late.severity == dg.AssetCheckSeverity.WARN
    assert late.metadata["late_rows"].value == {f"PriceSnapshot {p.month_year(history['cold'])}": 1}


def test_the_restore_job_brings_an_archived_month_back(db_env, history):
    month = history["cold"]
    with db_env.connect() as conn:
        before = rows_of(conn, "PriceSnapshot", month)
    dg.materialize([cold_archive], partition_key=p.partition_key(month), resources=_resources(db_env))
    result = restore_archived_month.execute_in_process(
        run_config={"ops": {"restore_month_from_archive": {"config": {"table": "PriceSnapshot",
                                                                      "month": p.month_year(month)}}}},
        resources=_resources(db_env))
    assert result.success
    assert result.output_for_node("restore_month_from_archive")["rows"] == {"PriceSnapshot": len(before)}
    with db_env.connect() as conn:
        assert rows_of(conn, "PriceSnapshot", month) == before
        assert [m[2] for m in metadata_rows(conn, "PriceSnapshot")] == ["restored"]


@pytest.mark.parametrize("config, message", [
    ({"table": "Prices", "month": "2025-01"}, "table must be one of"),
    ({"table": "PriceSnapshot", "month": "2025-13"}, "not a month"),
    ({"table": "PriceSnapshot", "month": "Jan 2025"}, "month must look like 2025-01"),
])
def test_the_restore_job_rejects_bad_config_before_doing_anything(config, message):
    with pytest.raises(Exception, match=message):
        restore_archived_month.execute_in_process(
            run_config={"ops": {"restore_month_from_archive": {"config": config}}},
            resources={"database": DatabaseResource(primary_url="postgresql://nobody@127.0.0.1:1/none"),
                       "archive": ArchiveStoreResource(bucket="b", prefix="p")})


def test_a_missing_archive_bucket_fails_the_run_naming_it(db_env, history, monkeypatch):
    monkeypatch.delenv("ARCHIVE_BUCKET")
    result = dg.materialize([cold_archive], partition_key=p.partition_key(history["cold"]),
                            resources={"database": DatabaseResource(), "archive": ArchiveStoreResource()},
                            raise_on_error=False)
    assert not result.success
    assert "ARCHIVE_BUCKET is not set" in str(result.get_step_failure_events()[0].event_specific_data.error)
    with db_env.connect() as conn:
        assert month_ops.is_attached(conn, p.PRICE_SNAPSHOT, history["cold"])


def _evaluate_schedule(when):
    with dg.build_schedule_context(scheduled_execution_time=when, resources={"database": DatabaseResource()}) as context:
        return tiering_daily(context)


def test_the_daily_schedule_requests_exactly_the_due_months_keyed_by_day(db_env, history):
    now = now_utc()
    requests = _evaluate_schedule(now)
    by_asset = {(r.asset_selection[0].to_user_string(), r.partition_key): r.run_key for r in requests}
    day = now.strftime("%Y-%m-%d")
    assert by_asset == {
        ("warm_tier", p.partition_key(history["warm"])): f"warm_tier:{p.partition_key(history['warm'])}:{day}",
        ("cold_archive", p.partition_key(history["cold"])): f"cold_archive:{p.partition_key(history['cold'])}:{day}",
    }
    tomorrow = _evaluate_schedule(now + timedelta(days=1))
    assert {r.run_key for r in tomorrow}.isdisjoint(by_asset.values())  # a month that failed is asked again
    dg.materialize([warm_tier, cold_archive], partition_key=p.partition_key(history["warm"]), resources=_resources(db_env))
    dg.materialize([cold_archive], partition_key=p.partition_key(history["cold"]), resources=_resources(db_env))
    assert isinstance(_evaluate_schedule(now), dg.SkipReason)
