"""Models on demand through the gateway, under a real citadeld, in front of FAKE upstreams.

- ``lazy-a`` and ``lazy-b`` start on demand, in a swap group of one; the
  gateway may start them (``on_demand``); ``lazy-a`` stops after 2 s idle.
- ``other`` starts on demand too, but the gateway is not granted it.
- ``stuck`` starts on demand and never gets ready (nothing listens on its port).

The gateway's ``hold_timeout`` is 8 s and its queue holds 2 requests.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from gateway_harness import Http, fake_service, free_ports, wait_until

MODELS = {"model-a": "lazy-a", "model-b": "lazy-b", "model-other": "other", "model-stuck": "stuck"}


class OnDemand:
    """The running daemon and the gateway's client."""

    def __init__(self, daemon: Any, gateway_port: int):
        self.daemon = daemon
        self.gw = Http(gateway_port)

    def ask(self, model: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
        """A completion request for ``model``."""
        return self.gw.post("/v1/completions", {"model": model, "prompt": "hi", **extra}, timeout=60)

    def state(self, worker: str) -> dict[str, Any]:
        """The worker's entry in citadeld's status."""
        return self.daemon.status()[worker]

    def metric(self, name: str) -> float:
        """The sum of one family's samples on the gateway's /metrics."""
        text = self.gw.get("/metrics")[2]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def on_demand(module_daemon: Any) -> OnDemand:
    gw_port, port_a, port_b, port_other, port_stuck = free_ports(5)
    stuck = json.dumps([sys.executable, "-c", "import time; time.sleep(600)"])
    services = (
        fake_service("lazy-a", port_a) + 'start = "on-demand"\nidle_stop = 2\nswap_group = "one"\n'
        + fake_service("lazy-b", port_b) + 'start = "on-demand"\nswap_group = "one"\n'
        + fake_service("other", port_other) + 'start = "on-demand"\n'
        + f"""[services.stuck]
type = "command"
command = {stuck}
start = "on-demand"
stop_timeout = 2
health = {{ http = "http://127.0.0.1:{port_stuck}/health", period = 0.2 }}
""")
    routes = ", ".join(f'"{model}" = ["{service}"]' for model, service in MODELS.items())
    daemon = module_daemon(services + f"""
[swap_groups.one]
max_running = 1
busy_wait = 10

[services.gw]
type = "gateway"
listen = "127.0.0.1:{gw_port}"
queue_size = 2
hold_timeout = 8
retry_after = 3
routes = {{ {routes} }}
on_demand = ["lazy-a", "lazy-b", "stuck"]
""")
    daemon.wait_state("gw", "running", timeout=60)
    dep = OnDemand(daemon, gw_port)
    wait_until(lambda: dep.gw.get("/healthz")[0] == 200, 30, "the gateway to read citadeld's status")
    return dep


def test_idle_models_are_listed_and_started_by_the_first_request(on_demand: OnDemand) -> None:
    assert on_demand.state("lazy-a")["state"] == "idle"
    listed = {m["id"] for m in on_demand.gw.get("/v1/models")[2]["data"]}
    assert {"model-a", "model-b", "model-stuck"} <= listed and "model-other" not in listed
    held_before = on_demand.metric("gateway_held_total")
    status, _, body = on_demand.ask("model-a")
    assert status == 200 and body["choices"]
    assert on_demand.state("lazy-a")["state"] == "running"
    assert on_demand.metric("gateway_held_total") == held_before + 1
    assert on_demand.metric("gateway_hold_seconds_count") >= 1


def test_alternating_models_swap_in_a_group_of_one_and_lose_nothing(on_demand: OnDemand) -> None:
    answers = [on_demand.ask(model)[0] for model in ("model-b", "model-a", "model-b", "model-a")]
    assert answers == [200, 200, 200, 200]
    status = on_demand.daemon.status()
    assert status["lazy-a"]["state"] == "running"
    assert status["lazy-b"]["state"] == "idle"
    assert status["lazy-b"]["demand"]["down_reason"] == "evicted for lazy-a"


def test_a_request_in_flight_keeps_its_worker_past_idle_stop(on_demand: OnDemand) -> None:
    assert on_demand.ask("model-a")[0] == 200
    started = time.monotonic()
    status, _, _ = on_demand.ask("model-a", fake_delay=4)
    assert status == 200 and time.monotonic() - started >= 4
    assert on_demand.state("lazy-a")["state"] == "running"  # idle_stop = 2 did not cut it short
    idle = on_demand.daemon.wait_state("lazy-a", "idle", timeout=20)
    assert idle["demand"]["down_reason"] == "idle for 2s"


def test_a_service_the_gateway_is_not_granted_stays_down(on_demand: OnDemand) -> None:
    status, headers, body = on_demand.ask("model-other")
    assert status == 503 and body["error"]["code"] == "no_ready_worker" and "retry-after" in headers
    assert on_demand.state("other")["state"] == "idle"


def test_held_requests_time_out_with_503_and_too_many_get_429(on_demand: OnDemand) -> None:
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(on_demand.ask, "model-stuck") for _ in range(2)]
        wait_until(lambda: on_demand.metric("gateway_held_requests") == 2, 10, "two held requests")
        third = on_demand.ask("model-stuck")
        answers = [f.result() for f in futures]
    assert third[0] == 429 and third[2]["error"]["code"] == "queue_full"
    for status, headers, body in answers:
        assert status == 503 and headers["retry-after"] == "3"
        assert body["error"]["code"] == "model_starting" and "hold_timeout = 8s" in body["error"]["message"]
    assert on_demand.state("stuck")["state"] == "starting"
    assert on_demand.metric("gateway_hold_timeouts_total") == 2
    on_demand.daemon.ctl("stop", "stuck", "--wait")
