"""The UI backfill proof: a backfill launched the way the UI launches it, over the
webserver's /graphql (`launchPartitionBackfill` with `partitionsByAssets`), executed by
the daemon on this repository's dagster.yaml, loads three days of `price_snapshots`
after creating their month with `table_partitions`, and every row lands in its monthly
child, none in the default partition.

`price_snapshots` depends on `table_partitions` through a time-window partition mapping
and both carry BackfillPolicy.single_run(): the backfill makes one run per asset, the
month's before the days'. Runs once (PostgreSQL 18): what it proves is Dagster's.
"""

import time

import pytest

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines_tests.dagster_procs import dagster_setup, one_flavor, wait_for

pytestmark = [one_flavor(), pytest.mark.slow]

MONTH = "2025-03-01"
DAYS = ["2025-03-10", "2025-03-11", "2025-03-12"]
TOKENS, TICK_MINUTES = 12, 60
# A small synthetic market: what is proven is where rows land, not how many there are.
SETTINGS = {"sources": {"price": "synthetic", "synthetic": {"tokens": TOKENS, "wallets": 5,
                                                             "max_tokens_per_wallet": 3, "tick_minutes": TICK_MINUTES}}}

# The UI's mutation (the fields of LaunchPartitionBackfill in the UI's LaunchAssetExecutionButton).
LAUNCH = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""

STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PythonError { message stack }
    ... on Error { message }
    ... on PartitionBackfill {
      id status isAssetBackfill numCancelable
      error { message stack }
      assetBackfillData {
        assetBackfillStatuses {
          __typename
          ... on AssetPartitionsStatusCounts {
            assetKey { path } numPartitionsTargeted numPartitionsInProgress numPartitionsMaterialized
            numPartitionsFailed
          }
        }
      }
    }
  }
}"""

RUNS = """
query BackfillRuns($backfillId: String!) {
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $backfillId}]}) {
    __typename
    ... on PythonError { message stack }
    ... on Runs { results { runId status startTime endTime assetSelection { path }
                            tags { key value } } }
  }
}"""

DONE = {"COMPLETED_SUCCESS", "COMPLETED_FAILED", "COMPLETED", "FAILED", "CANCELED"}


def _by_asset(backfill: dict) -> dict[str, dict]:
    statuses = backfill["assetBackfillData"]["assetBackfillStatuses"]
    return {"/".join(s["assetKey"]["path"]): s for s in statuses}


def _final_runs(runs: list[dict]) -> dict[str, dict]:
    """Each asset's last attempt: the run no other run names as its parent (a retry's
    dagster/parent_run_id)."""
    parents = {t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/parent_run_id"}
    final: dict[str, dict] = {}
    for run in runs:
        if run["runId"] not in parents:
            asset = "/".join(run["assetSelection"][0]["path"])
            assert asset not in final, f"two runs of {asset} that were not retries: {runs}"
            final[asset] = run
    return final


def test_a_ui_backfill_creates_the_month_then_loads_its_days_into_the_child(stack, db, artifacts_dir):
    started = time.monotonic()
    with dagster_setup(stack, db.env, artifacts_dir / "test_backfill", settings=SETTINGS) as setup:
        web = setup.start_webserver()
        daemon = setup.start_daemon()  # asset backfills are run by the daemon
        ready = time.monotonic()

        launched = web.graphql(LAUNCH, {"backfillParams": {
            "title": "test_backfill: three days and their month",
            "partitionsByAssets": [
                {"assetKey": {"path": ["price_snapshots"]},
                 "partitions": {"range": {"start": DAYS[0], "end": DAYS[-1]}}},
                {"assetKey": {"path": ["table_partitions"]},
                 "partitions": {"range": {"start": MONTH, "end": MONTH}}},
            ],
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def logs() -> str:
            return daemon.log_tail(80) + "\n" + web.process.log_tail(20)

        def finished() -> dict | None:
            daemon.assert_running()
            web.process.assert_running()
            backfill = web.graphql(STATUS, {"backfillId": backfill_id})["partitionBackfillOrError"]
            assert backfill["__typename"] == "PartitionBackfill", backfill
            return backfill if backfill["status"] in DONE else None

        backfill = wait_for(f"backfill {backfill_id} to finish", finished, 420, interval=2, diagnose=logs)
        completed = time.monotonic()
        runs = web.graphql(RUNS, {"backfillId": backfill_id})["runsOrError"]["results"]
        failed = "\n".join(web.run_events(r["runId"]) for r in runs if r["status"] != "SUCCESS")
        assert backfill["status"] == "COMPLETED_SUCCESS", f"{backfill}\n{failed}\n{logs()}"
        assert backfill["isAssetBackfill"] is True

        counts = _by_asset(backfill)
        assert counts["table_partitions"]["numPartitionsTargeted"] == 1
        assert counts["table_partitions"]["numPartitionsMaterialized"] == 1
        assert counts["price_snapshots"]["numPartitionsTargeted"] == len(DAYS)
        assert counts["price_snapshots"]["numPartitionsMaterialized"] == len(DAYS)
        assert all(c["numPartitionsFailed"] == 0 for c in counts.values()), counts

        # single_run(): one successful run per asset, the month's finished before the days' started.
        # A run whose launch failed (e.g. a code server restarting under load) is retried once by
        # the instance (run_retries); the retry must succeed.
        final = _final_runs(runs)
        assert sorted(final) == ["price_snapshots", "table_partitions"], runs
        assert all(r["status"] == "SUCCESS" for r in final.values()), f"{runs}\n{failed}"
        assert final["table_partitions"]["endTime"] <= final["price_snapshots"]["startTime"]
        tags = {t["key"]: t["value"] for t in final["price_snapshots"]["tags"]}
        assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (
            DAYS[0], DAYS[-1])
        if failed:
            print(f"\nretried after a failed attempt:\n{failed}")

    with db.connect() as conn:
        month = p.parse_month(MONTH)
        assert month in month_ops.attached_months(conn, p.PRICE_SNAPSHOT)
        rows = conn.execute("""
            SELECT tableoid::regclass::text, "recordedAt"::date::text, count(*), count(DISTINCT "tokenId")
              FROM "PriceSnapshot" GROUP BY 1, 2 ORDER BY 2""").fetchall()
        default_rows = conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0]
    child = f'"{p.child_name(p.PRICE_SNAPSHOT, month)}"'
    per_day = TOKENS * 24 * 60 // TICK_MINUTES
    assert rows == [(child, day, per_day, TOKENS) for day in DAYS], rows
    assert default_rows == 0
    print(f"\nbackfill test: processes ready in {ready - started:.0f} s, backfill launched to COMPLETED_SUCCESS in "
          f"{completed - ready:.0f} s, whole test {time.monotonic() - started:.0f} s")
