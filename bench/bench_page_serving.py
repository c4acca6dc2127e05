"""How long one worker takes to serve its ``/metrics`` page: the two page servers of
``bench_exporter.py`` beside a real vLLM, when one runs.

    .venv/bin/python bench/bench_page_serving.py [--url http://127.0.0.1:8101/metrics] [--requests 100]

``bench_exporter.py`` compares the exporter with fetching eight pages, so how
fast each page is served sets its baseline. This times sequential GETs (one
at a time, 20 ms apart, over one keep-alive session where the server allows
it) of the fixture page from each of its servers (``bytes``: the page's bytes;
``registry``: rendered per request by prometheus_client, as vLLM does) and,
with ``--url``, of a real worker's ``/metrics`` (``./scripts/run`` serves
vLLM's on 127.0.0.1:8101 and :8102).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine, ms, percentile, table
from bench_exporter import FIXTURES, SERVERS


async def timings(url: str, requests: int) -> list[float]:
    """``requests`` sequential GETs of ``url`` (after 10 to warm up); seconds each."""
    found = []
    async with aiohttp.ClientSession() as session:
        for i in range(requests + 10):
            start = time.perf_counter()
            async with session.get(url, headers={"Accept-Encoding": "identity"}) as resp:
                assert resp.status == 200, (url, resp.status)
                await resp.read()
            if i >= 10:
                found.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", action="append", default=[], help="a real worker's /metrics (repeatable)")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    folder = Path(tempfile.mkdtemp(prefix="bench-page-serving-"))
    (folder / "metrics.0").write_bytes((FIXTURES / "vllm_metrics.txt").read_bytes())
    rows = []
    for kind, source in SERVERS.items():
        (folder / f"{kind}.py").write_text(source)
        port = free_port()
        server = subprocess.Popen([sys.executable, str(folder / f"{kind}.py"), str(port), str(folder), "1"])
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 10
            while True:
                try:
                    values = asyncio.run(timings(url, args.requests))
                    break
                except aiohttp.ClientConnectorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            server.kill()
            server.wait()
        rows.append([f"fixture page, served as {kind}", ms(percentile(values, 50)), ms(percentile(values, 90))])
    for url in args.url:
        values = asyncio.run(timings(url, args.requests))
        rows.append([url, ms(percentile(values, 50)), ms(percentile(values, 90))])
    print(table(["page", "p50", "p90"], rows))


if __name__ == "__main__":
    main()
