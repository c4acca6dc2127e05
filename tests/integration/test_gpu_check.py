"""bench/gpu_check.py, run as a user runs it, in a subprocess.

On the FAKE NVML it must pass every check and write its figures; without a GPU
it says so and exits 0; a broken host makes it exit 1. Its real-GPU path runs
here too, as a rehearsal on stand-ins for pynvml, torch and nvidia-smi
(``tests/fixtures/gpu_check_rehearsal``).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
FIXTURES = Path(__file__).parents[1] / "fixtures"
HOST_8GPU = FIXTURES / "fake_host_8gpu.json"
REHEARSAL = FIXTURES / "gpu_check_rehearsal"
HAS_NVML_LIBRARY = ctypes.util.find_library("nvidia-ml") is not None

#: Every check a passing run on a fake host makes (``pin.torch_uuid`` does not apply there).
FAKE_CHECKS = {
    "nvml.fake_matches_pynvml", "nvml.every_call_probed", "nvml.process_list_matches_pynvml",
    "inventory.matches_host", "inventory.cli_matches_api", "inventory.fake_flag",
    "inventory.cpus_are_numa_node", "pin.cuda_visible_devices", "pin.device_count", "pin.cpu_affinity",
    "metrics.worker_gpu_memory", "api.gpu_processes", "exporter.parses_as_prometheus_text",
    "exporter.parses_as_openmetrics", "exporter.citadel_gpu_utilization_ratio",
    "exporter.citadel_gpu_memory_used_bytes", "exporter.citadel_gpu_memory_total_bytes",
    "exporter.citadel_gpu_temperature_celsius", "exporter.citadel_gpu_power_watts",
    "exporter.citadel_gpu_xid_errors", "xid.watched", "release.nvml_reports_free",
    "release.restart_after_release", "release.citadeld_saw_memory_held", "restart.pinned_again",
}


def run_check(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], float]:
    """Run the script; its result, its results file, and how long it took."""
    out = tmp_path / "figures.json"
    base = {k: v for k, v in os.environ.items() if k not in ("CITADEL_FAKE_NVML", "OUT")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--state-dir",
                             str(tmp_path / "state"), *args], capture_output=True, text=True, check=False,
                            timeout=timeout, env={**base, **(env or {})})
    took = time.monotonic() - started
    assert out.exists(), f"no results file:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(out.read_text()), took


def checks_of(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results file's checks by name."""
    return {c["name"]: c for c in data["checks"]}


def assert_passed(result: subprocess.CompletedProcess[str], data: dict[str, Any]) -> None:
    """Exit 0, every check passed or did not apply, and the table says so."""
    failed = [c for c in data["checks"] if c["ok"] is False]
    assert result.returncode == 0 and data["passed"] is True and not failed, \
        f"{json.dumps(failed, indent=1)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "| check " in result.stdout and "PASSED in" in result.stdout


def test_fake_mode_passes_and_writes_its_figures(tmp_path: Path) -> None:
    before = HOST_8GPU.read_text()
    result, data, took = run_check(tmp_path, "--fake", str(HOST_8GPU))
    assert_passed(result, data)
    assert took < 60, f"the fake run took {took:.1f}s"
    assert HOST_8GPU.read_text() == before  # the script changes a copy
    assert (data["check"], data["version"], data["mode"]) == ("citadel-gpu-check", 1, "fake")
    assert 0 < data["runtime_s"] < data["deadline_s"] == 480
    checks = checks_of(data)
    assert all(checks[name]["ok"] is True for name in FAKE_CHECKS), \
        {n: checks.get(n) for n in FAKE_CHECKS if (checks.get(n) or {}).get("ok") is not True}
    assert checks["pin.torch_uuid"]["ok"] is None
    uuid = json.loads(before)["gpus"][0]["uuid"]
    assert data["gpu"]["uuid"] == uuid and data["gpu"]["index"] == 0

    figures = data["figures"]
    assert len(figures["inventory"]["api"]["gpus"]) == 8 and figures["inventory"]["api"]["fake"] is True
    assert figures["worker"]["cuda_visible_devices"] == uuid and figures["worker"]["device_count"] == 1
    gib = 1 << 30
    assert figures["process_memory"]["metric"] == 22 * gib  # 20 GiB + the child's 2
    assert figures["exporter"]["citadel_gpu_utilization_ratio"] == 0.97
    release = figures["release"]
    # The script freed the memory 1 s after citadeld began to wait; citadeld respawned after that.
    assert release["killed"] <= release["exit_event"] <= release["wait_event"] < release["released"]
    assert release["released"] <= release["spawned"] and release["citadeld_wait_s"] >= 1.0
    assert release["release_s"] >= 1.0 and release["restart_after_release_s"] >= 0
    assert figures["restarted_worker"]["restarts"] == 1
    assert figures["restarted_worker"]["pid"] == release["new_pid"] != figures["worker"]["pid"]

    assert data["nvml"]["differences"] == []
    calls = data["nvml"]["calls"]
    assert calls["nvmlDeviceGetUUID(h)"] == {"type": "str", "value": uuid}
    assert calls["nvmlDeviceGetPciInfo(h)"]["fields"]["busId"] == "str"
    assert calls["nvmlDeviceGetCount() after nvmlShutdown"]["raises"] == "NVMLError_Uninitialized"
    assert data["nvml"]["processes_while_held"]["items"]["fields"]["usedGpuMemory"] == "int"
    assert (tmp_path / "state" / "citadel" / "citadeld.out").exists()


def test_the_env_var_picks_the_fake_and_an_unpinnable_gpu_runs_unpinned(tmp_path: Path) -> None:
    # GPU 5 is on NUMA node 1 (CPUs 32-63): on a machine with fewer CPUs, none is near it,
    # and the worker runs on citadeld's CPUs.
    result, data, _ = run_check(tmp_path, "--gpu", "5", "--gib", "4", "--child-gib", "1",
                                env={"CITADEL_FAKE_NVML": str(HOST_8GPU)})
    assert_passed(result, data)
    assert data["mode"] == "fake" and data["gpu"]["index"] == 5
    worker_cpus = set(data["figures"]["worker"]["cpus"])
    assert worker_cpus == (set(range(32, 64)) & os.sched_getaffinity(0) or os.sched_getaffinity(0))
    assert data["figures"]["process_memory"]["metric"] == 5 << 30


@pytest.mark.skipif(HAS_NVML_LIBRARY, reason="this host has an NVIDIA driver")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    result, data, took = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert data["mode"] == "no-gpu" and data["passed"] is True and data["checks"] == []
    assert "NVML Shared Library Not Found" in data["reason"]
    assert "SKIPPED: no GPU here" in result.stdout
    assert took < 30


def test_a_host_whose_nvml_fails_exits_1_naming_the_step(tmp_path: Path) -> None:
    host = tmp_path / "broken.json"
    host.write_text(json.dumps({**json.loads(HOST_8GPU.read_text()), "init_error": "DriverNotLoaded"}))
    result, data, _ = run_check(tmp_path, "--fake", str(host))
    assert result.returncode == 1 and data["passed"] is False
    failed = [c for c in data["checks"] if c["ok"] is False]
    assert [c["name"] for c in failed] == ["nvml.step"]
    assert "NVML gives no UUID for GPU 0" in failed[0]["detail"]
    assert checks_of(data)["not_run"]["detail"].startswith("citadeld, inventory")
    assert "FAILED in" in result.stdout


def test_real_gpu_mode_rehearsed_on_stand_ins(tmp_path: Path) -> None:
    """The real-GPU path (pynvml, torch, nvidia-smi, NVML's release watch, the fake mirroring
    the "real" GPU), on stand-ins that share one fake host (see the fixture's README)."""
    host = tmp_path / "rehearsal-host.json"
    shutil.copyfile(REHEARSAL / "host.json", host)
    paths = [str(REHEARSAL), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {"GPU_CHECK_REHEARSAL_HOST": str(host), "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "PATH": f"{REHEARSAL / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    result, data, took = run_check(tmp_path, env=env)
    assert_passed(result, data)
    assert data["mode"] == "real" and took < 60
    checks = checks_of(data)
    for name in ("nvml.real_matches_pynvml", "nvml.fake_matches_real", "pin.torch_uuid",
                 "inventory.matches_host", "release.restart_after_release", "restart.pinned_again"):
        assert checks[name]["ok"] is True, checks[name]
    assert "nvidia-smi" in checks["inventory.matches_host"]["detail"]
    assert data["figures"]["worker"]["device_uuid"] == data["gpu"]["uuid"]
    assert data["nvml"]["fake_mirror_calls"] and data["nvml"]["differences"] == []
    smi = data["figures"]["process_memory"]["nvidia_smi"]
    assert {int(row["pid"]) for row in smi} == set(data["figures"]["process_memory"]["worker_pids"])
