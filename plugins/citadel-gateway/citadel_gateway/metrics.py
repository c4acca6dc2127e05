"""The gateway's own Prometheus metrics, served on its listener at ``/metrics``.

citadeld federates them like any worker's: the gateway type's
``metrics_url`` points the exporter here (see docs/gateway.md for why the
gateway does not use the in-daemon collector hook). Label values are the
configured key name (never the key) and models the gateway knows; a request
for an unknown model counts under ``model="-"``, so that clients cannot
create label values at will. Names start with ``gateway_``, not
``citadel_``: the exporter keeps that prefix for its own families and drops
federated families that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine_load import EngineLoadFeed
from .policy import RoutingPolicy
from .upstreams import UpstreamTable

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LiveState(Collector):
    """Queue depth, in-flight requests and ready workers, read at scrape time."""

    def __init__(self, table: UpstreamTable, queue_depths: Callable[..., dict[str, int]]):
        self.table = table
        self.queue_depths = queue_depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges (runs in the scrape handler, on the loop)."""
        queue = GaugeMetricFamily("gateway_queue_depth",
                                  "Requests waiting for a free worker, by model", labels=["model"])
        depths = self.queue_depths()
        for model in sorted(set(depths) | set(self.table.routes)):
            queue.add_metric([model], depths.get(model, 0))
        yield queue
        held = GaugeMetricFamily("gateway_held_requests",
                                 "Requests held while a worker for their model starts or wakes on demand",
                                 labels=["model"])
        for model, depth in sorted(self.queue_depths(True).items()):
            held.add_metric([model], depth)
        yield held
        outstanding = GaugeMetricFamily("gateway_outstanding_requests",
                                        "Requests in flight to each worker", labels=["worker"])
        ready = GaugeMetricFamily("gateway_worker_in_rotation",
                                  "1 when the worker is running and ready", labels=["worker"])
        for upstream in self.table.workers.values():
            outstanding.add_metric([upstream.name], upstream.outstanding)
            ready.add_metric([upstream.name], 1.0 if upstream.in_rotation else 0.0)
        yield outstanding
        yield ready


class _Routing(Collector):
    """What chose each request's worker, prefix affinity's outcomes, and the engines' load as read."""

    def __init__(self, table: UpstreamTable, policy: RoutingPolicy, engines: EngineLoadFeed):
        self.table = table
        self.policy = policy
        self.engines = engines

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the families (runs in the scrape handler, on the loop)."""
        chosen = CounterMetricFamily(
            "gateway_routing_decisions", "Workers chosen, by what chose them (least-outstanding, "
            "engine-load, prefix-affinity)", labels=["chosen_by", "policy"])
        for by, count in sorted(self.policy.chosen_by.items()):
            chosen.add_metric([by, self.policy.name], count)
        yield chosen
        affinity = CounterMetricFamily(
            "gateway_prefix_affinity", "Requests with a long enough prompt prefix, by outcome: hit "
            "(sent to their prefix's worker) or overloaded (that worker was; the policy chose)",
            labels=["outcome"])
        for outcome, count in sorted(self.policy.affinity_outcomes.items()):
            affinity.add_metric([outcome], count)
        yield affinity
        age = GaugeMetricFamily("gateway_engine_reading_age_seconds",
                                "Age of the last reading of each worker's engine load", labels=["worker"])
        waiting = GaugeMetricFamily("gateway_engine_waiting_requests",
                                    "The engine's waiting requests, as last read", labels=["worker"])
        kv = GaugeMetricFamily("gateway_engine_kv_cache_usage",
                               "The engine's KV-cache use (0 to 1), as last read", labels=["worker"])
        now = self.engines.clock()
        # Only workers the gateway knows: label values never come from an answer alone.
        for name in sorted(set(self.engines.samples) & set(self.table.workers)):
            sample = self.engines.samples[name]
            age.add_metric([name], max(0.0, now - sample.at))
            waiting.add_metric([name], sample.waiting)
            kv.add_metric([name], sample.kv_cache_usage)
        yield age
        yield waiting
        yield kv


class GatewayMetrics:
    """Every metric of one gateway, in its own registry."""

    def __init__(self, table: UpstreamTable, queue_depths: Callable[..., dict[str, int]],
                 policy: RoutingPolicy | None = None, engines: EngineLoadFeed | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests", "Requests answered, by model, key and status",
                                ["model", "key", "status"], registry=r)
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "From sending a request to a worker to its last byte", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_ttfb = Histogram(
            "gateway_upstream_time_to_first_byte_seconds",
            "From sending a request to a worker to the first byte of its answer's body", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("gateway_retries", "Requests retried on another worker",
                               ["model"], registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens the workers reported, by model, key and kind",
                              ["model", "key", "kind"], registry=r)
        self.client_disconnects = Counter(
            "gateway_client_disconnects", "Requests whose client left before the answer ended",
            ["model"], registry=r)
        self.held = Counter("gateway_held", "Requests held while their model started or woke on demand",
                            registry=r)
        self.hold_seconds = Histogram(
            "gateway_hold_seconds", "From holding a request to a worker for its model coming up", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.hold_timeouts = Counter("gateway_hold_timeouts",
                                     "Held requests answered 503 after hold_timeout", ["model"], registry=r)
        r.register(_LiveState(table, queue_depths))
        if policy is not None and engines is not None:
            r.register(_Routing(table, policy, engines))
