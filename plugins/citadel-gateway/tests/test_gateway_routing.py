"""Routing by the engines' own load, and prefix affinity, with real processes.

A real citadeld runs two workers of a ``vllm`` service that are FAKE upstreams
(``fake_upstream.py`` through a shim interpreter: real vLLM is far too slow
here), each serving a ``/metrics`` page in vLLM's names with a queue the test
sets. citadeld reads the pages (``GET /v1/engines``); two gateways route:

- ``gw-load``: ``policy = "engine-load"``;
- ``gw-affinity``: least-outstanding, with ``prefix_affinity``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import Http, fake_vllm_python, fake_vllm_service, free_ports, wait_until

from citadel_supervisor.control.client import ControlClient
from citadel_supervisor.testing import free_port_run

SYSTEM = "You answer questions about the sea, briefly and kindly. " * 30  # ~1700 characters


class Routing:
    """The deployment: citadeld, the two fakes by worker name, the two gateways."""

    def __init__(self, daemon: Any, fakes: dict[str, Http], load: Http, affinity: Http):
        self.daemon = daemon
        self.fakes = fakes
        self.load = load
        self.affinity = affinity

    def received(self) -> dict[str, int]:
        """Requests each fake has received so far."""
        return {name: fake.get("/fake/stats")[2]["requests"] for name, fake in self.fakes.items()}

    def metric(self, gw: Http, name: str, worker: str | None = None, **labels: str) -> float | None:
        """One sample of a gateway's /metrics, or None."""
        if worker is not None:
            labels["worker"] = worker
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in gw.get("/metrics")[2].splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture(scope="module")
def routing(module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routing]:
    folder = tmp_path_factory.mktemp("fake-vllm")
    (folder / "model").mkdir()
    python = fake_vllm_python(folder)
    base = free_port_run(2)
    load_port, affinity_port = free_ports(2)
    daemon = module_daemon(
        fake_vllm_service("chat", base, python, folder / "model", "m", replicas=2)
        + f"""
[services.gw-load]
type = "gateway"
listen = "127.0.0.1:{load_port}"
policy = "engine-load"
engine_load = {{ poll_period = 0.2, stale_after = 2 }}

[services.gw-affinity]
type = "gateway"
listen = "127.0.0.1:{affinity_port}"
prefix_affinity = {{ prefix_chars = 1024, slack = 100 }}
""")
    status = daemon.wait_for(
        lambda s: s if all(w.get("ready") for w in s.values()) and len(s) == 4 else None,
        60, "every worker ready")
    fakes = {name: Http(entry["port"]) for name, entry in status.items() if entry["service"] == "chat"}
    assert len(fakes) == 2
    deployment = Routing(daemon, fakes, Http(load_port), Http(affinity_port))
    for gw in (deployment.load, deployment.affinity):
        wait_until(lambda gw=gw: gw.get("/v1/models", timeout=2)[0] == 200 and
                   [m["id"] for m in gw.get("/v1/models", timeout=2)[2]["data"]] == ["m"],
                   30, "the gateways to list the model")
    yield deployment


def _ask(gw: Http, system: str = "Be brief.", question: str = "hi") -> None:
    status, _, data = gw.post("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "system", "content": system},
                                   {"role": "user", "content": question}]})
    assert status == 200, data


def test_citadeld_serves_the_engines_load(routing: Routing) -> None:
    client = ControlClient(str(routing.daemon.socket))
    answer = wait_until(lambda: (a := client.call("GET", "/v1/engines")) and len(a["engines"]) == 2 and a,
                        10, "both engines read")
    assert answer["period"] == 0.5
    for entry in answer["engines"]:
        assert entry["worker"] in routing.fakes and entry["service"] == "chat"
        assert entry["waiting"] == 0 and entry["age"] < 1.0 and entry["error"] is None


def test_engine_load_routing_avoids_the_engine_with_a_queue(routing: Routing) -> None:
    busy, idle = sorted(routing.fakes)
    routing.fakes[busy].post("/fake/load", {"waiting": 20, "kv_cache_usage": 0.9})
    try:
        wait_until(lambda: routing.metric(routing.load, "gateway_engine_waiting_requests", busy) == 20,
                   10, f"the gateway to read {busy}'s queue")
        before = routing.received()
        for _ in range(8):
            _ask(routing.load)
        after = routing.received()
        assert after[busy] - before[busy] == 0, "the engine with a queue got requests"
        assert after[idle] - before[idle] == 8
        assert (routing.metric(routing.load, "gateway_routing_decisions_total",
                               chosen_by="engine-load", policy="engine-load") or 0) >= 8
    finally:
        routing.fakes[busy].post("/fake/load", {"waiting": 0})
    # Without the queue, the two share the traffic again. (Not exactly by turns: a reading
    # taken while a request ran counts it until the next one.)
    wait_until(lambda: routing.metric(routing.load, "gateway_engine_waiting_requests", busy) == 0,
               10, f"the gateway to see {busy}'s queue gone")
    before = routing.received()
    for _ in range(6):
        _ask(routing.load)
    after = routing.received()
    assert after[busy] - before[busy] >= 2 and after[idle] - before[idle] >= 2


def test_prefix_affinity_keeps_a_prefix_on_one_worker(routing: Routing) -> None:
    before = routing.received()
    for i in range(6):
        _ask(routing.affinity, SYSTEM, f"question {i}")
    after = routing.received()
    got = sorted(after[name] - before[name] for name in routing.fakes)
    assert got == [0, 6], f"the shared prefix was split: {after} after {before}"
    assert routing.metric(routing.affinity, "gateway_prefix_affinity_total", outcome="hit") == 6
    # Short prompts have no affinity: the policy spreads them.
    before = routing.received()
    for _ in range(4):
        _ask(routing.affinity)
    after = routing.received()
    assert sorted(after[name] - before[name] for name in routing.fakes) == [2, 2]


def test_the_gateway_shows_engine_load_to_clients_only_on_its_metrics(routing: Routing) -> None:
    for path in ("/v1/engines", "/v1/status", "/engines"):
        status, _, _ = routing.load.get(path)
        assert status in (404, 405), f"{path} answered {status}"
    status, headers, data = routing.load.post("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    assert "waiting" not in str(data) and not any("engine" in h for h in headers)
