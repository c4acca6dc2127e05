"""Durations in config: seconds as numbers, or strings with units ("500ms", "2m")."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> object:
    """Turn ``"500ms"``, ``"2m"``, ``"1.5h"`` or a number into seconds (float).

    Anything else is passed on unchanged, for pydantic to reject with its own
    message.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration: use seconds (30) or a number with a unit "
                "(500ms, 30s, 2m, 1h)"
            )
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return value


#: A non-negative duration in seconds.
Duration = Annotated[float, BeforeValidator(parse_duration)]
