"""The raw config: reading TOML files, merging drop-ins, and ``${VAR}`` interpolation.

``_Sources`` remembers which file each key path came from, so that every
issue names the file that set the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigIssue, format_path
from .interpolation import InterpolationError, Interpolator


class _Sources:
    """Which file each key path came from, for error messages."""

    def __init__(self, main: Path):
        self.main = main
        self.by_path: dict[tuple[object, ...], Path] = {}

    def record(self, data: Mapping[str, Any], file: Path, prefix: tuple[object, ...] = ()) -> None:
        for key, value in data.items():
            path = prefix + (key,)
            self.by_path[path] = file
            if isinstance(value, Mapping):
                self.record(value, file, path)

    def __call__(self, loc: tuple[object, ...]) -> Path:
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.by_path:
                return self.by_path[loc[:end]]
        return self.main


def _read_toml(path: Path, issues: list[ConfigIssue]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        issues.append(ConfigIssue(path, "", "file not found"))
    except PermissionError:
        issues.append(ConfigIssue(path, "", "permission denied"))
    except IsADirectoryError:
        issues.append(ConfigIssue(path, "", "is a directory, not a TOML file"))
    except tomllib.TOMLDecodeError as exc:
        issues.append(ConfigIssue(path, "", f"invalid TOML: {exc}"))
    return None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge ``extra`` into ``base``: tables merge key by key, other values replace."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _interpolate(
    data: Any, interp: Interpolator, loc: tuple[object, ...], sources: _Sources, issues: list[ConfigIssue]
) -> Any:
    if isinstance(data, str):
        try:
            return interp.resolve(data)
        except InterpolationError as exc:
            issues.append(ConfigIssue(sources(loc), format_path(loc), str(exc)))
            return data
    if isinstance(data, dict):
        return {k: _interpolate(v, interp, loc + (k,), sources, issues) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, interp, loc + (i,), sources, issues) for i, v in enumerate(data)]
    return data


def _resolve_path(value: Path | None, base: Path) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value)


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``CITADEL_DISABLE_PLUGINS`` (comma separated)."""
    return {n.strip() for n in os.environ.get("CITADEL_DISABLE_PLUGINS", "").split(",") if n.strip()}
