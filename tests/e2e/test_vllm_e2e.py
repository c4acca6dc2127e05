"""End to end with real vLLM on the CPU: serve, crash the API server alone, recover, stop clean;
and an embedding model's vectors.

Only what holds on any CPU is asserted: the shape of the answers, sizes, and
that equal requests at temperature 0 get equal answers. What a 135M model
says depends on the CPU's kernels, so its words are never checked.

Needs ``scripts/setup-models`` (``./scripts/test`` runs it): vLLM in
``.venv-vllm`` and the models in ``var/models``. ``CITADEL_SKIP_E2E=1`` skips.
"""

from __future__ import annotations

import json
import math
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, wait_gone

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL_DIR = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models"))
CHAT_MODEL = MODEL_DIR / "smollm2-135m-instruct"

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
]


def _post(port: int, path: str, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


MAX_TOKENS = 12


def _chat(port: int, api_key: str) -> str:
    """One chat completion at temperature 0, checked for the shape of an OpenAI answer; its text.

    What a 135M model says depends on the CPU's kernels: the text itself is not checked."""
    answer = _post(port, "/v1/chat/completions", api_key=api_key, body={
        "model": "smollm2", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}]})
    assert answer["object"] == "chat.completion" and answer["model"] == "smollm2", answer
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length"), answer
    content = choice["message"]["content"]
    assert isinstance(content, str) and content.strip(), answer
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= MAX_TOKENS, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    return content


def _first_liveness_result(daemon: Any, pid: int) -> dict[str, Any]:
    """The liveness probe's state once it has run for the worker with this pid."""
    def probed(status: dict[str, Any]) -> dict[str, Any] | None:
        chat = status["chat"]
        live = chat["probes"].get("liveness", {})
        return live if chat["pid"] == pid and live.get("last") else None
    result: dict[str, Any] = daemon.wait_for(probed, timeout=120, what="the inference probe's first result")
    return result


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
    port = free_port()
    # The inference probe runs once as the worker comes up, then not again for ten
    # minutes: no probe request shares a batch with the test's, so the answers at
    # temperature 0 before and after the restart are computed alike.
    daemon = daemon_factory(f"""
        [services.chat]
        type = "vllm"
        model = "{CHAT_MODEL}"
        served_model_name = "smollm2"
        python = "{VLLM_PYTHON}"
        port = {port}
        max_model_len = 1024
        api_key = "${{CHAT_API_KEY}}"
        args = ["--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        stable_after = 5
        startup_timeout = 300
        [services.chat.probes]
        startup = {{ kind = "http", path = "/health", period = 0.1, timeout = 2 }}
        liveness = {{ kind = "inference", period = "10m", timeout = 30 }}
        readiness = {{ kind = "http", path = "/health", period = 5, failure_threshold = 1 }}
        """, start=False, env={"CHAT_API_KEY": api_key})
    daemon.config.write_text(daemon.config.read_text().replace("[daemon]\n", '[daemon]\ncgroups = "off"\n', 1))
    daemon.start()
    first = daemon.wait_state("chat", "running", timeout=300)
    assert first["port"] == port and first["models"] == ["smollm2"]
    # The inference liveness probe sends a real 1-token request, with the API key.
    live = _first_liveness_result(daemon, first["pid"])
    assert live["kind"] == "inference" and live["last"]["ok"], live
    before = _chat(port, api_key)

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
    assert _first_liveness_result(daemon, second["pid"])["last"]["ok"]
    assert _chat(port, api_key) == before, "at temperature 0 the same model gives the same answer"

    survivors = [p.pid for p in psutil.Process(second["pid"]).children(recursive=True)] + [second["pid"]]
    assert daemon.stop(timeout=120) == 0
    assert wait_gone(survivors, timeout=30) == []
    assert [p.pid for p in _vllm_processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    # The key went to vLLM through its environment: never into citadeld's log or the worker log.
    assert api_key not in daemon.logs()
    worker_log = (daemon.root / "log" / "chat.log").read_text()
    assert api_key not in worker_log
    # citadeld's probes of /health stay out of vLLM's access log; other requests are logged.
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in worker_log
    assert '"GET /health HTTP/1.1"' not in worker_log


EMBED_MODEL = MODEL_DIR / "all-minilm-l6-v2"


def _embed(port: int, text: str | list[str]) -> list[list[float]]:
    """One ``/v1/embeddings`` request, checked for the shape of an OpenAI answer; its vectors."""
    answer = _post(port, "/v1/embeddings", {"model": "minilm", "input": text})
    inputs = [text] if isinstance(text, str) else text
    assert answer["object"] == "list" and answer["model"] == "minilm", answer
    assert [item["index"] for item in answer["data"]] == list(range(len(inputs)))
    assert answer["usage"]["prompt_tokens"] >= len(inputs), answer["usage"]
    return [item["embedding"] for item in answer["data"]]


def test_vllm_embedding_worker_serves_vectors_of_the_models_width(daemon_factory):
    assert EMBED_MODEL.exists(), f"{EMBED_MODEL} is missing: run ./scripts/setup-models"
    port = free_port()
    daemon = daemon_factory(f"""
        [services.embed]
        type = "vllm"
        model = "{EMBED_MODEL}"
        served_model_name = "minilm"
        python = "{VLLM_PYTHON}"
        port = {port}
        args = ["--runner", "pooling", "--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        startup_timeout = 300
        """, start=False)
    daemon.config.write_text(daemon.config.read_text().replace("[daemon]\n", '[daemon]\ncgroups = "off"\n', 1))
    daemon.start()
    assert daemon.wait_state("embed", "running", timeout=300)["models"] == ["minilm"]

    [hello] = _embed(port, "hello")
    assert len(hello) == 384 and all(math.isfinite(x) for x in hello)
    # Requests one after another compute alike: equal input, equal vector.
    [again] = _embed(port, "hello")
    assert again == pytest.approx(hello, abs=1e-6)
    pair = _embed(port, ["hello", "Quarterly revenue fell by three percent."])
    assert [len(v) for v in pair] == [384, 384]
    assert pair[0] != pytest.approx(pair[1], abs=1e-3), "different texts, different vectors"
    assert daemon.stop(timeout=120) == 0
