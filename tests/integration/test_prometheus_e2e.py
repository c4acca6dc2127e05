"""A real Prometheus server scrapes a real citadeld's exporter.

Prometheus (Debian's ``prometheus`` package; ``scripts/test`` installs it)
runs on loopback with its storage in a temp folder; the test asks its HTTP
API until the ``citadel_`` series and the workers' federated ``vllm:`` series,
with their ``service`` and ``worker`` labels, are there, and until its target
reports no scrape error (Prometheus asks for OpenMetrics, so this also checks
that format against Prometheus' own parser).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_ports
from test_exporter import fetch, page_service

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """``prometheus(target)`` -> the base URL of a Prometheus scraping ``target`` every second."""
    if PROMETHEUS is None:
        pytest.fail("the prometheus binary is not installed: apt-get install prometheus "
                    "(scripts/test installs it)")
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        folder = tmp_path / "prometheus"
        folder.mkdir()
        (folder / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: citadel\n    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        log = (folder / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    status, _, body = fetch(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # Prometheus not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_prometheus_scrapes_citadel_and_the_federated_vllm_series(daemon_factory: Any, tmp_path: Path,
                                                                  prometheus: Any) -> None:
    exporter, chat_port, embed_port = free_ports(3)
    config = f'[exporter]\nlisten = "127.0.0.1:{exporter}"\n'
    config += page_service("chat", tmp_path, chat_port, extra="replicas = 2")
    config += page_service("embed", tmp_path, embed_port)
    d = daemon_factory(config)
    for worker in ("chat.0", "chat.1", "embed"):
        d.wait_state(worker, "running")
    base = prometheus(f"127.0.0.1:{exporter}")

    def target_healthy() -> Any:
        status, _, body = fetch(f"{base}/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        return targets if targets and targets[0]["health"] == "up" else None

    targets = eventually(target_healthy, 60, "Prometheus to scrape the exporter")
    assert targets[0]["lastError"] == ""

    up = eventually(lambda: query(base, "citadel_worker_up"), 30, "citadel_worker_up in Prometheus")
    assert {(r["metric"]["service"], r["metric"]["worker"]) for r in up} == {
        ("chat", "chat.0"), ("chat", "chat.1"), ("embed", "embed")}
    assert all(r["value"][1] == "1" for r in up)

    federated = eventually(lambda: query(base, "count by (service, worker) ({__name__=~'vllm:.+'})"),
                           30, "the federated vllm: series")
    per_worker = {(r["metric"]["service"], r["metric"]["worker"]): int(r["value"][1]) for r in federated}
    assert set(per_worker) == {("chat", "chat.0"), ("chat", "chat.1"), ("embed", "embed")}
    assert len(set(per_worker.values())) == 1 and min(per_worker.values()) > 50

    running = query(base, "vllm:num_requests_running")
    assert running and all({"service", "worker", "model_name"} <= set(r["metric"]) for r in running)
    fed_up = query(base, "citadel_federation_up")
    assert sorted(r["value"][1] for r in fed_up) == ["1", "1", "1"]
    assert query(base, "citadel_host_memory_available_bytes")
    assert query(base, "citadel_worker_restarts_total")
