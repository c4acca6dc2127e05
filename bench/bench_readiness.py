"""Readiness lag: from vLLM's /health first answering 200 to citadeld saying ``running``.

Runs citadeld with the embedded chat model (real vLLM on the CPU), restarts
the worker N times, and for each start measures, on one clock:

- t_health: the first 200 from ``/health``, polled every 2 ms by this script;
- t_running: the time stamp of citadeld's ``state -> running`` event
  (``GET /v1/events`` on the control socket).

Usage: .venv/bin/python bench/bench_readiness.py [--runs 5]
Needs ./scripts/setup-models (vLLM in .venv-vllm, models in var/models).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 18501


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("citadel", timeout=None)
        self.path_ = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path_)


def first_health_200(stop: threading.Event, out: list[float]) -> None:
    """Poll /health every 2 ms; record the first 200."""
    while not stop.is_set():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=0.5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                out.append(time.time())
                return
        except OSError:
            pass
        time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="citadel-bench-ready-"))
    sock = root / "control.sock"
    config = root / "citadeld.toml"
    config.write_text(f"""
[daemon]
control_socket = "{sock}"
state_dir = "{root}"
log_dir = "{root}/log"
socket_group = ""
[exporter]
listen = ""
[services.chat]
type = "vllm"
model = "{REPO}/var/models/smollm2-135m-instruct"
served_model_name = "smollm2"
python = "{REPO}/.venv-vllm/bin/python"
port = {PORT}
max_model_len = 1024
args = ["--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
""")
    daemon = subprocess.Popen([str(BIN / "citadeld"), "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=(root / "citadeld.log").open("w"))
    lags = []
    try:
        while not sock.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        events = UnixHTTP(str(sock))
        events.request("GET", "/v1/events")
        stream = events.getresponse()
        for run in range(args.runs):
            if run:
                ctl = UnixHTTP(str(sock))
                ctl.request("POST", "/v1/restart", body=json.dumps({"names": ["chat"]}),
                            headers={"Content-Type": "application/json"})
                ctl.getresponse().read()
            health: list[float] = []
            stop = threading.Event()
            # Wait for the old server to be gone before watching /health.
            deadline = time.time() + 60
            while run and time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", PORT), timeout=0.2).close()
                    time.sleep(0.01)
                except OSError:
                    break
            poller = threading.Thread(target=first_health_200, args=(stop, health), daemon=True)
            poller.start()
            running_at = None
            while running_at is None:
                line = stream.readline()
                if not line:
                    raise RuntimeError("event stream closed")
                event = json.loads(line)
                if event["kind"] == "state" and event["worker"] == "chat" and event["state"] == "running":
                    running_at = event["time"]
            poller.join(5)
            stop.set()
            if not health:
                print(f"run {run + 1}: /health never seen 200 before running")
                continue
            lag = running_at - health[0]
            lags.append(lag)
            print(f"run {run + 1}: /health 200 -> running in {lag * 1000:.1f} ms")
    finally:
        daemon.terminate()
        daemon.wait(120)
        shutil.rmtree(root, ignore_errors=True)
    if lags:
        print(f"\nreadiness lag over {len(lags)} starts: p50 {statistics.median(lags) * 1000:.1f} ms, "
              f"max {max(lags) * 1000:.1f} ms (target: p50 <= 100 ms; llama-swap polls every 1 s, "
              "GPUStack every 3 s)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
