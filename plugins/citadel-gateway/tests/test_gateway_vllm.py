"""End to end: the gateway in front of real vLLM on the CPU, under a real citadeld.

A chat completion and a streamed one through the gateway, routed by the
model name the ``vllm`` type reports (no ``routes`` table). Needs vLLM in
``.venv-vllm`` and the models in ``var/models`` (``scripts/setup-models``;
``./scripts/test`` runs it). ``CITADEL_SKIP_E2E=1`` skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from gateway_harness import Http, free_ports, read_sse, sha256_hash, wait_gateway_models

from citadel_supervisor.plugins import load_plugins

REPO = Path(__file__).resolve().parents[3]
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL_DIR = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models"))
CHAT_MODEL = MODEL_DIR / "smollm2-135m-instruct"
KEY = "sk-gateway-e2e-3c5e7a9b1d2f4a6c"


def _missing() -> str | None:
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} is missing (scripts/setup-models sets it up)"
    if "vllm" not in load_plugins().service_types():
        return "the vllm service type is not installed"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


WORKER_KEY = "sk-test-worker-key-only-gateway-knows"


def test_chat_and_stream_through_the_gateway_to_vllm(daemon_factory: Any) -> None:
    assert CHAT_MODEL.exists(), f"{CHAT_MODEL} is missing: run ./scripts/setup-models"
    gw_port, vllm_port = free_ports(2)
    daemon = daemon_factory(f"""
        [services.chat]
        type = "vllm"
        model = "{CHAT_MODEL}"
        served_model_name = "smollm2"
        python = "{VLLM_PYTHON}"
        port = {vllm_port}
        max_model_len = 1024
        # The worker wants its own key: the gateway must send it (clients never see it).
        api_key = "${{CHAT_WORKER_KEY}}"
        args = ["--enforce-eager", "--no-enable-prefix-caching"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1", VLLM_NO_USAGE_STATS = "1" }}
        startup_timeout = 400

        [services.gw]
        type = "gateway"
        listen = "127.0.0.1:{gw_port}"
        [[services.gw.keys]]
        name = "e2e"
        hash = "{sha256_hash(KEY)}"
        """, start=False, env={"CHAT_WORKER_KEY": WORKER_KEY})
    daemon.config.write_text(daemon.config.read_text().replace("[daemon]\n", '[daemon]\ncgroups = "off"\n', 1))
    daemon.start()
    daemon.wait_state("chat", "running", timeout=420)
    gw = Http(gw_port)
    wait_gateway_models(gw, KEY, {"smollm2"}, timeout=60)

    question = {"model": "smollm2", "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "Write one sentence about the sea."}]}
    status, _, data = gw.post("/v1/chat/completions", question, key=KEY, timeout=120)
    assert status == 200, data
    # The shape of an OpenAI answer; what a 135M model says is not checked.
    assert data["object"] == "chat.completion" and data["model"] == "smollm2", data
    answer = data["choices"][0]["message"]["content"]
    assert isinstance(answer, str) and answer.strip(), data
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12, usage

    conn, resp = gw.stream("/v1/chat/completions", {**question, "stream": True}, key=KEY, timeout=120)
    try:
        assert resp.status == 200
        events = read_sse(resp)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "the usage chunk the gateway asked for stays with it"
    assert len({c["id"] for c in chunks}) == 1, "one completion's chunks, and only those"
    assert chunks[-1]["choices"][0]["finish_reason"] == data["choices"][0]["finish_reason"]
    # The stream passes whole: at temperature 0 (prefix caching off, so the second request
    # is computed as the first was) its pieces join up to the answer given in one piece.
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == answer

    _, _, metrics = gw.get("/metrics")
    completion = [line for line in metrics.splitlines()
                  if line.startswith("gateway_tokens_total{") and 'key="e2e"' in line
                  and 'kind="completion"' in line]
    assert completion and float(completion[0].rsplit(" ", 1)[1]) == 2 * usage["completion_tokens"], \
        "the stream's usage (and the answer's) counted for the key"
    # The worker's own key reached vLLM from the gateway, and was never written anywhere.
    assert WORKER_KEY not in daemon.logs()
    gateway = daemon.status()["gw"]
    assert WORKER_KEY not in " ".join(psutil.Process(gateway["pid"]).cmdline())
