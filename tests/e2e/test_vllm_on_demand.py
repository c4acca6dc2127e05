"""Models on demand with real vLLM on the CPU: two models in a swap group of one behind the
gateway, started by their first request, evicting each other (the chat model starts twice:
evicted, it starts again when wanted), stopped when idle.

The chat model asks for ``sleep = 1``: the CPU build has no sleep mode, so citadeld says so
once and stops and starts it instead (what this test checks; sleep itself is tested against
a stand-in of vLLM's endpoints in tests/integration/test_on_demand.py). Only shapes and
sizes of answers are asserted, never what a model says.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from bench_on_demand import CHAT, MODEL_DIR, ask, on_demand_services

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("CITADEL_SKIP_E2E") == "1", reason="CITADEL_SKIP_E2E=1"),
]


def check_answer(model: str, answer: dict[str, Any]) -> None:
    """The shape of the answer: 1-4 tokens of text, or one 384-wide vector."""
    if model == CHAT:
        [choice] = answer["choices"]
        assert isinstance(choice["text"], str) and 0 < answer["usage"]["completion_tokens"] <= 4, answer
    else:
        [item] = answer["data"]
        assert len(item["embedding"]) == 384, len(item["embedding"])


def test_two_real_models_take_turns_on_demand(daemon_factory):
    for model in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        assert (MODEL_DIR / model).exists(), f"{MODEL_DIR / model} is missing: run ./scripts/setup-models"
    gw_port, chat_port, embed_port = free_ports(3)
    daemon = daemon_factory(on_demand_services(gw_port, chat_port, embed_port, idle_stop=20), start=False)
    daemon.config.write_text(daemon.config.read_text().replace("[daemon]\n", '[daemon]\ncgroups = "off"\n', 1))
    daemon.start()
    daemon.wait_state("gw", "running", timeout=60)
    status = daemon.status()
    assert status["chat"]["state"] == "idle" and status["embed"]["state"] == "idle"

    for model in ("smollm2", "minilm", "smollm2"):
        code, _, _, answer = ask(gw_port, model)
        assert code == 200, answer
        check_answer(model, answer)
    status = daemon.status()
    assert status["chat"]["state"] == "running"
    assert status["embed"]["state"] == "idle"
    assert status["embed"]["demand"]["down_reason"] == "evicted for chat"
    assert status["embed"]["last_failure"] is None and status["chat"]["last_failure"] is None
    # The CPU build has no sleep mode: said once, and the chat model was stopped, not put to sleep.
    assert daemon.logs().count("stopped and started instead of sleeping") == 1
    assert status["chat"]["demand"]["sleep"] is False

    # Idle for idle_stop: stopped into idle, not counted as a failure. (That a request
    # starts an idle worker again is shown above: the chat model's second start.)
    idle = daemon.wait_state("chat", "idle", timeout=120)
    assert idle["demand"]["down_reason"] == "idle for 20s"
    assert idle["restarts"] == 0 and idle["last_failure"] is None
