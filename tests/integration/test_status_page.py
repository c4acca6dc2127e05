"""The status page on a real citadeld: in headless Chromium (its DevTools protocol, tests/chromium.py),
and its data over HTTP: live updates, output shown as text, no secrets, the streams' cap.

Chromium is Debian's ``chromium`` package, which scripts/test installs: without it these tests
fail, saying so, rather than skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from chromium import Chromium, Page
from conftest import RunningDaemon, free_port, wait_until

from citadel_supervisor.ui.page import HOST_PERIOD
from citadel_supervisor.ui.stream import HEARTBEAT, MAX_STREAMS, stream_limit

#: What the page's script must never do with what a worker printed: run it.
TRAP_DIALOGS = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) {
  window[name] = (message) => { window.__dialogs.push(`${name}: ${message}`); };
}
"""
FAKE_HOST = Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json"
SLEEPER = '["python3", "-c", "import time; time.sleep(3600)"]'
#: Prints HTML and terminal escapes, then sleeps.
HOSTILE = ('["python3", "-u", "-c", "print(\'<script>alert(1)</script><img src=x onerror=alert(2)> '
           '\\\\x1b[31mred\\\\x1b[0m done\'); import time; time.sleep(3600)"]')


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium | str]:
    """One headless Chromium for the module's tests, or why it could not start (each test
    that needs it then fails, through ``need``: it does not skip, as scripts/test installs
    Chromium)."""
    started = Chromium(tmp_path_factory.mktemp("chromium"))
    try:
        started.start()
    except RuntimeError as exc:
        started.close()
        yield str(exc)
        return
    try:
        yield started
    finally:
        started.close()


def need(browser: Chromium | str) -> Chromium:
    """``browser``, or the test fails with the reason it is missing."""
    if isinstance(browser, str):
        pytest.fail(browser, pytrace=False)
    return browser


def exporter_config(port: int, extra: str = "") -> str:
    return f'[exporter]\nlisten = "127.0.0.1:{port}"\n{extra}\n'


def open_page(browser: Chromium, port: int) -> Page:
    """The status page in a new tab, once it is live and shows its workers."""
    page = browser.new_page()
    page.add_script(TRAP_DIALOGS)
    page.goto(f"http://127.0.0.1:{port}/")
    wait_until(lambda: page.evaluate("document.getElementById('connection').dataset.state") == "live",
               20, "the page's stream to be live")
    return page


def rows(page: Page) -> dict[str, dict[str, str]]:
    """Each worker row of the page, cell by cell, as the page shows it."""
    return page.evaluate("""Object.fromEntries(Array.from(document.querySelectorAll('#workers tbody tr'),
        (row) => [row.dataset.worker, Object.fromEntries(Array.from(row.cells,
            (cell) => [cell.className.split(' ')[0], cell.textContent]))]))""")


def when(value: Any, test: Any) -> Any:
    """``value`` if ``test(value)``, else None: for ``wait_until``."""
    return value if test(value) else None


def no_errors(page: Page) -> None:
    assert page.errors() == [], "the page reported errors"
    assert page.evaluate("window.__dialogs") == []


def test_the_page_shows_every_worker_and_a_kill_within_a_second(daemon_factory: Any, browser: Chromium | str) -> None:
    chromium = need(browser)
    port = free_port()
    d = daemon_factory(exporter_config(port) + f"""
        [services.victim]
        type = "command"
        command = {SLEEPER}
        restart = "never"

        [services.steady]
        type = "command"
        command = {SLEEPER}
        replicas = 2
        """)
    status = d.wait_for(lambda s: s if len(s) == 3 and all(w["state"] == "running" for w in s.values()) else None,
                        what="every worker running")
    page = open_page(chromium, port)
    shown = wait_until(lambda: when(rows(page), lambda r: len(r) == 3 and all(
        w["state"] == "running" for w in r.values())), 10, "three running workers on the page")
    for name, worker in status.items():
        assert shown[name]["pid"] == str(worker["pid"])
        assert (shown[name]["service"], shown[name]["restarts"], shown[name]["ready"]) == (
            worker["service"], "0", "yes")
    assert page.evaluate("document.getElementById('summary').textContent") == "3/3 running"

    # The kill shows on the open page within a second, with no reload. Measured from here
    # (Chromium's own clock may be tens of ms off this one): each look at the page takes a
    # round trip, so the figure is an upper bound.
    page.evaluate("window.__stillHere = true")
    state = "document.querySelector('tr[data-worker=\"victim\"]').dataset.state"
    killed_at = time.monotonic()
    os.kill(status["victim"]["pid"], signal.SIGKILL)
    wait_until(lambda: page.evaluate(state) != "running", 10, "the page to show the kill", interval=0.01)
    latency = time.monotonic() - killed_at
    assert latency < 1.0, f"the page showed the kill after {latency:.3f}s"
    victim = wait_until(lambda: when(rows(page)["victim"], lambda r: r["state"] == "stopped"), 10,
                        "the victim stopped on the page")
    assert (victim["pid"], victim["exit"], victim["ready"]) == ("\u2013", "killed by SIGKILL", "no")
    assert page.evaluate("window.__stillHere") is True
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert page.evaluate("document.getElementById('summary').textContent") == "2/3 running"
    events = page.evaluate("Array.from(document.querySelectorAll('#events li'), (li) => li.textContent)")
    assert any("victim" in e and "exited: killed by SIGKILL" in e for e in events), events
    # The GPUs (none here) and the health report came through too.
    wait_until(lambda: page.evaluate("document.getElementById('gpus-note').textContent").startswith("no GPUs"),
               10, "the GPU section")
    wait_until(lambda: page.evaluate("document.getElementById('health-badge').dataset.status") == "fail", 10,
               "the health report to fail (the victim's service has no ready worker)")
    no_errors(page)


def test_what_a_worker_prints_shows_as_text(daemon_factory: Any, browser: Chromium | str) -> None:
    chromium = need(browser)
    port = free_port()
    d = daemon_factory(exporter_config(port, "ui_logs = true") + f"""
        [services.hostile]
        type = "command"
        command = {HOSTILE}
        """)
    d.wait_state("hostile", "running")
    wait_until(lambda: "done" in d.ctl("logs", "hostile").stdout, 10, "the worker's line")
    page = open_page(chromium, port)
    page.evaluate("document.querySelector('tr[data-worker=\"hostile\"]').click()")
    text = wait_until(lambda: when(page.evaluate("document.getElementById('log-lines').textContent"),
                                   lambda t: "done" in t), 10, "the worker's output on the page")
    assert "<script>alert(1)</script><img src=x onerror=alert(2)>" in text
    assert "\\x1b[31mred\\x1b[0m" in text and "\x1b" not in text
    # Text, not markup: the output made no element, and the page still has its one script.
    assert page.evaluate("document.getElementById('log-lines').childElementCount") == 0
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 1
    no_errors(page)


def test_the_page_shows_the_gpus_and_who_holds_them(daemon_factory: Any, browser: Chromium | str,
                                                    tmp_path: Path) -> None:
    chromium = need(browser)
    host = tmp_path / "host.json"
    host.write_text(FAKE_HOST.read_text())
    port = free_port()
    d = daemon_factory(exporter_config(port) + f"""
        [services.holder]
        type = "command"
        command = {SLEEPER}
        gpus = [1]
        """, env={"CITADEL_FAKE_NVML": str(host)})
    pid = d.wait_state("holder", "running")["pid"]
    page = open_page(chromium, port)
    # The worker's process takes 4 GiB of GPU 1, and some of GPU 2 (not its own); a process
    # that is no worker's holds GPU 3. The fake NVML reads its file again when it changes.
    data = json.loads(host.read_text())
    data["gpus"][1].update(memory_used_mib=4096, processes=[{"pid": pid, "used_mib": 4096}])
    data["gpus"][2].update(memory_used_mib=1024, processes=[{"pid": pid, "used_mib": 1024}])
    data["gpus"][3].update(memory_used_mib=2048, processes=[{"pid": 999999, "used_mib": 2048}])
    host.write_text(json.dumps(data))

    def gpu_rows() -> dict[str, list[str]]:
        return page.evaluate("""Object.fromEntries(Array.from(document.querySelectorAll('#gpus tbody tr'),
            (row) => [row.dataset.gpu, Array.from(row.cells, (cell) => cell.textContent)]))""")

    rows_now = wait_until(lambda: when(gpu_rows(), lambda r: len(r) == 8 and "4.0 / 79.6 GiB" in r["1"][2]),
                          10 + HOST_PERIOD, "GPU 1's memory on the page")
    assert rows_now["1"][1] == "NVIDIA H100 80GB HBM3 (FAKE)" and rows_now["1"][5] == "holder"
    assert rows_now["2"][5] == "holder" and rows_now["0"][5] == "\u2013"
    assert rows_now["3"][5] == "\u2013 (+1 other processes)"
    assert "FAKE GPUs" in page.evaluate("document.getElementById('gpus-note').textContent")
    assert rows(page)["holder"]["gpus"] == "1"
    no_errors(page)


# --------------------------------------------------------------------------
# Over HTTP
# --------------------------------------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], str]:
    async with session.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def fetch_all(port: int, paths: list[str]) -> dict[str, tuple[int, dict[str, str], str]]:
    async def run() -> dict[str, tuple[int, dict[str, str], str]]:
        async with aiohttp.ClientSession() as session:
            return {p: await _get(session, f"http://127.0.0.1:{port}{p}") for p in paths}
    return asyncio.run(run())


UI_PATHS = ["/", "/ui/", "/ui/static/status.js", "/ui/static/status.css", "/ui/api/status",
            "/ui/api/logs/leaky"]


def test_worker_output_and_secrets_stay_off_the_network_by_default(daemon_factory: Any) -> None:
    port = free_port()
    secret = "sup3r-s3cret-value-" + str(port)
    d = daemon_factory(exporter_config(port) + """
        [services.leaky]
        type = "command"
        command = ["python3", "-u", "-c", "import os; print('marker-line', os.environ['HF_TOKEN']); raise SystemExit(3)"]
        env = { HF_TOKEN = "${CITADEL_TEST_TOKEN}" }
        restart = "never"
        """, env={"CITADEL_TEST_TOKEN": secret})
    d.wait_for(lambda s: s["leaky"]["last_exit"], what="the worker to exit")
    answers = fetch_all(port, UI_PATHS)
    for path, (code, headers, body) in answers.items():
        assert secret not in body and "marker-line" not in body, path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert "script-src 'self'" in headers["Content-Security-Policy"], path
    code, _, body = answers["/ui/api/logs/leaky"]
    assert code == 403 and "ui_logs" in json.loads(body)["error"]
    (worker,) = json.loads(answers["/ui/api/status"][2])["workers"]
    assert (worker["state"], worker["last_exit_reason"]) == ("stopped", "exit code 3")
    assert "last_lines" not in worker
    # The stream's snapshot holds the exit event, without the output it carried; nor do the
    # health report and the GPUs hold either.
    messages = asyncio.run(read_stream(port, lambda m: m if {"health", "gpus"} <= kinds(m) else None))
    assert secret not in json.dumps(messages) and "marker-line" not in json.dumps(messages)
    assert any(e["kind"] == "exit" and e["detail"]["reason"] == "exit code 3"
               for e in messages[0]["data"]["events"])
    assert answers["/"][2] == answers["/ui/"][2] and answers["/"][1]["Content-Type"].startswith("text/html")


def test_with_ui_logs_the_output_is_masked(daemon_factory: Any) -> None:
    port = free_port()
    secret = "sup3r-s3cret-value-" + str(port)
    d = daemon_factory(exporter_config(port, "ui_logs = true") + """
        [services.leaky]
        type = "command"
        command = ["python3", "-u", "-c", "import os; print('marker-line', os.environ['HF_TOKEN']); raise SystemExit(3)"]
        env = { HF_TOKEN = "${CITADEL_TEST_TOKEN}" }
        restart = "never"
        """, env={"CITADEL_TEST_TOKEN": secret})
    d.wait_for(lambda s: s["leaky"]["last_exit"], what="the worker to exit")
    answers = fetch_all(port, ["/ui/api/logs/leaky?n=5", "/ui/api/status", "/ui/api/logs/nobody",
                               "/ui/api/logs/leaky?n=x"])
    code, _, body = answers["/ui/api/logs/leaky?n=5"]
    assert code == 200 and json.loads(body)["lines"] == ["marker-line ****"]
    assert json.loads(answers["/ui/api/status"][2])["workers"][0]["last_lines"] == ["marker-line ****"]
    assert answers["/ui/api/logs/nobody"][0] == 404 and answers["/ui/api/logs/leaky?n=x"][0] == 400


def test_without_the_page_the_listener_serves_what_it_did(daemon_factory: Any) -> None:
    port = free_port()
    daemon_factory(exporter_config(port, "ui = false"))
    answers = fetch_all(port, ["/", "/ui/", "/ui/api/status", "/metrics"])
    assert answers["/"][0] == 200 and answers["/"][2].startswith("citadeld exporter: /metrics")
    assert answers["/ui/"][0] == answers["/ui/api/status"][0] == 404
    assert answers["/metrics"][0] == 200


async def read_stream(port: int, until: Any, timeout: float = 20) -> list[dict[str, Any]]:
    """Read ``/ui/api/events`` until ``until(messages)`` returns something; that. Each message
    is ``{"event": kind, "data": ...}``, or ``{"comment": text}``."""
    messages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(read_bufsize=2**22) as session, session.get(
            f"http://127.0.0.1:{port}/ui/api/events", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        block: list[str] = []
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line:
                block.append(line)
                continue
            if block and block[0].startswith(":"):
                messages.append({"comment": block[0][1:].strip()})
            elif block and block[0].startswith("event: "):
                messages.append({"event": block[0].removeprefix("event: "),
                                 "data": json.loads(block[1].removeprefix("data: "))})
            block = []
            done = until(messages)
            if done:
                return done
    raise AssertionError(f"the stream ended; read {messages}")


def kinds(messages: list[dict[str, Any]]) -> set[str]:
    """The kinds of event among ``messages``."""
    return {m["event"] for m in messages if "event" in m}


def exporter_cap(d: RunningDaemon) -> int:
    """The exporter's connection cap, as citadeld logged it."""
    found = wait_until(lambda: re.search(r"exporter: at most (\d+) connections", d.logs()), 10,
                       "the exporter's cap in the log")
    return int(found.group(1))


def test_the_stream_sends_a_snapshot_events_and_heartbeats(daemon_factory: Any) -> None:
    port = free_port()
    d = daemon_factory(exporter_config(port) + f"""
        [services.one]
        type = "command"
        command = {SLEEPER}
        """)
    d.wait_state("one", "running")

    async def scenario() -> list[dict[str, Any]]:
        def until(messages: list[dict[str, Any]]) -> Any:
            if len(messages) == 1:
                assert messages[0]["event"] == "snapshot"
                asyncio.get_running_loop().run_in_executor(None, d.ctl, "stop", "one")
            stopped = any(m.get("event") == "worker" and m["data"]["worker"]["state"] == "stopped"
                          for m in messages)
            return messages if stopped and any("comment" in m for m in messages) else None
        return await read_stream(port, until, timeout=4 * HEARTBEAT + 10)

    started = time.monotonic()
    messages = asyncio.run(scenario())
    snapshot = messages[0]["data"]
    assert [w["name"] for w in snapshot["workers"]] == ["one"] and snapshot["logs"] is False
    # The health report and the GPUs come right after the snapshot, read for every page at once.
    assert {m.get("event") for m in messages[1:3]} == {"health", "gpus"}
    health = next(m["data"] for m in messages if m.get("event") == "health")
    assert "one:ready" in health["checks"]
    gpus = next(m["data"] for m in messages if m.get("event") == "gpus")
    assert gpus["available"] is False and gpus["reason"]
    assert {e["kind"] for e in snapshot["events"]} >= {"state", "ready"}
    states = [m["data"]["event"]["state"] for m in messages if m.get("event") == "worker"]
    assert states[-1] == "stopped" and "stopping" in states
    assert {m["comment"] for m in messages if "comment" in m} == {"keep-alive"}
    assert time.monotonic() - started >= HEARTBEAT  # a comment after a quiet stretch, not sooner


def test_the_streams_are_capped_and_a_page_that_leaves_frees_its_slot(daemon_factory: Any) -> None:
    port = free_port()
    d = daemon_factory(exporter_config(port))
    limit = stream_limit(exporter_cap(d))
    assert limit <= MAX_STREAMS
    url = f"http://127.0.0.1:{port}/ui/api/events"

    async def open_streams(session: aiohttp.ClientSession, count: int) -> list[aiohttp.ClientResponse]:
        opened = []
        for _ in range(count):
            resp = await session.get(url)
            opened.append(resp)
            if resp.status == 200:
                await resp.content.readuntil(b"\n\n")  # retry
                await resp.content.readuntil(b"\n\n")  # the snapshot: the stream holds its slot
        return opened

    async def scenario() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            pages = await open_streams(session, limit + 1)
            assert [r.status for r in pages] == [200] * limit + [503]
            assert "too many status pages open" in (await pages[-1].json())["error"]
            assert pages[-1].headers["Retry-After"] == "10"
            # Prometheus keeps its slots.
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
            for resp in pages:
                resp.close()

            async def all_slots_free() -> bool:
                again = await open_streams(session, limit)
                for resp in again:
                    resp.close()
                return all(r.status == 200 for r in again)

            deadline = time.monotonic() + 10
            while not await all_slots_free():
                assert time.monotonic() < deadline, "the streams' slots were not freed"
                await asyncio.sleep(0.1)

    asyncio.run(scenario())
