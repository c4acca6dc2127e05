"""GPU pinning through a real citadeld, on a FAKE 8-GPU host (this machine has no GPU).

``CITADEL_FAKE_NVML`` makes citadeld read a fake NVML built from a JSON
host description; everything else (spawn, env, affinity, restarts) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import CITADELD

FIXTURE = Path(__file__).parents[1] / "fixtures" / "fake_host_8gpu.json"
PY = sys.executable
UUID = "GPU-fa4e0000-0000-4000-8000-00000000000{}"


def _fake_host(tmp_path: Path) -> Path:
    host = tmp_path / "fake-host.json"
    shutil.copy(FIXTURE, host)
    return host


def _sleeper(name: str, gpus: str, extra: str = "") -> str:
    return f"""
        [services.{name}]
        type = "command"
        command = ["{PY}", "-c", "import time; time.sleep(3600)"]
        gpus = {gpus}
        {extra}
        """


def test_workers_are_pinned_by_uuid_with_numa_affinity(daemon_factory, tmp_path):
    host = _fake_host(tmp_path)
    daemon = daemon_factory(_sleeper("a", "[0, 1]") + _sleeper("b", "2") + _sleeper("free", "[]"),
                            env={"CITADEL_FAKE_NVML": str(host)})
    status = daemon.wait_state("a", "running")
    env = psutil.Process(status["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == f"{UUID.format(0)},{UUID.format(1)}"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert status["gpus"] == [0, 1]
    # GPUs 0-1 sit on NUMA node 0 (CPUs 0-31 in the fake): the worker runs on those of ours.
    assert set(os.sched_getaffinity(status["pid"])) == set(range(32)) & os.sched_getaffinity(0)
    b = daemon.wait_state("b", "running")
    assert len(b["gpus"]) == 2 and not set(b["gpus"]) & {0, 1}
    free = daemon.wait_state("free", "running")
    assert "CUDA_VISIBLE_DEVICES" not in psutil.Process(free["pid"]).environ()
    gpus = json.loads(daemon.ctl("gpus", "--json", check=False).stdout or "{}") or None
    if gpus is None:  # citadelctl gpus may not exist yet: read the API directly
        gpus = json.loads(subprocess.run(
            ["curl", "-s", "--unix-socket", str(daemon.socket), "http://citadel/v1/gpus"],
            capture_output=True, text=True, check=True).stdout)
    assert gpus["available"] is True and gpus["fake"] is True
    by_index = {g["index"]: g for g in gpus["gpus"]}
    assert len(by_index) == 8
    assert "a" in json.dumps(by_index[0])


def test_clash_and_missing_gpu_are_refused_naming_both(tmp_path):
    host = _fake_host(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(_sleeper("one", "[3]") + _sleeper("two", "[3, 9]"))
    result = subprocess.run([CITADELD, "--check", "--config", str(config)], capture_output=True,
                            text=True, env={**os.environ, "CITADEL_FAKE_NVML": str(host)})
    assert result.returncode == 1
    assert "services.two.gpus[1]: GPU 9 does not exist (this host has GPUs 0-7)" in result.stderr
    assert "'one'" in result.stderr and "'two'" in result.stderr and "gpus_shared" in result.stderr


def test_no_gpu_host_refuses_gpu_requests(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(_sleeper("one", "[0]"))
    env = {k: v for k, v in os.environ.items() if k != "CITADEL_FAKE_NVML"}
    result = subprocess.run([CITADELD, "--check", "--config", str(config)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1
    assert "services.one.gpus: this host has no GPU" in result.stderr


def test_restart_waits_for_gpu_memory_release(daemon_factory, tmp_path):
    host = _fake_host(tmp_path)
    daemon = daemon_factory(_sleeper("g", "[5]", "stable_after = 0.1\ngpu_release_timeout = 30"),
                            env={"CITADEL_FAKE_NVML": str(host)})
    first = daemon.wait_state("g", "running")
    time.sleep(0.3)
    # A process that is no worker of ours holds memory on GPU 5 (as a dying engine would).
    data = json.loads(host.read_text())
    data["gpus"][5]["processes"] = [{"pid": 999999, "used_mib": 4096}]
    host.write_text(json.dumps(data))
    os.kill(first["pid"], signal.SIGKILL)
    time.sleep(2.0)
    status = daemon.status()["g"]
    assert status["pid"] in (None, first["pid"]) or status["state"] != "running", \
        "restarted while the GPU was still full"
    assert "waiting up to 30s for GPU memory" in daemon.logs()
    data["gpus"][5]["processes"] = []
    host.write_text(json.dumps(data))
    second = daemon.wait_for(lambda s: s["g"] if s["g"]["state"] == "running" and s["g"]["pid"] != first["pid"]
                             else None, timeout=15, what="restart after release")
    assert second["restarts"] == 1
    assert "released after" in daemon.logs()
