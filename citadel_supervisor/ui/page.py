"""The status page part (``ui``): a read-only, live page for the operator on the exporter's listener.

Routes, mounted at the listener's root through ``citadel_exporter_routes``:

- ``/`` and ``/ui/``: the page; ``/ui/static/status.css`` and ``/ui/static/status.js``;
- ``/ui/api/events``: ``text/event-stream``, all the page reads: a ``snapshot`` (the
  workers and the recent events), then a ``worker`` message per event (the event and the
  worker's status after it), ``gpus`` (the GPUs and which workers hold them) every
  ``HOST_PERIOD`` seconds, ``health`` (the health report) then and soon after events,
  and a comment when the stream is otherwise quiet;
- ``/ui/api/status``: the workers, as the page shows them (``views.WORKER_FIELDS``);
- ``/ui/api/logs/{worker}?n=N``: a worker's last lines; 403 unless ``[exporter] ui_logs``.

The health report and the GPUs are read once for all open pages, and only while one
is open, so a page costs citadeld its stream's writes and no reads of its own.

Nothing here acts: the control socket is the only place where workers are started,
stopped or restarted (docs/status-page.md says why). Every answer carries a content
security policy that lets the page run its own script and nothing else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from .. import __version__, hookimpl
from ..config import ExporterConfig
from ..control.responses import json_response
from ..control.route import Route
from ..events import WorkerEvent
from ..waits import wait_event, within
from .stream import (
    BATCH,
    GONE_CHECK,
    HEARTBEAT,
    KEEPALIVE,
    WRITE_TIMEOUT,
    EventStream,
    EventStreams,
    stream_limit,
)
from .views import page_event, page_gpus, page_lines, page_worker, sse_message

if TYPE_CHECKING:
    from ..supervisor import Supervisor

#: Events the page gets on opening (and keeps), newest last.
RECENT_EVENTS = 100
#: Lines of a worker's output the page asks for by default, and at most.
DEFAULT_LINES, MAX_LINES = 100, 500
#: Seconds between two reads of the GPUs and the health report while a page is open.
HOST_PERIOD = 5.0
#: Seconds after an event before the health report is read again: one read for a burst.
SETTLE = 0.5

#: Sent with every answer. The policy lets the page load its own script, style and
#: stream and nothing else: no inline script, no other origin, no frame around it.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: The files the page is made of: name -> content type.
STATIC = {"index.html": "text/html", "status.css": "text/css", "status.js": "text/javascript"}


def read_static() -> dict[str, bytes]:
    """The page's files, from the package (``citadel_supervisor/ui/static``)."""
    folder = resources.files(__package__).joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}


class StatusPage:
    """The page's routes and its live feed, over the running supervisor."""

    def __init__(self, config: ExporterConfig, supervisor: Supervisor, *,
                 report: Callable[[], dict[str, Any]],
                 gpus: Callable[..., Awaitable[dict[str, Any]]],
                 max_connections: Callable[[], int]):
        """``report``: the health report now (the exporter's); ``gpus(fresh=False)``: the
        GPU part's answer; ``max_connections``: the exporter's connection cap, of which the
        streams take at most half (read when a page opens)."""
        self.enabled = config.ui
        self.logs = config.ui_logs
        self.supervisor = supervisor
        self.report = report
        self.gpus = gpus
        self.max_connections = max_connections
        self.streams = EventStreams()
        self.stopping = False
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.files: dict[str, bytes] = {}
        if self.enabled:
            try:
                self.files = read_static()
            except OSError as exc:
                # The workers matter more than their page: run on, and say so.
                logger.error("status page: cannot read its files ({}); no page at / until "
                             "citadel-supervisor is installed again", exc)
                self.enabled = False
        #: The last ``health`` and ``gpus`` messages, for a page that opens.
        self._host: dict[str, bytes] = {}
        self._tend_task: asyncio.Task[None] | None = None
        self._soon = asyncio.Event()

    # -- hooks ----------------------------------------------------------------

    @hookimpl
    def citadel_exporter_routes(self) -> list[Route]:
        """The page and its data, at the root of the exporter's listener (none when
        ``[exporter] ui = false``)."""
        if not self.enabled:
            return []
        pages = [("/", self.index, "the status page"), ("/ui/", self.index, "the status page"),
                 ("/ui/static/status.css", self.static("status.css"), "the page's style"),
                 ("/ui/static/status.js", self.static("status.js"), "the page's script"),
                 ("/ui/api/events", self.events_route, "the page's live feed (server-sent events)"),
                 ("/ui/api/status", self.status_route, "the workers, as the page shows them"),
                 ("/ui/api/logs/{name}", self.logs_route, "a worker's last lines (with ui_logs)")]
        return [Route("GET", path, handler, summary, at_root=True) for path, handler, summary in pages]

    @hookimpl
    def citadel_worker_event(self, event: WorkerEvent) -> None:
        """Keep the event for pages to come, and send it to the open ones (encoded once)."""
        if not self.enabled:
            return
        shown = page_event(event, self.logs)
        self.recent.append(shown)
        if len(self.streams):
            worker = self.supervisor.workers.get(event.worker)
            self.streams.publish(sse_message("worker", {
                "event": shown, "worker": page_worker(worker, self.logs) if worker is not None else None}))
            self._soon.set()

    async def close(self) -> None:
        """End the open pages' streams (citadeld is stopping): the listener then closes
        at once, rather than waiting for them."""
        self.stopping = True
        self.streams.end_all()
        if self._tend_task is not None:
            self._tend_task.cancel()

    # -- what is done once for every open page -------------------------------------

    async def _tend(self) -> None:
        """While a page is open: end the streams of pages that left (every ``GONE_CHECK``
        seconds); read the GPUs every ``HOST_PERIOD`` seconds, and the health report then
        and ``SETTLE`` seconds after events; send each when it changed."""
        loop = asyncio.get_running_loop()
        gpus_due = health_due = 0.0
        while len(self.streams):
            self.streams.end_gone()
            try:
                if loop.time() >= gpus_due:
                    gpus_due = loop.time() + HOST_PERIOD
                    self._publish_host("gpus", page_gpus(await self.gpus(fresh=False)))
                    health_due = 0.0
                if loop.time() >= health_due:
                    health_due = gpus_due
                    self._publish_host("health", self.report())
            except Exception as exc:  # noqa: BLE001 - the pages keep their feed whatever one read does
                logger.opt(exception=exc).warning("status page: cannot read the health report or "
                                                  "the GPUs: {}", exc)
            if self._soon.is_set():  # events came: the health report again, once they settled
                self._soon.clear()
                health_due = min(health_due, loop.time() + SETTLE)
            await wait_event(self._soon, max(0.0, min(GONE_CHECK, gpus_due - loop.time(),
                                                      health_due - loop.time())))

    def _publish_host(self, kind: str, data: Any) -> None:
        message = sse_message(kind, data)
        if message != self._host.get(kind):
            self._host[kind] = message
            self.streams.publish(message)

    def _start_tending(self) -> None:
        if self._tend_task is None or self._tend_task.done():
            self._tend_task = asyncio.get_running_loop().create_task(self._tend(), name="status-page")

    # -- answers --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/ui/api/status`` answers."""
        return {"version": __version__, "logs": self.logs,
                "workers": [page_worker(w, self.logs) for w in self.supervisor.workers.values()]}

    def _json(self, data: Any, status: int = 200) -> web.Response:
        response = json_response(data, status)
        response.headers.update(HEADERS)
        return response

    async def index(self, request: web.Request) -> web.Response:
        """GET / and /ui/: the page."""
        return web.Response(body=self.files["index.html"], content_type="text/html", charset="utf-8",
                            headers=HEADERS)

    def static(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of one of the page's files."""
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=self.files[name], content_type=STATIC[name], charset="utf-8",
                                headers=HEADERS)
        return handler

    async def status_route(self, request: web.Request) -> web.Response:
        """GET /ui/api/status."""
        return self._json(self.status())

    async def logs_route(self, request: web.Request) -> web.Response:
        """GET /ui/api/logs/{name}?n=N: the worker's last ``n`` lines (at most ``MAX_LINES``)."""
        name = request.match_info["name"]
        if not self.logs:
            return self._json({"error": "worker output is not shown on the status page: "
                                        "[exporter] ui_logs is off (docs/status-page.md); "
                                        f"use citadelctl logs {name}"}, 403)
        worker = self.supervisor.workers.get(name)
        if worker is None:
            return self._json({"error": f"no worker named {name!r}"}, 404)
        raw = request.query.get("n", str(DEFAULT_LINES))
        if not raw.isdigit():
            return self._json({"error": f"n must be a whole number of lines, not {raw!r}"}, 400)
        return self._json({"worker": name, "lines": page_lines(worker.output.recent(min(int(raw), MAX_LINES)))})

    async def events_route(self, request: web.Request) -> web.StreamResponse:
        """GET /ui/api/events: a snapshot, then every event, until the page leaves.

        A page that left is noticed within ``GONE_CHECK`` seconds (``_tend``), or at the
        next write: its slot is free again.
        """
        if self.stopping:
            return self._json({"error": "citadeld is stopping"}, 503)
        limit = stream_limit(self.max_connections())
        stream = self.streams.open(limit, request.transport)
        if stream is None:
            response = self._json({"error": f"too many status pages open ({limit}); "
                                            "close one, or try again later"}, 503)
            response.headers["Retry-After"] = "10"
            return response
        self._start_tending()
        resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            await self._send(request, resp, b"retry: 3000\n\n" + self._snapshot(stream))
            while True:
                await stream.wait(HEARTBEAT)
                if stream.pending and not stream.ended:
                    await asyncio.sleep(BATCH)  # the rest of a burst of events, in the same write
                if stream.ended:
                    break
                message = self._snapshot(stream) if stream.behind else stream.take()
                await self._send(request, resp, message or KEEPALIVE)
        except (ConnectionResetError, TimeoutError):
            pass  # the page left, or stopped reading
        finally:
            self.streams.close(stream)
        return resp

    def _snapshot(self, stream: EventStream) -> bytes:
        """The snapshot, then the last health and GPU messages (the queue's are dropped)."""
        stream.catch_up()
        return (sse_message("snapshot", {**self.status(), "events": list(self.recent)})
                + b"".join(self._host.values()))

    async def _send(self, request: web.Request, resp: web.StreamResponse, message: bytes) -> None:
        """Write ``message``; ``ConnectionResetError`` if the page left, ``TimeoutError`` if it
        stopped reading (a write waits only while the connection's buffer is full)."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the page left")
        if transport.get_write_buffer_size():
            await within(resp.write(message), WRITE_TIMEOUT)
        else:
            await resp.write(message)
