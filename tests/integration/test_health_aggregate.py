"""Aggregated health: the health+json report, host-check thresholds, the health file, liveness."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_ports, wait_until
from prometheus_client.parser import text_string_to_metric_families as parse_text
from test_exporter import fetch, page_service

from citadel_supervisor.config import HostChecksConfig
from citadel_supervisor.exporter.health_report import (
    CheckResult,
    HealthFile,
    build_report,
    check_statuses,
    readiness,
    worker_checks,
)
from citadel_supervisor.exporter.host_checks import gpu_checks, grade, run_host_checks
from citadel_supervisor.exporter.snapshot import ProbeSnapshot, WorkerSnapshot
from citadel_supervisor.gpu import GpuInfo

#: Keys the draft defines for one object of ``checks``.
CHECK_KEYS = {"componentId", "componentType", "observedValue", "observedUnit", "status",
              "affectedEndpoints", "time", "output", "links"}


def assert_health_json(doc: dict[str, Any]) -> None:
    """Fail unless ``doc`` has the shape of draft-inadarei-api-health-check's response."""
    assert doc["status"] in ("pass", "warn", "fail")
    assert isinstance(doc.get("checks"), dict) and doc["checks"]
    for key, objects in doc["checks"].items():
        assert re.fullmatch(r"[^:\s]+:[^:\s]+", key), f"check key {key!r} is not component:measurement"
        assert isinstance(objects, list) and objects
        for obj in objects:
            assert set(obj) <= CHECK_KEYS, set(obj) - CHECK_KEYS
            assert obj["status"] in ("pass", "warn", "fail")
            assert isinstance(obj["componentId"], str) and obj["componentId"]
            assert "observedValue" in obj
            assert obj["time"].endswith("Z")
            datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))  # RFC 3339
            if obj["status"] == "pass":
                assert "output" not in obj
    statuses = [o["status"] for objs in doc["checks"].values() for o in objs]
    rank = ["pass", "warn", "fail"]
    assert doc["status"] == max(statuses, key=rank.index)


def snapshot(service: str, worker: str, ready: bool, required: bool = True,
             probes: tuple[ProbeSnapshot, ...] = ()) -> WorkerSnapshot:
    return WorkerSnapshot(service=service, worker=worker, state="running" if ready else "starting",
                          ready=ready, required=required, restarts=0, uptime=1.0, probes=probes,
                          proc=None, metrics_url=None)


# --------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------


def test_grade_against_warn_and_fail_thresholds() -> None:
    assert grade(0.5, 0.1, 0.05, low_is_bad=True) == "pass"
    assert grade(0.08, 0.1, 0.05, low_is_bad=True) == "warn"
    assert grade(0.01, 0.1, 0.05, low_is_bad=True) == "fail"
    assert grade(90, 85, 95, low_is_bad=False) == "warn"
    assert grade(95, 85, 95, low_is_bad=False) == "fail"
    assert grade(99, None, None, low_is_bad=False) == "pass"


def test_readiness_counts_required_services_only() -> None:
    workers = [snapshot("chat", "chat.0", False), snapshot("chat", "chat.1", True),
               snapshot("batch", "batch", False, required=False)]
    assert readiness(workers) == (True, {"chat": True, "batch": False})
    assert readiness(workers, "batch") == (False, {"batch": False})
    with pytest.raises(KeyError):
        readiness(workers, "nope")
    workers[1] = snapshot("chat", "chat.1", False)
    assert readiness(workers)[0] is False


def test_a_service_fails_only_when_none_of_its_workers_is_ready() -> None:
    probe = ProbeSnapshot("liveness", False, 0.01, 3, "HTTP 503", time.time())
    workers = [snapshot("chat", "chat.0", False, probes=(probe,)), snapshot("chat", "chat.1", True),
               snapshot("embed", "embed", False), snapshot("batch", "batch", False, required=False)]
    checks = worker_checks(workers)
    got = {(c.key, c.component_id): c.status for c in checks}
    assert got == {("chat:ready", "chat.0"): "warn", ("chat:ready", "chat.1"): "pass",
                   ("chat:liveness", "chat.0"): "warn", ("embed:ready", "embed"): "fail",
                   ("batch:ready", "batch"): "warn"}
    report = build_report(checks, "0.1.0")
    assert_health_json(report)
    assert report["status"] == "fail"
    assert check_statuses(checks) == {"chat:ready": 1, "chat:liveness": 1, "embed:ready": 2, "batch:ready": 1}


def test_host_checks_cross_thresholds_that_this_machine_surely_crosses() -> None:
    relaxed = HostChecksConfig(load_warn_per_cpu=None)
    assert {c.key: c.status for c in run_host_checks([Path("/")], relaxed)} == {
        "host:disk_free": "pass", "host:memory_available": "pass", "host:load": "pass"}
    # free space and memory are always below 100 %, and load per CPU is never below 0
    strict = HostChecksConfig(disk_free_warn_ratio=1.0, disk_free_fail_ratio=None,
                              memory_available_warn_ratio=1.0, memory_available_fail_ratio=1.0,
                              load_warn_per_cpu=0.0, load_fail_per_cpu=None)
    got = {c.key: c.status for c in run_host_checks([Path("/")], strict)}
    assert got == {"host:disk_free": "warn", "host:memory_available": "fail", "host:load": "warn"}
    assert_health_json(build_report(run_host_checks([Path("/")], strict), "0.1.0"))


def test_gpu_checks_read_gpu_info_fields() -> None:
    hot = GpuInfo(index=0, uuid="GPU-aaaa", memory_total=80 * 2**30, memory_used=79 * 2**30,
                  temperature_c=96, xid_errors=2, last_xid=79)
    cool = GpuInfo(index=1, uuid="GPU-bbbb", memory_total=80 * 2**30, memory_used=2**30,
                   temperature_c=40, xid_errors=0)
    blind = GpuInfo(index=2, uuid="GPU-cccc")  # NVML told nothing: no checks rather than guesses
    checks = gpu_checks([hot, cool, blind], HostChecksConfig())
    got = {(c.key, c.component_id): c.status for c in checks}
    assert got == {("gpu:temperature", "GPU-aaaa"): "fail", ("gpu:memory_used", "GPU-aaaa"): "warn",
                   ("gpu:xid_errors", "GPU-aaaa"): "warn", ("gpu:temperature", "GPU-bbbb"): "pass",
                   ("gpu:memory_used", "GPU-bbbb"): "pass", ("gpu:xid_errors", "GPU-bbbb"): "pass"}
    xid = next(c for c in checks if c.key == "gpu:xid_errors" and c.component_id == "GPU-aaaa")
    assert "XID 79" in (xid.output or "")


def test_the_health_file_is_replaced_whole_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    health_file = HealthFile(path)
    first = build_report([CheckResult("chat:ready", "chat", "pass", True, time=1.0)], "0.1.0")
    assert health_file.write(first)
    inode = path.stat().st_ino
    same_but_later = build_report([CheckResult("chat:ready", "chat", "pass", True, time=2.0)], "0.1.0")
    assert not health_file.write(same_but_later)
    changed = build_report([CheckResult("chat:ready", "chat", "fail", False, time=3.0)], "0.1.0")
    assert health_file.write(changed)
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert json.loads(path.read_text())["status"] == "fail"
    assert [p.name for p in tmp_path.iterdir()] == ["health.json"]


# --------------------------------------------------------------------------
# A real citadeld
# --------------------------------------------------------------------------


def test_health_endpoint_and_file_follow_readiness_and_host_thresholds(daemon_factory: Any,
                                                                      tmp_path: Path) -> None:
    flag = tmp_path / "ready-flag"
    port = free_port()
    d = daemon_factory(f"""
[exporter]
listen = "127.0.0.1:{port}"
[exporter.host_checks]
disk_free_warn_ratio = 1.0
disk_free_fail_ratio = 0.0
load_warn_per_cpu = 1000.0
[services.gate]
type = "command"
command = ["sleep", "600"]
stop_timeout = 1
[services.gate.probes.readiness]
kind = "exec"
command = ["test", "-f", "{flag}"]
period = 0.2
failure_threshold = 1
""")
    d.wait_state("gate", "running")
    url = f"http://127.0.0.1:{port}/health"
    health_file = d.root / "run" / "health.json"

    def report() -> tuple[int, dict[str, Any]]:
        status, headers, body = fetch(url)
        assert headers["Content-Type"].startswith("application/health+json")
        return status, json.loads(body)

    def with_host_checks() -> tuple[int, dict[str, Any]] | None:
        answer = report()
        return answer if "host:disk_free" in answer[1]["checks"] else None

    status, doc = wait_until(with_host_checks, what="the host checks")
    assert_health_json(doc)
    assert status == 503 and doc["status"] == "fail"  # gate is required and not ready
    assert doc["checks"]["gate:ready"][0]["status"] == "fail"
    assert doc["checks"]["host:disk_free"][0]["status"] == "warn"  # free < 100 %: always crossed
    assert doc["checks"]["host:memory_available"][0]["status"] == "pass"
    wait_until(lambda: health_file.exists() and json.loads(health_file.read_text())["status"] == "fail",
             what="the health file to say fail")

    flag.write_text("")
    d.wait_for(lambda s: s["gate"]["ready"], what="gate ready")
    status, doc = report()
    assert status == 200 and doc["status"] == "warn"  # only the disk threshold warns now
    assert_health_json(doc)
    def file_warns() -> dict[str, Any] | None:
        on_file: dict[str, Any] = json.loads(health_file.read_text())
        return on_file if on_file["status"] == "warn" else None

    on_file = wait_until(file_warns, what="the health file to follow")
    assert_health_json(on_file)
    assert on_file["checks"]["gate:ready"][0]["observedValue"] is True
    # citadelctl health reads the same report over the control socket
    assert json.loads(d.ctl("health", "--json").stdout)["status"] == "warn"


def test_a_failing_host_threshold_fails_health(daemon_factory: Any) -> None:
    port = free_port()
    daemon_factory(f"""
[exporter]
listen = "127.0.0.1:{port}"
[exporter.host_checks]
memory_available_fail_ratio = 1.0
""")

    def with_memory_check() -> tuple[int, dict[str, str], str] | None:
        answer = fetch(f"http://127.0.0.1:{port}/health")
        return answer if "host:memory_available" in answer[2] else None

    status, _, body = wait_until(with_memory_check, what="the memory check")
    doc = json.loads(body)
    assert_health_json(doc)
    assert status == 503 and doc["status"] == "fail"
    assert doc["checks"]["host:memory_available"][0]["status"] == "fail"
    assert "available of" in doc["checks"]["host:memory_available"][0]["output"]
    text = fetch(f"http://127.0.0.1:{port}/metrics")[2]
    statuses = {s.labels["check"]: s.value for f in parse_text(text) for s in f.samples
                if s.name == "citadel_health_check_status"}
    assert statuses["host:memory_available"] == 2 and statuses["host:disk_free"] == 0


def test_a_worker_stopped_with_sigstop_is_down_in_federation_then_restarted_by_liveness(
        daemon_factory: Any, tmp_path: Path) -> None:
    port, web_port, page_port = free_ports(3)
    config = f'[exporter]\nlisten = "127.0.0.1:{port}"\nscrape_timeout = 0.3\n'
    config += page_service("chat", tmp_path, page_port)
    config += page_service("web", tmp_path, web_port, extra="""
backoff_initial = 0.1
[services.web.probes.liveness]
kind = "http"
path = "/metrics"
period = 0.5
timeout = 0.3
failure_threshold = 3
""")
    d = daemon_factory(config)
    first = d.wait_state("web", "running")
    d.wait_state("chat", "running")
    os.kill(first["pid"], signal.SIGSTOP)
    try:
        text = fetch(f"http://127.0.0.1:{port}/metrics")[2]
        up = {s.labels["worker"]: s.value for f in parse_text(text) for s in f.samples
              if s.name == "citadel_federation_up"}
        assert up == {"chat": 1.0, "web": 0.0}
        again = d.wait_for(lambda s: s["web"] if s["web"]["state"] == "running" and s["web"]["restarts"] >= 1
                           else None, timeout=30, what="web restarted by its liveness probe")
        assert again["pid"] != first["pid"]
        assert "liveness probe failed 3 times" in d.logs()
    finally:
        try:
            os.kill(first["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
