"""Fetching every worker's own ``/metrics`` concurrently, and how each fetch went.

Every page is fetched with one timeout through the daemon's one HTTP session,
so a slow or dead worker costs at most that timeout and never hides the
others. Each page is relabelled as soon as it arrives, while the others are
still on their way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import aiohttp
from prometheus_client.core import GaugeMetricFamily, Metric

from .relabel import PageRelabeler, RelabelledPage

#: What federation asks workers for: the classic text format, parsed here.
TEXT_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
#: The pages come over loopback: compressing them (prometheus_client, and so vLLM, gzips
#: whenever asked) would cost the worker and citadeld CPU and save nothing.
FETCH_HEADERS = {"Accept": TEXT_ACCEPT, "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class ScrapeTarget:
    """One worker's page to fetch; ``url`` is None when the worker does not run."""

    service: str
    worker: str
    url: str | None


@dataclass
class ScrapeResult:
    """How fetching one worker's page went, and the page, relabelled, when it was up."""

    target: ScrapeTarget
    up: bool
    duration: float
    page: RelabelledPage | None = None
    error: str | None = None


async def fetch_page(session: aiohttp.ClientSession, target: ScrapeTarget, timeout: float,
                     relabeler: PageRelabeler | None = None) -> ScrapeResult:
    """Fetch one worker's page and relabel it as soon as it arrives, while the other
    pages are still on their way.

    A failure is a result with ``up`` False, never an exception.
    """
    if target.url is None:
        return ScrapeResult(target, False, 0.0, error="not running")
    start = time.monotonic()
    try:
        async with session.get(target.url, headers=FETCH_HEADERS,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return ScrapeResult(target, False, time.monotonic() - start, error=f"HTTP {resp.status}")
            # The exposition format is UTF-8; decoding it here spares aiohttp's charset guessing.
            text = (await resp.read()).decode("utf-8", errors="replace")
    except asyncio.TimeoutError:
        return ScrapeResult(target, False, time.monotonic() - start, error=f"timed out after {timeout:g}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return ScrapeResult(target, False, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")
    duration = time.monotonic() - start
    relabeler = relabeler or PageRelabeler(target.service, target.worker)
    # On the loop, on purpose: a page takes under half a millisecond, while handing it to
    # a thread made the loop wait for the GIL (up to the 5 ms switch interval) on every
    # read of the other pages still arriving. The sleep(0) gives each page its own turn
    # of the loop, so that pages arriving together do not add up into one long stall.
    await asyncio.sleep(0)
    return ScrapeResult(target, True, duration, relabeler.split(text))


async def scrape_all(session: aiohttp.ClientSession, targets: Iterable[ScrapeTarget], timeout: float,
                     relabelers: dict[tuple[str, str], PageRelabeler] | None = None) -> list[ScrapeResult]:
    """Fetch every target's page at once; one result per target, in order.

    ``relabelers`` keeps each worker's ``PageRelabeler`` (and its cache) from
    one scrape to the next; workers no longer listed are dropped from it.
    """
    targets = list(targets)
    if relabelers is None:
        relabelers = {}
    wanted = {(t.service, t.worker) for t in targets}
    for key in [k for k in relabelers if k not in wanted]:
        del relabelers[key]
    for t in targets:
        relabelers.setdefault((t.service, t.worker), PageRelabeler(t.service, t.worker))
    return list(await asyncio.gather(*(
        fetch_page(session, t, timeout, relabelers[(t.service, t.worker)]) for t in targets)))


class FederationCollector:
    """``citadel_federation_up`` and ``citadel_federation_scrape_duration_seconds`` per worker."""

    def __init__(self, results: Iterable[ScrapeResult]):
        self.results = list(results)

    def collect(self) -> Iterator[Metric]:
        """Yield the two families."""
        labels = ["service", "worker"]
        up = GaugeMetricFamily("citadel_federation_up",
                               "1 when the worker's own /metrics was fetched in this scrape.", labels=labels)
        duration = GaugeMetricFamily("citadel_federation_scrape_duration_seconds",
                                     "Seconds fetching the worker's own /metrics took in this scrape.",
                                     labels=labels)
        for result in self.results:
            key = [result.target.service, result.target.worker]
            up.add_metric(key, 1.0 if result.up else 0.0)
            duration.add_metric(key, result.duration)
        yield up
        yield duration
