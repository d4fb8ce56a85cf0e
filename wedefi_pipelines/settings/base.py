"""The settings' building blocks: strict models, durations, the error that names the key."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SETTINGS_ENV = "WEDEFI_SETTINGS"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the file and the key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(value: Any) -> float:
    """'50ms', '1s', '5000ms' or a bare number of milliseconds -> milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '50ms', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like '50ms' or '1s', got {value!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2) or "ms"]


DurationMs = Annotated[float, BeforeValidator(parse_duration_ms), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
