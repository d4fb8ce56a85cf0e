"""Alerts into the app's "Alert"/"AlertDelivery" tables: one row per incident, the
run-failure sensor over any failed run, and the webhook (received, retried, never
blocking the row)."""

import dagster as dg
import psycopg
import pytest

from wedefi_pipelines.defs.health.resources import AlertSinkResource
from wedefi_pipelines.health import alerting
from wedefi_pipelines.health.alerting import IncidentReport
from wedefi_pipelines.resources.database import ConfigurationError

from .test_health_support import (WebhookServer, alerts, deliveries, health_settings, instance,  # noqa: F401
                                  report_failure)


def report(**overrides) -> IncidentReport:
    fields = dict(incident="run.ingest_prices_job", type="pipeline_run_failed", severity="warning",
                  title="Dagster run of ingest_prices_job failed", description="boom", evidence={"n": 1},
                  run={"runId": "r1", "job": "ingest_prices_job"})
    return IncidentReport(**{**fields, **overrides})


def test_one_row_per_incident_updated_while_it_lasts_and_a_new_one_after_it_resolves(db):
    with db.connect(autocommit=False) as conn:
        first = alerting.record_incident(conn, report())
        second = alerting.record_incident(conn, report(evidence={"n": 2}, run={"runId": "r2", "job": "j"}))
        conn.commit()
    assert first.created and not second.created and first.id == second.id
    [row] = alerts(db)
    assert row["status"] == "pending" and row["metadata"]["occurrences"] == 2
    assert row["metadata"]["evidence"] == {"n": 2} and [r["runId"] for r in row["metadata"]["runs"]] == ["r1", "r2"]
    assert row["updatedAt"] >= row["createdAt"]

    with db.connect() as conn:  # the app's processor dispatched it: still the same incident
        conn.execute("""UPDATE "Alert" SET status = 'dispatched'""")
    with db.connect(autocommit=False) as conn:
        assert alerting.record_incident(conn, report()).id == first.id
        [resolved] = alerting.resolve_incidents(conn, ["run.ingest_prices_job"], reason="job succeeded")
        conn.commit()
    assert resolved.status == "resolved" and resolved.metadata["resolution"] == "job succeeded"
    with db.connect(autocommit=False) as conn:
        reopened = alerting.record_incident(conn, report())
        conn.commit()
    rows = alerts(db)
    assert reopened.created and [r["status"] for r in rows] == ["resolved", "pending"]
    assert rows[0]["contextHash"] != rows[1]["contextHash"]


@dg.op
def load_prices() -> None:
    raise dg.Failure(description="price source returned HTTP 503", metadata={"source": "coingecko", "attempts": 5})


@dg.job
def ingest_prices_job():
    load_prices()


def test_a_failed_ingestion_run_becomes_one_pending_alert_updated_by_the_next_failure(db_env, instance):
    first = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False)
    report_failure(first, instance)
    [row] = alerts(db_env)
    assert (row["type"], row["severity"], row["status"]) == ("pipeline_run_failed", "warning", "pending")
    assert row["title"] == "Dagster run of ingest_prices_job failed"
    assert "price source returned HTTP 503" in row["description"]
    [step] = row["metadata"]["evidence"]["failedSteps"]
    assert step["step"] == "load_prices" and step["failure"]["metadata"] == {"source": "coingecko", "attempts": 5}
    assert row["metadata"]["incident"] == "run.ingest_prices_job"

    second = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False)
    report_failure(second, instance)
    [row] = alerts(db_env)
    assert row["metadata"]["occurrences"] == 2
    assert [r["runId"] for r in row["metadata"]["runs"]] == [first.run_id, second.run_id]


def test_a_run_that_will_be_retried_raises_no_alert(db_env, instance):
    result = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False,
                                                  tags={"dagster/will_retry": "true"})
    skipped = report_failure(result, instance)
    assert isinstance(skipped, dg.SkipReason) and "will be retried" in skipped.skip_message
    assert alerts(db_env) == []


def test_the_webhook_receives_the_new_incident_once_and_each_attempt_is_recorded(db_env, instance):
    with WebhookServer().running() as hook:
        for _ in range(2):
            run = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False)
            report_failure(run, instance, webhook_url=hook.url)
    [post] = hook.posts  # the second failure updated the incident: no second page
    assert post["text"].startswith("*") and "PIPELINE RUN FAILED:* Dagster run of ingest_prices_job failed" in post["text"]
    assert post["attachments"][0]["color"] == "#f59e0b"
    [delivery] = deliveries(db_env)
    [row] = alerts(db_env)
    assert (delivery["alertId"], delivery["channel"], delivery["success"]) == (row["id"], "webhook", True)
    assert delivery["metadata"]["statusCode"] == 200 and delivery["metadata"]["event"] == "opened"
    assert "secret" not in delivery["metadata"]["url"]  # a Slack webhook's path is its credential


def test_a_failing_webhook_is_retried_and_every_attempt_recorded(db_env, instance, health_settings):
    health_settings({"monitoring": {"webhook_attempts": 3, "webhook_backoff_s": 0}})
    with WebhookServer(behaviour=lambda n: 503 if n < 3 else 200).running() as hook:
        run = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False)
        report_failure(run, instance, webhook_url=hook.url)
    assert len(hook.posts) == 3
    assert [(d["success"], d["metadata"]["statusCode"]) for d in deliveries(db_env)] == [
        (False, 503), (False, 503), (True, 200)]


def test_a_hanging_webhook_never_blocks_the_alert_row(db_env, instance, health_settings):
    health_settings({"monitoring": {"webhook_timeout_s": 0.3, "webhook_attempts": 2, "webhook_backoff_s": 0}})
    rows_seen_by_webhook = []

    def count_alerts():  # what another session sees while the webhook is being called
        with psycopg.connect(db_env.url) as conn:
            rows_seen_by_webhook.append(conn.execute('SELECT count(*) FROM "Alert"').fetchone()[0])

    with WebhookServer(behaviour=lambda n: None, on_request=count_alerts).running() as hook:
        run = ingest_prices_job.execute_in_process(instance=instance, raise_on_error=False)
        report_failure(run, instance, webhook_url=hook.url)
    assert rows_seen_by_webhook == [1, 1]  # committed before the first post
    assert [a["status"] for a in alerts(db_env)] == ["pending"]
    attempts = deliveries(db_env)
    assert [d["success"] for d in attempts] == [False, False]
    assert all("Timeout" in d["metadata"]["error"] for d in attempts)


def test_a_webhook_url_that_is_no_url_fails_naming_the_variable(db_env, monkeypatch):
    monkeypatch.setenv("ALERT_WEBHOOK_URL", "hooks.slack.com/services/x")
    with db_env.database() as database:
        with pytest.raises(ConfigurationError, match="ALERT_WEBHOOK_URL must be an http"):
            AlertSinkResource().sink(database)
