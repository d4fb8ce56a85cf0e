"""What the Dagster instance knows about the daemon, the sensors, the schedules and the runs,
for `healthcheck` and `metrics`. Dagster's instigator types have no public import path,
so the one internal import lives here (test_healthcheck.py fails loudly if it moves).

Which sensors and schedules exist, and which run by default, comes from the code
location's definitions; whether one was turned on or off in the UI, and its ticks, from
the instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.scheduler.instigation import InstigatorStatus

from wedefi_pipelines.health.healthcheck import Heartbeat, Instigator

FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "(no message)"


def heartbeats(instance: dg.DagsterInstance) -> tuple[list[Heartbeat], list[str]]:
    """(every daemon's latest heartbeat, the daemon types this instance requires)."""
    beats = [Heartbeat(kind, beat.timestamp, tuple(_first_line(e.message) for e in beat.errors or ()))
             for kind, beat in instance.get_daemon_heartbeats().items()]
    return beats, list(instance.get_required_daemon_types())


def _running(default_running: bool, state: Any) -> bool:
    if state is None or state.status == InstigatorStatus.DECLARED_IN_CODE:
        return default_running
    return state.status == InstigatorStatus.RUNNING


def instigators(instance: dg.DagsterInstance, repository: Any) -> list[Instigator]:
    """The code location's sensors and schedules with their status and latest tick."""
    states = {}
    for kind in (InstigatorType.SENSOR, InstigatorType.SCHEDULE):
        for state in instance.all_instigator_state(instigator_type=kind):
            states[(kind, state.instigator_name)] = state
    found = []
    definitions = ([("sensor", InstigatorType.SENSOR, d) for d in repository.sensor_defs]
                   + [("schedule", InstigatorType.SCHEDULE, d) for d in repository.schedule_defs])
    for label, kind, definition in definitions:
        state = states.get((kind, definition.name))
        default_running = definition.default_status in (dg.DefaultSensorStatus.RUNNING,
                                                        dg.DefaultScheduleStatus.RUNNING)
        tick = None
        if state is not None:
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
            tick = ticks[0] if ticks else None
        data = state.instigator_data if state is not None else None
        interval = getattr(definition, "minimum_interval_seconds", None) if label == "sensor" else None
        found.append(Instigator(
            kind=label, name=definition.name, running=_running(default_running, state),
            interval_s=float(interval) if interval else None,
            last_tick_at=tick.timestamp if tick else None,
            last_status=tick.status.value if tick else None,
            last_error=(tick.error.message if tick and tick.error else None),
            started_at=getattr(data, "last_sensor_start_timestamp", None),
        ))
    return found


@dataclass(frozen=True)
class JobRuns:
    job: str
    counts: dict[str, int]  # finished runs still in storage, by status
    last_status: str | None
    last_end: float | None  # epoch seconds


def job_runs(instance: dg.DagsterInstance, repository: Any) -> list[JobRuns]:
    """Finished runs per job of the code location (what retention has not purged yet) and
    each job's latest outcome. Implicit asset jobs included."""
    found = []
    for job in sorted(repository.job_names):
        counts = {status.value: instance.get_runs_count(dg.RunsFilter(job_name=job, statuses=[status]))
                  for status in FINISHED}
        last = instance.get_run_records(dg.RunsFilter(job_name=job, statuses=list(FINISHED)), limit=1)
        record = last[0] if last else None
        end = None
        if record is not None:
            end = record.end_time or record.update_timestamp.timestamp()
        found.append(JobRuns(job, counts, record.dagster_run.status.value if record else None, end))
    return found


def code_location_repository():
    """The repository of this code location (sensors, schedules, jobs and their defaults)."""
    from wedefi_pipelines.definitions import defs

    return defs.get_repository_def()
