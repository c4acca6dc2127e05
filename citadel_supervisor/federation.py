"""Federation: each worker's own ``/metrics``, fetched concurrently and re-exposed.

Every page is fetched with one timeout through the daemon's one HTTP session,
so a slow or dead worker costs at most that timeout and never hides the
others. Each sample gets ``service`` and ``worker`` labels (a label of the
same name already on the sample is kept as ``exported_service`` /
``exported_worker``, as Prometheus' ``honor_labels = false`` does), and the
families of all workers are merged by name, keeping the first worker's type
and help.

Pages are handled as text, line by line, without building sample objects:
a vLLM page is about 600 lines and a scrape may carry dozens of them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from loguru import logger
from prometheus_client.core import GaugeMetricFamily, Metric

#: What federation asks workers for: the classic text format, parsed here.
TEXT_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"

#: Sample-name suffixes that belong to a family of the base name.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info", "_gcount", "_gsum")
_CLASH = re.compile(r'([{,]\s*)(service|worker)(\s*=\s*")')


@dataclass(frozen=True)
class ScrapeTarget:
    """One worker's page to fetch; ``url`` is None when the worker does not run."""

    service: str
    worker: str
    url: str | None


@dataclass
class ScrapeResult:
    """How fetching one worker's page went, and its families when it was up."""

    target: ScrapeTarget
    up: bool
    duration: float
    families: list[Family] = field(default_factory=list)
    error: str | None = None


async def fetch_page(session: aiohttp.ClientSession, target: ScrapeTarget, timeout: float,
                     relabeler: PageRelabeler | None = None) -> ScrapeResult:
    """Fetch one worker's page and split it into relabelled families as soon as it arrives,
    while the other pages are still on their way.

    A failure is a result with ``up`` False, never an exception.
    """
    if target.url is None:
        return ScrapeResult(target, False, 0.0, error="not running")
    start = time.monotonic()
    try:
        async with session.get(target.url, headers={"Accept": TEXT_ACCEPT},
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
    # On the loop, on purpose: a page takes about a millisecond, while handing it to a
    # thread made the loop wait for the GIL (up to the 5 ms switch interval) on every
    # read of the other pages still arriving. The sleep(0) gives each page its own turn
    # of the loop, so that pages arriving together do not add up into one long stall.
    await asyncio.sleep(0)
    families = relabeler.split(text)
    return ScrapeResult(target, True, duration, families)


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


@dataclass
class Family:
    """One metric family merged over workers: its name, type, help and sample text."""

    name: str
    type: str = "untyped"
    help: str | None = None
    #: Relabelled sample lines, one chunk per worker; each line ends with a newline.
    chunks: list[str] = field(default_factory=list)

    def owns(self, sample_name: str) -> bool:
        """True when a sample of this name belongs to this family."""
        if sample_name == self.name:
            return True
        return sample_name.startswith(self.name) and sample_name[len(self.name):] in _SUFFIXES


_META = re.compile(r"\n# (HELP|TYPE) ([^ \n]+)(?: ([^\n]*))?")


def _relabel(line: str, labels: str) -> tuple[str, str]:
    """``name{a="b"} 1`` -> (``name``, ``name{service="s",worker="w",a="b"} 1``)."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = line[brace + 1:]
        if ("service" in rest or "worker" in rest) and _CLASH.search(line, brace):
            rest = _CLASH.sub(r"\1exported_\2\3", line[brace:])[1:]
        joiner = "" if rest.startswith("}") else ","
        return line[:brace], f"{line[:brace]}{{{labels}{joiner}{rest}"
    name = line[:space] if space != -1 else line
    return name, f"{name}{{{labels}}}{line[len(name):]}"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_bare_lines(chunk: str, labels: str) -> str:
    """Give the lines of ``chunk`` that have no labels yet (``name 1``) the ``labels``."""
    out = []
    for line in chunk.split("\n")[:-1]:
        out.append(line if labels in line else _relabel(line, labels)[1])
    return "\n".join(out) + "\n"


def _plain(text: str) -> bool:
    """True when no label value holds an escaped quote, no label set is empty, no line is
    blank or ends in CR, and no label is named service or worker: then ``_relabel_chunk`` works."""
    return not ('\\"' in text or "{}" in text or "\r" in text or "service=" in text
                or "worker=" in text or text.find("\n\n", 0, len(text.rstrip("\n"))) != -1)


def _relabel_chunk(raw: str, name: str, labels: str) -> str | None:
    """Relabel the sample lines of one ``_plain`` family (``raw`` is
    ``"\\nline\\nline"``); None when a sample of another family sits among them.

    ``"} `` ends every label set when no label value holds an escaped quote,
    so one ``str.replace`` labels every sample with labels; lines without
    labels are then done one by one.
    """
    lines = raw.count("\n")
    if raw.count(f"\n{name}") != lines:
        return None  # a sample of another family sits here
    chunk = raw.replace('"} ', f'",{labels}}} ')
    chunk = chunk[1:] + "\n"
    if chunk.count(labels) != lines:
        chunk = _label_bare_lines(chunk, labels)
    return chunk


class PageRelabeler:
    """Splits one worker's pages into families with its labels added.

    A page is cut at its ``# HELP``/``# TYPE`` lines into slots of sample
    text. The layout (which slot belongs to which family, with its type and
    help) is worked out again only when those lines change, and a slot whose
    text did not change since the last page (an idle server's histograms,
    for instance) keeps its relabelled text: only what changed is relabelled.
    """

    def __init__(self, service: str, worker: str):
        self.service = service
        self.worker = worker
        self.labels = f'service="{_label_value(service)}",worker="{_label_value(worker)}"'
        self._meta: tuple[list[str], ...] | None = None
        self._layout: list[tuple[str, str, str | None, list[int]]] = []
        self._raw: list[str] = []  # each slot's sample text, as last seen
        self._out: list[str] = []  # and relabelled

    def split(self, text: str) -> list[Family]:
        """The page's families, relabelled (CPU work: about a millisecond for a vLLM page)."""
        families = self._split_fast(text)
        if families is None:
            self._meta = None
            families = _page_by_line(text, self.labels)
        return families

    def _split_fast(self, text: str) -> list[Family] | None:
        # One C-level split: ["", kind, name, help-or-type, samples, kind, name, ...].
        parts = _META.split(text if text.startswith("\n") else "\n" + text)
        if len(parts) < 5 or parts[0]:
            return None
        meta = (parts[1::4], parts[2::4], parts[3::4])
        samples = parts[4::4]
        if meta != self._meta:
            self._meta, self._layout = meta, _layout(*meta)
            self._raw, self._out = [], []
        names = meta[1]
        old_raw, old_out = self._raw, self._out
        out: list[str] = []
        plain: bool | None = None  # checked once, at the first slot that changed
        for i, raw in enumerate(samples):
            if old_raw and raw == old_raw[i]:
                out.append(old_out[i])
                continue
            raw = raw.rstrip("\n")
            if not raw:
                out.append("")
                continue
            if plain is None:
                plain = _plain(text)
            chunk = _relabel_chunk(raw, names[i], self.labels) if plain else None
            if chunk is None:
                return None
            out.append(chunk)
        self._raw, self._out = samples, out
        families = []
        for name, kind, help_text, slots in self._layout:
            chunks = [out[s] for s in slots if out[s]]
            families.append(Family(name, kind, help_text, chunks))
        return families


def _layout(kinds: list[str], names: list[str], values: list[str | None]
            ) -> list[tuple[str, str, str | None, list[int]]]:
    """``(family, type, help, slots)`` per family, from a page's metadata lines in order."""
    found: dict[str, list[Any]] = {}
    for slot, (kind, name, value) in enumerate(zip(kinds, names, values)):
        family = found.setdefault(name, ["untyped", None, []])
        if kind == "HELP":
            family[1] = value or ""
        else:
            family[0] = (value or "untyped").strip()
        family[2].append(slot)
    return [(name, kind, help_text, slots) for name, (kind, help_text, slots) in found.items()]


def _page_by_line(text: str, labels: str) -> list[Family]:
    """Split and relabel any page in the text format, one line at a time."""
    page: dict[str, Family] = {}
    lines: dict[str, list[str]] = {}
    current: Family | None = None
    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue
            name = parts[2]
            current = page.get(name)
            if current is None:
                current = page[name] = Family(name)
                lines[name] = []
            if parts[1] == "HELP":
                current.help = parts[3] if len(parts) > 3 else ""
            else:
                current.type = parts[3].strip() if len(parts) > 3 else "untyped"
            continue
        name, relabelled = _relabel(line, labels)
        if current is None or not current.owns(name):
            current = page.get(name)
            if current is None:
                current = page[name] = Family(name)
                lines[name] = []
        lines[current.name].append(relabelled + "\n")
    for name, family in page.items():
        if lines[name]:
            family.chunks.append("".join(lines[name]))
    return list(page.values())


class FederatedFamilies:
    """Worker pages merged into families by name, in the order first seen."""

    def __init__(self, reserved_prefix: str = "citadel_"):
        self.families: dict[str, Family] = {}
        self.reserved_prefix = reserved_prefix
        self.conflicts: list[str] = []

    def add_page(self, service: str, worker: str, text: str) -> None:
        """Add one worker's page (Prometheus text format) with its labels."""
        self.add_families(PageRelabeler(service, worker).split(text), worker)

    def add_families(self, families: Iterable[Family], worker: str) -> None:
        """Add one worker's families, already relabelled."""
        for family in families:
            self._merge(family, worker)

    def _merge(self, family: Family, worker: str) -> None:
        if family.name.startswith(self.reserved_prefix):
            self._conflict(f"{worker}: family {family.name} uses the exporter's own prefix; dropped")
            return
        known = self.families.get(family.name)
        if known is None:
            self.families[family.name] = family
        elif known.type != family.type:
            self._conflict(f"{worker}: family {family.name} is a {family.type}, "
                           f"another worker's is a {known.type}; dropped")
        else:
            known.chunks.extend(family.chunks)
            if known.help is None:
                known.help = family.help

    def _conflict(self, message: str) -> None:
        if message not in self.conflicts:
            self.conflicts.append(message)

    def render(self, openmetrics: bool = False) -> str:
        """The merged families as exposition text (OpenMetrics framing without ``# EOF``)."""
        out: list[str] = []
        families = self.families
        for family in families.values():
            if not family.chunks:
                continue
            name, kind = family.name, family.type
            if openmetrics:
                name, kind, skip = _openmetrics_family(family, families)
                if skip:
                    continue
            if family.help is not None:
                out.append(f"# HELP {name} {family.help}\n")
            out.append(f"# TYPE {name} {kind}\n")
            out.extend(family.chunks)
        return "".join(out)


def _openmetrics_family(family: Family, families: dict[str, Family]) -> tuple[str, str, bool]:
    """How a text-format family reads in OpenMetrics: (name, type, skip it)."""
    name, kind = family.name, family.type
    if kind == "untyped":
        return name, "unknown", False
    if kind == "counter":
        if name.endswith("_total"):
            return name[: -len("_total")], kind, False
        return name, "unknown", False  # a counter without _total samples is not valid OpenMetrics
    if kind == "gauge" and name.endswith("_created"):
        # prometheus_client's text format gives each counter's and histogram's
        # creation time as a gauge family; OpenMetrics reserves that name.
        base = name[: -len("_created")]
        owner = families.get(base + "_total") or families.get(base)
        if owner is not None and owner.type in ("counter", "histogram", "summary"):
            return name, kind, True
    return name, kind, False


def merge_pages(results: Iterable[ScrapeResult]) -> FederatedFamilies:
    """Merge the pages of every worker that was up."""
    merged = FederatedFamilies()
    for result in results:
        if result.up:
            merged.add_families(result.families, result.target.worker)
    for message in merged.conflicts:
        logger.debug("federation: {}", message)
    return merged


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
