"""Shared fixtures and helpers of the health and alerting tests (no tests here).

They drive the real thing: sensors are ticked with build_sensor_context and the cursor
the previous tick returned, the runs they request are executed in process on one
DagsterInstance, and the run-failure sensor is invoked on those failed runs.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import dagster as dg
import psycopg
import pytest
import yaml

from wedefi_pipelines.defs.health.resources import AlertSinkResource
from wedefi_pipelines.defs.health.sensors import alert_on_run_failure
from wedefi_pipelines.resources.database import DatabaseResource
from wedefi_pipelines.settings import current_settings


@pytest.fixture
def health_settings(tmp_path, monkeypatch) -> Iterator[Callable[[dict], object]]:
    """Apply a WEDEFI_SETTINGS file for this test (the settings are read through it, as in
    production); `clear_after_s` defaults to 0 here so a passing probe ends its episode."""

    def apply(data: dict):
        data = {**data, "monitoring": {"clear_after_s": 0, **data.get("monitoring", {})}}
        path = tmp_path / "wedefi-settings.yaml"
        path.write_text(yaml.safe_dump(data))
        monkeypatch.setenv("WEDEFI_SETTINGS", str(path))
        current_settings.cache_clear()
        return current_settings()

    yield apply
    current_settings.cache_clear()


@pytest.fixture
def instance():
    """One Dagster instance for a test's sensor ticks, runs and run-failure sensor calls."""
    with dg.instance_for_test() as inst:
        yield inst


def resources(webhook_url: str | None = None) -> dict:
    return {"database": DatabaseResource(), "alert_sink": AlertSinkResource(webhook_url=webhook_url)}


class Ticker:
    """Ticks one sensor, keeping its cursor between ticks as the daemon does."""

    def __init__(self, sensor: dg.SensorDefinition, instance: dg.DagsterInstance, webhook_url: str | None = None):
        self.sensor, self.instance, self.webhook_url = sensor, instance, webhook_url
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,
                                     resources=resources(self.webhook_url)) as context:
            result = self.sensor(context)
        self.cursor = result.cursor
        return result


def execute(job_name: str, request: dg.RunRequest, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """Execute a requested run the way the daemon would launch it (same config and tags)."""
    from wedefi_pipelines.definitions import defs

    job = defs.resolve_job_def(job_name)
    return job.execute_in_process(run_config=request.run_config, tags=request.tags, instance=instance,
                                  raise_on_error=False)


def report_failure(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance,
                   webhook_url: str | None = None):
    with dg.build_run_status_sensor_context(
        sensor_name="alert_on_run_failure", dagster_event=result.get_run_failure_event(),
        dagster_instance=instance, dagster_run=result.dagster_run, resources=resources(webhook_url),
    ) as context:
        return alert_on_run_failure(context.for_run_failure())


def check_evaluations(result: dg.ExecuteInProcessResult) -> list:
    return [e.event_specific_data for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]


def alerts(db) -> list[dict]:
    with db.connect() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute('SELECT * FROM "Alert" ORDER BY "createdAt", id').fetchall()


def deliveries(db) -> list[dict]:
    with db.connect() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute('SELECT * FROM "AlertDelivery" ORDER BY "createdAt", id').fetchall()


class WebhookServer:
    """A Slack-like endpoint on loopback. `behaviour(n)` -> status code, or None to hang."""

    def __init__(self, behaviour: Callable[[int], int | None] = lambda n: 200, on_request=None):
        self.posts: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.posts.append(json.loads(body))
                if on_request is not None:
                    on_request()
                status = behaviour(len(server.posts))
                if status is None:  # hang until the test ends
                    server.release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"unavailable")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/services/T000/B000/secret"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @contextmanager
    def running(self):
        self.thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
