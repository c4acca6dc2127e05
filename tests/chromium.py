"""A headless Chromium for the tests, driven through its DevTools protocol.

No browser-automation package: aiohttp's websocket client (a dependency of
citadeld already) speaks the protocol. Chromium is Debian's ``chromium``
package, which scripts/test installs; ``Chromium.start`` fails with a message
saying so when it is missing (a test that needs it must fail, not skip).

The protocol runs on an event loop in a thread of its own, so tests stay plain
functions: ``page.evaluate(js)`` blocks until Chromium answers.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from citadel_supervisor.testing import wait_until

T = TypeVar("T")

#: Seconds one protocol call may take before the test fails.
CALL_TIMEOUT = 30.0
#: Where scripts/test says Chromium comes from.
INSTALL_HINT = ("Debian's chromium package is needed for the status page's browser tests: "
                "./scripts/test installs it, or run apt-get install -y chromium")


def chromium_binary() -> str:
    """The path of Chromium; ``RuntimeError`` with the install hint when there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"Chromium is not installed. {INSTALL_HINT}")


class ProtocolError(RuntimeError):
    """Chromium answered a call with an error, or a page's script threw."""


class Chromium:
    """One headless Chromium process with a profile in ``folder``; ``close`` ends it."""

    def __init__(self, folder: Path, window: tuple[int, int] = (1400, 1000)):
        self.folder = folder
        self.window = window
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chromium-cdp", daemon=True)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: Protocol events received, by session: ``(method, params)``.
        self.events: dict[str | None, list[tuple[str, dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    # -- process ----------------------------------------------------------------

    def start(self) -> Chromium:
        """Start Chromium and connect to its DevTools endpoint."""
        binary = chromium_binary()
        profile = self.folder / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                "--remote-debugging-port=0", f"--user-data-dir={profile}",
                f"--window-size={self.window[0]},{self.window[1]}", "about:blank"]
        with (self.folder / "chromium.log").open("wb") as log:
            # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"

        def endpoint() -> str | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            lines = port_file.read_text().split() if port_file.exists() else []
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}" if len(lines) >= 2 else None

        url = wait_until(endpoint, 60, "chromium's DevTools endpoint")
        self._thread.start()
        self._run(self._connect(url))
        return self

    def log(self) -> str:
        """What Chromium printed."""
        path = self.folder / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Close the connection and end Chromium."""
        if self._thread.is_alive():
            try:
                self._run(self._disconnect(), timeout=10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- protocol ---------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, url: str) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.setdefault(data.get("sessionId"), []).append((data["method"], data.get("params", {})))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ProtocolError("the DevTools connection closed"))

    async def _call(self, method: str, params: dict[str, Any] | None, session: str | None) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        answer = await future
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """One protocol call; its result."""
        return self._run(self._call(method, params, session))

    def new_page(self) -> Page:
        """A new tab, attached (a flat session) and with its Page, Runtime and Log domains on."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        return page


class Page:
    """One tab of a ``Chromium``."""

    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A protocol call in this tab's session."""
        return self.browser.call(method, params, self.session)

    def events(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every ``method`` event this tab sent so far."""
        return [params for name, params in list(self.browser.events.get(self.session, []))
                if name == method]

    def add_script(self, source: str) -> None:
        """Run ``source`` in every document this tab loads from now on, before its own scripts."""
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until its document has loaded."""
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise ProtocolError(f"cannot open {url}: {answer['errorText']}")
        wait_until(lambda: self.evaluate("document.readyState") == "complete", 30,
                   f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ProtocolError(f"{expression!r} threw: {text}")
        return answer["result"].get("value")

    def errors(self) -> list[str]:
        """Everything the page reported as an error: uncaught exceptions, console errors,
        and the browser's own log entries of level error (a blocked load, a CSP violation)."""
        found = [f"exception: {e['exceptionDetails'].get('exception', {}).get('description') or e['exceptionDetails'].get('text')}"
                 for e in self.events("Runtime.exceptionThrown")]
        found += [f"console.{e['type']}: {' '.join(str(a.get('value', a.get('description'))) for a in e['args'])}"
                  for e in self.events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        found += [f"log: {e['entry'].get('text')} ({e['entry'].get('url', '')})"
                  for e in self.events("Log.entryAdded") if e["entry"].get("level") == "error"]
        return found

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})["data"]
        path.write_bytes(base64.b64decode(data))
