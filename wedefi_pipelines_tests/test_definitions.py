"""`defs` loads anywhere; a run that needs a missing variable fails at its start, naming it."""

import os
import subprocess
import sys

import dagster as dg
import pytest

from wedefi_pipelines.definitions import defs
from wedefi_pipelines.defs.schema import database_schema
from wedefi_pipelines.resources.database import DatabaseResource

CONTRACT_VARS = ("DATABASE_URL_PRIMARY", "DATABASE_URL_READ", "DATABASE_URL_ANALYTICS", "REDIS_URL",
                 "ARCHIVE_BUCKET", "ARCHIVE_PREFIX", "AWS_ENDPOINT_URL_S3", "DAGSTER_PG_URL", "WEDEFI_SETTINGS")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CONTRACT_VARS}


def test_defs_load_and_resolve():
    repo = defs.get_repository_def()
    assert repo.get_all_jobs()
    assert dg.AssetKey("database_schema") in {a.key for a in defs.resolve_all_asset_specs()}


def test_dagster_definitions_validate_passes_with_no_environment():
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "wedefi_pipelines.definitions"],
        env=_clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_bad_settings_fail_at_load_time_naming_the_key(tmp_path):
    bad = tmp_path / "wedefi.yaml"
    bad.write_text("partitions:\n  horizon_months: 0\n")
    result = subprocess.run(
        [sys.executable, "-c", "import wedefi_pipelines.definitions"],
        env={**_clean_env(), "WEDEFI_SETTINGS": str(bad)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "partitions.horizon_months" in result.stderr


def test_a_run_without_the_primary_fails_at_its_start_naming_it(monkeypatch):
    monkeypatch.delenv("DATABASE_URL_PRIMARY", raising=False)
    result = dg.materialize([database_schema], resources={"database": DatabaseResource()}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "DATABASE_URL_PRIMARY is not set" in str(failure.event_specific_data.error)


def test_database_schema_asset_migrates_the_primary(db_env):
    result = dg.materialize([database_schema], resources={"database": DatabaseResource()})
    assert result.success
    metadata = result.asset_materializations_for_node("database_schema")[0].metadata
    assert metadata["applied"].value == []  # the template was already migrated
    assert metadata["already_applied"].value == 3 or metadata["already_applied"].value >= 3
