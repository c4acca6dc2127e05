"""The gateway under a real citadeld, in front of FAKE upstreams run as ``command`` services.

One deployment serves the whole module (starting seven processes per test
would take most of a minute on two cores):

- ``alpha-1`` and ``alpha-2`` serve the model ``alpha``;
- ``solo`` serves ``solo`` (one worker: queueing and disconnects);
- ``beta-bad`` resets every connection; ``beta`` routes to it and to
  ``alpha-2`` (retry on another worker), ``gamma`` to it alone (no retry
  target).

Each test leaves the deployment as it found it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import Http, fake_service, free_ports, read_sse, sha256_hash, wait_until

ADMIN = "sk-admin-5d1e3a7c9b0f4e21"
LIMITED = "sk-limited-8a2b4c6d8e0f1a3b"       # from a credential file
TOKENS = "sk-tokens-1f2e3d4c5b6a7988"
ALPHA_ONLY = "sk-alphaonly-0a9b8c7d6e5f4a3b"
ALL_KEYS = (ADMIN, LIMITED, TOKENS, ALPHA_ONLY)
FAKES = ("alpha-1", "alpha-2", "solo", "beta-bad")


class Deployment:
    """The running daemon, the gateway's client, and each fake's client."""

    def __init__(self, daemon: Any, gateway_port: int, fake_ports: dict[str, int], exporter_port: int):
        self.daemon = daemon
        self.gw = Http(gateway_port)
        self.exporter = Http(exporter_port)
        self.fakes = {name: Http(port) for name, port in fake_ports.items()}

    def stats(self, name: str) -> dict[str, Any]:
        """What a fake received."""
        return self.fakes[name].get("/fake/stats")[2]

    def received(self) -> int:
        """Requests received by every fake together."""
        return sum(self.stats(name)["requests"] for name in FAKES)

    def metrics(self) -> str:
        """The gateway's /metrics text."""
        return self.gw.get("/metrics")[2]

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from the gateway's /metrics (0 when absent)."""
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def chat(self, model: str, key: str | None = ADMIN, **extra: Any) -> tuple[int, dict[str, str], Any]:
        """POST /v1/chat/completions."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.gw.post("/v1/chat/completions", body, key=key)

    def set_health(self, name: str, ok: bool) -> None:
        """Make a fake's /health pass or fail (its readiness follows)."""
        self.fakes[name].post("/fake/health", {"ok": ok})

    def in_rotation(self, name: str) -> bool:
        """True when the gateway routes to ``name``."""
        return self.metric("gateway_worker_in_rotation", worker=name) == 1.0


@pytest.fixture(scope="module")
def deployment(module_daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    gw_port, exporter_port, *ports = free_ports(2 + len(FAKES))
    fake_ports = dict(zip(FAKES, ports))
    creds = tmp_path_factory.mktemp("credentials")
    (creds / "gw-limited").write_text(LIMITED)
    services = "".join(fake_service(name, port, fail="reset" if name == "beta-bad" else "none")
                       for name, port in fake_ports.items())
    daemon = module_daemon(services + f"""
[exporter]
listen = "127.0.0.1:{exporter_port}"

[services.gw]
type = "gateway"
listen = "127.0.0.1:{gw_port}"
per_worker_concurrency = 2
queue_size = 2
queue_timeout = 30
routes = {{ alpha = ["alpha-1", "alpha-2"], solo = ["solo"], beta = ["beta-bad", "alpha-2"], gamma = ["beta-bad"] }}
after = {json.dumps(list(FAKES))}

[[services.gw.keys]]
name = "admin"
hash = "{sha256_hash(ADMIN)}"

[[services.gw.keys]]
name = "limited"
key = "${{credential:gw-limited}}"
models = ["alpha"]
requests_per_minute = 3

[[services.gw.keys]]
name = "tokens"
hash = "{sha256_hash(TOKENS)}"
tokens_per_minute = 20

[[services.gw.keys]]
name = "alpha-only"
hash = "{sha256_hash(ALPHA_ONLY)}"
models = ["alpha"]
""", env={"CREDENTIALS_DIRECTORY": str(creds)})
    dep = Deployment(daemon, gw_port, fake_ports, exporter_port)
    daemon.wait_state("gw", "running", timeout=60)
    wait_until(lambda: all(dep.in_rotation(n) for n in FAKES), 30, "every fake in rotation")
    return dep


def _error(data: Any) -> dict[str, Any]:
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    return data["error"]


def test_routes_each_endpoint_by_model_across_replicas(deployment: Deployment) -> None:
    seen = set()
    for _ in range(4):
        status, _, data = deployment.chat("alpha")
        assert status == 200, data
        assert data["model"] == "alpha"
        seen.add(data["system_fingerprint"])
    assert seen == {"alpha-1", "alpha-2"}, "idle replicas should share sequential requests"

    status, _, data = deployment.gw.post("/v1/completions", {"model": "solo", "prompt": "hi"}, key=ADMIN)
    assert status == 200 and data["system_fingerprint"] == "solo"
    status, _, data = deployment.gw.post("/v1/embeddings", {"model": "alpha", "input": "hi"}, key=ADMIN)
    assert status == 200 and data["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    assert deployment.stats("solo")["last_body"]["prompt"] == "hi"


def test_models_lists_what_each_key_may_use(deployment: Deployment) -> None:
    status, _, data = deployment.gw.get("/v1/models", key=ADMIN)
    assert status == 200 and data["object"] == "list"
    assert {m["id"] for m in data["data"]} == {"alpha", "solo", "beta", "gamma"}
    status, _, data = deployment.gw.get("/v1/models", key=ALPHA_ONLY)
    assert [m["id"] for m in data["data"]] == ["alpha"]
    status, _, data = deployment.gw.get("/v1/models")
    assert status == 401 and _error(data)["type"] == "authentication_error"


def test_stream_passes_each_chunk_as_it_comes(deployment: Deployment) -> None:
    # Two chunks 3 s apart: a gateway that buffered would deliver nothing within 2 s.
    conn, resp = deployment.gw.stream("/v1/chat/completions", {
        "model": "solo", "stream": True, "messages": [], "fake_chunks": 2, "fake_chunk_delay": 3,
    }, key=ADMIN, timeout=2)
    try:
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        first = resp.readline()
        assert first.startswith(b"data: ") and b"tok0" in first
        conn.sock.settimeout(10)
        events = read_sse(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok1 "]
    # The gateway asked for usage on the client's behalf, counted it, and kept it from the client.
    assert deployment.stats("solo")["last_body"]["stream_options"] == {"include_usage": True}
    assert all("usage" not in c for c in chunks)


def test_stream_keeps_the_usage_chunk_the_client_asked_for(deployment: Deployment) -> None:
    conn, resp = deployment.gw.stream("/v1/chat/completions", {
        "model": "alpha", "stream": True, "messages": [], "stream_options": {"include_usage": True},
    }, key=ADMIN)
    try:
        events = read_sse(resp)
    finally:
        conn.close()
    usage = [json.loads(e) for e in events if e != "[DONE]" and json.loads(e).get("usage")]
    assert len(usage) == 1 and usage[0]["usage"]["total_tokens"] == 15


def test_full_queue_answers_429_with_retry_after(deployment: Deployment) -> None:
    # solo takes 2 at once (per_worker_concurrency) and 2 more wait (queue_size).
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(deployment.chat, "solo", ADMIN, fake_delay=2) for _ in range(4)]
        wait_until(lambda: deployment.metric("gateway_queue_depth", model="solo") == 2,
                   10, "two requests queued for solo")
        status, headers, data = deployment.chat("solo")
        assert status == 429, data
        assert int(headers["retry-after"]) >= 1
        error = _error(data)
        assert error["code"] == "queue_full"
        assert [f.result()[0] for f in slow] == [200] * 4
    assert deployment.metric("gateway_queue_depth", model="solo") == 0


def test_requests_per_minute_limit(deployment: Deployment) -> None:
    for _ in range(3):
        status, _, data = deployment.chat("alpha", LIMITED)
        assert status == 200, data
    status, headers, data = deployment.chat("alpha", LIMITED)
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    error = _error(data)
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    # The key from the credential is limited to alpha.
    status, _, data = deployment.chat("solo", LIMITED)
    assert status == 403 and _error(data)["code"] == "model_not_allowed"


def test_tokens_per_minute_limit_counts_reported_usage(deployment: Deployment) -> None:
    # 20 tokens a minute; each answer reports 15: the first leaves 5, the second
    # (a stream, counted from its usage chunk) puts the key in debt, the third waits.
    status, _, _ = deployment.chat("alpha", TOKENS)
    assert status == 200
    conn, resp = deployment.gw.stream("/v1/chat/completions",
                                      {"model": "alpha", "stream": True, "messages": []}, key=TOKENS)
    try:
        assert read_sse(resp)[-1] == "[DONE]"
    finally:
        conn.close()
    status, headers, data = deployment.chat("alpha", TOKENS)
    assert status == 429, data
    assert _error(data)["type"] == "tokens"
    assert int(headers["retry-after"]) >= 1
    assert deployment.metric("gateway_tokens_total", key="tokens", kind="prompt") == 20


def test_failed_request_is_retried_once_on_another_worker(deployment: Deployment) -> None:
    before = deployment.stats("beta-bad")["requests"]
    for _ in range(4):
        status, _, data = deployment.chat("beta")
        assert status == 200, data
        assert data["system_fingerprint"] == "alpha-2"
    assert deployment.stats("beta-bad")["requests"] > before, "beta-bad should have been tried"
    assert deployment.metric("gateway_retries_total", model="beta") >= 1


def test_failure_without_another_worker_is_a_502(deployment: Deployment) -> None:
    status, _, data = deployment.chat("gamma")
    assert status == 502
    error = _error(data)
    assert error["type"] == "upstream_error" and "no other worker" in error["message"]


def test_client_disconnect_cancels_the_upstream_request(deployment: Deployment) -> None:
    before = deployment.stats("solo")["cancelled"]
    with pytest.raises(socket.timeout):
        deployment.gw.post("/v1/chat/completions", {"model": "solo", "messages": [], "fake_delay": 30},
                           key=ADMIN, timeout=0.5)
    wait_until(lambda: deployment.stats("solo")["cancelled"] == before + 1, 10,
               "solo to see its request cancelled")

    # A stream, left after its first chunk.
    before = deployment.stats("solo")["cancelled"]
    conn, resp = deployment.gw.stream("/v1/chat/completions", {
        "model": "solo", "stream": True, "messages": [], "fake_chunks": 20, "fake_chunk_delay": 0.3,
    }, key=ADMIN)
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: deployment.stats("solo")["cancelled"] == before + 1, 10,
               "solo to see its stream cancelled")
    wait_until(lambda: deployment.metric("gateway_outstanding_requests", worker="solo") == 0,
               10, "solo's slots to be released")


def test_bad_input_gets_openai_errors_and_reaches_no_worker(deployment: Deployment) -> None:
    gw = deployment.gw
    before = deployment.received()
    cases = [
        (gw.post("/v1/chat/completions", raw=b'{"model": "alpha", ', key=ADMIN), 400, None),
        (gw.post("/v1/chat/completions", ["alpha"], key=ADMIN), 400, None),
        (gw.post("/v1/chat/completions", {"messages": []}, key=ADMIN), 400, "model"),
        (gw.post("/v1/chat/completions", {"model": 7}, key=ADMIN), 400, "model"),
        (deployment.chat("no-such-model"), 404, "model"),
        (deployment.chat("alpha", key=None), 401, None),
        (deployment.chat("alpha", key="sk-wrong-key-00000000"), 401, None),
        (gw.post("/v1/chat/completions", {"model": "alpha"}, headers={"Authorization": f"Basic {ADMIN}"}),
         401, None),
        (gw.post("/v1/chat/completions", raw=b'{"model": "alpha", "pad": "' + b"x" * (5 << 20) + b'"}',
                 key=ADMIN), 413, None),
        (deployment.chat("solo", key=ALPHA_ONLY), 403, "model"),
    ]
    for (status, _, data), expected, param in cases:
        assert status == expected, (expected, data)
        assert _error(data)["param"] == param
    assert deployment.received() == before, "no bad request may reach a worker"


def test_metrics_count_by_model_key_and_status(deployment: Deployment) -> None:
    deployment.chat("alpha")
    assert deployment.metric("gateway_requests_total", model="alpha", key="admin", status="200") >= 1
    assert deployment.metric("gateway_requests_total", model="-", key="-", status="401") >= 1
    text = deployment.metrics()
    for family in ("gateway_upstream_latency_seconds_bucket",
                   "gateway_upstream_time_to_first_byte_seconds_bucket",
                   "gateway_queue_depth"):
        assert family in text


def test_citadeld_exporter_federates_the_gateway_metrics(deployment: Deployment) -> None:
    deployment.chat("alpha")
    status, _, text = deployment.exporter.get("/metrics")
    assert status == 200
    lines = [line for line in text.splitlines()
             if line.startswith("gateway_requests_total{") and 'key="admin"' in line]
    assert lines and all('service="gw"' in line and 'worker="gw"' in line for line in lines), lines


def test_worker_that_stops_being_ready_leaves_the_rotation(deployment: Deployment) -> None:
    deployment.set_health("alpha-2", False)
    try:
        wait_until(lambda: not deployment.in_rotation("alpha-2"), 10, "alpha-2 to leave the rotation")
        served = {deployment.chat("alpha")[2]["system_fingerprint"] for _ in range(4)}
        assert served == {"alpha-1"}
        deployment.set_health("alpha-1", False)
        wait_until(lambda: not deployment.in_rotation("alpha-1"), 10, "alpha-1 to leave the rotation")
        status, headers, data = deployment.chat("alpha")
        assert status == 503 and _error(data)["code"] == "no_ready_worker"
        assert "retry-after" in headers
    finally:
        deployment.set_health("alpha-1", True)
        deployment.set_health("alpha-2", True)
    wait_until(lambda: deployment.in_rotation("alpha-1") and deployment.in_rotation("alpha-2"), 10,
               "alpha-1 and alpha-2 to come back")
    served = {deployment.chat("alpha")[2]["system_fingerprint"] for _ in range(4)}
    assert served == {"alpha-1", "alpha-2"}


def test_stopped_worker_leaves_the_rotation_and_rejoins(deployment: Deployment) -> None:
    deployment.daemon.ctl("stop", "solo", "--wait")
    wait_until(lambda: not deployment.in_rotation("solo"), 10, "solo to leave the rotation")
    status, _, data = deployment.chat("solo")
    assert status == 503, data
    deployment.daemon.ctl("start", "solo", "--wait")
    wait_until(lambda: deployment.in_rotation("solo"), 20, "solo to come back")
    assert deployment.chat("solo")[0] == 200


def test_keys_appear_in_no_log_and_no_argv(deployment: Deployment) -> None:
    daemon = deployment.daemon
    texts = [daemon.logs()]
    texts += [p.read_text(errors="replace") for p in Path(daemon.root / "log").rglob("*") if p.is_file()]
    texts.append(daemon.ctl("logs", "gw", "-n", "1000").stdout)
    gw_pid = daemon.status()["gw"]["pid"]
    texts.append(Path(f"/proc/{gw_pid}/cmdline").read_bytes().decode(errors="replace"))
    for text in texts:
        for key in ALL_KEYS:
            assert key not in text
    assert "sk-wrong-key" not in "".join(texts)


def test_concurrent_requests_share_both_replicas(deployment: Deployment) -> None:
    # Least outstanding: with one slow request on a replica, the next goes to the other.
    results: list[str] = []

    def slow() -> None:
        results.append(deployment.chat("alpha", fake_delay=1.5)[2]["system_fingerprint"])

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: deployment.metric("gateway_outstanding_requests", worker="alpha-1")
               + deployment.metric("gateway_outstanding_requests", worker="alpha-2") == 1,
               10, "the slow request to be in flight")
    busy = "alpha-1" if deployment.metric("gateway_outstanding_requests", worker="alpha-1") else "alpha-2"
    others = {deployment.chat("alpha")[2]["system_fingerprint"] for _ in range(3)}
    thread.join()
    assert busy not in others
    assert results == [busy]
    time.sleep(0)  # the slow one finished: both are idle again
