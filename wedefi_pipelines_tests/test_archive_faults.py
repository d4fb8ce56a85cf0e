"""Injected failures during a cold archive: every row stays in PostgreSQL or in verified S3
objects (never neither, never both), and a re-run completes the month exactly once."""

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStoreError
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.archive import Archiver, VerificationError
from wedefi_pipelines_tests.iceberg_support import NAMESPACE, catalog_row, month_files, plain_catalog
from wedefi_pipelines_tests.slow_archive_defs import PAUSE_ENV
from wedefi_pipelines_tests.test_tiering_support import (CuttingProxy, assert_nothing_lost, load_prices,
                                                         metadata_rows, month_content, months_ago, object_rows,
                                                         seed_reference, store_for)

REPO = Path(__file__).resolve().parent.parent
# Archives argv[1]'s month argv[2] and kills itself (SIGKILL) right after step argv[3].
RUNNER = ("import os, signal, sys; from datetime import date; from wedefi_pipelines.resources.database import Database; "
          "from wedefi_pipelines.resources.archive import ArchiveStore; "
          "from wedefi_pipelines.tiering.archive import archive_month; "
          "kill = lambda step, parts: os.kill(os.getpid(), signal.SIGKILL) if step == sys.argv[3] else None; "
          "archive_month(Database.from_env(), ArchiveStore.from_env(), sys.argv[1], date.fromisoformat(sys.argv[2]), "
          "on_step=kill)")


@pytest.fixture
def cold_month(db):
    month = months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month)
        original = month_content(conn, "PriceSnapshot", month)
    return month, original


def _archived_once(db, store, month, original, tmp_path) -> None:
    with db.connect() as conn:
        assert not month_ops.relation_exists(conn, p.child_name(p.PRICE_SNAPSHOT, month))
        assert [m[:3] for m in metadata_rows(conn, "PriceSnapshot")] == [(p.month_year(month), original.count, "archived")]
        recorded = [r[0] for r in object_rows(conn, "PriceSnapshot")]
    assert store.list_keys(store.month_prefix("PriceSnapshot", month)) == recorded and len(recorded) == 1
    assert_nothing_lost(db, store, "PriceSnapshot", month, original, tmp_path)
    # registered in the Iceberg table exactly once, whatever crashed before
    files = month_files(plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot")))
    assert files == {month: {store.uri(recorded[0]): original.count}}


def test_s3_unreachable_in_the_middle_of_the_upload(db, cold_month, tmp_path):
    month, original = cold_month
    settings = Settings.model_validate({"archive": {"s3_max_attempts": 2, "s3_connect_timeout_s": 1,
                                                    "s3_read_timeout_s": 2}})
    proxy = CuttingProxy(db.stack.s3.port, cut_after=4000)  # dies a few kB into the object
    flaky = store_for(db, settings, endpoint=proxy.endpoint)
    with db.database(settings) as database, pytest.raises(ArchiveStoreError, match="upload"):
        Archiver(database, flaky).archive_month("PriceSnapshot", month)
    assert proxy.cut.is_set() and proxy.sent > 4000
    store = store_for(db)
    with db.connect() as conn:  # frozen: detached with every row, nothing recorded
        assert not month_ops.is_attached(conn, p.PRICE_SNAPSHOT, month)
        assert metadata_rows(conn, "PriceSnapshot") == []
    assert_nothing_lost(db, store, "PriceSnapshot", month, original, tmp_path)
    with db.database() as database:
        assert Archiver(database, store).archive_month("PriceSnapshot", month).action == "archived"
    _archived_once(db, store, month, original, tmp_path)


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_an_object_damaged_after_its_upload_fails_verification_and_is_redone(db, cold_month, tmp_path, damage):
    month, original = cold_month
    store = store_for(db)

    def damage_it(step, parts):
        if step != "uploaded":
            return
        body = store.client.get_object(Bucket=store.bucket, Key=parts[0].key)["Body"].read()
        if damage == "corrupted":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        else:
            body = body[:len(body) // 2]
        store.client.put_object(Bucket=store.bucket, Key=parts[0].key, Body=body)

    expected = "checksum mismatch" if damage == "corrupted" else "truncated"
    with db.database() as database, pytest.raises(VerificationError, match=expected):
        Archiver(database, store, on_step=damage_it).archive_month("PriceSnapshot", month)
    assert store.list_keys(store.month_prefix("PriceSnapshot", month)) == []  # the bad object is gone
    assert_nothing_lost(db, store, "PriceSnapshot", month, original, tmp_path)
    with db.database() as database:
        assert Archiver(database, store).archive_month("PriceSnapshot", month).action == "archived"
    _archived_once(db, store, month, original, tmp_path)


@pytest.mark.parametrize("step", ["frozen", "exported", "uploaded", "verified", "recorded", "registered"])
def test_a_run_killed_after_any_step_is_completed_by_a_rerun(db, cold_month, tmp_path, step):
    """`uploaded`: the object is on S3, no metadata yet; `recorded`: the metadata rows are
    written but the DROP is not; `registered`: the Iceberg table's new metadata file is
    written and its metadata_location swapped, the DROP not yet (one transaction: the kill
    rolls metadata and swap back, leaving at most an unreferenced metadata file)."""
    month, original = cold_month
    store = store_for(db)
    env = {**os.environ, **db.env, "ARCHIVE_PREFIX": f"t/{db.name}"}
    killed = subprocess.run([sys.executable, "-c", RUNNER, "PriceSnapshot", month.isoformat(), step], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    with db.connect() as conn:
        assert metadata_rows(conn, "PriceSnapshot") == [] and object_rows(conn, "PriceSnapshot") == []
        assert not month_ops.is_attached(conn, p.PRICE_SNAPSHOT, month)  # frozen before the kill
    leftovers = store.list_keys(store.month_prefix("PriceSnapshot", month))
    assert len(leftovers) == (1 if step in ("uploaded", "verified", "recorded", "registered") else 0)
    location, _ = catalog_row(db, "PriceSnapshot")
    if location is not None:  # the table may exist (created before the transaction), with nothing in it
        assert month_files(plain_catalog(db, store).load_table((NAMESPACE, "PriceSnapshot"))) == {}
    assert_nothing_lost(db, store, "PriceSnapshot", month, original, tmp_path)
    with db.database() as database:
        assert Archiver(database, store).archive_month("PriceSnapshot", month).action == "archived"
    _archived_once(db, store, month, original, tmp_path)


def test_two_cli_archive_runs_of_one_month_at_once(db, cold_month, tmp_path):
    """`dagster asset materialize` bypasses the run queue (and each CLI call here even has
    its own throwaway instance, so no pool is shared): the month's advisory lock makes the
    second run wait, then find the month archived."""
    month, original = cold_month
    store = store_for(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER")}
    env.update(db.env)
    env.pop("DAGSTER_PG_URL", None)
    env.update({"ARCHIVE_PREFIX": f"t/{db.name}", PAUSE_ENV: "3"})
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "wedefi_pipelines_tests.slow_archive_defs",
               "--select", "cold_archive", "--partition", p.partition_key(month),
               "--config-json", '{"execution": {"config": {"in_process": {}}}}']  # no step subprocess to start
    runs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    joined = "\n".join(outputs)
    assert "waiting for pid" in joined  # the runs overlapped: one waited for the other's lock
    assert "already archived" in joined
    _archived_once(db, store, month, original, tmp_path)
    with db.connect() as conn:
        assert [m[:3] for m in metadata_rows(conn, "PortfolioSnapshot")] == [(p.month_year(month), 0, "archived")]
