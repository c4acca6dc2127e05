"""The exporter's own families, encoded by prometheus_client's encoders, each
family encoded again only when it changed.

Most of a scrape's own families (worker states, restarts, the build, plugins,
startup histograms) are the same from one scrape to the next; comparing a
family's samples costs a small part of encoding them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import Metric

#: An encoder of prometheus_client's: ``generate_latest`` of the text format or of OpenMetrics.
Encoder = Callable[[Any], bytes]

OPENMETRICS_EOF = b"# EOF\n"


class CollectedFamilies:
    """A registry-like holder of families already collected, for prometheus_client's encoders."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        """The families, as ``CollectorRegistry.collect`` would give them."""
        return self.families


def without_eof(encoded: bytes) -> bytes:
    """An encoder's output without OpenMetrics' closing ``# EOF`` (the page has one, at its end)."""
    return encoded.removesuffix(OPENMETRICS_EOF)


class FamilyEncoder:
    """Encodes families, reusing the bytes of each family whose samples did not change.

    One instance per set of families encoded together (a scrape's supervisor
    families, say); for each encoder, it holds only what the last call saw.
    """

    def __init__(self) -> None:
        self._caches: dict[Encoder, dict[str, tuple[Metric, bytes]]] = {}

    def encode(self, families: Iterable[Metric], encoder: Encoder) -> bytes:
        """The families, encoded (without OpenMetrics' ``# EOF``)."""
        last = self._caches.get(encoder, {})
        cache: dict[str, tuple[Metric, bytes]] = {}
        out = []
        for family in families:
            hit = last.get(family.name) or cache.get(family.name)
            if hit is not None and _same(hit[0], family):
                data = hit[1]
            else:
                data = without_eof(encoder(CollectedFamilies([family])))
            cache[family.name] = (family, data)
            out.append(data)
        self._caches[encoder] = cache
        return b"".join(out)


def _same(old: Metric, new: Metric) -> bool:
    return (old.samples == new.samples and old.type == new.type and old.documentation == new.documentation
            and old.unit == new.unit)
