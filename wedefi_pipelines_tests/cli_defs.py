"""Test-only definitions for the CI materialization contract (`dagster asset materialize`).

Loaded by the CLI with `-m wedefi_pipelines_tests.cli_defs`. Each asset that runs writes
a marker file named after itself (and its partitions) into $WEDEFI_CLI_TEST_DIR, so a
test can tell what ran in the CLI's own processes: an asset, one that fails, one guarded
by a blocking ERROR check that fails (its downstream must not run), and a daily asset
with a single-run backfill policy for `--partition-range`.
"""

import os
from pathlib import Path

import dagster as dg

MARKER_DIR_ENV = "WEDEFI_CLI_TEST_DIR"


def _mark(name: str) -> None:
    Path(os.environ[MARKER_DIR_ENV], name).write_text("ran\n")


@dg.asset
def cli_ok() -> dg.MaterializeResult:
    _mark("cli_ok")
    return dg.MaterializeResult(metadata={"rows": 1})


@dg.asset
def cli_broken() -> None:
    _mark("cli_broken")
    raise RuntimeError("cli_broken: the source answered 503")


@dg.asset
def cli_guarded() -> None:
    _mark("cli_guarded")


@dg.asset_check(asset=cli_guarded, blocking=True)
def rows_are_valid() -> dg.AssetCheckResult:
    _mark("rows_are_valid")
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata={"invalid_rows": 3})


@dg.asset(deps=[cli_guarded])
def cli_after_guard() -> None:
    _mark("cli_after_guard")


@dg.asset(
    partitions_def=dg.DailyPartitionsDefinition(start_date="2025-01-01", end_date="2025-03-01"),
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def cli_daily(context: dg.AssetExecutionContext) -> None:
    for key in context.partition_keys:
        _mark(f"cli_daily_{key}")


defs = dg.Definitions(
    assets=[cli_ok, cli_broken, cli_guarded, cli_after_guard, cli_daily], asset_checks=[rows_are_valid]
)
