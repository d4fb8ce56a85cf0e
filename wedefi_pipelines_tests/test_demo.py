"""The README's first command: `wedefi-pipelines demo`, end to end, as a newcomer runs it.

It starts its own embedded stack (PostgreSQL 18 primary + replica, moto S3, Redis), so
this test uses none of the session's fixtures. The summary it prints is read back from
PostgreSQL, S3 and Redis after the steps, so asserting on it checks what the steps left
behind, not what they claimed.
"""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_materializes_everything_and_its_summary_shows_every_tier_and_the_cache():
    done = subprocess.run([sys.executable, "-m", "wedefi_pipelines", "demo"], capture_output=True, text=True,
                          timeout=540)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]

    steps = re.findall(r"^\[\s*\d+\] (\w+)", out, flags=re.M)
    for step in ("start", "database_schema", "partition_horizon", "seed_history", "table_partitions",
                 "ingestion", "rollups", "tiering", "redis_cache", "health"):
        assert step in steps, (step, steps)
    assert "positions_have_portfolio_rows FAILED" not in out

    # tiers: the month older than a year is in S3 only, the months between 30 days and a year warm
    cold = re.findall(r"^\s+PriceSnapshot\s+(\d{4}-\d{2})\s+([\d,]+) rows\s+cold \(Parquet on S3\)", out, flags=re.M)
    assert len(cold) == 1 and int(cold[0][1].replace(",", "")) > 0, cold
    assert re.search(rf"s3://wedefi-archive/archive/PriceSnapshot/year={cold[0][0][:4]}/month={cold[0][0][5:]}/"
                     r"part-\d+\.parquet\s+[\d,]+ B", out)
    assert len(re.findall(r"^\s+PriceSnapshot\s+\S+\s+[\d,]+ rows\s+warm", out, flags=re.M)) >= 10

    # the archived month is in its Iceberg table, with the archive's row count
    iceberg = re.search(rf"wedefi\.PriceSnapshot\s+partitioned by month\(recordedAt\): {cold[0][0]} ([\d,]+) rows in 1 file",
                        out)
    assert iceberg and iceberg[1] == cold[0][1], out[-3000:]
    assert re.search(r"s3://wedefi-archive/archive/_iceberg/PriceSnapshot/metadata/\S+\.metadata\.json", out)

    # the cross-tier read joined the archive, read through the Iceberg table, and PostgreSQL
    history = re.search(r"(\d+) rows: (\d+) from S3 \(.*\) through the Iceberg table wedefi\.PriceSnapshot "
                        r"snapshot \d+, 1 file\(s\), (\d+) from PostgreSQL", out)
    assert history and int(history[2]) > 0 and int(history[3]) > 0, out[-3000:]
    assert int(history[1]) == int(history[2]) + int(history[3])

    # rollups: rows in every table, and a year's daily chart served from them, archived month included
    rollups = re.search(r"rollups: PriceRollupHourly ([\d,]+) rows, PriceRollupDaily ([\d,]+) rows, "
                        r"PortfolioRollupDaily ([\d,]+) rows", out)
    assert rollups and all(int(n.replace(",", "")) > 0 for n in rollups.groups()), out[-3000:]
    chart = re.search(r"daily chart of \S+ over \S+ from PriceRollupDaily alone: (\d+) days \((\d+) in archived", out)
    assert chart and int(chart[1]) >= 360 and int(chart[2]) > 0, out[-3000:]

    # a portfolio key per wallet of the demo's market (200), within its 300 s TTL
    keys = re.search(r"cache keys by family: price (\d+), portfolio (\d+), governance (\d+)", out)
    assert keys and (int(keys[1]), int(keys[2]), int(keys[3])) == (10, 200, 200), out[-2000:]
    ttl = re.search(r"portfolio:\S+ \(TTL (\d+) s\)", out)
    assert ttl and 0 < int(ttl[1]) <= 300
    assert "open alerts:" in out and re.search(r"demo finished in \d+s", out)
