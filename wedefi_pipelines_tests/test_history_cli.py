"""`wedefi-pipelines history`: a token's prices across an archived month, as CSV."""

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.history import price_history
from wedefi_pipelines_tests.test_tiering_support import load_prices, months_ago, seed_reference, store_for

REPO = Path(__file__).resolve().parent.parent


def _history(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wedefi_pipelines.cli", "history", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_history_prints_a_range_spanning_an_archived_month(db):
    cold, before_cold = months_ago(13), months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, before_cold)
        load_prices(conn, cold)
    store = store_for(db)
    with db.database() as database:
        Archiver(database, store).archive_month("PriceSnapshot", before_cold)
        db.wait_replicas()
        start, end = p.month_bounds(before_cold)[0].replace(day=25), p.month_bounds(cold)[0].replace(day=3)
        expected = price_history(database, store, "tok-3", start, end)
    env = {**os.environ, **db.env, "ARCHIVE_PREFIX": f"t/{db.name}"}
    result = _history(env, "--token", "tok-3", "--start", start.isoformat(), "--end", end.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "recordedAt,priceUsd,source,id"
    assert len(lines) - 1 == expected.rows.num_rows > 0
    assert lines[1].startswith(f"{start:%Y-%m-%dT%H:%M:%S}.000Z,")
    assert f"from the S3 archive (archived months: {p.month_year(before_cold)})" in result.stderr
    assert f"{expected.from_archive} from the S3 archive" in result.stderr and expected.from_archive > 0


def test_history_names_what_is_missing(db):
    env = {k: v for k, v in os.environ.items() if k not in ("ARCHIVE_BUCKET", "DATABASE_URL_PRIMARY")}
    env.update({k: v for k, v in db.env.items() if k != "ARCHIVE_BUCKET"})
    env["ARCHIVE_PREFIX"] = "x"
    result = _history(env, "--token", "tok-1", "--start", "2025-01-01", "--end", "2025-02-01")
    assert result.returncode == 2 and "ARCHIVE_BUCKET is not set" in result.stderr
    bad = _history(env, "--token", "tok-1", "--start", "January", "--end", "2025-02-01")
    assert bad.returncode == 2 and "not a date or time: 'January'" in bad.stderr
