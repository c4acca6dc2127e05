"""The collectors of citadeld's own families, one module each.

``supervisor`` (the workers' states, the daemon's build, plugins, reloads and
loop) runs on the loop, as it reads the supervisor's live state. ``processes``
and ``host`` are built-in plugins: they come through ``citadel_scrape_collectors``
for every scrape, in the exporter's thread, as the GPU part's and any plugin's do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loguru import logger
from prometheus_client.core import Metric

#: Label names of a worker's series.
WORKER_LABELS = ["service", "worker"]


def collect_safely(collectors: Iterable[Any]) -> list[Metric]:
    """Every family of every collector; a collector that raises is logged and skipped."""
    families: list[Metric] = []
    for collector in collectors:
        try:
            families.extend(collector.collect())
        except Exception as exc:  # noqa: BLE001 - one bad collector (often a plugin's) must not cost the rest
            logger.opt(exception=exc).error("metric collector {} failed: {}", type(collector).__name__, exc)
    return families
