"""Alerts into WeDefiDaily's own "Alert" / "AlertDelivery" tables, and the optional webhook.

One "Alert" row per incident. An incident is named by a key ("health.replication_lag.
wedefi_read", "run.ingestion_job"); while it lasts (its row is still 'pending' or
'dispatched', the app's non-final statuses) every new occurrence updates that row
(occurrences, last run, evidence) instead of adding one. Once resolved, the next
occurrence opens a new row. "contextHash", the app's unique dedup key, is the SHA-256 of
the incident key and the time the row was opened, so every row has its own.

Rows are written with status 'pending', so the app's own alert processor
(apps/api/src/jobs/process-alerts.ts) dispatches them to its channels. When
ALERT_WEBHOOK_URL is set, a Slack-compatible JSON post goes out too, when an incident
opens and when it resolves, with a timeout and retries; every attempt is an
"AlertDelivery" row (channel 'webhook'). The alert row is committed before any post, so
a dead or hanging webhook never holds it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import psycopg
import requests
from psycopg import sql
from psycopg.types.json import Jsonb

from wedefi_pipelines import locks

log = logging.getLogger(__name__)

SOURCE = "wedefi-pipelines"
OPEN_STATUSES = ("pending", "dispatched")  # the app's processor: pending -> dispatched -> resolved
WEBHOOK_CHANNEL = "webhook"
MAX_RUNS_KEPT = 20
SEVERITY_COLORS = {"critical": "#dc2626", "warning": "#f59e0b", "info": "#3b82f6"}
SEVERITY_EMOJI = {"critical": "\U0001F6A8", "warning": "\u26A0\uFE0F", "info": "\u2139\uFE0F"}
RESOLVED_COLOR = "#16a34a"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _db_time(moment: datetime) -> datetime:
    """Prisma's DateTime columns are timestamp(3) without time zone, holding UTC."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def context_hash(incident: str, opened_at: datetime) -> str:
    payload = {"source": SOURCE, "incident": incident, "openedAt": opened_at.astimezone(timezone.utc).isoformat()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class IncidentReport:
    """One occurrence of an incident: what the alert row says about it."""

    incident: str
    type: str
    severity: str
    title: str
    description: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    rule: str | None = None
    run: Mapping[str, Any] | None = None  # {"runId", "job", "partition", "location"} of a failed run

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_COLORS:
            raise ValueError(f"severity must be one of {sorted(SEVERITY_COLORS)}, got {self.severity!r}")
        if len(self.type) > 64:
            raise ValueError(f'"Alert".type is varchar(64); {self.type!r} is longer')


@dataclass(frozen=True)
class AlertRow:
    id: str
    context_hash: str
    incident: str
    type: str
    severity: str
    title: str
    description: str | None
    status: str
    trigger_at: datetime
    metadata: Mapping[str, Any]
    created: bool = False  # this call opened it


_COLUMNS = sql.SQL('id, "contextHash", type, severity, title, description, status, "triggerAt", metadata')


def _row(record, created: bool = False) -> AlertRow:
    id_, chash, type_, severity, title, description, status, trigger_at, metadata = record
    return AlertRow(id_, chash, (metadata or {}).get("incident", ""), type_, severity, title, description,
                    status, trigger_at, metadata or {}, created)


def _lock_incident(conn: psycopg.Connection, incident: str) -> None:
    """Serialise writers of one incident (the run-failure and health sensors may overlap)."""
    locks.xact_lock(conn, "alerting.incident", f"{SOURCE}:{incident}")


def _open_rows(
    conn: psycopg.Connection, incidents: list[str] | None, prefixes: Sequence[str] | None
) -> list[AlertRow]:
    query = sql.SQL("""SELECT {} FROM "Alert" WHERE status = ANY(%s) AND metadata->>'source' = %s""").format(_COLUMNS)
    params: list[Any] = [list(OPEN_STATUSES), SOURCE]
    if incidents is not None:
        query += sql.SQL(" AND metadata->>'incident' = ANY(%s)")
        params.append(incidents)
    if prefixes is not None:
        query += sql.SQL(" AND EXISTS (SELECT 1 FROM unnest(%s::text[]) p WHERE starts_with(metadata->>'incident', p))")
        params.append(list(prefixes))
    return [_row(r) for r in conn.execute(query + sql.SQL(' ORDER BY "triggerAt", "createdAt"'), params)]


def open_alerts(conn: psycopg.Connection, prefixes: Sequence[str] | None = None) -> list[AlertRow]:
    """Our alerts still open (pending or dispatched), oldest first; only incidents starting
    with one of `prefixes` when given."""
    return _open_rows(conn, None, prefixes)


def record_incident(conn: psycopg.Connection, report: IncidentReport, now: datetime | None = None) -> AlertRow:
    """Open the incident's alert row, or update the open one. Call inside a transaction."""
    now = now or utcnow()
    _lock_incident(conn, report.incident)
    existing = _open_rows(conn, [report.incident], None)
    runs = [dict(report.run)] if report.run else []
    if existing:
        row = existing[-1]
        meta = dict(row.metadata)
        kept = [r for r in meta.get("runs", []) if not report.run or r.get("runId") != report.run.get("runId")]
        meta.update({
            "evidence": dict(report.evidence), "occurrences": int(meta.get("occurrences", 1)) + 1,
            "lastSeenAt": now.isoformat(), "runs": (kept + runs)[-MAX_RUNS_KEPT:],
        })
        record = conn.execute(
            sql.SQL("""UPDATE "Alert" SET severity = %s, title = %s, description = %s, metadata = %s,
                              "updatedAt" = %s
                        WHERE id = %s RETURNING {}""").format(_COLUMNS),
            (report.severity, report.title, report.description, Jsonb(meta), _db_time(now), row.id),
        ).fetchone()
        return _row(record)
    meta = {
        "source": SOURCE, "incident": report.incident, "rule": report.rule, "evidence": dict(report.evidence),
        "occurrences": 1, "firstSeenAt": now.isoformat(), "lastSeenAt": now.isoformat(), "runs": runs,
    }
    record = conn.execute(
        sql.SQL("""INSERT INTO "Alert" (id, type, severity, title, description, status, "triggerAt", metadata,
                                        "contextHash", "createdAt", "updatedAt")
                   VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s) RETURNING {}""").format(_COLUMNS),
        (str(uuid.uuid4()), report.type, report.severity, report.title, report.description, _db_time(now),
         Jsonb(meta), context_hash(report.incident, now), _db_time(now), _db_time(now)),
    ).fetchone()
    return _row(record, created=True)


def resolve_incidents(
    conn: psycopg.Connection, incidents: Iterable[str], now: datetime | None = None, reason: str = ""
) -> list[AlertRow]:
    """Mark the incidents' open rows 'resolved', with the time (and why) in metadata."""
    now = now or utcnow()
    keys = sorted(set(incidents))
    for key in keys:
        _lock_incident(conn, key)
    resolved = []
    for row in _open_rows(conn, keys, None) if keys else []:
        meta = {**row.metadata, "resolvedAt": now.isoformat(), "resolution": reason or "condition cleared"}
        record = conn.execute(
            sql.SQL("""UPDATE "Alert" SET status = 'resolved', metadata = %s, "updatedAt" = %s
                        WHERE id = %s RETURNING {}""").format(_COLUMNS),
            (Jsonb(meta), _db_time(now), row.id),
        ).fetchone()
        resolved.append(_row(record))
    return resolved


def record_delivery(conn: psycopg.Connection, alert_id: str, success: bool, metadata: Mapping[str, Any]) -> None:
    conn.execute(
        """INSERT INTO "AlertDelivery" (id, "alertId", channel, success, metadata, "createdAt")
           VALUES (%s, %s, %s, %s, %s, %s)""",
        (str(uuid.uuid4()), alert_id, WEBHOOK_CHANNEL, success, Jsonb(dict(metadata)), _db_time(utcnow())),
    )


# -- the webhook -------------------------------------------------------------------------------

def slack_payload(alert: AlertRow, event: str = "opened") -> dict[str, Any]:
    """Slack's incoming-webhook JSON (text + one attachment), in the app's own format
    (apps/api/src/services/alert-delivery.ts) so both channels read alike."""
    label = alert.type.replace("_", " ").upper()
    meta = alert.metadata
    if event == "resolved":
        text = f"*\u2705 RESOLVED {label}:* {alert.title}"
        color = RESOLVED_COLOR
    else:
        text = f"*{SEVERITY_EMOJI.get(alert.severity, '')} {label}:* {alert.title}"
        color = SEVERITY_COLORS.get(alert.severity, SEVERITY_COLORS["info"])
    fields = [
        {"title": "Severity", "value": alert.severity, "short": True},
        {"title": "Incident", "value": alert.incident, "short": True},
        {"title": "First seen", "value": meta.get("firstSeenAt", ""), "short": True},
        {"title": "Occurrences", "value": str(meta.get("occurrences", 1)), "short": True},
    ]
    runs = meta.get("runs") or []
    if runs:
        fields.append({"title": "Dagster run", "value": f"{runs[-1].get('job')} {runs[-1].get('runId')}", "short": False})
    if event == "resolved":
        fields.append({"title": "Resolved", "value": meta.get("resolvedAt", ""), "short": True})
    return {
        "text": text,
        "attachments": [{
            "color": color,
            "text": alert.description or "",
            "fields": fields,
            "footer": f"wedefi-pipelines \u00b7 alert {alert.id} \u00b7 contextHash {alert.context_hash[:12]}",
            "ts": int(utcnow().timestamp()),
        }],
    }


@dataclass(frozen=True)
class Attempt:
    attempt: int
    success: bool
    status_code: int | None
    error: str | None
    elapsed_ms: float
    response: str | None


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


@dataclass(frozen=True)
class Webhook:
    """A Slack-compatible endpoint: each attempt bounded by `timeout_s` (connect and read),
    up to `attempts` tries on network errors, 429 and 5xx, backing off from `backoff_s`."""

    url: str
    timeout_s: float = 3.0
    attempts: int = 3
    backoff_s: float = 0.5

    @property
    def address(self) -> str:
        """Scheme and host only: a Slack webhook's path is its secret."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    def post(self, payload: Mapping[str, Any], on_attempt: Callable[[Attempt], None] | None = None) -> list[Attempt]:
        attempts = []
        for n in range(1, self.attempts + 1):
            started = time.monotonic()
            status, error, body, ok = None, None, None, False
            try:
                response = requests.post(self.url, json=payload, timeout=(self.timeout_s, self.timeout_s))
                status, body = response.status_code, response.text[:200]
                ok = 200 <= status < 300
                if not ok:
                    error = f"HTTP {status}"
            except requests.RequestException as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            attempt = Attempt(n, ok, status, error, (time.monotonic() - started) * 1000.0, body)
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(attempt)
            if ok or (status is not None and not _retryable(status)) or n == self.attempts:
                break
            time.sleep(self.backoff_s * 2 ** (n - 1))
        return attempts


class AlertSink:
    """Writes incidents and their resolutions through `connect()` (a context manager giving a
    connection inside a transaction, e.g. Database.connect), then posts them to the webhook.
    Plain Python: the Dagster sensors, the CLI and tests share it."""

    def __init__(
        self, connect: Callable[[], ContextManager[psycopg.Connection]], webhook: Webhook | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.connect = connect
        self.webhook = webhook
        self.log = logger or log

    def raise_incident(self, report: IncidentReport) -> AlertRow:
        """Record the occurrence (committed first), then announce a newly opened incident."""
        with self.connect() as conn:
            alert = record_incident(conn, report)
        if alert.created:
            self.notify(alert, "opened")
        return alert

    def resolve(self, incidents: Iterable[str], reason: str = "") -> list[AlertRow]:
        with self.connect() as conn:
            resolved = resolve_incidents(conn, incidents, reason=reason)
        for alert in resolved:
            self.notify(alert, "resolved")
        return resolved

    def open_incidents(self, prefixes: Sequence[str] | None = None) -> dict[str, AlertRow]:
        with self.connect() as conn:
            return {row.incident: row for row in open_alerts(conn, prefixes)}

    def notify(self, alert: AlertRow, event: str) -> list[Attempt]:
        """Post to the webhook (if any), one "AlertDelivery" row per attempt, each committed
        as it happens. Never raises for the webhook's sake: the alert row already exists."""
        if self.webhook is None:
            return []

        def record(attempt: Attempt) -> None:
            meta = {
                "event": event, "attempt": attempt.attempt, "of": self.webhook.attempts,
                "url": self.webhook.address, "statusCode": attempt.status_code, "error": attempt.error,
                "elapsedMs": round(attempt.elapsed_ms, 1), "response": attempt.response,
                "deliveredAt": utcnow().isoformat(),
            }
            try:
                with self.connect() as conn:
                    record_delivery(conn, alert.id, attempt.success, meta)
            except psycopg.Error as exc:
                self.log.warning("could not record webhook attempt %s for alert %s: %s", attempt.attempt, alert.id, exc)

        attempts = self.webhook.post(slack_payload(alert, event), on_attempt=record)
        if not attempts[-1].success:
            self.log.warning("webhook %s did not take alert %s (%s) after %d attempt(s): %s",
                             self.webhook.address, alert.id, event, len(attempts), attempts[-1].error)
        return attempts
