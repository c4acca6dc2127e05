"""Federation: every worker's own ``/metrics``, fetched concurrently, relabelled and merged.

- ``fetch``: the concurrent fetch, bounded by a timeout per page, and the
  per-worker scrape-up and duration families;
- ``validate``: whether a page is valid exposition text (a bad page is dropped whole);
- ``relabel``: one page with ``service`` and ``worker`` labels on every sample;
- ``merge``: the pages' families merged by name, and rendered.
"""

from .fetch import (
    FederationCollector,
    PageDrops,
    ScrapeResult,
    ScrapeTarget,
    fetch_page,
    scrape_all,
)
from .merge import FederatedFamilies, FederationRenderer
from .relabel import Family, PageRelabeler, RelabelledPage, page_by_line

__all__ = [
    "Family",
    "FederatedFamilies",
    "FederationCollector",
    "FederationRenderer",
    "PageDrops",
    "PageRelabeler",
    "RelabelledPage",
    "ScrapeResult",
    "ScrapeTarget",
    "fetch_page",
    "page_by_line",
    "scrape_all",
]
