"""The status page's cost to citadeld: /metrics with 0 and with 20 open pages, side by side.

    .venv/bin/python bench/bench_status_page.py [--pages 20] [--rounds 3] [--scrapes 100]
                                                [--idle 10] [--flap 2]

One citadeld, with a FAKE NVML of eight GPUs (``tests/fixtures/fake_host_8gpu.json``),
runs eight ``command`` workers, one per GPU: seven sleep; one exits every
``--flap`` seconds and is restarted at once, so that events flow all along (about
four per flap: exit, state changes, readiness) and every open page gets them
(``--flap 0``: a quiet fleet, where a page hears little but its heartbeat).

A page is simulated by what the real page does over the network (``status.js``):
it holds ``/ui/api/events`` open and reads every message (the workers' events,
and the health report and the GPUs, which citadeld reads once for all pages every
5 s and after events). The ``--pages`` pages run in a child process of their own,
so their work is not the scraper's.

In each of ``--rounds`` rounds, with no page and then with ``--pages`` pages
open (the order swapped every round, as the machine's load drifts):

- **idle**: ``--idle`` seconds with no scrape: citadeld's CPU time (``/proc``),
  so that what the pages cost, per page, is the difference;
- **scrapes**: ``--scrapes`` requests to ``/metrics``, one every 100 ms (as
  Prometheus asks, OpenMetrics, on a kept-alive connection): their latency,
  citadeld's CPU time, and the loop's lag inside citadeld while a scrape was
  in flight (the bench's lag probe, ``_common.py lag-probe``).

Prints the latencies side by side with their ratios, and the CPU time of one
scrape beside that of one open page over a scrape interval (15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Citadel,
    cpu_seconds,
    free_port,
    loadavg,
    machine,
    median,
    ms,
    percentile,
    read_lag_probe,
    table,
    wait_until,
)

FAKE_HOST = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fake_host_8gpu.json"
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
#: Prometheus's usual scrape interval, to put one page's cost beside one scrape's.
SCRAPE_INTERVAL = 15.0


def services(flap: float, tag: str) -> str:
    """Eight workers, one per GPU; the last one exits every ``flap`` seconds (0: never)."""
    text = ""
    for i in range(8):
        command = (f'["sleep", "{flap:g}"]' if i == 7 and flap else '["sleep", "3600"]')
        text += f"""
[services.{tag}w{i}]
type = "command"
command = {command}
gpus = [{i}]
stop_timeout = 2
{'stable_after = 0.1' if i == 7 else ''}
"""
    return text


# --------------------------------------------------------------------------
# The pages (a child process)
# --------------------------------------------------------------------------


SNAPSHOT, MESSAGE = b"\nevent: snapshot\n", b"\nevent: "


async def _pages(port: int, count: int) -> None:
    """Hold ``count`` pages open until stdin closes; print what they received, as JSON."""
    base = f"http://127.0.0.1:{port}"
    received: dict[str, Any] = {"messages": 0, "snapshots": 0, "errors": 0, "refusals": []}
    ready = asyncio.Event()

    async def page(session: aiohttp.ClientSession, index: int) -> None:
        async with session.get(f"{base}/ui/api/events") as resp:
            if resp.status != 200:
                received["errors"] += 1
                received["refusals"].append(f"{resp.status} {await resp.text()}")
                if received["snapshots"] + received["errors"] >= count:
                    ready.set()
                return
            # Count the messages in each chunk, without parsing them: the pages share the
            # machine with citadeld, and should take as little of it as they can.
            tail = b""  # the last chunk's end, for a marker split between two chunks
            async for chunk in resp.content.iter_any():
                text = tail + chunk
                snapshots = text.count(SNAPSHOT) - tail.count(SNAPSHOT)
                received["snapshots"] += snapshots
                received["messages"] += text.count(MESSAGE) - tail.count(MESSAGE) - snapshots
                tail = text[-len(SNAPSHOT):]
                if snapshots and received["snapshots"] + received["errors"] >= count:
                    ready.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.ensure_future(page(session, i)) for i in range(count)]
        await asyncio.wait_for(ready.wait(), 30)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(received), flush=True)


class Pages:
    """``count`` open pages, in a child process, until ``close``."""

    def __init__(self, port: int, count: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--pages-child", str(port), str(count)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"the pages did not open: {line!r}")

    def close(self) -> dict[str, Any]:
        """Close the pages; what they received."""
        out, _ = self.proc.communicate("", timeout=30)
        return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


async def scrapes(url: str, count: int) -> tuple[list[float], list[tuple[float, float]]]:
    """``count`` scrapes, one every 100 ms; their latencies and wall-clock windows."""
    latencies, windows = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm the connection
            async with session.get(url, headers={"Accept": PROMETHEUS_ACCEPT}) as resp:
                await resp.read()
        for _ in range(count):
            wall, start = time.time(), time.perf_counter()
            async with session.get(url, headers={"Accept": PROMETHEUS_ACCEPT}) as resp:
                assert resp.status == 200, resp.status
                await resp.read()
            took = time.perf_counter() - start
            latencies.append(took)
            windows.append((wall, time.time()))
            await asyncio.sleep(max(0.0, 0.1 - took))
    return latencies, windows


def lag_during(rows: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """The lag samples whose wake-up fell inside a scrape (or one probe period after it)."""
    found, j = [], 0
    for wall, lag in rows:
        while j < len(windows) and windows[j][1] + 0.02 < wall:
            j += 1
        if j < len(windows) and windows[j][0] <= wall:
            found.append(lag)
    return found


def phase(citadel: Citadel, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The idle stretch, then the scrapes; what each cost citadeld."""
    cpu0, t0 = cpu_seconds(citadel.pid), time.monotonic()
    time.sleep(args.idle)  # the stretch measured: nothing else to wait for
    cpu1, t1 = cpu_seconds(citadel.pid), time.monotonic()
    latencies, windows = asyncio.run(scrapes(url, args.scrapes))
    cpu2, t2 = cpu_seconds(citadel.pid), time.monotonic()
    return {"idle_cpu": cpu1 - cpu0, "idle_wall": t1 - t0, "scrape_cpu": cpu2 - cpu1,
            "scrape_wall": t2 - t1, "latencies": latencies, "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=20, help="open pages in the second case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=100, help="scrapes per case and round")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds without scrapes per case and round")
    parser.add_argument("--flap", type=float, default=2.0,
                        help="seconds between the flapping worker's exits; 0: a quiet fleet")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--pages-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pages_child:
        asyncio.run(_pages(*args.pages_child))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-status-page-"))
    probe = root / "lag.txt"
    port = free_port()
    tag = f"sp{os.getpid()}"
    citadel = Citadel(root / "citadel", services(args.flap, tag), lag_probe=probe,
                      exporter_listen=f"127.0.0.1:{port}", env={"CITADEL_FAKE_NVML": str(FAKE_HOST)})
    results: dict[int, list[dict[str, Any]]] = {0: [], args.pages: []}
    received: list[dict[str, Any]] = []
    try:
        citadel.start()
        wait_until(lambda: citadel.all_running([f"{tag}w{i}" for i in range(7)]), 60, "the workers")
        url = f"http://127.0.0.1:{port}/metrics"
        for r in range(args.rounds):
            for count in ([0, args.pages] if r % 2 == 0 else [args.pages, 0]):
                pages = Pages(port, count) if count else None
                try:
                    results[count].append(phase(citadel, url, args))
                finally:
                    if pages is not None:
                        received.append(pages.close())
                print(f"round {r + 1}, {count} pages: done (load {loadavg()})", file=sys.stderr)
        rows = read_lag_probe(probe)
    finally:
        citadel.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, results, received, rows)


def report(args: argparse.Namespace, results: dict[int, list[dict[str, Any]]], received: list[dict[str, Any]],
           rows: list[tuple[float, float]]) -> None:
    """Print the tables."""
    print(f"Machine: {machine()}; load {loadavg()}")
    fleet = f"one exiting every {args.flap:g} s" if args.flap else "none exiting"
    print(f"Eight workers, {fleet}; {args.rounds} rounds of {args.scrapes} scrapes "
          f"and {args.idle:g} s idle per case.\n")
    figures: dict[int, dict[str, float]] = {}
    for count, phases in results.items():
        latencies = [x for p in phases for x in p["latencies"]]
        lags = lag_during(rows, [w for p in phases for w in p["windows"]])
        figures[count] = {
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99), "max": max(latencies),
            "lag_p99": percentile(lags, 99),
            "idle_cpu_rate": sum(p["idle_cpu"] for p in phases) / sum(p["idle_wall"] for p in phases),
        }
    base, busy = figures[0], figures[args.pages]
    header = ["/metrics", "0 pages", f"{args.pages} pages", "ratio"]
    lines = [[key, ms(base[key]), ms(busy[key]), f"{busy[key] / base[key]:.2f}"]
             for key in ("p50", "p90", "p99", "max")]
    lines.append(["loop lag p99 during a scrape", ms(base["lag_p99"]), ms(busy["lag_p99"]),
                  f"{busy['lag_p99'] / base['lag_p99']:.2f}" if base["lag_p99"] > 0 else "n/a"])
    print(table(header, lines))
    per_page = (busy["idle_cpu_rate"] - base["idle_cpu_rate"]) / args.pages
    # A scrape's own CPU time: the scrapes' stretch less what citadeld spends idle meanwhile.
    scrape = median([(p["scrape_cpu"] - base["idle_cpu_rate"] * p["scrape_wall"]) / len(p["latencies"])
                     for p in results[0]])
    print()
    print(table(["citadeld CPU time", "value"], [
        ["idle, 0 pages (per second)", ms(base["idle_cpu_rate"])],
        [f"idle, {args.pages} pages (per second)", ms(busy["idle_cpu_rate"])],
        [f"one open page over {SCRAPE_INTERVAL:g} s", ms(per_page * SCRAPE_INTERVAL)],
        ["one /metrics scrape (0 pages)", ms(scrape)],
    ]))
    total = {k: sum(r[k] for r in received) for k in ("messages", "snapshots", "errors")}
    print(f"\nThe pages received {total['snapshots']} snapshots and {total['messages']} messages "
          f"(events, health reports, GPUs); {total['errors']} were refused.")
    for refusal in sorted({r for got in received for r in got["refusals"]}):
        print(f"refused: {refusal}")


if __name__ == "__main__":
    main()
