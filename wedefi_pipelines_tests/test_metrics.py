"""`wedefi-pipelines metrics`: the endpoint served by the real command on the real stack
(probes, platform figures, run outcomes), a source that is down, and the sample Prometheus
rules (the defaults' output, checked by promtool, thresholds following the settings)."""

import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from wedefi_pipelines.cache.contract import encode, family
from wedefi_pipelines.health.metrics import PlatformCollector, prometheus_rules, rules_yaml
from wedefi_pipelines.settings import Settings, parse_settings
from wedefi_pipelines_tests.dagster_procs import dagster_setup, free_port, wait_for
from wedefi_pipelines_tests.system_packages import SystemPackageError, ensure_promtool

RULES = Path(__file__).resolve().parent.parent / "docs" / "prometheus" / "wedefi-rules.yml"


def samples(text: str) -> dict[tuple, float]:
    """{(name, (label, value), ...): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


def value(found: dict, metric: str, **labels) -> float:
    return found[(metric, *sorted(labels.items()))]


# -- the rules ---------------------------------------------------------------------------------


def test_the_rules_file_in_docs_is_what_the_default_settings_generate():
    assert RULES.read_text() == rules_yaml(Settings()), (
        "regenerate it: env -u WEDEFI_SETTINGS wedefi-pipelines metrics --print-rules > docs/prometheus/wedefi-rules.yml")


def test_promtool_accepts_the_rules():
    try:
        promtool = ensure_promtool()
    except SystemPackageError as exc:
        pytest.fail(str(exc))
    result = subprocess.run([str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_follow_the_sensors_thresholds():
    settings = parse_settings({
        "alerts": [{"name": "LongTransaction", "condition": "transaction_age > 10min"},
                   {"name": "ReplicationSlotRetainedWal", "condition": "retained_wal > 2GB"},
                   {"name": "VacuumBacklog", "condition": "dead_tuples_over_threshold_for > 90min"},
                   {"name": "TransactionIdWraparound", "condition": "xid_age > 800000000"}],
        "monitoring": {"pipeline_sessions": {"wedefi-pipelines": "3h", "wedefi-pipelines:adopt": None}},
    })
    rules = {(r["alert"], r["labels"].get("sessions")): r for g in prometheus_rules(settings)["groups"]
             for r in g["rules"]}
    assert rules[("WedefiLongTransaction", None)]["expr"].endswith("> 600")
    assert rules[("WedefiReplicationSlotRetainedWal", None)]["expr"].endswith("> 2147483648")
    assert rules[("WedefiVacuumBacklog", None)]["for"] == "90m"
    assert rules[("WedefiTransactionIdWraparound", None)]["expr"] == "wedefi_pg_xid_age > 800000000"
    assert ("WedefiTransactionIdWraparoundCritical", None) not in rules  # the override gave no critical
    assert rules[("WedefiPipelineLongTransaction", "wedefi-pipelines")]["expr"].endswith("> 10800")
    assert ("WedefiPipelineLongTransaction", "wedefi-pipelines:adopt") not in rules  # never alerted on
    defaults = {r["alert"]: r for g in prometheus_rules(Settings())["groups"] for r in g["rules"]}
    assert defaults["WedefiDeadlocks"]["expr"] == "increase(wedefi_pg_deadlocks_total[1m]) > 5"
    assert defaults["WedefiTransactionIdWraparoundCritical"]["expr"] == "wedefi_pg_xid_age > 1500000000"
    assert yaml.safe_load(RULES.read_text()) == prometheus_rules(Settings())


# -- the endpoint ------------------------------------------------------------------------------


def _late_price_row(conn) -> None:
    """A price of a month without a child: it waits in "PriceSnapshot_default"."""
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now())""")
    conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    VALUES ('tok-m', 1, '0xm', 'M', 'M', 18, now())""")
    conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                    VALUES ('tok-m', 1.5, 'synthetic', '2020-01-15')""")


def test_the_metrics_command_serves_probes_platform_figures_and_run_outcomes(stack, db, artifacts_dir, monkeypatch):
    with db.connect() as conn:
        _late_price_row(conn)
    cache = redis.Redis.from_url(db.env["REDIS_URL"])
    computed = datetime.now(timezone.utc) - timedelta(seconds=90)
    fam = family("portfolio")  # a value computed 90 s ago, stored as every writer stores it (PXAT computedAt + TTL)
    key = fam.key(f"w-{uuid.uuid4().hex[:6]}")
    encoded = encode(fam, key.removeprefix(fam.prefix), [], computed)
    cache.set(key, encoded.value, pxat=int((computed.timestamp() + fam.ttl(Settings().cache)) * 1000))
    idle = psycopg.connect(db.url, application_name="wedefi-api")
    idle.execute("SELECT 1")  # idle in transaction from here on
    process = None
    try:
        with dagster_setup(stack, db.env, artifacts_dir / f"test_metrics_{stack.flavor}") as setup:
            with setup.instance(monkeypatch) as instance:
                for job, status in (("health_reports_job", dg.DagsterRunStatus.SUCCESS),
                                    ("health_reports_job", dg.DagsterRunStatus.FAILURE),
                                    ("deadlocks_check_job", dg.DagsterRunStatus.SUCCESS)):
                    instance.add_run(dg.DagsterRun(job_name=job, run_id=str(uuid.uuid4()), status=status))
            port = free_port()
            log = (artifacts_dir / f"test_metrics_{stack.flavor}.log").open("w")
            process = subprocess.Popen([sys.executable, "-m", "wedefi_pipelines.cli", "metrics", "--port", str(port)],
                                       env=setup.env, stdout=log, stderr=subprocess.STDOUT)

            def scraped():
                assert process.poll() is None, "the metrics command exited"
                try:
                    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
                except requests.ConnectionError:
                    return None
                return response if response.status_code == 200 else None

            response = wait_for("the metrics endpoint", scraped, 120, interval=0.5)
            found = samples(response.text)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            log.close()
    finally:
        idle.close()
        cache.delete(key)
        if process is not None and process.poll() is None:
            process.kill()
    assert "serving http://127.0.0.1:" in (artifacts_dir / f"test_metrics_{stack.flavor}.log").read_text()
    for source in ("postgres_primary", "postgres_read_replica", "postgres_analytics_replica", "redis", "dagster"):
        assert value(found, "wedefi_up", source=source) == 1, source
    failed = [k for k, v in found.items() if k[0] == "wedefi_probe_success" and v != 1]
    assert failed == []
    assert value(found, "wedefi_pg_oldest_idle_in_transaction_seconds", server="primary", sessions="app") > 0
    assert value(found, "wedefi_pg_oldest_transaction_seconds", server="primary", sessions="wedefi-pipelines") == 0
    assert value(found, "wedefi_pg_xid_age", database=db.name) > 0
    assert value(found, "wedefi_pg_invalid_indexes") == 0
    assert value(found, "wedefi_pg_deadlocks_total", server="analytics_replica") >= 0
    assert value(found, "wedefi_pg_standby_conflicts_total", server="read_replica", cause="lock") >= 0
    assert value(found, "wedefi_pg_replicas_streaming") == 2
    assert value(found, "wedefi_pg_max_connections", server="primary") == 200
    assert value(found, "wedefi_partition_default_rows", table="PriceSnapshot") == 1
    assert value(found, "wedefi_partition_months_ahead", table="PriceSnapshot") == 0  # the template has no month
    assert value(found, "wedefi_archive_months", table="PriceSnapshot", status="archived") == 0
    assert value(found, "wedefi_cache_keys", family="portfolio") >= 1
    assert value(found, "wedefi_cache_oldest_key_age_seconds", family="portfolio") >= 90
    assert value(found, "wedefi_dagster_runs", job="health_reports_job", status="FAILURE") == 1
    assert value(found, "wedefi_dagster_runs", job="health_reports_job", status="SUCCESS") == 1
    assert value(found, "wedefi_dagster_runs", job="deadlocks_check_job", status="SUCCESS") == 1
    assert value(found, "wedefi_dagster_job_last_run_success", job="deadlocks_check_job") == 1
    assert value(found, "wedefi_dagster_instigator_running", kind="sensor", name="wraparound_sensor") == 1


def test_a_source_that_is_down_is_reported_and_the_rest_still_served(db):
    with db.database() as database:
        collector = PlatformCollector(database, Settings(), redis.Redis(host="127.0.0.1", port=free_port(),
                                                                        socket_connect_timeout=1))
        found = {(s.name, *sorted(s.labels.items())): s.value for f in collector.collect() for s in f.samples}
    assert value(found, "wedefi_up", source="redis") == 0
    assert value(found, "wedefi_up", source="postgres_primary") == 1
    assert value(found, "wedefi_pg_client_connections", server="primary") >= 1


def test_metrics_refuses_a_bad_port_naming_it():
    result = subprocess.run([sys.executable, "-m", "wedefi_pipelines.cli", "metrics", "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port must be 1..65535" in result.stderr
