"""What a failed Dagster run says, as an incident for the "Alert" table.

A run requested by a health sensor carries its incident in tags (wedefi/incident, with
wedefi/alert_type, wedefi/severity, wedefi/rule); its failed check's description is the
title and its evidence the check's. Any other failed run (ingestion, archive, ...) is
the incident "run.<job>" of its job (in its code location when known): repeated failures
of one job update one alert until that alert is resolved. A job may set wedefi/incident
and wedefi/severity tags itself to group or grade its failures differently.
"""

from typing import Any, Iterable, Mapping

import dagster as dg

from wedefi_pipelines.health.alerting import IncidentReport
from wedefi_pipelines.health.rules import RUNBOOK, condition_of, safe_name

TAG_INCIDENT = "wedefi/incident"
TAG_EPISODE = "wedefi/episode"
TAG_TYPE = "wedefi/alert_type"
TAG_SEVERITY = "wedefi/severity"
TAG_RULE = "wedefi/rule"
TAG_WILL_RETRY = "dagster/will_retry"
RUN_FAILED_TYPE = "pipeline_run_failed"


def metadata_json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Dagster metadata values as plain JSON (tables as lists of records)."""
    out = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, dg.TableMetadataValue):
            out[key] = [dict(record.data) for record in value.records]
            continue
        raw = getattr(value, "value", value)
        out[key] = raw if isinstance(raw, (str, int, float, bool, list, dict, type(None))) else str(raw)
    return out


def _location(run: dg.DagsterRun) -> str | None:
    origin = run.remote_job_origin
    return origin.location_name if origin is not None else None


def incident_for_run(
    run: dg.DagsterRun, failure_message: str | None, events: Iterable[dg.DagsterEvent]
) -> IncidentReport:
    step_failures, failed_checks = [], []
    for event in events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            data = event.event_specific_data
            user = getattr(data, "user_failure_data", None)
            step_failures.append({
                "step": event.step_key,
                "error": (data.error.message.strip() if data and data.error else "")[:1000],
                "failure": None if user is None else {"description": user.description,
                                                      "metadata": metadata_json(user.metadata)},
            })
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            if not evaluation.passed:
                failed_checks.append({
                    "check": f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}",
                    "description": evaluation.description,
                    "metadata": metadata_json(evaluation.metadata),
                })
    partition = run.tags.get("dagster/partition")
    location = _location(run)
    run_info = {"runId": run.run_id, "job": run.job_name, "partition": partition, "location": location}
    tags = run.tags
    condition = condition_of(tags.get(TAG_INCIDENT, ""))
    if condition and failed_checks:
        check = failed_checks[0]
        evidence = check["metadata"].get("evidence")
        return IncidentReport(
            incident=tags[TAG_INCIDENT], type=tags.get(TAG_TYPE, RUN_FAILED_TYPE),
            severity=tags.get(TAG_SEVERITY, "warning"), title=(check["description"] or run.job_name)[:300],
            description=f"{check['description'] or ''}\nWhat to do ({RUNBOOK[condition]}) See docs/health.md.",
            evidence={"findings": evidence, "check": check["check"], "episode": tags.get(TAG_EPISODE),
                      "runId": run.run_id, "job": run.job_name},
            rule=tags.get(TAG_RULE), run=run_info,
        )
    incident = tags.get(TAG_INCIDENT) or ".".join(
        ["run"] + ([safe_name(location)] if location else []) + [safe_name(run.job_name)])
    errors = [f"{f['step']}: {f['error'].splitlines()[0] if f['error'] else ''}" for f in step_failures]
    errors += [f"{c['check']}: {c['description']}" for c in failed_checks]
    where = f" (partition {partition})" if partition else ""
    return IncidentReport(
        incident=incident, type=tags.get(TAG_TYPE, RUN_FAILED_TYPE), severity=tags.get(TAG_SEVERITY, "warning"),
        title=f"Dagster run of {run.job_name}{where} failed",
        description="\n".join([failure_message or "run failed"] + errors)[:4000],
        evidence={"runId": run.run_id, "job": run.job_name, "partition": partition, "location": location,
                  "message": failure_message, "failedSteps": step_failures, "failedChecks": failed_checks},
        rule=tags.get(TAG_RULE), run=run_info,
    )
