"""The status page part (``ui``): a read-only, live page for the operator on the exporter's listener.

Routes, mounted at the listener's root through ``citadel_exporter_routes``:

- ``/`` and ``/ui/``: the page; ``/ui/static/status.css`` and ``/ui/static/status.js``;
- ``/ui/api/status``: the workers, as the page shows them (``views.WORKER_FIELDS``);
- ``/ui/api/events``: ``text/event-stream``: a ``snapshot`` (the workers and the recent
  events), then a ``worker`` message per event (the event and the worker's status after
  it), and a comment every few seconds;
- ``/ui/api/health``: the health report (200 whatever its status);
- ``/ui/api/gpus``: the GPUs, their memory and which workers hold them;
- ``/ui/api/logs/{worker}?n=N``: a worker's last lines; 403 unless ``[exporter] ui_logs``.

Nothing here acts: the control socket is the only place where workers are started,
stopped or restarted (docs/status-page.md says why). Every answer carries a content
security policy that lets the page run its own script and nothing else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__, hookimpl
from ..config import ExporterConfig
from ..control.responses import json_response
from ..control.route import Route
from ..control.routes import next_or_gone
from ..events import WorkerEvent
from ..waits import within
from .stream import (
    END,
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

#: Sent with every answer. The policy lets the page load its own script, style and
#: streams and nothing else: no inline script, no other origin, no frame around it.
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
        streams take at most half (read when it listens)."""
        self.enabled = config.ui
        self.logs = config.ui_logs
        self.supervisor = supervisor
        self.report = report
        self.gpus = gpus
        self.max_connections = max_connections
        self.streams = EventStreams()
        self.stopping = False
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.files = read_static() if self.enabled else {}

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
                 ("/ui/api/status", self.status_route, "the workers, as the page shows them"),
                 ("/ui/api/events", self.events_route, "the page's live feed (server-sent events)"),
                 ("/ui/api/health", self.health_route, "the health report"),
                 ("/ui/api/gpus", self.gpus_route, "the GPUs and which workers hold them"),
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

    async def close(self) -> None:
        """End the open pages' streams (citadeld is stopping): the listener then closes
        at once, rather than waiting for them."""
        self.stopping = True
        self.streams.end_all()

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

    async def health_route(self, request: web.Request) -> web.Response:
        """GET /ui/api/health: the report, 200 whatever its status (the page shows it)."""
        return self._json(self.report())

    async def gpus_route(self, request: web.Request) -> web.Response:
        """GET /ui/api/gpus: read from NVML at most once a second, however many pages ask."""
        return self._json(page_gpus(await self.gpus(fresh=False)))

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
        n = min(int(raw), MAX_LINES)
        return self._json({"worker": name, "lines": page_lines(worker.output.recent(n))})

    async def events_route(self, request: web.Request) -> web.StreamResponse:
        """GET /ui/api/events: a snapshot, then every event, until the page leaves."""
        limit = stream_limit(self.max_connections())
        stream = self.streams.open(limit) if not self.stopping else None
        if self.stopping:
            return self._json({"error": "citadeld is stopping"}, 503)
        if stream is None:
            response = self._json({"error": f"too many status pages open ({limit}); "
                                            "close one, or try again later"}, 503)
            response.headers["Retry-After"] = "10"
            return response
        try:
            resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
            await resp.prepare(request)
            await self._send(resp, b"retry: 3000\n\n" + self._snapshot(stream))
            while True:
                try:
                    message = await within(next_or_gone(request, stream.queue), HEARTBEAT)
                except TimeoutError:
                    message = KEEPALIVE
                if message == END:
                    break
                if stream.behind:
                    message = self._snapshot(stream)
                await self._send(resp, message)
        except (ConnectionResetError, TimeoutError):
            pass  # the page left, or stopped reading
        finally:
            self.streams.close(stream)
        return resp

    def _snapshot(self, stream: EventStream) -> bytes:
        stream.catch_up()
        return sse_message("snapshot", {**self.status(), "events": list(self.recent)})

    async def _send(self, resp: web.StreamResponse, message: bytes) -> None:
        await within(resp.write(message), WRITE_TIMEOUT)
