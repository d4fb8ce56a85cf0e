"""The CI materialization contract: `dagster asset materialize` exits non-zero on any failure.

Runs the real CLI as CI would, from the repository root with no Dagster environment (the
throwaway instance of wedefi_pipelines/instance.py), on the test-only definitions in
wedefi_pipelines_tests/cli_defs.py; their assets leave marker files, so each test can
see what ran. The same command against the PostgreSQL instance is in test_instance.py.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from wedefi_pipelines_tests.cli_defs import MARKER_DIR_ENV

REPO = Path(__file__).resolve().parent.parent
DAGSTER_VARS = ("DAGSTER_HOME", "DAGSTER_PG_URL", "WEDEFI_THROWAWAY_DAGSTER_DIR")


CASES = {
    "ok": ["--select", "cli_ok"],
    "broken": ["--select", "cli_broken,cli_ok"],
    "guarded": ["--select", "cli_guarded,cli_after_guard"],
    "partition": ["--select", "cli_daily", "--partition", "2025-01-15"],
    "partition-range": ["--select", "cli_daily", "--partition-range", "2025-01-30...2025-02-02"],
}


@dataclass
class Outcome:
    returncode: int
    stderr: str
    ran: set[str]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every case's CLI run, two at a time (each spends seconds loading Dagster; they are independent)."""
    env = {k: v for k, v in os.environ.items() if k not in DAGSTER_VARS}

    def run(case: str) -> Outcome:
        marker_dir = tmp_path_factory.mktemp(case)
        result = subprocess.run(
            [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "wedefi_pipelines_tests.cli_defs",
             *CASES[case]],
            cwd=REPO, env={**env, MARKER_DIR_ENV: str(marker_dir)}, capture_output=True, text=True, timeout=600,
        )
        return Outcome(result.returncode, result.stderr, {p.name for p in marker_dir.iterdir()})

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


def test_exits_zero_when_every_asset_succeeds_and_cleans_its_throwaway_instance(outcomes):
    ok = outcomes["ok"]
    assert ok.returncode == 0, ok.stderr
    assert ok.ran == {"cli_ok"}
    throwaway = re.search(r"throwaway SQLite Dagster instance in (\S+)", ok.stderr)
    assert throwaway, ok.stderr
    assert not Path(throwaway.group(1)).exists()


def test_exits_non_zero_when_an_asset_fails(outcomes):
    broken = outcomes["broken"]
    assert broken.returncode != 0
    assert "cli_broken: the source answered 503" in broken.stderr
    assert "Materialization failed" in broken.stderr
    assert broken.ran == {"cli_broken", "cli_ok"}  # the independent asset still ran


def test_exits_non_zero_when_a_blocking_error_check_fails(outcomes):
    guarded = outcomes["guarded"]
    assert guarded.returncode != 0
    assert "blocking asset check failed with ERROR severity" in guarded.stderr
    # The asset itself succeeded: the run failed because of its check, and the
    # downstream asset never ran on the data the check rejected.
    assert guarded.ran == {"cli_guarded", "rows_are_valid"}


@pytest.mark.parametrize(
    ("case", "days"),
    [
        ("partition", ["2025-01-15"]),
        ("partition-range", ["2025-01-30", "2025-01-31", "2025-02-01", "2025-02-02"]),
    ],
)
def test_partition_and_partition_range_materialize_exactly_those_days(outcomes, case, days):
    assert outcomes[case].returncode == 0, outcomes[case].stderr
    assert outcomes[case].ran == {f"cli_daily_{day}" for day in days}
