"""End to end with real vLLM on the CPU: serve, crash the API server alone, recover, stop clean.

Needs ``scripts/setup-models`` (``./scripts/test`` runs it): vLLM in
``.venv-vllm`` and the models in ``var/models``. ``CITADEL_SKIP_E2E=1`` skips.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import wait_gone

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL_DIR = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models"))
CHAT_MODEL = MODEL_DIR / "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
]


def _chat(port: int, api_key: str) -> str:
    body = json.dumps({"model": "smollm2", "max_tokens": 12, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def _vllm_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            if str(CHAT_MODEL) in " ".join(proc.info["cmdline"] or []) or \
                    (proc.info["environ"] or {}).get("CITADEL_SERVICE") == "chat":
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_vllm_worker_serves_recovers_and_leaves_nothing(daemon_factory, tmp_path):
    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} is missing: run ./scripts/setup-models"
    assert CHAT_MODEL.exists(), f"{CHAT_MODEL} is missing: run ./scripts/setup-models"
    api_key = "sk-e2e-test-key-never-logged-123"
    daemon = daemon_factory(f"""
        [services.chat]
        type = "vllm"
        model = "{CHAT_MODEL}"
        served_model_name = "smollm2"
        python = "{VLLM_PYTHON}"
        port = 18401
        max_model_len = 1024
        api_key = "${{CHAT_API_KEY}}"
        args = ["--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        stable_after = 5
        startup_timeout = 300
        inference_probe = true
        """, start=False, env={"CHAT_API_KEY": api_key})
    daemon.config.write_text(daemon.config.read_text().replace("[daemon]\n", '[daemon]\ncgroups = "off"\n', 1))
    daemon.start()
    first = daemon.wait_state("chat", "running", timeout=300)
    assert first["port"] == 18401 and first["models"] == ["smollm2"]
    assert "paris" in _chat(18401, api_key).lower()
    # The inference liveness probe sends a real 1-token request, with the API key.
    live = daemon.wait_for(lambda s: s["chat"]["probes"].get("liveness", {}).get("last") and s["chat"],
                           timeout=120, what="the inference probe's first result")["probes"]["liveness"]
    assert live["kind"] == "inference" and live["last"]["ok"], live

    leader = psutil.Process(first["pid"])
    engine = [p.pid for p in leader.children(recursive=True)]
    assert engine, "vLLM's EngineCore should be a child of the API server"
    # Kill the API server alone (vLLM issue 55510: its engine would live on).
    leader.send_signal(signal.SIGKILL)
    assert wait_gone(engine, timeout=60) == [], "EngineCore/Worker outlived the API server"
    second = daemon.wait_for(lambda s: s["chat"] if s["chat"]["state"] == "running"
                             and s["chat"]["pid"] != first["pid"] else None, timeout=300, what="restart")
    assert second["restarts"] == 1
    assert second["last_exit"] == {"code": None, "signal": signal.SIGKILL}
    assert "paris" in _chat(18401, api_key).lower()

    survivors = [p.pid for p in psutil.Process(second["pid"]).children(recursive=True)] + [second["pid"]]
    assert daemon.stop(timeout=120) == 0
    assert wait_gone(survivors, timeout=30) == []
    assert [p.pid for p in _vllm_processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    # The key went to vLLM through its environment: never into citadeld's log or the worker log.
    assert api_key not in daemon.logs()
    assert api_key not in (daemon.root / "log" / "chat.log").read_text()
