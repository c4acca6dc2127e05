"""A frozen engine behind a healthy API server, on real vLLM: the engine process (EngineCore)
is stopped with SIGSTOP while requests are in flight. vLLM's /health keeps answering 200;
citadeld's progress probe sees requests pending and no token processed, and restarts the
worker with the cause "stalled"; the requests in flight get an error instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port

from citadel_supervisor.services.vllm_metrics import EngineMetrics, read_engine

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
CHAT_MODEL = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models")) / "smollm2-135m-instruct"
STALL_TIMEOUT = 15
REQUESTS = 3
#: Each request's length: minutes of work on a slow CPU, so that the engine is frozen mid-way.
MAX_TOKENS = 1900

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
]


def _complete(port: int, outcome: dict[str, Any]) -> None:
    """One long completion; records how it ended (answer or error) and when."""
    body = {"model": "smollm2", "prompt": "Tell a long story about the sea.", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            outcome["status"] = answer.status
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        outcome["error"] = type(exc).__name__
    outcome["ended"] = time.monotonic()


def _health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _engine_reading(port: int) -> EngineMetrics | None:
    """vLLM's own counters, read by the test straight from the worker's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            return read_engine(answer.read().decode(errors="replace"))
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _wait_until_generating(port: int, outcomes: list[dict[str, Any]], timeout: float) -> EngineMetrics:
    """Wait until the engine runs every request and has generated tokens for them."""
    deadline = time.monotonic() + timeout
    reading = None
    while time.monotonic() < deadline:
        assert not any(outcomes), f"a request ended before the engine was frozen: {outcomes}"
        reading = _engine_reading(port)
        if reading is not None and (reading.pending or 0) >= REQUESTS and (reading.generation_tokens or 0) > 0:
            return reading
        time.sleep(0.2)  # polling vLLM's counters until the engine is busy with every request
    raise AssertionError(f"the engine did not take the requests within {timeout:g}s; last reading {reading}")


def _wait_stopped(process: psutil.Process, timeout: float) -> None:
    """Wait until the kernel shows ``process`` stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while process.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, f"{process.pid} is {process.status()}, not stopped"
        time.sleep(0.05)  # polling the kernel's process state


def _without_worker_output(log: str) -> str:
    """citadeld's own lines of its JSON log: what it decided, without what vLLM printed."""
    return "\n".join(line for line in log.splitlines() if "logs.worker_output" not in line)


def _engine_core(leader: int) -> psutil.Process:
    for child in psutil.Process(leader).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under the API server")


def test_a_frozen_engine_is_found_stalled_and_restarted(daemon_factory: Any) -> None:
    assert CHAT_MODEL.exists(), f"{CHAT_MODEL} is missing: run ./scripts/setup-models"
    port = free_port()
    daemon = daemon_factory(f"""
        [services.chat]
        type = "vllm"
        model = "{CHAT_MODEL}"
        served_model_name = "smollm2"
        python = "{VLLM_PYTHON}"
        port = {port}
        max_model_len = 2048
        args = ["--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        startup_timeout = 300
        stall_timeout = {STALL_TIMEOUT}
        stop_timeout = 5
        backoff_initial = 0
        """)
    first = daemon.wait_state("chat", "running", timeout=300)
    assert daemon.status()["chat"]["probes"]["liveness"]["kind"] == "progress"

    outcomes: list[dict[str, Any]] = [{} for _ in range(REQUESTS)]
    threads = [threading.Thread(target=_complete, args=(port, o), daemon=True) for o in outcomes]
    for thread in threads:
        thread.start()
    # Freeze the engine once it is generating for every request: the test reads vLLM's own
    # counters for that, so that how soon citadeld's probe runs cannot make it late.
    busy = _wait_until_generating(port, outcomes, timeout=120)
    engine = _engine_core(first["pid"])
    frozen = time.monotonic()
    engine.send_signal(signal.SIGSTOP)
    _wait_stopped(engine, timeout=30)
    assert not any(outcomes), f"a request ended before the engine was frozen: {outcomes}"
    health_200_until = frozen
    try:
        while (now := daemon.status()["chat"])["pid"] == first["pid"]:
            if _health_ok(port):
                health_200_until = time.monotonic()
            time.sleep(0.5)  # sampling /health while the worker is still the frozen one
            assert time.monotonic() - frozen < STALL_TIMEOUT + 120, (
                f"the stall was not acted on; state {now['state']}, liveness probe: "
                f"{json.dumps(now['probes'].get('liveness'))}\n--- citadeld log ---\n"
                f"{_without_worker_output(daemon.logs())[-6000:]}")
    finally:
        if engine.is_running():
            engine.send_signal(signal.SIGCONT)  # it is killed with its tree anyway
    acted = time.monotonic() - frozen
    for thread in threads:
        thread.join(60)
    assert all("error" in o or o.get("status") != 200 for o in outcomes), outcomes  # none hung, none finished
    status = daemon.status()["chat"]
    assert status["last_failure"] == "stalled", status
    assert "stalled:" in daemon.logs()
    second = daemon.wait_state("chat", "running", timeout=300)
    assert second["pid"] != first["pid"]
    print(f"\nstall: frozen with {busy.pending:g} requests running, {busy.generation_tokens:g} tokens generated; "
          f"/health answered 200 for {health_200_until - frozen:.1f}s after SIGSTOP of the engine; "
          f"citadeld restarted the worker {acted:.1f}s after it (stall_timeout = {STALL_TIMEOUT}s)")
