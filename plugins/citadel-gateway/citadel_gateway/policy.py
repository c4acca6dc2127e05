"""Which worker gets a request: the routing policy, and prefix affinity in front of it.

``least-outstanding`` (the default): the worker with the fewest requests in
flight from this gateway. It adapts to a slow worker on its own, since a
slow worker's requests finish later and so count longer.

``engine-load``: each worker scores::

    score = o + w + 4 * kv

where ``o`` is the gateway's own requests in flight to it, ``w`` the
engine's waiting requests and ``kv`` its KV-cache use (0 to 1), as citadeld
last read them. ``o`` is exact and reacts at once, between readings; the
engine adds what only it knows: that it is saturated (a queue: another
request would only wait, whoever sent the ones before) and how full its
cache is (a full KV cache counts as 4 requests: vLLM preempts running
requests then). The engine's running count is left out on purpose: a
reading is up to a second old, and counting its running requests (as
``max(o, r + w)``, the first version) charged a fast worker for requests it
had already finished, which sent more traffic to the slow one (the
benchmark in docs/benchmarks.md). The lowest score wins. When any candidate has no fresh reading (older than
``engine_load.stale_after``), all are compared by ``o`` alone, as in
least-outstanding, so that a worker without a reading is neither favoured
nor shunned.

Either way, ties rotate, and a worker at ``per_worker_concurrency`` is never
chosen (the request queues instead).

Prefix affinity (``prefix_affinity``, off by default): a request whose
prompt's first ``prefix_chars`` characters hash to a worker (rendezvous
hashing over the candidates, ``affinity.owner``) goes there unless that
worker is overloaded: at its cap, its engine has more than ``max_waiting``
requests waiting (fresh reading), or it has more than ``slack`` requests in
flight beyond the least busy free worker. Then the policy chooses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from .affinity import owner
from .config import PrefixAffinity
from .engine_load import EngineSample
from .upstreams import Upstream

LEAST_OUTSTANDING = "least-outstanding"
ENGINE_LOAD = "engine-load"
PREFIX_AFFINITY = "prefix-affinity"
POLICIES = (LEAST_OUTSTANDING, ENGINE_LOAD)
#: What a full KV cache weighs, in requests.
KV_WEIGHT = 4.0

Samples = Callable[[str], "EngineSample | None"]


def _no_samples(worker: str) -> EngineSample | None:
    return None


def engine_score(outstanding: int, sample: EngineSample) -> float:
    """The engine-load score of a worker (lower is better); see the module's docstring."""
    return outstanding + sample.waiting + KV_WEIGHT * sample.kv_cache_usage


class RoutingPolicy:
    """Chooses among a model's workers in rotation; counts what chose, for the metrics."""

    def __init__(self, name: str, per_worker: int, samples: Samples = _no_samples,
                 affinity: PrefixAffinity | None = None):
        """``samples(worker)``: the engine's fresh load or None (``EngineLoadFeed.sample``)."""
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
        self.name = name
        self.per_worker = per_worker
        self.samples = samples
        self.affinity = affinity
        #: Requests routed, by what chose the worker (``least-outstanding``, ``engine-load``,
        #: ``prefix-affinity``).
        self.chosen_by: Counter[str] = Counter()
        #: Requests with an affinity key, by outcome: ``hit`` (sent to their prefix's worker)
        #: or ``overloaded`` (that worker was overloaded: the policy chose).
        self.affinity_outcomes: Counter[str] = Counter()
        self._turn = 0

    def choose(self, candidates: Sequence[Upstream], key: bytes | None = None) -> Upstream | None:
        """The worker for a request among ``candidates`` (in rotation, serving its model), or
        None when all are at their cap. ``key``: its prompt prefix's digest, for affinity."""
        free = [u for u in candidates if u.outstanding < self.per_worker]
        if not free:
            return None
        if key is not None and self.affinity is not None:
            home = owner(key, candidates, lambda u: u.name)
            if home is not None and home in free and not self.overloaded(home, free):
                self.affinity_outcomes["hit"] += 1
                self.chosen_by[PREFIX_AFFINITY] += 1
                return home
            self.affinity_outcomes["overloaded"] += 1
        chosen, by = self._by_policy(free)
        self.chosen_by[by] += 1
        return chosen

    def overloaded(self, upstream: Upstream, free: Sequence[Upstream]) -> bool:
        """Too busy to take a request for affinity's sake (see the module's docstring)."""
        assert self.affinity is not None
        if upstream.outstanding >= self.per_worker:
            return True
        sample = self.samples(upstream.name)
        if sample is not None and sample.waiting > self.affinity.max_waiting:
            return True
        return upstream.outstanding - min(u.outstanding for u in free) > self.affinity.slack

    def _by_policy(self, free: Sequence[Upstream]) -> tuple[Upstream, str]:
        scores: list[float] | None = None
        if self.name == ENGINE_LOAD:
            samples = [self.samples(u.name) for u in free]
            if all(s is not None for s in samples):
                scores = [engine_score(u.outstanding, s) for u, s in zip(free, samples, strict=True)
                          if s is not None]
        by = ENGINE_LOAD if scores is not None else LEAST_OUTSTANDING
        if scores is None:
            scores = [float(u.outstanding) for u in free]
        least = min(scores)
        best = [u for u, score in zip(free, scores, strict=True) if score <= least + 1e-9]
        # Rotate among equals, so that idle replicas share sequential traffic.
        self._turn += 1
        return best[self._turn % len(best)], by
