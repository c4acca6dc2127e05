"""A real webhook receiver for the tests: an aiohttp server in its own thread.

It lives in its own module, not in conftest.py: citadeld's tests and these
both have a ``conftest`` module, and ``from conftest import ...`` finds
whichever pytest imported last.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from citadel_webhook import SIGNATURE_HEADER, verify

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
