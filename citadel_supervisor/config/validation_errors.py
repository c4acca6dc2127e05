"""Turning pydantic's ``ValidationError`` into ``ConfigIssue``s with clean key paths."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import ConfigIssue, did_you_mean, format_path


def _model_at(model: type[BaseModel], loc: tuple[object, ...]) -> type[BaseModel] | None:
    """The model whose fields sit at ``loc`` under ``model``, if one does."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) is list:
            current = get_args(current)[0]
        # Unwrap Optional[...] / unions to their one model member.
        while get_origin(current) in (Union, types.UnionType):
            models = [a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None



def _issues_from_validation(
    exc: ValidationError,
    model: type[BaseModel],
    prefix: tuple[object, ...],
    origin: Callable[[tuple[object, ...]], Path | None],
    data: object,
) -> list[ConfigIssue]:
    """Turn pydantic's errors into issues with clean key paths.

    pydantic reports a value that matches no member of a union once per
    member, each under a tag such as ``list[union[int,str]]``. Tags are
    dropped from the path, only the members that got furthest into the value
    are kept, and what is left at one path becomes one issue.
    """
    found: list[tuple[tuple[object, ...], str, tuple[object, ...] | None, str | None]] = []
    for err in exc.errors():
        raw = tuple(err["loc"])
        loc, union_at, member = _strip_union_tags(raw, data, keep_last=err["type"] == "missing")
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = parent.model_fields if parent else {}
            message = "unknown key" + did_you_mean(str(loc[-1]), known)
        else:
            message = err["msg"].removeprefix("Value error, ")
            loc, message = _key_named_in_message(model, loc, message)
            if err["type"] != "missing" and "input" in err and _is_scalar(err["input"]):
                message += f" (got {err['input']!r})"
        found.append((loc, message, union_at, member))

    # Per union, keep only the members whose errors reach deepest into the value.
    deepest: dict[tuple[object, ...], int] = {}
    for loc, _, union_at, _ in found:
        if union_at is not None:
            deepest[union_at] = max(deepest.get(union_at, 0), len(loc))
    kept = [f for f in found if f[2] is None or len(f[0]) == deepest[f[2]]]

    issues: list[ConfigIssue] = []
    merged: dict[tuple[object, ...], list[str]] = {}
    for loc, message, union_at, _ in kept:
        if union_at is None:
            issues.append(ConfigIssue(origin(prefix + loc), format_path(prefix + loc), message))
        elif message not in merged.setdefault(loc, []):
            merged[loc].append(message)
    for loc, messages in merged.items():
        message = messages[0] if len(messages) == 1 else _one_of(model, loc, messages)
        issues.append(ConfigIssue(origin(prefix + loc), format_path(prefix + loc), message))
    return issues


def _strip_union_tags(
    loc: tuple[object, ...], data: object, keep_last: bool
) -> tuple[tuple[object, ...], tuple[object, ...] | None, str | None]:
    """``loc`` without union tags, the path of the first union, and the member tag there.

    A tag is a part of the path that is no key of the input at that point;
    the last part is kept when it names a missing key.
    """
    clean: list[object] = []
    union_at: tuple[object, ...] | None = None
    member: str | None = None
    node: Any = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        is_key = isinstance(node, dict) and part in node
        is_index = isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node)
        if is_key or is_index:
            node = node[part]
        elif isinstance(part, str) and not (last and keep_last):
            if union_at is None:
                union_at, member = tuple(clean), part
            continue
        else:
            node = None
        clean.append(part)
    return tuple(clean), union_at, member


_KEY_PREFIX_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*): (.+)$", re.DOTALL)


def _key_named_in_message(
    model: type[BaseModel], loc: tuple[object, ...], message: str
) -> tuple[tuple[object, ...], str]:
    """Move a leading ``key[i]: `` of a model validator's message into the path.

    A validator that checks several fields at once names the key it is about
    that way (``command[0]: prog does not exist``).
    """
    match = _KEY_PREFIX_RE.match(message)
    if not match:
        return loc, message
    owner = _model_at(model, loc)
    if owner is None or match.group(1) not in owner.model_fields:
        return loc, message
    indices = tuple(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return loc + (match.group(1),) + indices, match.group(3)


def _one_of(model: type[BaseModel], loc: tuple[object, ...], messages: list[str]) -> str:
    """One message for a value that matched none of a union's members."""
    parent = _model_at(model, loc[:-1]) if loc else None
    field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
    got = ""
    for m in messages:
        if "(got " in m:
            got = m[m.rindex(" (got "):]
            break
    if field is not None and field.description:
        return f"expected {field.description}{got}"
    parts = [m.removesuffix(got) if got else m for m in messages]
    parts = [parts[0]] + [p.removeprefix("Input should be ") for p in parts[1:]]
    return " or ".join(parts) + got


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) and len(str(value)) < 80

