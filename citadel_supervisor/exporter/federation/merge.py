"""Workers' relabelled pages merged into one set of families, and rendered.

Families are merged by name, keeping the first page's type and help; a family
whose type differs on a later page, or that uses the exporter's own prefix,
is dropped and said so. Pages with the same layout (every vLLM of a version
serves the same families) are merged a family at a time: each family's text
is joined over all of them at once, and the lines whose sample name is one
the family's type allows (its name; ``_bucket``, ``_count`` and ``_sum`` for a
histogram) are counted there: when some are not, a sample sits under another
family's metadata, and those pages are merged line by line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from loguru import logger

from .relabel import Family, RelabelledPage


class FederatedFamilies:
    """Worker pages merged into families by name, in the order first seen."""

    def __init__(self, pages: Iterable[RelabelledPage] = (), reserved_prefix: str = "citadel_"):
        self.families: dict[str, Family] = {}
        self.reserved_prefix = reserved_prefix
        self.conflicts: list[str] = []
        groups: dict[object, list[RelabelledPage]] = {}
        for page in pages:
            if page.dropped is not None:
                continue  # not valid text: never merged (fetch_page does not return one either)
            layout = page.layout
            key = layout.key if layout is not None and layout.families is not None else id(page)
            groups.setdefault(key, []).append(page)
        for group in groups.values():
            self.add_pages(group)

    def add_pages(self, pages: list[RelabelledPage]) -> None:
        """Add pages that share one layout (or one page without any)."""
        layout = pages[0].layout
        if layout is None or layout.families is None:
            for page in pages:
                self._add_families(page.line_families, page.worker)
            return
        merged = []
        owned = 0  # sample lines whose name is one their family's type allows
        for family in layout.families:
            parts = [text for page in pages for i in family.blocks if (text := page.samples[i])]
            chunks = []
            if parts:
                text = "\n".join(parts)
                owned += text.startswith(family.starts)
                for start in family.line_starts:
                    owned += text.count(start)
                chunks.append(text + "\n")
            # A family without samples still counts: its help and type hold for the
            # samples that later pages bring (as the line path has it).
            merged.append(Family(family.name, family.type, family.help, chunks))
        if owned != sum(page.lines for page in pages):
            # Some sample is not its family's (another family's, or one without metadata
            # of its own): take each page line by line.
            for page in pages:
                self._add_families(page.by_line(), page.worker)
            return
        self._add_families(merged, pages[0].worker)

    def _add_families(self, families: Iterable[Family], worker: str) -> None:
        for family in families:
            self._merge(family, worker)

    def _merge(self, family: Family, worker: str) -> None:
        if family.name.startswith(self.reserved_prefix):
            self._conflict(f"{worker}: family {family.name} uses the exporter's own prefix; dropped")
            return
        known = self.families.get(family.name)
        if known is None:
            # A copy: a relabeller keeps the page it returned, to reuse while the page is unchanged.
            self.families[family.name] = Family(family.name, family.type, family.help, list(family.chunks))
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


class FederationRenderer:
    """The workers' pages, merged and rendered; the last bytes again while every page is
    the one the last call had (a relabeller returns the same page for an unchanged text,
    so an idle fleet's pages are merged once)."""

    def __init__(self) -> None:
        self._pages: list[RelabelledPage | None] = []
        self._rendered: dict[bool, bytes] = {}

    def render(self, pages: Sequence[RelabelledPage | None], openmetrics: bool) -> bytes:
        """``pages``: one per worker, None for a worker that was down."""
        if len(pages) != len(self._pages) or any(page is not old for page, old in zip(pages, self._pages)):
            self._pages, self._rendered = list(pages), {}
        rendered = self._rendered.get(openmetrics)
        if rendered is None:
            merged = FederatedFamilies(page for page in pages if page is not None)
            for message in merged.conflicts:
                logger.debug("federation: {}", message)
            rendered = self._rendered[openmetrics] = merged.render(openmetrics).encode()
        return rendered
