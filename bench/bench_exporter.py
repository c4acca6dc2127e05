"""The exporter's /metrics with eight vLLM pages to federate: its latency, and the loop's lag.

    .venv/bin/python bench/bench_exporter.py [--rounds 200] [--workers 8] [--page FILE]
                                             [--pages static|changing|both]
                                             [--server bytes|registry|both]

Eight ``command`` workers each serve a vLLM ``/metrics`` page (the one
captured from vLLM on the CPU, ``tests/fixtures/vllm_metrics.txt``, about 600
lines), in one of two ways:

- ``bytes``: the page's bytes, from the standard library's HTTP server (one
  thread per request): the cheapest a worker can serve it, and so the
  strictest baseline;
- ``registry``: rendered again on every request by prometheus_client from a
  registry holding the page's families, as vLLM renders its ``/metrics``
  (vLLM mounts prometheus_client's ``make_asgi_app``; served here by
  prometheus_client's own ``start_http_server``). A real vLLM on this machine
  takes about 7 ms to answer ``/metrics``; this server about 4 ms.

And two cases:

- ``static``: the same page every time, as an idle vLLM serves it;
- ``changing``: every sample's value differs from one request to the next
  (16 versions of the page served in turn), as a busy vLLM's page does and
  the worst case for the exporter, which re-labels only the families whose
  samples changed since its last scrape.

Then, in rounds, side by side from this process (a separate process from
citadeld, so its own work is not the daemon's):

- baseline: fetch the eight pages concurrently (aiohttp, as the exporter does);
- exporter, text: ``GET /metrics`` (Prometheus text format, no compression);
- exporter, as Prometheus asks: OpenMetrics, gzip.

The order of the three is rotated every round. Inside citadeld, a probe
task (the bench's launcher, ``_common.py lag-probe``) sleeps 10 ms again and
again and records how late each wake-up is; the lag figures are those
wake-ups that fell within an exporter request. Targets: exporter p50 at most
50 ms and at most 1.5 times the baseline's p50; loop lag p99 at most 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Citadel,
    cpu_seconds,
    free_ports,
    loadavg,
    machine,
    ms,
    percentile,
    read_lag_probe,
    table,
    wait_until,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


PAGE_SERVER = """\
import http.server, itertools, sys
port, folder, versions = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pages = [open(f"{folder}/metrics.{i}", "rb").read() for i in range(versions)]
turn = itertools.count()

class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = pages[next(turn) % versions]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), Page).serve_forever()
"""
REGISTRY_PAGE_SERVER = """\
import itertools, sys, time
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
port, folder, versions = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pages = [list(text_string_to_metric_families(open(f"{folder}/metrics.{i}").read())) for i in range(versions)]
turn = itertools.count()

class Fixture:
    def collect(self):
        return pages[next(turn) % versions]

registry = CollectorRegistry()
registry.register(Fixture())
start_http_server(port, addr="127.0.0.1", registry=registry)
while True:
    time.sleep(3600)
"""
SERVERS = {"bytes": PAGE_SERVER, "registry": REGISTRY_PAGE_SERVER}
_SAMPLE = re.compile(r"^([^#\n].*) (\S+)$", re.MULTILINE)


def shifted(page: str, by: float) -> str:
    """The page with ``by`` added to every sample's value."""
    return _SAMPLE.sub(lambda m: f"{m.group(1)} {float(m.group(2)) + by}", page)


def page_versions(page: str, versions: int) -> list[str]:
    """``versions`` copies of the page; in copy k every sample's value is k more."""
    return [shifted(page, k) if k else page for k in range(versions)]


def services(root: Path, page: Path, ports: list[int], versions: int, server: str) -> str:
    """The config's services: a page server of the ``server`` kind on each of ``ports``."""
    folder = root / "page"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.py").write_text(SERVERS[server])
    for i, text in enumerate(page_versions(page.read_text(), versions)):
        (folder / f"metrics.{i}").write_text(text)
    text = ""
    for i, port in enumerate(ports):
        text += f"""
[services.vllm{i}]
type = "command"
command = ["{sys.executable}", "{folder / 'server.py'}", "{port}", "{folder}", "{versions}"]
port = {port}
metrics = "/metrics"
stop_timeout = 2
[services.vllm{i}.probes.startup]
kind = "http"
path = "/metrics"
period = 0.1
"""
    return text


async def measure(exporter: str, pages: list[str], rounds: int, pause: float
                  ) -> tuple[dict[str, list[float]], list[tuple[float, float]], int]:
    """Time each kind of request ``rounds`` times; also the wall-clock windows of exporter requests."""
    timings: dict[str, list[float]] = {"baseline": [], "text": [], "prometheus": []}
    windows: list[tuple[float, float]] = []
    size = 0
    async with aiohttp.ClientSession() as session:
        async def get(url: str, headers: dict[str, str]) -> bytes:
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200, (url, resp.status)
                return await resp.read()

        async def baseline() -> None:
            await asyncio.gather(*(get(u, {"Accept-Encoding": "identity"}) for u in pages))

        async def text() -> None:
            nonlocal size
            size = len(await get(exporter, {"Accept-Encoding": "identity"}))

        async def prometheus() -> None:
            await get(exporter, {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})

        kinds = {"baseline": baseline, "text": text, "prometheus": prometheus}
        for _ in range(5):  # warm up connections and caches
            for run in kinds.values():
                await run()
        order = list(kinds)
        for i in range(rounds):
            for name in order[i % 3:] + order[: i % 3]:
                wall, start = time.time(), time.perf_counter()
                await kinds[name]()
                timings[name].append(time.perf_counter() - start)
                if name != "baseline":
                    windows.append((wall, time.time()))
                await asyncio.sleep(pause)
    return timings, windows, size


def lag_during(rows: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """The lag samples whose wake-up fell inside a request window (or one probe period after)."""
    found = []
    j = 0
    for wall, lag in rows:
        while j < len(windows) and windows[j][1] + 0.02 < wall:
            j += 1
        if j < len(windows) and windows[j][0] <= wall:
            found.append(lag)
    return found


def run(args: argparse.Namespace, versions: int, server: str) -> dict[str, object]:
    """One citadeld with the page servers; the timings and lag samples."""
    root = Path(tempfile.mkdtemp(prefix="bench-exporter-"))
    *ports, port = free_ports(args.workers + 1)  # the workers' and the exporter's
    text = services(root, args.page, ports, versions, server)
    lag_file = root / "lag.txt"
    citadel = Citadel(root, text, lag_probe=lag_file)
    citadel.config.write_text(citadel.config.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
    names = [f"vllm{i}" for i in range(args.workers)]
    try:
        citadel.start()
        wait_until(lambda: citadel.all_running(names), 60, "the page servers to run", 0.1)
        time.sleep(1.0)
        idle_start = time.time()
        time.sleep(3.0)
        idle = [lag for wall, lag in read_lag_probe(lag_file) if wall >= idle_start]
        pages = [f"http://127.0.0.1:{p}/metrics" for p in ports]
        cpu_before = cpu_seconds(citadel.pid)
        timings, windows, size = asyncio.run(
            measure(f"http://127.0.0.1:{port}/metrics", pages, args.rounds, args.pause))
        daemon_cpu = (cpu_seconds(citadel.pid) - cpu_before) / len(windows)
        time.sleep(1.2)  # the probe writes once a second
        during = lag_during(read_lag_probe(lag_file), windows)
    finally:
        citadel.stop()
    return {"timings": timings, "idle": idle, "during": during, "size": size, "cpu": daemon_cpu}


def report(case: str, workers: int, result: dict[str, object]) -> None:
    """Print one case's tables and verdicts."""
    timings: dict[str, list[float]] = result["timings"]  # type: ignore[assignment]
    idle: list[float] = result["idle"]  # type: ignore[assignment]
    during: list[float] = result["during"]  # type: ignore[assignment]
    rows = []
    for name, label in (("baseline", f"fetch the {workers} pages concurrently (baseline)"),
                        ("text", "exporter /metrics, text format"),
                        ("prometheus", "exporter /metrics, OpenMetrics + gzip (as Prometheus asks)")):
        values = timings[name]
        rows.append([label, ms(percentile(values, 50)), ms(percentile(values, 90)), ms(percentile(values, 99))])
    print(f"\n### {case}\n")
    print(table(["request", "p50", "p90", "p99"], rows))
    print()
    print(table(["supervisor loop lag", "samples", "p50", "p99", "max"], [
        ["idle", str(len(idle)), ms(percentile(idle, 50)), ms(percentile(idle, 99)), ms(max(idle, default=0))],
        ["during exporter requests", str(len(during)), ms(percentile(during, 50)), ms(percentile(during, 99)),
         ms(max(during, default=0))],
    ]))
    base = percentile(timings["baseline"], 50)
    print()
    print(f"exporter page: {int(result['size']) / 1024:.0f} KiB; citadeld CPU per exporter request: "  # type: ignore[call-overload]
          f"{ms(float(result['cpu']))}; load now: {loadavg()}")  # type: ignore[arg-type]
    for name in ("text", "prometheus"):
        p50 = percentile(timings[name], 50)
        print(f"{name}: p50 {ms(p50)} ({'ok' if p50 <= 0.050 else 'OVER'} <= 50 ms), "
              f"{p50 / base:.2f} x baseline ({'ok' if p50 <= 1.5 * base else 'OVER'} <= 1.5)")
    lag99 = percentile(during, 99)
    print(f"loop lag p99 during scrapes: {ms(lag99)} ({'ok' if lag99 <= 0.020 else 'OVER'} <= 20 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--page", type=Path, default=FIXTURES / "vllm_metrics.txt")
    parser.add_argument("--pages", choices=["static", "changing", "both"], default="both")
    parser.add_argument("--server", choices=["bytes", "registry", "both"], default="both",
                        help="how the workers serve their pages (see above)")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between requests")
    args = parser.parse_args()
    print(f"machine: {machine()}; load before: {loadavg()}")
    print(f"page: {args.page} ({len(args.page.read_text().splitlines())} lines), {args.workers} workers, "
          f"{args.rounds} rounds")
    cases = ["static", "changing"] if args.pages == "both" else [args.pages]
    servers = list(SERVERS) if args.server == "both" else [args.server]
    for server in servers:
        for case in cases:
            report(f"{case} pages, served as {server}", args.workers, run(args, 1 if case == "static" else 16, server))


if __name__ == "__main__":
    main()
