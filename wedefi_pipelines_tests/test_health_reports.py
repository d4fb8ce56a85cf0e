"""The daily reports: slow statements over the window since the previous report, and
index usage across every server."""

import dagster as dg
from wedefi_pipelines.defs.health import assets
from wedefi_pipelines.resources.database import DatabaseResource

from .test_health_support import health_settings, instance  # noqa: F401


def materialize(asset, instance) -> dict:
    result = dg.materialize([asset], instance=instance, resources={"database": DatabaseResource()})
    assert result.success
    return result.asset_materializations_for_node(asset.key.path[-1])[0].metadata


def statements(metadata) -> list[dict]:
    return [dict(r.data) for r in metadata["statements"].value.records]


def test_the_slow_query_report_covers_only_the_window_since_the_previous_report(db_env, instance, health_settings):
    health_settings({"monitoring": {"slow_query_report_mean_ms": 100}})
    with db_env.connect() as conn:
        conn.execute("SELECT pg_sleep(0.25), pg_backend_pid() AS before_first_report")
    first = statements(materialize(assets.slow_query_report, instance))
    assert [r["query"] for r in first if "before_first_report" in r["query"]]

    with db_env.connect() as conn, db_env.connect("read") as replica:
        for _ in range(2):
            conn.execute("SELECT pg_sleep(0.15)")
        conn.execute("SELECT 1 AS fast")
        replica.execute("SELECT pg_sleep(0.12)")
    metadata = materialize(assets.slow_query_report, instance)
    rows = statements(metadata)
    assert not [r for r in rows if "before_first_report" in r["query"]]  # outside this window
    [primary] = [r for r in rows if r["server"] == "primary"]
    assert primary["query"] == "SELECT pg_sleep($1)" and primary["calls"] == 2
    assert 150 <= primary["mean_exec_ms"] < 1000 and primary["read_time_ms"] >= 0
    assert [r["server"] for r in rows if r["server"] != "primary"] == ["read_replica"]
    assert metadata["windows"].value["primary"].startswith("since report run")
    with db_env.connect() as conn:  # only the last report's figures are kept
        assert conn.execute("SELECT count(DISTINCT run_id) FROM wedefi_health_statement_baseline").fetchone()[0] == 2


def test_the_index_usage_report_calls_unused_only_what_no_server_scanned(db_env, instance):
    with db_env.connect() as conn:
        conn.execute("CREATE TABLE report_t (id int PRIMARY KEY, v int, w int)")
        conn.execute("INSERT INTO report_t SELECT g, g, g FROM generate_series(1, 5000) g")
        conn.execute("CREATE INDEX report_t_v ON report_t (v)")
        conn.execute("CREATE INDEX report_t_w ON report_t (w)")
        conn.execute("ANALYZE report_t")
    db_env.wait_replicas()
    with db_env.connect("analytics") as replica:
        replica.execute("SET enable_seqscan = off")
        replica.execute("SELECT * FROM report_t WHERE v = 3").fetchall()
    metadata = materialize(assets.index_usage_report, instance)
    unused = {r.data["index"] for r in metadata["unused"].value.records}
    assert "report_t_w" in unused  # never scanned anywhere
    assert "report_t_v" not in unused  # scanned on the analytics replica only
    assert "report_t_pkey" not in unused  # enforces the primary key
    assert set(metadata["hit_ratio_pct"].value) == {"primary", "read_replica", "analytics_replica"}
