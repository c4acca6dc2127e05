"""The daemon's one logging setup: loguru sinks, formats, masking, stdlib routing.

Only the daemon's entry point calls ``setup_logging``; library modules log
through loguru's ``logger`` and add no sinks. Every sink masks secrets in
the finished text, so nothing reaches a terminal, the journal or a JSON
line unmasked, tracebacks included (they are logged without local
variables).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from loguru import logger

from .masking import masker

FORMATS = ("auto", "console", "journal", "json")

# syslog priorities, which journald reads from a "<N>" prefix.
_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# C0 but tab, DEL, and C1 (U+009B is a CSI to some terminals, as ESC [ is).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """Escape control characters (newlines included), so one line stays one line and
    a worker's output cannot drive the terminal that shows it (colours, cursor, title)."""
    if not _CONTROL_RE.search(text):
        return text
    return _CONTROL_RE.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


# Every control character but tab and newline (the journal format prefixes each line).
_UNSAFE_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _escape_message(record: Any) -> None:
    """A loguru patcher: escape terminal control sequences in every message.

    Worker lines are escaped when they are read; this also covers messages
    that quote worker output or other untrusted text (an exit report's last
    lines, a plugin's error), so no sink passes raw escapes to a terminal.
    """
    message = record["message"]
    if _UNSAFE_RE.search(message):
        record["message"] = _UNSAFE_RE.sub(
            lambda m: m.group(0).encode("unicode_escape").decode("ascii"), message
        )


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` -> ``journal`` under journald (``JOURNAL_STREAM``), else ``console``."""
    if fmt != "auto":
        return fmt
    return "journal" if os.environ.get("JOURNAL_STREAM") else "console"


def _tags(record: Any) -> str:
    extra = record["extra"]
    worker = extra.get("worker")
    return f"[{worker}] " if worker else ""


def _console_format(record: Any) -> str:
    record["extra"]["_tags"] = _tags(record)
    return (
        "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        "<cyan>{extra[_tags]}</cyan>{message}\n{exception}"
    )


def _exception_text(record: Any) -> str:
    exc = record["exception"]
    return "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))


def _journal_line(record: Any) -> str:
    prio = _PRIORITY.get(record["level"].name, 6)
    text = _tags(record) + record["message"]
    if record["exception"] is not None:
        text += "\n" + _exception_text(record).rstrip()
    # Every line carries the priority; a worker line's own newlines were escaped already.
    return "\n".join(f"<{prio}>{line}" for line in masker.mask(text).split("\n")) + "\n"


def _json_line(record: Any) -> str:
    extra = {k: v for k, v in record["extra"].items() if not k.startswith("_")}
    obj: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "worker": extra.pop("worker", None),
        "service": extra.pop("service", None),
        "pid": record["process"].id,
        "logger": record["name"],
    }
    for key, value in extra.items():
        obj.setdefault(key, value if isinstance(value, (str, int, float, bool, type(None))) else str(value))
    if record["exception"] is not None:
        obj["exception"] = _exception_text(record)
    return masker.mask(json.dumps(obj, ensure_ascii=False)) + "\n"


class _MaskedStream:
    """A sink that masks loguru's finished text before writing it."""

    def __init__(self, stream: TextIO, render: Callable[[Any], str] | None = None):
        self.stream = stream
        self.render = render

    def write(self, message: Any) -> None:
        text = self.render(message.record) if self.render else masker.mask(str(message))
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr must not take the daemon down


class InterceptHandler(logging.Handler):
    """Routes the standard library's ``logging`` (aiohttp, asyncio, plugins) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure loguru's one sink; returns the format chosen. Only citadeld's entry point calls this."""
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    # citadeld's own HF_TOKEN or *_API_KEY may surface in any message (a
    # plugin's error, a worker's output) before a config names it.
    masker.add_env(os.environ)
    logger.remove()
    logger.configure(patcher=_escape_message)
    common: dict[str, Any] = {"level": level, "backtrace": False, "diagnose": False, "catch": True}
    if fmt == "console":
        colour = hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")
        logger.add(_MaskedStream(stream), format=_console_format, colorize=colour, **common)
    elif fmt == "journal":
        logger.add(_MaskedStream(stream, _journal_line), format="{message}", colorize=False, **common)
    elif fmt == "json":
        logger.add(_MaskedStream(stream, _json_line), format="{message}", colorize=False, **common)
    else:
        raise ValueError(f"unknown log format {fmt!r}; one of {', '.join(FORMATS)}")
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return fmt
