"""The daemon's log: formats, escaping, stdlib routing, and secrets kept out of every sink."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from citadel_supervisor.logs.daemon_log import escape_control, resolve_format, setup_logging
from citadel_supervisor.logs.masking import masker

ANSI_RE = re.compile(r"\x1b\[")
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


@pytest.fixture
def log_stream() -> Iterator[Any]:
    """``log_stream(fmt)`` -> a StringIO that citadeld's logging writes to; all undone afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_aiohttp = logging.getLogger("aiohttp.access").level

    def make(fmt: str, level: str = "DEBUG") -> io.StringIO:
        stream = io.StringIO()
        assert setup_logging(level, fmt, stream) == fmt
        return stream

    yield make
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    logging.getLogger("aiohttp.access").setLevel(saved_aiohttp)
    masker.clear()


def test_journal_format_prefixes_every_line(log_stream: Any) -> None:
    stream = log_stream("journal")
    logger.debug("debugging")
    logger.info("started")
    logger.bind(worker="chat.0").warning("slow")
    logger.error("two\nlines")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed")
    lines = stream.getvalue().splitlines()
    assert lines[:5] == ["<7>debugging", "<6>started", "<4>[chat.0] slow", "<3>two", "<3>lines"]
    assert lines[5] == "<3>it failed"
    # The traceback's lines carry the priority too, so journald keeps them together at ERROR.
    assert any("ValueError: boom" in line for line in lines[6:])
    for line in lines:
        assert re.match(r"^<[0-7]>", line), line
        assert not ANSI_RE.search(line) and not TIMESTAMP_RE.search(line), line


def test_json_format_one_object_per_line(log_stream: Any) -> None:
    stream = log_stream("json")
    logger.info("plain")
    logger.bind(worker="chat.1", service="chat").info("from a worker: {}", "x")
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("caught")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["message"] for r in records] == ["plain", "from a worker: x", "caught"]
    for r in records:
        assert {"time", "level", "message", "worker", "service", "pid"} <= set(r)
        assert TIMESTAMP_RE.match(r["time"])
    assert records[0]["level"] == "INFO" and records[0]["worker"] is None
    assert records[1]["worker"] == "chat.1" and records[1]["service"] == "chat"
    assert records[2]["level"] == "ERROR" and "KeyError: 'missing'" in records[2]["exception"]


def test_console_format_has_no_colour_on_a_file(log_stream: Any) -> None:
    stream = log_stream("console")
    logger.bind(worker="w").info("hello")
    text = stream.getvalue()
    assert "[w] hello" in text and TIMESTAMP_RE.search(text) and not ANSI_RE.search(text)


def test_control_characters_in_any_message_are_escaped(log_stream: Any) -> None:
    stream = log_stream("journal")
    logger.info("exited; last lines:\n  | \x1b]0;title\x07\rfake\x00")
    assert stream.getvalue() == "<6>exited; last lines:\n<6>  | \\x1b]0;title\\x07\\rfake\\x00\n"


def test_level_filters(log_stream: Any) -> None:
    stream = log_stream("journal", level="WARNING")
    logger.info("quiet")
    logger.warning("loud")
    assert stream.getvalue() == "<4>loud\n"


def test_auto_picks_journal_under_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert resolve_format("auto", io.StringIO()) == "journal"
    assert resolve_format("json", io.StringIO()) == "json"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert resolve_format("auto", io.StringIO()) == "console"


def test_unknown_format_is_refused(log_stream: Any) -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        log_stream("xml")


def test_stdlib_logging_is_routed(log_stream: Any) -> None:
    stream = log_stream("json")
    logging.getLogger("aiohttp").warning("server %s is %s", "x", "slow")
    logging.getLogger("aiohttp.access").info("GET / 200")  # access logs are too chatty
    logging.getLogger("some.plugin").debug("detail")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["message"]) for r in records] == [("WARNING", "server x is slow"),
                                                             ("DEBUG", "detail")]


@pytest.mark.parametrize("line, escaped", [
    ("plain", "plain"),
    ("tab\there", "tab\there"),
    ("a\nb", "a\\nb"),
    ("cr\roverwrite", "cr\\roverwrite"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("nul\x00del\x7f", "nul\\x00del\\x7f"),
])
def test_escape_control(line: str, escaped: str) -> None:
    assert escape_control(line) == escaped


def test_every_sink_masks(log_stream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    masker.add_secret("planted-secret-value")
    # The daemon's own secret-named environment is masked from the start.
    monkeypatch.setenv("CITADEL_TEST_API_KEY", "env-secret-of-the-daemon")
    for fmt in ("journal", "json", "console"):
        stream = log_stream(fmt)
        logger.info("value planted-secret-value and hf_abcdefghijklmnop, env-secret-of-the-daemon")
        try:
            raise RuntimeError("wrapped planted-secret-value")
        except RuntimeError:
            logger.exception("failed")
        text = stream.getvalue()
        for secret in ("planted-secret-value", "hf_abcdefghijklmnop", "env-secret-of-the-daemon"):
            assert secret not in text, text
        assert "****" in text


# --------------------------------------------------------------------------
# A real citadeld: a secret planted everywhere reaches no sink
# --------------------------------------------------------------------------

SECRET_VAR = "tokvalue-abcdef-98765"      # via ${CITADEL_TEST_TOKEN}: a secret by its name
SECRET_ENV = "plainvalue-apikey-123"       # a literal in an API_KEY-named env entry
SECRET_CWD = "cwdpart-secret-4242"         # reaches an exception message (a spawn error)

LEAKY_WORKER = """\
import os, sys
print("env", os.environ["HF_TOKEN"], os.environ["OPENAI_API_KEY"], flush=True)
print("arg", sys.argv[1], flush=True)
print("pattern hf_abcdefghijklmnop Authorization: Bearer abcdefghijkl", file=sys.stderr, flush=True)
raise RuntimeError("failed with " + os.environ["HF_TOKEN"])
"""


def test_secrets_reach_no_sink(daemon_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY_WORKER)
    d = daemon_factory(f"""\
        [services.leaky]
        type = "command"
        command = ["python3", "{script}", "${{CITADEL_TEST_TOKEN}}"]
        env = {{ HF_TOKEN = "${{CITADEL_TEST_TOKEN}}", OPENAI_API_KEY = "{SECRET_ENV}" }}
        restart = "never"

        [services.evil]
        type = "command"
        command = ["python3", "-c", 'import sys; sys.stdout.write("start\\x1b[2J\\rfake\\x00end\\n")']
        restart = "never"

        [services.nocwd]
        type = "command"
        command = ["python3", "-c", "pass"]
        cwd = "/nonexistent/${{CITADEL_TEST_DIR_SECRET}}"
        restart = "never"
        """, env={"CITADEL_TEST_TOKEN": SECRET_VAR, "CITADEL_TEST_DIR_SECRET": SECRET_CWD})
    leaky = d.wait_for(lambda s: s["leaky"] if s["leaky"]["last_exit"] else None, what="leaky to exit")
    nocwd = d.wait_for(lambda s: s["nocwd"] if s["nocwd"]["last_error"] else None, what="nocwd to fail")
    d.wait_for(lambda s: s["evil"]["last_exit"], what="evil to exit")
    # The worker really printed them, and the daemon really reported them, masked.
    assert any("env **** ****" in line for line in leaky["last_lines"]), leaky
    assert "****" in nocwd["last_error"], nocwd

    sinks = {
        "daemon log": d.logs(),
        "worker log file": (d.root / "log" / "leaky.log").read_text(),
        "status --json": d.ctl("status", "--json").stdout,
        "status": d.ctl("status").stdout,
        "logs leaky": d.ctl("logs", "leaky").stdout,
    }
    assert "arg ****" in sinks["worker log file"]
    assert "RuntimeError: failed with ****" in sinks["logs leaky"]
    for where, text in sinks.items():
        for secret in (SECRET_VAR, SECRET_ENV, SECRET_CWD, "hf_abcdefghijklmnop", "abcdefghijkl"):
            assert secret not in text, f"{secret} leaked into the {where}:\n{text[-3000:]}"
    records = [json.loads(line) for line in sinks["daemon log"].splitlines()]  # --log-format json
    check_control_characters_escaped(records)


def check_control_characters_escaped(records: list[dict[str, Any]]) -> None:
    """The worker "evil" wrote terminal escapes; the daemon's log has them escaped."""
    lines = [r for r in records if r.get("worker") == "evil" and r["message"].startswith("start\\")]
    assert len(lines) == 1, records
    assert lines[0]["message"] == "start\\x1b[2J\\rfake\\x00end"
    assert lines[0]["service"] == "evil"
    # No message quotes the worker's raw bytes (the exit report's "last lines" included):
    # a journal or console sink would pass them to the terminal.
    for r in records:
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", r["message"]), r
