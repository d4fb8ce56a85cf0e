"""Rollups (issue 16) against the real stack: equal to aggregates computed here in Python
over the same raw rows (ties included), kept current through writes that are not the
pipeline's, respected by the archive, computed from the archive for months archived
before them, and read by the history CLI and asset_correlations."""

import os
import subprocess
import sys
from collections import defaultdict
from datetime import date, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.definitions import defs
from wedefi_pipelines.ingest.correlations import compute_correlations
from wedefi_pipelines.rollups.gate import archive_blocker
from wedefi_pipelines.rollups.reads import price_chart
from wedefi_pipelines.rollups.refresh import month_days, refresh, stale_days
from wedefi_pipelines.rollups.tables import PORTFOLIO, PRICE
from wedefi_pipelines.rollups.verify import verify_sample
from wedefi_pipelines.tiering.archive import Archiver
from wedefi_pipelines.tiering.restore import restore_month
from wedefi_pipelines.tiering.warm import warm_month
from wedefi_pipelines_tests.test_tiering_support import (TOKENS, load_portfolio, load_prices, months_ago,
                                                         seed_reference, store_for)

REPO = Path(__file__).resolve().parent.parent
PRICE_COLUMNS = '"openUsd", "highUsd", "lowUsd", "closeUsd", "sumUsd", "sampleCount", "firstAt", "lastAt"'


# -- the independent computation ------------------------------------------------------------------

def expected_prices(rows, width: timedelta) -> dict:
    """{(token, bucket): (open, high, low, close, sum, count, first, last)} of (token, price, source, at) rows."""
    buckets = defaultdict(list)
    for token, price, source, at in rows:
        start = datetime(at.year, at.month, at.day) if width == timedelta(days=1) else at.replace(
            minute=0, second=0, microsecond=0)
        buckets[(token, start)].append((at, source, price))
    result = {}
    for key, items in buckets.items():
        first_at, last_at = min(i[0] for i in items), max(i[0] for i in items)
        opening = sorted((i for i in items if i[0] == first_at), key=lambda i: i[1])[-1][2]
        closing = sorted((i for i in items if i[0] == last_at), key=lambda i: i[1])[-1][2]
        prices = [i[2] for i in items]
        with localcontext() as exact:
            exact.prec = 80  # numeric(38, 18) sums exactly
            total = sum(prices, Decimal(0))
        result[key] = (opening, max(prices), min(prices), closing, total, len(items), first_at, last_at)
    return result


def raw_prices(conn, month: date) -> list[tuple]:
    start, end = p.month_bounds(month)
    return conn.execute('SELECT "tokenId", "priceUsd", source, "recordedAt" FROM "PriceSnapshot" '
                        'WHERE "recordedAt" >= %s AND "recordedAt" < %s', (start, end)).fetchall()


def stored(conn, table: str, month: date) -> dict:
    start, end = p.month_bounds(month)
    rows = conn.execute(f'SELECT "tokenId", "bucketStart", {PRICE_COLUMNS} FROM "{table}" '
                        'WHERE "bucketStart" >= %s AND "bucketStart" < %s', (start, end)).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def add_ties(conn, month: date) -> None:
    """Rows sharing an existing row's time with another source: the greatest source wins
    both open (earliest time) and close (latest time)."""
    start = p.month_bounds(month)[0]
    conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt") VALUES
                    ('tok-1', 7.5, 'zzz', %(s)s), ('tok-1', 8.5, '0aa', %(s)s),
                    ('tok-2', 9.5, 'zzz', %(l)s), ('tok-2', 1.5, '0aa', %(l)s)""",
                 {"s": start, "l": start + timedelta(hours=18)})


# -- tests --------------------------------------------------------------------------------------

def test_price_rollups_equal_python_aggregates_with_ties(db):
    month = months_ago(2)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month, step="20 minutes")
        add_ties(conn, month)
        conn.commit()
    with db.database() as database:
        result = refresh(database, PRICE, days=month_days(month))
        again = refresh(database, PRICE, days=month_days(month))
    assert len(result.refreshed) == len(month_days(month)) and result.rows_written["PriceRollupHourly"] > 0
    assert again.rows_written == {"PriceRollupHourly": 0, "PriceRollupDaily": 0}  # unchanged: nothing rewritten
    with psycopg.connect(db.url) as conn:
        raw = raw_prices(conn, month)
        assert stored(conn, "PriceRollupHourly", month) == expected_prices(raw, timedelta(hours=1))
        assert stored(conn, "PriceRollupDaily", month) == expected_prices(raw, timedelta(days=1))
        tie = stored(conn, "PriceRollupHourly", month)[("tok-1", p.month_bounds(month)[0])]
        assert tie[0] == Decimal("7.5")  # open: the earliest time's greatest source
        assert conn.execute("""SELECT "childName" FROM (SELECT c.relname AS "childName" FROM pg_inherits i
                               JOIN pg_class c ON c.oid = i.inhrelid
                               WHERE i.inhparent = '"PriceRollupDaily"'::regclass) x""").fetchall() == [
            (p.child_name("PriceRollupDaily", month),)]


def test_writes_that_are_not_ours_are_caught_by_the_watermark(db):
    month = p.month_of(datetime.utcnow())
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        conn.execute(f"""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                         SELECT 'tok-1', 10 + g, 'synthetic', %s::timestamp + g * interval '1 hour'
                           FROM generate_series(0, 23) g""", (p.month_bounds(month)[0],))
        conn.commit()
    first_day = p.month_bounds(month)[0].date()
    with db.database() as database:
        refresh(database, PRICE, days=[first_day])
        with psycopg.connect(db.url, autocommit=True) as conn:
            assert stale_days(conn, PRICE, first_day) == []
            # the app's own insert (a late row of an old day), and a row for a month with no child:
            # the default partition, years back
            conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                            VALUES ('tok-1', 99, 'app', %s), ('tok-2', 5, 'app', '2019-06-03 10:00')""",
                         (p.month_bounds(month)[0] + timedelta(hours=5, minutes=30),))
            assert stale_days(conn, PRICE, first_day) == [date(2019, 6, 3), first_day]
            blocker = archive_blocker(conn, "PriceSnapshot", month)
            assert blocker and blocker.startswith(f"rollups behind: 1 day(s) of {p.month_year(month)}")
        result = refresh(database, PRICE, sweep_since=first_day)
        assert sorted(result.refreshed) == [date(2019, 6, 3), first_day]
        with psycopg.connect(db.url, autocommit=True) as conn:
            assert stale_days(conn, PRICE, first_day) == []
            assert archive_blocker(conn, "PriceSnapshot", month) is None
            hour = conn.execute("""SELECT "highUsd", "sampleCount" FROM "PriceRollupHourly" WHERE "tokenId" = 'tok-1'
                                   AND "bucketStart" = %s""", (p.month_bounds(month)[0] + timedelta(hours=5),)).fetchone()
            assert hour == (Decimal(99), 2)
            assert conn.execute("""SELECT "closeUsd" FROM "PriceRollupDaily" WHERE "tokenId" = 'tok-2'""").fetchone() == (
                Decimal(5),)
            # deleting raw rows never shrinks the rollups
            conn.execute("""DELETE FROM "PriceSnapshot" WHERE "tokenId" = 'tok-1' AND "recordedAt" < %s""",
                         (p.month_bounds(month)[0] + timedelta(hours=3),))
        kept = refresh(database, PRICE, days=[first_day])
        assert kept.refreshed == [] and "kept as they are" in kept.notes[0]


def test_portfolio_rollups_include_the_all_wallets_row(db):
    month = months_ago(1)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_portfolio(conn, month, every="6 hours")
    with db.database() as database:
        refresh(database, PORTFOLIO, days=month_days(month))
    with psycopg.connect(db.url) as conn:
        start, end = p.month_bounds(month)
        raw = conn.execute("""SELECT "walletId", "totalUsdValue", id, "capturedAt" FROM "PortfolioSnapshot"
                              WHERE "capturedAt" >= %s AND "capturedAt" < %s""", (start, end)).fetchall()
        expected = {}
        for (wallet, day), items in _by_day(raw).items():
            first, last = min(i[2] for i in items), max(i[2] for i in items)
            values = [i[0] for i in items]
            expected[(wallet, day)] = (max((i for i in items if i[2] == first), key=lambda i: i[1])[0],
                                       max((i for i in items if i[2] == last), key=lambda i: i[1])[0],
                                       min(values), max(values), len(items), first, last)
        got = {(r[0], r[1]): tuple(r[2:]) for r in conn.execute(
            """SELECT "walletId", "bucketStart", "openUsd", "closeUsd", "minUsd", "maxUsd", "sampleCount", "firstAt",
                      "lastAt" FROM "PortfolioRollupDaily" """)}
        assert got == expected and any(w is None for w, _ in got)


def _by_day(rows):
    days = defaultdict(list)
    for wallet, value, row_id, at in rows:
        days[(wallet, datetime(at.year, at.month, at.day))].append((value, row_id, at))
    return days


def test_archive_waits_for_rollups_and_a_year_chart_is_unchanged_by_archive_and_restore(db):
    cold = months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, cold, step="1 hour")
        load_prices(conn, months_ago(2), step="1 hour")
    store = store_for(db)
    start, end = p.month_bounds(cold)[0], datetime.utcnow()
    with db.database() as database:
        refresh(database, PRICE, days=month_days(months_ago(2)))  # rollups in use; the cold month never folded
        skipped = Archiver(database, store).archive_month("PriceSnapshot", cold)
        assert skipped.action == "skipped" and skipped.reason.startswith(f"rollups behind: {len(month_days(cold))} day(s)")
        refresh(database, PRICE, days=month_days(cold))
        db.wait_replicas()
        before = price_chart(database, "tok-2", start, end, "1d").rows
        archived = Archiver(database, store).archive_month("PriceSnapshot", cold)
        assert archived.action == "archived"
        db.wait_replicas()
        after = price_chart(database, "tok-2", start, end, "1d").rows
        assert after == before and len(before) == len(month_days(cold)) + len(month_days(months_ago(2)))
        assert refresh(database, PRICE, sweep_since=start.date()).refreshed == []  # archived: nothing stale
        restore_month(database, store, "PriceSnapshot", cold)
        assert refresh(database, PRICE, sweep_since=start.date()).refreshed == []  # restored rows: not new
        db.wait_replicas()
        assert price_chart(database, "tok-2", start, end, "1d").rows == before


def test_months_archived_before_rollups_get_theirs_from_the_archive(db):
    cold = months_ago(14)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, cold, step="2 hours")
        raw = raw_prices(conn, cold)
    store = store_for(db)
    with db.database() as database:
        assert Archiver(database, store).archive_month("PriceSnapshot", cold).action == "archived"  # rollups not in use
        with psycopg.connect(db.url, autocommit=True) as conn:  # a late row waits in the default partition
            conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                            VALUES ('tok-1', 3.25, 'late', %s)""", (p.month_bounds(cold)[0] + timedelta(days=3),))
        result = refresh(database, PRICE, sweep_since=date.today(), store=store)
    assert sorted(result.from_archive) == month_days(cold)
    raw.append(("tok-1", Decimal("3.25"), "late", p.month_bounds(cold)[0] + timedelta(days=3)))
    with psycopg.connect(db.url) as conn:
        assert stored(conn, "PriceRollupDaily", cold) == expected_prices(raw, timedelta(days=1))
        assert stored(conn, "PriceRollupHourly", cold) == expected_prices(raw, timedelta(hours=1))
    with db.database() as database:
        assert refresh(database, PRICE, sweep_since=date.today(), store=store).refreshed == []


def test_history_resolution_reads_the_rollups(db):
    month = months_ago(2)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month, step="6 hours")
    with db.database() as database:
        refresh(database, PRICE, days=month_days(month))
        db.wait_replicas()
        start, end = p.month_bounds(month)
        chart = price_chart(database, "tok-1", start, end, "1d")
    env = {**os.environ, **db.env}
    out = subprocess.run([sys.executable, "-m", "wedefi_pipelines.cli", "history", "--token", "tok-1", "--start",
                          start.isoformat(), "--end", end.isoformat(), "--resolution", "1d"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "bucketStart,openUsd,highUsd,lowUsd,closeUsd,averageUsd,sampleCount"
    assert len(lines) - 1 == len(chart.rows) == len(month_days(month))
    assert lines[1].startswith(f"{start:%Y-%m-%d}T00:00:00Z,") and lines[1].endswith(",4")


@pytest.mark.parametrize("minutes", [60, 1440])
def test_correlations_from_the_rollups_equal_the_raw_path(db, minutes):
    as_of = datetime.combine(date.today(), datetime.min.time()) - timedelta(days=1)
    with psycopg.connect(db.url, autocommit=True) as conn:
        seed_reference(conn)
        from wedefi_pipelines import provisioning
        provisioning.provision_months(conn, p.months_between(as_of - timedelta(days=40), as_of))
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        SELECT t, round((100 + 40 * sin(g / (3.0 + i)) + i)::numeric, 6), 'synthetic',
                               %s::timestamp - g * interval '20 minutes'
                          FROM generate_series(0, 30 * 72) g, unnest(%s::text[]) WITH ORDINALITY AS u(t, i)""",
                     (as_of, list(TOKENS)))
    with db.database() as database:
        with psycopg.connect(db.url) as conn:
            raw = compute_correlations(conn, as_of, 3, ["7d", "30d"], timedelta(minutes=minutes))
        first = (as_of - timedelta(days=31)).date()
        refresh(database, PRICE, days=[first + timedelta(days=i) for i in range(32)])
        with psycopg.connect(db.url) as conn:
            # changed raw prices, not refreshed: the rollup path does not see them
            conn.execute('UPDATE "PriceSnapshot" SET "priceUsd" = "priceUsd" * 2 WHERE "tokenId" = %s', (TOKENS[0],))
            rolled = compute_correlations(conn, as_of, 3, ["7d", "30d"], timedelta(minutes=minutes))
    assert rolled == raw and len(raw[1]["30d"]) == 3


def test_price_rollups_asset_and_its_check(db_env, monkeypatch):
    monkeypatch.delenv("ARCHIVE_BUCKET")  # no S3 configured: only an archived month would need it
    day = date.today() - timedelta(days=1)
    with psycopg.connect(db_env.url, autocommit=True) as conn:
        seed_reference(conn)
        from wedefi_pipelines import provisioning
        provisioning.provision_months(conn, [p.month_of(day)])
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        SELECT 'tok-1', 10 + g, 'synthetic', %s::timestamp + g * interval '15 minutes'
                          FROM generate_series(0, 95) g""", (datetime(day.year, day.month, day.day),))
    job = defs.get_job_def("price_rollups_job")
    result = job.execute_in_process(partition_key=day.isoformat(), instance=dg.DagsterInstance.ephemeral())
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["checked"].value == 25  # 24 hours and the day
    with psycopg.connect(db_env.url, autocommit=True) as conn:
        conn.execute("""UPDATE "PriceRollupHourly" SET "highUsd" = "highUsd" + 1 WHERE "bucketStart" = %s""",
                     (datetime(day.year, day.month, day.day, 3),))
        verdict = verify_sample(conn, PRICE, 50, datetime(day.year, day.month, day.day))
    assert verdict.checked == 25 and [m["bucketStart"] for m in verdict.mismatches] == [f"{day}T03:00:00"]


def test_the_hourly_rollup_tiers_warm_then_cold_and_its_chart_reads_the_archive(db):
    old, warm = months_ago(26), months_ago(3)  # past tiers.PriceRollupHourly's cold age (730 days); warm
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, old, step="2 hours")
        load_prices(conn, warm, step="2 hours")
    store = store_for(db)
    with db.database() as database:
        refresh(database, PRICE, days=month_days(old) + month_days(warm))
        db.wait_replicas()
        span = (p.month_bounds(old)[0], p.month_bounds(warm)[1])
        hourly, daily = (price_chart(database, "tok-1", *span, r).rows for r in ("1h", "1d"))
        assert len(hourly) == (len(month_days(old)) + len(month_days(warm))) * 12

        assert warm_month(database, "PriceRollupHourly", warm).action == "converted"
        assert Archiver(database, store).archive_month("PriceSnapshot", old).action == "archived"
        cold = Archiver(database, store).archive_month("PriceRollupHourly", old)
        assert cold.action == "archived" and cold.parts[0].rows == 3 * 12 * len(month_days(old))
        db.wait_replicas()
        with pytest.raises(ValueError, match=f"PriceRollupHourly months {p.month_year(old)} are archived"):
            price_chart(database, "tok-1", *span, "1h")
        chart = price_chart(database, "tok-1", *span, "1h", store)
        assert chart.rows == hourly and chart.archived_months == [old]
        assert price_chart(database, "tok-1", *span, "1d").rows == daily  # the daily rollup stays hot

        with psycopg.connect(db.url, autocommit=True) as conn:  # a late raw row of the month: its hours are cold
            conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                            VALUES ('tok-1', 2.5, 'late', %s)""", (p.month_bounds(old)[0] + timedelta(hours=1),))
        held = refresh(database, PRICE, sweep_since=date.today(), store=store)
        assert held.refreshed == [] and "price rollups archived, not refreshed" in held.notes[0]
        restore_month(database, store, "PriceRollupHourly", old)
        assert refresh(database, PRICE, sweep_since=date.today(), store=store).from_archive  # raw: from its archive
        db.wait_replicas()
        late_hour = price_chart(database, "tok-1", *span, "1h").rows[1]  # the late row's own hour, new
        assert late_hour[0] == p.month_bounds(old)[0] + timedelta(hours=1) and late_hour[4] == Decimal("2.5")


KILLED_REFRESH = """
import os, signal, sys
from datetime import date
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.rollups import statements
from wedefi_pipelines.rollups.refresh import month_days, refresh
from wedefi_pipelines.rollups.tables import PRICE

def die(*args, **kwargs):  # after the hourly upsert ran, inside the open transaction
    os.kill(os.getpid(), signal.SIGKILL)

statements.price_daily = die
with Database.from_env() as db:
    refresh(db, PRICE, days=month_days(date.fromisoformat(sys.argv[1])))
"""


def test_a_refresh_killed_mid_transaction_leaves_nothing_and_reruns_to_the_same_rollups(db):
    month = months_ago(2)
    with psycopg.connect(db.url) as conn:
        seed_reference(conn)
        load_prices(conn, month, step="3 hours")
    killed = subprocess.run([sys.executable, "-c", KILLED_REFRESH, month.isoformat()], env={**os.environ, **db.env},
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    with psycopg.connect(db.url) as conn:
        assert conn.execute('SELECT count(*) FROM "PriceRollupHourly"').fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM wedefi_rollup_watermark").fetchone()[0] == 0
    with db.database() as database:
        assert len(refresh(database, PRICE, days=month_days(month)).refreshed) == len(month_days(month))
    with psycopg.connect(db.url) as conn:
        raw = raw_prices(conn, month)
        assert stored(conn, "PriceRollupHourly", month) == expected_prices(raw, timedelta(hours=1))
        assert stored(conn, "PriceRollupDaily", month) == expected_prices(raw, timedelta(days=1))


def test_history_older_than_the_sweep_is_folded_and_a_late_write_there_is_folded_by_naming_its_month(
        db_env, monkeypatch):
    monkeypatch.delenv("ARCHIVE_BUCKET")
    old = months_ago(4)
    with psycopg.connect(db_env.url) as conn:
        seed_reference(conn)
        load_prices(conn, old, step="6 hours")
        load_portfolio(conn, old, every="6 hours")
    with db_env.database() as database:
        for family in (PRICE, PORTFOLIO):  # history that predates the rollups: the whole month, once
            assert sorted(refresh(database, family, sweep_since=date.today()).refreshed) == month_days(old)
            assert refresh(database, family, sweep_since=date.today()).refreshed == []
        with psycopg.connect(db_env.url, autocommit=True) as conn:  # the app writes into a months-old day
            conn.execute("""INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked",
                            "capturedAt") VALUES ('pf-app', 'w-1', 1.25, 1, %s)""",
                         (p.month_bounds(old)[0] + timedelta(days=4, hours=1),))
            assert refresh(database, PORTFOLIO, sweep_since=date.today()).refreshed == []  # outside the window
            blocker = archive_blocker(conn, "PortfolioSnapshot", old)
            assert blocker.startswith(f"rollups behind: 1 day(s) of {p.month_year(old)}")
            assert f"with config months: ['{p.month_year(old)}']" in blocker
    run = defs.get_job_def("portfolio_rollups_job").execute_in_process(
        run_config={"ops": {"portfolio_rollups": {"config": {"months": [p.month_year(old)]}}}},
        instance=dg.DagsterInstance.ephemeral())
    assert run.success
    with psycopg.connect(db_env.url, autocommit=True) as conn:
        assert archive_blocker(conn, "PortfolioSnapshot", old) is None
        assert conn.execute("""SELECT "minUsd" FROM "PortfolioRollupDaily" WHERE "walletId" = 'w-1'
                               AND "bucketStart" = %s""", (p.month_bounds(old)[0] + timedelta(days=4),)).fetchone() == (
            Decimal("1.25"),)
    bad = defs.get_job_def("portfolio_rollups_job").execute_in_process(
        run_config={"ops": {"portfolio_rollups": {"config": {"months": ["November"]}}}},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    [failure] = [e for e in bad.all_events if e.event_type_value == "STEP_FAILURE"]
    assert not bad.success and "not a month: 'November'" in failure.step_failure_data.error.to_string()
