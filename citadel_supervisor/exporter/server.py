"""The exporter: one HTTP listener (``[exporter] listen``) for Prometheus and load balancers.

- ``/metrics``: the supervisor, its workers' processes, the host, the GPUs,
  plugins' collectors, and every worker's own ``/metrics`` (federation), in
  the Prometheus text format or, when the scraper asks, OpenMetrics.
- ``/healthz``: 200 while the daemon's loop answers.
- ``/readyz``: 200 when every required service has a ready worker, else 503;
  ``/readyz?service=NAME`` for one service (a load balancer's per-backend check).
- ``/health``: the ``application/health+json`` report; 200 on pass or warn, 503 on fail.
- ``/``: the status page (``ui/``, a part that mounts its routes at the root through
  ``citadel_exporter_routes``), or, without it, a line naming these paths.

A scrape never blocks the supervisor's loop: what reads ``/proc`` or NVML, or
runs plugins' code, and gzip, run in threads; the workers' pages are fetched
concurrently, each bounded by ``scrape_timeout``, and relabelled as they
arrive; the merge and render take the loop briefly (not at all while no page
changed; docs/benchmarks.md has the figures). The health report is also written to ``STATE_DIR/health.json``
whenever it changes.

The listener never starves the rest of citadeld: it holds at most
``connection_cap`` connections (derived from ``RLIMIT_NOFILE``, keeping file
descriptors for the control socket and for spawning workers), answers 503 to
one more, and closes a connection idle for ``IDLE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import resource
import time
import zlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from loguru import logger
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from .. import __version__, hookimpl
from ..config import CitadelConfig
from ..control import API_PREFIX
from ..control.admission import CappedTCPSite, ConnectionGate
from ..control.responses import json_response
from ..control.route import Route, accept_plugin_routes
from ..events import EventBus, WorkerEvent
from ..gpu.metrics import GpuReader
from ..plugins import PluginRegistry
from ..waits import wait_event
from .collectors import collect_safely
from .collectors.supervisor import SupervisorCollector
from .exposition import OPENMETRICS_EOF, Encoder, FamilyEncoder
from .federation import (
    FederationCollector,
    FederationRenderer,
    PageDrops,
    PageRelabeler,
    ScrapeResult,
    ScrapeTarget,
    scrape_all,
)
from .health_report import (
    HEALTH_JSON,
    CheckResult,
    HealthFile,
    build_report,
    check_statuses,
    readiness,
    worker_checks,
)
from .host_checks import run_host_checks
from .monitors import LoopLagMonitor, StartupHistogram
from .snapshot import Scrape, WorkerSnapshot, snapshot_workers, tree_members

if TYPE_CHECKING:
    from ..supervisor import Supervisor

#: zlib's window bits for a gzip header and trailer. gzip through zlib directly is cheaper
#: than gzip.compress; level 1, as most of a page is repeated label sets, which even the
#: fastest level shrinks well (docs/benchmarks.md).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


#: Seconds a connection may sit idle, or take to send its request, before it is closed.
#: Scrapers and load balancers send at once; an idle connection only holds a descriptor.
IDLE_TIMEOUT = 5.0
#: File descriptors the exporter leaves to the rest of citadeld besides the control
#: socket's clients: workers' spawns (pipes, pidfds, cgroup files), their log files,
#: the state and health files, and the probes' and scrapes' outgoing connections.
FD_RESERVE = 128
#: The exporter's connection cap, whatever the limit: a handful is enough for scrapers.
MIN_CONNECTIONS, MAX_CONNECTIONS = 4, 512


def open_fds() -> int:
    """How many file descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_cap(nofile: int, in_use: int, reserve: int) -> int:
    """How many connections the exporter may hold: half of what ``nofile`` (the soft
    RLIMIT_NOFILE) leaves after the descriptors ``in_use`` and the ``reserve`` (half, as
    a /metrics request may open an outgoing connection per worker it scrapes)."""
    if nofile == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    spare = (nofile - in_use - reserve) // 2
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, spare))


def _is_loopback(remote: str | None) -> bool:
    """True for a peer on this host (127.0.0.0/8, ::1, or IPv4-mapped loopback)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``"127.0.0.1:9180"``, ``"[::1]:9180"`` or ``":9180"`` (every address) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"exporter.listen: {listen!r} is not host:port")
    host = host.strip("[]")
    return (host or None), int(port)


#: The answer of ``GET /v1/health``, for the OpenAPI document.
HEALTH_ANSWER: dict[str, Any] = {
    "type": "object", "required": ["status"],
    "description": "application/health+json (draft-inadarei-api-health-check)",
    "properties": {"status": {"enum": ["pass", "warn", "fail"]},
                   "checks": {"type": "object", "additionalProperties": {
                       "type": "array", "items": {"type": "object"}}}},
}


class Exporter:
    """The listener, the loop-lag monitor, and the health checks with their file.

    A built-in plugin too (``exporter``): it adds ``GET /v1/health`` to the control API.
    """

    def __init__(self, config: CitadelConfig, supervisor: Supervisor, plugins: PluginRegistry,
                 events: EventBus, reloads: Counter[str], session: aiohttp.ClientSession, *,
                 gpus: GpuReader | None = None, control_connections: int = 64):
        """``config``: citadeld's config as it started (``[exporter]`` and ``[daemon]`` change
        only on a restart); ``reloads``: the daemon's count of config reloads by result,
        kept up to date by it; ``session``: its one HTTP client session; ``gpus``: the
        reader of its GPUs, or None on a host without; ``control_connections``: the control
        socket's cap, whose descriptors are kept free."""
        self.supervisor = supervisor
        self.plugins = plugins
        self.events = events
        self.reloads = reloads
        self.control_connections = control_connections
        self.config = config.exporter
        self.session = session
        self.startup = StartupHistogram()
        self.loop_lag = LoopLagMonitor()
        self.gpus = gpus
        self.host_results: list[CheckResult] = []
        self.health_file = HealthFile(config.daemon.state_dir / "health.json")
        self.plugin_collectors: list[Any] = []
        self.relabelers: dict[tuple[str, str], PageRelabeler] = {}
        self.page_drops = PageDrops()
        self._own_encoder = FamilyEncoder()
        self._federation = FederationRenderer()
        self._local_encoder = FamilyEncoder()
        self.address: tuple[str | None, int] | None = None
        #: The listener's connection cap, once it listens (the status page keeps its
        #: streams to a share of it).
        self.max_connections = MAX_CONNECTIONS
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Start the monitors and the health file, then listen (if ``listen`` is set)."""
        answers = self.plugins.call_each("citadel_metric_collectors", supervisor=self.supervisor)
        for _, collectors in answers:
            self.plugin_collectors.extend(collectors)
        events = self.events.subscribe()  # now, so that no spawn is missed
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.loop_lag.run(), name="exporter-loop-lag"),
            loop.create_task(self._follow(events), name="exporter-events"),
            loop.create_task(self._health_loop(), name="exporter-health"),
        ]
        if self.config.listen:
            await self._listen(self.config.listen)

    async def _listen(self, listen: str) -> None:
        host, port = parse_listen(listen)
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/health", self.health)
        taken = {"/metrics", "/healthz", "/readyz", "/health"}
        routes = accept_plugin_routes(self.plugins.call_each("citadel_exporter_routes"), taken,
                                      API_PREFIX, root_allowed=True)
        for route in routes:
            app.router.add_get(route.mounted(API_PREFIX), route.handler)
        if "/" not in {route.mounted(API_PREFIX) for route in routes}:  # the status page is off
            app.router.add_get("/", self.index)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=IDLE_TIMEOUT)
        await self._runner.setup()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = open_fds()
        cap = self.max_connections = connection_cap(nofile, in_use, FD_RESERVE + self.control_connections)

        def gate(server: web.Server) -> ConnectionGate:
            return ConnectionGate(server, "citadeld's exporter", cap, content_type="text/plain")

        try:
            await CappedTCPSite(self._runner, host, port, gate).start()
        except OSError as exc:
            # The workers matter more than their metrics: run on, and say so loudly.
            logger.error("exporter.listen {}: cannot listen ({}); no /metrics, /healthz or /readyz "
                         "until citadeld restarts with a free address", listen, exc.strerror or exc)
            await self._runner.cleanup()
            self._runner = None
            return
        self.address = (host, port)
        logger.info("exporter listening on http://{}:{} (/metrics, /healthz, /readyz, /health)",
                    host or "*", port)
        logger.info("exporter: at most {} connections (RLIMIT_NOFILE {}, {} descriptors open, {} kept "
                    "for the control socket and workers); idle ones closed after {:g}s",
                    cap, nofile, in_use, FD_RESERVE + self.control_connections, IDLE_TIMEOUT)

    async def close(self) -> None:
        """Stop listening and stop the monitors."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that swallowed its cancellation must not hold the exit.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _follow(self, events: asyncio.Queue[WorkerEvent]) -> None:
        try:
            while True:
                event = await events.get()
                self.startup.on_event(event)
                self._changed.set()
        finally:
            self.events.unsubscribe(events)

    # -- health -------------------------------------------------------------

    def checks(self, workers: list[WorkerSnapshot]) -> list[CheckResult]:
        """Every check: the workers' now, the host's from its last run."""
        return worker_checks(workers) + self.host_results

    def report(self) -> dict[str, Any]:
        """The ``application/health+json`` report as of now."""
        return build_report(self.checks(snapshot_workers(self.supervisor)), __version__)

    def _host_checks(self) -> list[CheckResult]:
        gpus = self.gpus.read() if self.gpus is not None else []
        return run_host_checks(self.config.disk_paths, self.config.host_checks, gpus)

    async def _health_loop(self) -> None:
        """Run the host checks every ``health_period``; rewrite the health file on every change."""
        next_host_check = 0.0
        while True:
            if time.monotonic() >= next_host_check:
                try:
                    self.host_results = await asyncio.to_thread(self._host_checks)
                except Exception as exc:  # noqa: BLE001 - a failing check must not end the loop
                    logger.opt(exception=exc).error("host checks failed: {}", exc)
                next_host_check = time.monotonic() + self.config.health_period
            self._changed.clear()
            try:
                await asyncio.to_thread(self.health_file.write, self.report())
            except OSError as exc:
                logger.error("cannot write the health file {}: {}", self.health_file.path, exc)
            await wait_event(self._changed, max(0.0, next_host_check - time.monotonic()))

    # -- handlers -----------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        """GET /: what this listener serves."""
        return web.Response(text="citadeld exporter: /metrics /healthz /readyz /readyz?service=NAME /health\n")

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz: the daemon's loop answers."""
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """GET /readyz[?service=NAME]: 200 when ready for traffic, else 503."""
        service = request.query.get("service")
        workers = snapshot_workers(self.supervisor)
        try:
            ready, services = readiness(workers, service)
        except KeyError:
            return web.Response(status=404, text=f"no service named {service!r}\n")
        lines = [f"{name}: {'ready' if ok else 'not ready'}" for name, ok in sorted(services.items())]
        return web.Response(status=200 if ready else 503, text="\n".join(lines) + "\n")

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: the IETF health report; 503 when it fails."""
        report = self.report()
        return json_response(report, status=503 if report["status"] == "fail" else 200,
                             content_type=HEALTH_JSON)

    async def health_route(self, request: web.Request) -> web.Response:
        """Health report: every check (pass, warn or fail), as application/health+json."""
        return json_response(self.report())

    @hookimpl
    def citadel_control_routes(self) -> list[Route]:
        """``GET /v1/health``: the health report, whatever its status (200)."""
        return [Route("GET", "/health", self.health_route,
                      "Health report: every check (pass, warn or fail), as application/health+json",
                      answer=HEALTH_ANSWER)]

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: everything, in the format the scraper asked for."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        workers = snapshot_workers(self.supervisor)
        # What reads /proc, NVML or plugins' code runs in a thread (a host without
        # cgroups lists all its processes; a wedged GPU can hang NVML) while the
        # workers' pages are fetched and relabelled, on the loop, as they arrive.
        local = asyncio.ensure_future(asyncio.to_thread(self._encode_local, workers, encoder))
        results = await self.scrape_workers(workers)
        body = self.render(self._collect_supervisor(workers), await local, results, encoder,
                           content_type.startswith("application/openmetrics-text"))
        headers = {"Content-Type": content_type}
        if self._compress(request):
            body = await asyncio.to_thread(zlib.compress, body, 1, _GZIP_WBITS)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    def _compress(self, request: web.Request) -> bool:
        """Whether to gzip this answer: the scraper asks, and ``[exporter] compression`` lets it."""
        mode = self.config.compression
        if mode == "never" or "gzip" not in request.headers.get("Accept-Encoding", ""):
            return False
        return mode == "always" or not _is_loopback(request.remote)

    # -- collecting -----------------------------------------------------------

    async def scrape_workers(self, workers: list[WorkerSnapshot]) -> list[ScrapeResult]:
        """Fetch and relabel every worker's own page; count the pages dropped."""
        targets = [ScrapeTarget(w.service, w.worker, w.metrics_url if w.proc is not None else None)
                   for w in workers if w.metrics_url]
        results = await scrape_all(self.session, targets, self.config.scrape_timeout, self.relabelers)
        self.page_drops.count(results)
        for result in results:
            if result.dropped is not None:
                logger.debug("federation: {}'s page dropped ({})", result.target.worker, result.dropped)
        return results

    def _collect_supervisor(self, workers: list[WorkerSnapshot]) -> list[Metric]:
        """The supervisor's families (on the loop: they read its live state)."""
        collector = SupervisorCollector(
            workers,
            startup=self.startup,
            loop_lag=self.loop_lag,
            plugins={name: record.status for name, record in self.plugins.records.items()},
            reloads=dict(self.reloads),
            checks=check_statuses(self.checks(workers)),
        )
        return collect_safely([collector])

    def _encode_local(self, workers: list[WorkerSnapshot], encoder: Encoder) -> bytes:
        """The scrape's collectors (processes, host, GPUs, plugins') and the plugins' lasting
        ones, encoded (in a thread: they read /proc and NVML)."""
        scrape = Scrape(workers, tree_members(workers), self.config)
        collectors: list[Any] = []
        for _, answer in self.plugins.call_each("citadel_scrape_collectors", scrape=scrape):
            collectors.extend(answer)
        return self._local_encoder.encode(collect_safely(collectors + self.plugin_collectors), encoder)

    def render(self, own: list[Metric], local: bytes, results: list[ScrapeResult], encoder: Encoder,
               openmetrics: bool) -> bytes:
        """The page: the supervisor's families, the local ones (already encoded), the
        federation's status, then the workers' merged families.

        On the loop, as a thread would cost more in handing the GIL back and forth than it
        spares the loop (docs/benchmarks.md, bench/bench_exporter.py).
        """
        head = self._own_encoder.encode(
            own + collect_safely([FederationCollector(results, self.page_drops)]), encoder)
        return b"".join((head, local, self._federation.render([result.page for result in results], openmetrics),
                         OPENMETRICS_EOF if openmetrics else b""))
