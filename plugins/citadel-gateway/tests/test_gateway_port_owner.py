"""The gateway sends a worker's API key only to the worker's own listener.

Under a real citadeld, two ``vllm`` services with API keys and fake interpreters:
``own`` runs a recording HTTP server (it listens on its port itself), ``chat``
never listens, and a stranger the test starts takes ``chat``'s port before the
worker would bind it (port squatting). citadeld's probes pass against the
stranger, so ``chat`` is ready; only ``port_owner`` in ``/v1/status`` tells.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway_harness import Http, free_ports, wait_gateway_models

MAIN_TESTS = Path(__file__).resolve().parents[3] / "tests"
SQUATTER = MAIN_TESTS / "workers" / "squatter.py"
CHAT_KEY = "sk-chat-worker-key-not-for-strangers-41"
OWN_KEY = "sk-own-worker-key-for-its-listener-0042"


def _fake_python(path: Path, script: str) -> Path:
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def _service(name: str, python: Path, port: int, env_var: str) -> str:
    return f"""
        [services.{name}]
        type = "vllm"
        model = "fake-org/{name}"
        served_model_name = "{name}"
        python = "{python}"
        port = {port}
        api_key = "${{{env_var}}}"
        stop_timeout = 5
        """


def _requests(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_the_key_goes_to_the_workers_own_listener_and_never_to_a_stranger(
        daemon_factory: Any, tmp_path: Path) -> None:
    gw_port, chat_port, own_port = free_ports(3)
    own_record, stranger_record = tmp_path / "own.jsonl", tmp_path / "stranger.jsonl"
    sleeper = _fake_python(tmp_path / "python-sleeps", "exec sleep 600")
    fake_vllm = _fake_python(tmp_path / "python-serves",
                             f'exec "{sys.executable}" "{SQUATTER}" --record "{own_record}" "$@"')
    daemon = daemon_factory(_service("chat", sleeper, chat_port, "CHAT_KEY")
                            + _service("own", fake_vllm, own_port, "OWN_KEY") + f"""
        [services.gw]
        type = "gateway"
        listen = "127.0.0.1:{gw_port}"
        """, env={"CHAT_KEY": CHAT_KEY, "OWN_KEY": OWN_KEY})
    daemon.wait_state("chat", "starting")  # spawned: its port was free, and nobody listens yet
    stranger = subprocess.Popen([sys.executable, str(SQUATTER), "--port", str(chat_port),
                                 "--record", str(stranger_record)], stdout=subprocess.PIPE, text=True)
    try:
        assert stranger.stdout is not None and stranger.stdout.readline().strip() == "listening"
        status = daemon.wait_for(lambda s: s["chat"]["ready"] and s["own"]["ready"] and s,
                                 what="both workers ready (chat's probes answered by the stranger)")
        gw = Http(gw_port)
        wait_gateway_models(gw, None, {"chat", "own"})
        question = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

        code, _, data = gw.post("/v1/chat/completions", {"model": "own", **question})
        assert code == 200, data
        sent = [r for r in _requests(own_record) if r["path"] == "/v1/chat/completions"]
        assert sent and sent[0]["headers"]["Authorization"] == f"Bearer {OWN_KEY}"

        code, _, data = gw.post("/v1/chat/completions", {"model": "chat", **question})
        received = stranger_record.read_text() if stranger_record.exists() else ""
        assert CHAT_KEY not in received, "the worker's API key reached a stranger on its port"
        # citadeld's probes reach whatever holds the port (/health, and /metrics for the progress
        # probe), without a key; the gateway sends nothing there.
        assert not [r for r in _requests(stranger_record) if r["path"] not in ("/health", "/metrics")], received
        assert code == 502, data
        assert f"port {chat_port} of chat is held by another process" in data["error"]["message"], data
        assert CHAT_KEY not in daemon.logs() and OWN_KEY not in daemon.logs()
        assert status["chat"]["port_owner"] == "other" and status["own"]["port_owner"] == "worker"
    finally:
        stranger.kill()
        stranger.wait()
