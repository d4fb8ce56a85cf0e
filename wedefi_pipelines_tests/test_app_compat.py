"""WeDefiDaily's own clients are the judge (DESIGN.md section 9): its Prisma 7 client, with
the app's schema (prisma/schema.prisma) generated at test time, and the seed's Redis
CacheManager, run in Node against the managed database and the keys the pipeline wrote.

The Node side (app_compat/suite.mjs) makes every call of issue 12's Works and Breaks lists
and checks each against SQL; this module prepares Node, provisions the months around
today, runs the pipeline's cache refresh between the two phases, and fails with the Node
script's message. Each call's outcome is written to artifacts/app_compat_<pg>.json.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.cache.refresh import refresh_cache
from wedefi_pipelines.rollups.refresh import refresh
from wedefi_pipelines.rollups.tables import PORTFOLIO, PRICE
from wedefi_pipelines.resources.cache import connect_redis
from wedefi_pipelines.settings import parse_settings
from wedefi_pipelines_tests import node_app

# UTC+05:45: a client that mixes local time and UTC anywhere is off by an odd amount.
APP_TZ = "Asia/Kathmandu"
# sha256 of cjnemes/WeDefiDaily apps/api/prisma/schema.prisma at 1e84c9a3 (upstream file:
# sha256 aa889020...) without its `url = env("DATABASE_URL")` line: Prisma 7's one forced edit.
# The models this project adds (issue 16's rollups) follow this line, at the end of the file.
ROLLUPS_MARKER = "// ROLLUPS (issue 16): everything below this line is this project's"
UPSTREAM_SCHEMA_WITHOUT_URL_SHA256 = "457a890b2226c49783149985d3b156be7ffe904aa93316f1d9a0671aaf328ede"


@pytest.fixture(scope="session")
def app_client() -> node_app.NodeApp:
    try:
        return node_app.prepare()
    except node_app.NodeAppError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def redis_client(stack):
    if not stack.redis.running:
        stack.redis.start()
    client = connect_redis(stack.redis.url, parse_settings({}))
    client.flushdb()
    yield client
    client.close()


def run(app_client: node_app.NodeApp, phase: str, env: dict[str, str]) -> dict:
    try:
        return app_client.run_suite(phase, env)
    except node_app.NodeAppError as exc:
        pytest.fail(f"the app's client failed ({phase} phase):\n{exc}", pytrace=False)


def test_the_schema_is_the_apps_with_comments_and_prisma_7s_one_edit():
    """Every other line of prisma/schema.prisma is upstream's: our notes are whole-line `//` comments."""
    text = (node_app.REPO / "prisma" / "schema.prisma").read_text()
    upstream, ours = text.split(ROLLUPS_MARKER)
    lines = upstream.splitlines(keepends=True)
    code = "".join(line for line in lines if not line.startswith("//")).lstrip("\n").rstrip("\n") + "\n"
    assert hashlib.sha256(code.encode()).hexdigest() == UPSTREAM_SCHEMA_WITHOUT_URL_SHA256
    models = [line.split()[1] for line in ours.splitlines() if line.startswith("model ")]
    assert models == ["PriceRollupHourly", "PriceRollupDaily", "PortfolioRollupDaily"]  # the only addition
    assert 'url      = env("DATABASE_URL")' not in code and "@id @default(uuid())" in code


def test_node_versions_prisma_accepts():
    assert [node_app.supported(v) for v in ((20, 18, 3), (20, 19, 0), (21, 7, 0), (22, 11, 0), (22, 12, 0), (24, 0, 0))] \
        == [False, True, False, False, True, True]
    assert node_app.parse_version("v20.20.2\n") == (20, 20, 2)


def test_the_apps_prisma_client_and_cache_reader_work_on_the_managed_database(db, stack, app_client, redis_client,
                                                                               artifacts_dir):
    now = datetime.now(timezone.utc)
    with db.connect() as conn:
        for table in p.RANGE_TABLES:
            for offset in (-2, -1, 0, 1):
                for statement in p.create_child_sql(table, p.add_months(p.month_of(now), offset)):
                    conn.execute(statement)
    env = db.env | {"TZ": APP_TZ}

    writes = run(app_client, "prisma", env)
    db.wait_replicas()
    settings = parse_settings({})
    with db.database(settings) as database:
        first = refresh_cache(database, redis_client, settings)
        assert "wedefi_read" in first.read_from["portfolio_queries"]  # the pipeline read the replica
        since = (now - timedelta(days=60)).date()  # the rollups of what the app wrote, for its client to read
        assert refresh(database, PRICE, sweep_since=since).refreshed
        assert refresh(database, PORTFOLIO, sweep_since=since).refreshed
        reads = run(app_client, "cache", env)

        # The app's own miss path stored JSON.stringify of its Prisma result; the pipeline's
        # next refresh finds the very same bytes and only renews their expiry.
        app_written = reads["appWritten"]
        assert set(app_written) == {f"portfolio:{writes['wallets']['carol']}", f"governance:{writes['wallets']['carol']}"}
        again = refresh_cache(database, redis_client, settings)
    for key, value in app_written.items():
        assert redis_client.get(key) == value.encode(), key
    assert again.families["portfolio"].writes.unchanged == 3 and again.families["portfolio"].writes.written == 0
    assert again.families["governance"].writes.unchanged == 3

    outcomes = writes["results"] + reads["results"]
    assert all(r["result"] in ("works", "documented difference") for r in outcomes), outcomes
    (artifacts_dir / f"app_compat_{stack.flavor}.json").write_text(json.dumps({
        "node": writes["node"], "prisma": writes["prisma"], "tz": writes["tz"], "node_source": app_client.source,
        "timings_s": {k: round(v, 2) for k, v in app_client.timings.items()}, "results": outcomes,
    }, indent=2))
