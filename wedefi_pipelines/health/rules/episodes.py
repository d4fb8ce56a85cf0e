"""Breach episodes and the sensor cursor that carries them between ticks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from wedefi_pipelines.health.rules.findings import Finding, Evaluation


# -- episodes and the sensor cursor ------------------------------------------------------------

@dataclass(frozen=True)
class Episode:
    incident: str
    id: str  # when it opened, compact UTC: part of the run key
    since: str  # ISO 8601
    passing_since: str | None = None  # ISO 8601: the probe passes again, the hold is running

    @property
    def run_key(self) -> str:
        return f"{self.incident}.{self.id}"


@dataclass(frozen=True)
class EpisodeChanges:
    opened: tuple[tuple[Finding, Episode], ...]
    ongoing: tuple[tuple[Finding, Episode], ...]
    closed: tuple[Episode, ...]
    open: Mapping[str, Episode]


def episode_id(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def track_episodes(
    open_episodes: Mapping[str, Episode], evaluation: Evaluation, now: datetime, clear_after_s: float = 0.0
) -> EpisodeChanges:
    """Open an episode per newly breached incident and keep the breached ones. An episode
    whose incident passes (or is no longer evaluated at all) closes once it has passed for
    `clear_after_s`; a breach during that hold continues the same episode. Unknown
    incidents (their server could not be asked) keep their episode as it is."""
    now_iso = now.astimezone(timezone.utc).isoformat()
    opened, ongoing, still_open = [], [], {}
    for finding in evaluation.breached:
        key = finding.incident
        if key in still_open:  # two findings for one incident: the first one speaks
            continue
        episode = open_episodes.get(key)
        if episode is None:
            episode = Episode(key, episode_id(now), now_iso)
            opened.append((finding, episode))
        else:
            episode = Episode(key, episode.id, episode.since)
            ongoing.append((finding, episode))
        still_open[key] = episode
    closed = []
    for key, episode in open_episodes.items():
        if key in still_open:
            continue
        if key in evaluation.unknown:
            still_open[key] = episode
            continue
        passing_since = episode.passing_since or now_iso
        if (now - datetime.fromisoformat(passing_since)).total_seconds() >= clear_after_s:
            closed.append(episode)
        else:
            still_open[key] = Episode(key, episode.id, episode.since, passing_since)
    return EpisodeChanges(tuple(opened), tuple(ongoing), tuple(closed), still_open)


CURSOR_VERSION = 1


@dataclass(frozen=True)
class CursorState:
    episodes: Mapping[str, Episode] = field(default_factory=dict)
    baseline: Mapping[str, Any] = field(default_factory=dict)


def parse_cursor(text: str | None) -> CursorState:
    """The sensor's state; an empty, foreign or older cursor starts afresh (ValueError for a
    cursor that is ours but damaged, so it is not silently dropped)."""
    if not text:
        return CursorState()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"health sensor cursor is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
        return CursorState()
    try:
        episodes = {k: Episode(k, v["id"], v["since"], v.get("passing_since"))
                    for k, v in data.get("episodes", {}).items()}
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"health sensor cursor has a damaged episode: {exc!r}") from None
    baseline = data.get("baseline", {})
    if not isinstance(baseline, dict):
        raise ValueError("health sensor cursor's baseline is not an object")
    return CursorState(episodes, baseline)


def dump_cursor(state: CursorState) -> str:
    return json.dumps(
        {"v": CURSOR_VERSION,
         "episodes": {k: {"id": e.id, "since": e.since, "passing_since": e.passing_since}
                      for k, e in sorted(state.episodes.items())},
         "baseline": state.baseline},
        sort_keys=True, separators=(",", ":"),
    )
