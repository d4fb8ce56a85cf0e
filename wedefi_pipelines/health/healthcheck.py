"""The platform's own healthcheck (`wedefi-pipelines healthcheck`): pure judgement of what
the Dagster instance says about the daemon, the sensors and the schedules.

Dagster OSS has no such check beyond `dagster-daemon liveness-check` (heartbeats only):
a daemon can be alive while a sensor stopped ticking (its code location failed to load,
a tick hangs) or a schedule's ticks fail, and then no alert is ever written. Meant for
cron or an external alerting job; `liveness` keeps to heartbeats, so a container
liveness probe never restarts the daemon over a user-code error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# Dagster's daemons write a heartbeat every 30 s (dagster._daemon.daemon DEFAULT_HEARTBEAT_INTERVAL_SECONDS).
HEARTBEAT_INTERVAL_S = 30.0
DEFAULT_SENSOR_INTERVAL_S = 30.0  # a sensor without minimum_interval_seconds


@dataclass(frozen=True)
class Heartbeat:
    daemon_type: str
    timestamp: float | None  # None: this daemon never wrote one to this instance
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Instigator:
    """A sensor or schedule of the code location, as the instance knows it."""

    kind: str  # 'sensor' | 'schedule'
    name: str
    running: bool  # RUNNING in the UI, or running by default and not stopped
    interval_s: float | None  # sensors: minimum_interval_seconds
    last_tick_at: float | None  # epoch seconds of its latest tick (None: never ticked)
    last_status: str | None  # SUCCESS, SKIPPED, FAILURE, STARTED
    last_error: str | None = None
    started_at: float | None = None  # when it was last turned on in the UI, if ever


@dataclass(frozen=True)
class Problem:
    subject: str  # 'daemon SENSOR', 'sensor slow_query_sensor', ...
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


def _age(now: float, then: float) -> str:
    return f"{now - then:,.0f} s"


def heartbeat_problems(heartbeats: Iterable[Heartbeat], required: Sequence[str], now: float,
                       tolerance_s: float, with_errors: bool = False) -> list[Problem]:
    """A required daemon whose heartbeat is missing or older than the heartbeat interval
    plus the tolerance; with `with_errors`, also the errors a fresh heartbeat reports."""
    by_type = {h.daemon_type: h for h in heartbeats}
    limit = HEARTBEAT_INTERVAL_S + tolerance_s
    problems = []
    for daemon in required:
        beat = by_type.get(daemon)
        if beat is None or beat.timestamp is None:
            problems.append(Problem(f"daemon {daemon}", "no heartbeat in this instance: the daemon is not running "
                                                        "(or runs against another DAGSTER_HOME)"))
        elif now - beat.timestamp > limit:
            problems.append(Problem(f"daemon {daemon}", f"last heartbeat {_age(now, beat.timestamp)} ago, over "
                                                        f"{limit:,.0f} s: the daemon is down or stuck"))
        elif with_errors and beat.errors:
            problems.append(Problem(f"daemon {daemon}", f"reports {len(beat.errors)} error(s): {beat.errors[0]}"))
    return problems


def instigator_problems(instigators: Iterable[Instigator], now: float, tolerance_s: float) -> list[Problem]:
    """A RUNNING sensor that has not ticked within its interval plus the tolerance, or whose
    last tick failed; a RUNNING schedule whose last tick failed."""
    problems = []
    for item in instigators:
        if not item.running:
            continue
        subject = f"{item.kind} {item.name}"
        if item.last_status == "FAILURE":
            error = (item.last_error or "no error recorded").strip().splitlines()[0][:300]
            when = f" ({_age(now, item.last_tick_at)} ago)" if item.last_tick_at else ""
            problems.append(Problem(subject, f"last tick failed{when}: {error}"))
        if item.kind != "sensor":
            continue
        interval = item.interval_s or DEFAULT_SENSOR_INTERVAL_S
        limit = interval + tolerance_s
        if item.last_tick_at is None:
            since = item.started_at
            if since is None or now - since > limit:
                problems.append(Problem(subject, "RUNNING but it has never ticked"))
        elif now - item.last_tick_at > limit:
            problems.append(Problem(subject, f"last tick {_age(now, item.last_tick_at)} ago, over its "
                                             f"{interval:,.0f} s interval + {tolerance_s:,.0f} s tolerance"))
    return problems


def judge(heartbeats: Iterable[Heartbeat], required: Sequence[str], instigators: Iterable[Instigator], now: float,
          tolerance_s: float, liveness: bool = False) -> list[Problem]:
    """Everything wrong, heartbeats first; `liveness` judges heartbeats only."""
    heartbeats = list(heartbeats)
    if liveness:
        return heartbeat_problems(heartbeats, required, now, tolerance_s)
    return (heartbeat_problems(heartbeats, required, now, tolerance_s, with_errors=True)
            + instigator_problems(instigators, now, tolerance_s))
