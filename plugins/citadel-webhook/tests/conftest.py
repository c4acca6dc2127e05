"""Fixtures for the webhook plugin's tests.

``daemon_factory`` is citadeld's own (from the main repository's
tests/conftest.py, loaded under another module name so that the two
conftest modules do not clash). ``receiver`` is a real aiohttp server on a
local port that records each request and checks its signature.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from citadel_webhook import SIGNATURE_HEADER, verify

_MAIN_CONFTEST = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("citadel_main_conftest", _MAIN_CONFTEST)
if _spec is None or _spec.loader is None or not _MAIN_CONFTEST.exists():
    raise RuntimeError(f"the webhook tests use citadeld's fixtures from {_MAIN_CONFTEST}, "
                       "which is missing: run them from the Citadel repository")
citadel_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(citadel_fixtures)

daemon_factory = citadel_fixtures.daemon_factory

#: The HMAC key the tests sign with (long enough for WebhookConfig).
SECRET = "test-webhook-secret-0123456789abcdef"


@dataclass
class Received:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    signed: bool  # the signature matched the body and SECRET
    status: int  # what the receiver answered (0: it never answered)

    @property
    def json(self) -> dict[str, Any]:
        """The body, parsed."""
        return json.loads(self.body)


class WebhookReceiver:
    """An aiohttp server in its own thread; ``plan`` says how to answer the next requests.

    Each entry of ``plan`` answers one request: an HTTP status, or
    ``("hang", seconds)`` to answer 200 only after that long. Once the plan
    is used up every request gets 200.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: list[int | tuple[str, float]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="webhook-receiver", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        """The URL to configure."""
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the webhook receiver did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            step = self.plan.pop(0) if self.plan else 200
        status = 200
        if isinstance(step, tuple):
            await asyncio.sleep(step[1])
        else:
            status = step
        record = Received(dict(request.headers), body,
                          verify(body, SECRET, request.headers.get(SIGNATURE_HEADER)), status)
        with self._lock:
            self.requests.append(record)
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def received(self) -> list[Received]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self.requests)

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies of the requests answered 2xx, parsed."""
        return [r.json for r in self.received() if 200 <= r.status < 300]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20,
                 what: str = "deliveries") -> list[dict[str, Any]]:
        """Poll until ``predicate(delivered bodies)`` holds; the bodies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bodies = self.delivered()
            if predicate(bodies):
                return bodies
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got:\n"
                             + "\n".join(json.dumps(b) for b in self.delivered()))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A started webhook receiver; stopped after the test."""
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """A credentials folder, as systemd's LoadCredential= makes, holding ``webhook-secret``."""
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "webhook-secret").write_text(SECRET + "\n")
    return folder
