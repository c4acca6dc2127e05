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

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
CHAT_MODEL = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models")) / "smollm2-135m-instruct"
STALL_TIMEOUT = 15

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
]


def _complete(port: int, outcome: dict[str, Any]) -> None:
    """One long completion; records how it ended (answer or error) and when."""
    body = {"model": "smollm2", "prompt": "Tell a long story about the sea.", "max_tokens": 1000,
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
        max_model_len = 1024
        args = ["--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        startup_timeout = 300
        stall_timeout = {STALL_TIMEOUT}
        stop_timeout = 5
        backoff_initial = 0
        """)
    first = daemon.wait_state("chat", "running", timeout=300)
    assert daemon.status()["chat"]["probes"]["liveness"]["kind"] == "progress"

    outcomes: list[dict[str, Any]] = [{} for _ in range(3)]
    threads = [threading.Thread(target=_complete, args=(port, o), daemon=True) for o in outcomes]
    for thread in threads:
        thread.start()
    # Wait for the engine to be busy with them (its counters move), then freeze it.
    daemon.wait_for(lambda s: "pending" in (s["chat"]["probes"]["liveness"].get("last") or {}).get("detail", "")
                    and not (s["chat"]["probes"]["liveness"]["last"]["detail"].startswith("HTTP 200, 0 ")),
                    60, "the progress probe to see requests pending")
    engine = _engine_core(first["pid"])
    frozen = time.monotonic()
    engine.send_signal(signal.SIGSTOP)
    health_200_until = frozen
    try:
        while daemon.status()["chat"]["pid"] == first["pid"]:
            if _health_ok(port):
                health_200_until = time.monotonic()
            time.sleep(0.5)  # sampling /health while the worker is still the frozen one
            assert time.monotonic() - frozen < STALL_TIMEOUT + 120, "the stall was not acted on"
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
    print(f"\nstall: /health answered 200 for {health_200_until - frozen:.1f}s after SIGSTOP of the engine; "
          f"citadeld restarted the worker {acted:.1f}s after it (stall_timeout = {STALL_TIMEOUT}s)")
