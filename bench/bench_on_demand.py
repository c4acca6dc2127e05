"""Models on demand: two real vLLM models on the CPU in a swap group of one, behind the gateway.

Alternates requests between a chat model and an embedding model, so that
every request finds its model evicted and waits for a cold start; repeats a
request at once (warm); then waits for the chat model's idle stop and asks
again. For each request: the time from sending it to the first byte of the
answer, and its status. Requests lost (anything but 200) must be 0.

    .venv/bin/python bench/bench_on_demand.py [--rounds 2] [--idle-stop 20] [--json out.json]

Needs ``scripts/setup-models`` (vLLM in ``.venv-vllm``, the models in
``var/models``). It takes a few minutes: each cold start of vLLM on the CPU
is about half a minute.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, Citadel, free_ports, machine, median, table, wait_until

VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL_DIR = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models"))
CHAT, EMBED = "smollm2", "minilm"


def on_demand_services(gw_port: int, chat_port: int, embed_port: int, idle_stop: float) -> str:
    """Both models on demand in a swap group of one, and the gateway that may start them.
    The chat model asks for ``sleep = 1``, which the CPU build lacks (stopped instead)."""
    return f"""
        [swap_groups.cpu]
        max_running = 1

        [services.chat]
        type = "vllm"
        model = "{MODEL_DIR / 'smollm2-135m-instruct'}"
        served_model_name = "{CHAT}"
        python = "{VLLM_PYTHON}"
        port = {chat_port}
        max_model_len = 1024
        args = ["--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        start = "on-demand"
        swap_group = "cpu"
        idle_stop = {idle_stop}
        sleep = 1
        startup_timeout = 300

        [services.embed]
        type = "vllm"
        model = "{MODEL_DIR / 'all-minilm-l6-v2'}"
        served_model_name = "{EMBED}"
        python = "{VLLM_PYTHON}"
        port = {embed_port}
        args = ["--runner", "pooling", "--enforce-eager"]
        env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
        start = "on-demand"
        swap_group = "cpu"
        startup_timeout = 300

        [services.gw]
        type = "gateway"
        listen = "127.0.0.1:{gw_port}"
        on_demand = ["chat", "embed"]
        hold_timeout = 300
        upstream_timeout = 300
        """


def request_body(model: str) -> tuple[str, dict[str, Any]]:
    """The request for ``model``: a 4-token completion at temperature 0, or one embedding."""
    if model == CHAT:
        return "/v1/completions", {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0}
    return "/v1/embeddings", {"model": model, "input": "the sea"}


def ask(gw_port: int, model: str) -> tuple[int, float, float, dict[str, Any]]:
    """One request through the gateway: (status, seconds to the first byte, to the last, answer)."""
    path, body = request_body(model)
    conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=400)
    started = time.monotonic()
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.read(1)
        first_byte = time.monotonic() - started
        data = first + resp.read()
        total = time.monotonic() - started
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"raw": data[:200].decode(errors="replace")}
    return resp.status, first_byte, total, answer


def run(rounds: int, idle_stop: float) -> dict[str, Any]:
    """The bench; the figures."""
    gw_port, chat_port, embed_port = free_ports(3)
    root = Path(tempfile.mkdtemp(prefix="bench-on-demand-"))
    citadel = Citadel(root, on_demand_services(gw_port, chat_port, embed_port, idle_stop),
                      daemon_extra='cgroups = "off"')
    rows: list[dict[str, Any]] = []
    try:
        citadel.start()
        wait_until(lambda: citadel.status().get("gw", {}).get("state") == "running", 60, "the gateway")

        def measure(model: str, kind: str) -> None:
            status, first, total, _ = ask(gw_port, model)
            rows.append({"model": model, "kind": kind, "status": status, "first_byte": first, "total": total})
            print(f"{model:8} {kind:22} HTTP {status}  first byte {first:7.2f}s", flush=True)

        measure(CHAT, "cold (first request)")
        for _ in range(rounds):
            measure(EMBED, "cold (evicted)")
            measure(EMBED, "warm")
            measure(CHAT, "cold (evicted)")
            measure(CHAT, "warm")
        wait_until(lambda: citadel.status()["chat"]["state"] == "idle", idle_stop + 120, "the idle stop", 0.2)
        measure(CHAT, "cold (after idle stop)")
        status = citadel.status()
        starts = {name: status[name]["demand"]["start_seconds"] for name in ("chat", "embed")}
    finally:
        citadel.stop()
    return {"rows": rows, "start_seconds": starts, "lost": sum(r["status"] != 200 for r in rows),
            "machine": machine(), "rounds": rounds, "idle_stop": idle_stop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two models")
    parser.add_argument("--idle-stop", type=float, default=20.0, help="the chat model's idle_stop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for model in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        if not (MODEL_DIR / model).exists():
            raise SystemExit(f"{MODEL_DIR / model} is missing: run ./scripts/setup-models")
    result = run(args.rounds, args.idle_stop)
    summary = []
    for kind in ("cold (first request)", "cold (evicted)", "warm", "cold (after idle stop)"):
        for model in (CHAT, EMBED):
            times = [r["first_byte"] for r in result["rows"] if r["kind"] == kind and r["model"] == model]
            if times:
                summary.append([model, kind, str(len(times)), f"{median(times):.2f}s"])
    print(table(["model", "request", "n", "median first byte"], summary))
    warm = median([r["first_byte"] for r in result["rows"] if r["kind"] == "warm"])
    cold = median([r["first_byte"] for r in result["rows"] if r["kind"].startswith("cold")])
    print(f"cold / warm first byte: {cold / warm:.0f}x; last start (spawn to ready): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in result["start_seconds"].items() if v is not None))
    print(f"requests lost: {result['lost']} of {len(result['rows'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
