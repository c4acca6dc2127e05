"""The status page's parts in-process: what the page may see, its feed's cap and backlog, and
where exporter routes are mounted. tests/integration/test_status_page.py drives the page itself."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from loguru import logger

from citadel_supervisor.control.route import Route, accept_plugin_routes
from citadel_supervisor.events import WorkerEvent
from citadel_supervisor.process.tree import ExitStatus
from citadel_supervisor.ui.page import STATIC, read_static
from citadel_supervisor.ui.stream import (
    BACKLOG,
    MAX_STREAMS,
    EventStream,
    EventStreams,
    stream_limit,
)
from citadel_supervisor.ui.views import (
    MAX_LINE,
    page_event,
    page_gpus,
    page_lines,
    page_worker,
    sse_message,
)

HOSTILE = "<script>alert(1)</script> \x1b[31mred\x1b[0m token=sk-abcdefghijkl"


class Connection:
    """What a stream reads of its page's connection."""

    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class FakeWorker:
    """What ``page_worker`` reads of a worker: ``to_json`` and ``last_exit``."""

    def __init__(self, last_exit: ExitStatus | None = None, last_failure: str | None = None):
        self.last_exit = last_exit
        self.last_failure = last_failure

    def to_json(self) -> dict[str, Any]:
        return {"name": "chat", "service": "chat", "type": "command", "state": "backoff", "pid": None,
                "restarts": 2, "ready": False, "gpus": [0], "port": 8001, "since": 1.0, "uptime": None,
                "last_exit": self.last_exit.to_json() if self.last_exit else None, "last_error": None,
                "last_failure": self.last_failure,
                "phase": None, "models": ["m"], "probes": {"readiness": {"passing": False}},
                "host": "0.0.0.0", "gpu_uuids": ["GPU-1"], "env": {"HF_TOKEN": "hf_secretvalue"},
                "last_lines": [HOSTILE]}


def test_a_worker_shows_its_chosen_fields_and_output_only_with_logs() -> None:
    worker = FakeWorker(ExitStatus(code=None, signal=9))
    shown = page_worker(worker, logs=False)  # type: ignore[arg-type]
    assert "env" not in shown and "last_lines" not in shown and "probes" not in shown
    assert shown["last_exit_reason"] == "killed by SIGKILL"
    oom = page_worker(FakeWorker(ExitStatus(code=None, signal=9), last_failure="oom"), logs=False)  # type: ignore[arg-type]
    assert oom["last_exit_reason"] == "killed by SIGKILL (oom)" and oom["last_failure"] == "oom"
    assert (shown["state"], shown["restarts"], shown["port"], shown["gpus"]) == ("backoff", 2, 8001, [0])
    with_logs = page_worker(worker, logs=True)  # type: ignore[arg-type]
    assert "env" not in with_logs
    assert with_logs["last_lines"] == ["<script>alert(1)</script> \\x1b[31mred\\x1b[0m token=****"]


def test_output_is_masked_escaped_and_cut_after_masking() -> None:
    assert page_lines(["a\x07b\rc"]) == ["a\\x07b\\rc"]
    secret_at_the_cut = "x" * (MAX_LINE - 5) + " sk-abcdefghijklmnop"
    (cut,) = page_lines([secret_at_the_cut])
    assert "abcdef" not in cut and cut.endswith(" [cut]")
    assert len(cut) <= MAX_LINE + len(" [cut]")


def test_an_event_keeps_its_detail_but_output_only_with_logs() -> None:
    event = WorkerEvent("exit", "chat", "chat", "stopping", "running", detail={
        "exit": {"code": 3, "signal": None}, "reason": "exit code 3", "last_lines": [HOSTILE],
        "something_new": "not shown"})
    shown = page_event(event, logs=False)
    assert shown["detail"] == {"exit": {"code": 3, "signal": None}, "reason": "exit code 3"}
    assert page_event(event, logs=True)["detail"]["last_lines"][0].startswith("<script>")


def test_gpus_say_which_workers_hold_them() -> None:
    answer = {"available": True, "fake": True, "fake_host": "/secret/path.json", "driver_version": "550",
              "gpus": [{"index": 0, "uuid": "GPU-0", "name": "H100", "pci_bus_id": "0000:01:00.0",
                        "memory": {"total": 80, "used": 40, "free": 40}, "workers": ["chat"],
                        "processes": [{"pid": 1, "used_memory": 10, "worker": "chat"},
                                      {"pid": 2, "used_memory": 10, "worker": "embed"},
                                      {"pid": 3, "used_memory": 20, "worker": None}]}]}
    shown = page_gpus(answer)
    assert "fake_host" not in shown
    (gpu,) = shown["gpus"]
    assert (gpu["workers"], gpu["holders"], gpu["other_processes"]) == (["chat"], ["chat", "embed"], 1)
    assert "processes" not in gpu and "pci_bus_id" not in gpu
    assert page_gpus({"available": False, "reason": "no NVML", "gpus": []})["reason"] == "no NVML"


def test_a_server_sent_event_is_one_line_of_masked_json() -> None:
    message = sse_message("worker", {"line": "two\nlines\r\n\u2028 and token=abcdefgh"})
    text = message.decode()
    head, data, end = text.split("\n", 2)
    assert head == "event: worker" and end == "\n"
    assert json.loads(data.removeprefix("data: ")) == {"line": "two\nlines\r\n\u2028 and token=****"}


def test_streams_are_capped_and_a_slow_one_is_marked_behind() -> None:
    assert stream_limit(512) == MAX_STREAMS and stream_limit(20) == 10 and stream_limit(4) == 2
    assert stream_limit(1) == 1

    async def scenario() -> None:
        streams = EventStreams()
        first, second = streams.open(2, Connection()), streams.open(2, Connection())
        assert first is not None and second is not None
        assert streams.open(2, Connection()) is None
        streams.close(second)
        assert len(streams) == 1
        streams.publish(b"a")
        streams.publish(b"b")
        assert first.take() == b"ab" and first.take() == b""
        for i in range(BACKLOG + 1):
            streams.publish(f"{i}".encode())
        assert first.behind and first.pending == []
        streams.publish(b"lost")  # a stream behind needs a snapshot, not more messages
        assert first.pending == []
        first.catch_up()
        assert not first.behind
        streams.publish(b"next")
        assert first.take() == b"next"

    asyncio.run(scenario())


def test_the_streams_of_pages_that_left_are_ended() -> None:
    streams = EventStreams()
    staying, leaving = Connection(), Connection()
    kept, ended = streams.open(5, staying), streams.open(5, leaving)
    assert kept is not None and ended is not None
    streams.end_gone()
    assert not kept.ended and not ended.ended
    leaving.closing = True
    streams.end_gone()
    assert not kept.ended and ended.ended
    assert EventStream(None).gone()
    # At the cap, a page that left no longer counts, even before its handler closed it.
    streams = EventStreams()
    leaving = Connection()
    assert streams.open(1, leaving) is not None and streams.open(1, Connection()) is None
    leaving.closing = True
    assert streams.open(1, Connection()) is not None


def test_a_stream_waits_for_a_message_its_end_or_the_heartbeat() -> None:
    async def scenario() -> None:
        stream = EventStream()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stream.wait(0.05)  # nothing came: the heartbeat's turn
        assert loop.time() - started >= 0.05 and stream.take() == b""
        waiting = asyncio.ensure_future(stream.wait(60))
        await asyncio.sleep(0)  # let it start waiting
        stream.put(b"news")
        await asyncio.wait_for(waiting, 5)
        assert stream.take() == b"news"
        waiting = asyncio.ensure_future(stream.wait(60))
        await asyncio.sleep(0)  # let it start waiting
        stream.end()
        await asyncio.wait_for(waiting, 5)
        assert stream.ended
        stream.put(b"after the end")
        assert stream.pending == []
        await asyncio.wait_for(stream.wait(60), 5)  # an ended stream never waits

    asyncio.run(scenario())


def test_the_page_files_ship_and_every_one_is_served() -> None:
    files = read_static()
    assert set(files) == set(STATIC)
    html = files["index.html"].decode()
    assert '<script src="/ui/static/status.js" defer></script>' in html
    assert 'href="/ui/static/status.css"' in html
    # No inline script or style: the content security policy would block it.
    assert html.count("<script") == 1 and "style=" not in html and " on" + "click=" not in html
    # Worker data goes in as text: the script never parses HTML.
    script = files["status.js"].decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


async def _handler(request: Any) -> Any:
    raise NotImplementedError


def test_exporter_routes_may_mount_at_the_root_and_control_routes_may_not() -> None:
    page = Route("GET", "/", _handler, "a page", at_root=True)
    api = Route("GET", "/thing", _handler, "an API route")
    assert (page.mounted("/v1"), api.mounted("/v1")) == ("/", "/v1/thing")
    messages: list[str] = []
    sink = logger.add(messages.append, format="{message}")
    try:
        assert accept_plugin_routes([("ui", [page, api])], {"/metrics"}, "/v1", root_allowed=True) == [page, api]
        assert accept_plugin_routes([("ui", [page, api])], {"/v1/status"}, "/v1") == [api]
        taken = Route("GET", "/metrics", _handler, "taken", at_root=True)
        assert accept_plugin_routes([("x", [taken])], {"/metrics"}, "/v1", root_allowed=True) == []
    finally:
        logger.remove(sink)
    assert any("plugin ui adds the route GET / at the root" in m for m in messages)
    assert any("plugin x adds the control route GET /metrics, which is taken" in m for m in messages)


@pytest.mark.parametrize("name", sorted(STATIC))
def test_the_page_files_are_small(name: str) -> None:
    # No framework: each file stays a few kilobytes.
    assert len(read_static()[name]) < 32 * 1024
