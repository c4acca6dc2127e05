"""Make docs/status-page.png: the status page of a citadeld running a fleet of eight workers.

    .venv/bin/python scripts/status_page_screenshot.py [--out docs/status-page.png]

The fleet runs on a FAKE NVML of eight GPUs (a copy of tests/fixtures/fake_host_8gpu.json
whose memory and processes are set to the workers' own), as a host serving a few models
would: most workers running, one that was killed and came back, one crashing in backoff,
one still starting. The page is opened in headless Chromium (Debian's ``chromium``),
through the test suite's DevTools client (tests/chromium.py), with one worker selected to
show its last lines ([exporter] ui_logs is on for the picture).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from chromium import Chromium

from citadel_supervisor.testing import free_port, free_port_run, wait_until

sys.path.insert(0, str(ROOT / "bench"))
from _common import Citadel

FAKE_HOST = ROOT / "tests" / "fixtures" / "fake_host_8gpu.json"

#: A vLLM server's first lines, printed by the "model" workers (then they sleep).
VLLM_LINES = [
    "INFO 05-14 09:12:03 api_server.py:581] vLLM API server version 0.8.5",
    "INFO 05-14 09:12:03 api_server.py:582] args: model='/srv/models/{model}', max_model_len=8192",
    "INFO 05-14 09:12:11 model_runner.py:1110] Loading model weights took 14.99 GB",
    "INFO 05-14 09:12:19 gpu_executor.py:122] # GPU blocks: 27242, # CPU blocks: 2048",
    "INFO 05-14 09:12:24 launcher.py:28] Available routes are: /health, /v1/models, /v1/chat/completions",
    "INFO:     Started server process [{pid}]",
    "INFO:     Uvicorn running on http://0.0.0.0:{port} (Press CTRL+C to quit)",
]


def model_command(model: str) -> str:
    """A worker that prints vLLM's start-up lines and a request log line now and then."""
    lines = json.dumps(VLLM_LINES)
    script = textwrap.dedent(f"""\
        import os, time
        port = os.environ.get("PORT", "8000")
        for line in {lines}:
            print(line.format(model={model!r}, pid=os.getpid(), port=port), flush=True)
        n = 0
        while True:
            time.sleep(2)
            n += 1
            print(f'INFO:     127.0.0.1:4{{n % 1000:04d}} - "POST /v1/chat/completions HTTP/1.1" 200 OK', flush=True)
        """)
    return json.dumps(["python3", "-u", "-c", script])


def fleet(port: int) -> str:
    """Eight workers: hermes (two replicas), mixtral (two GPUs), phi3, openchat (starting),
    embed, rerank (crashing) and the gateway (no GPU)."""
    crash = json.dumps(["python3", "-u", "-c", (
        "print('INFO loading /srv/models/rerank'); "
        "print('ERROR CUDA out of memory. Tried to allocate 2.00 GiB'); raise SystemExit(1)")])
    return f"""
[services.hermes]
type = "command"
command = {model_command("hermes-3-8b")}
replicas = 2
port = {port}
gpus = 1

[services.mixtral]
type = "command"
command = {model_command("mixtral-8x7b")}
port = {port + 2}
gpus = [2, 3]

[services.phi3]
type = "command"
command = {model_command("phi-3-mini")}
port = {port + 3}
gpus = [4]

[services.openchat]
type = "command"
command = {model_command("openchat-3.6")}
port = {port + 4}
gpus = [5]
# Nothing answers on this port: the worker stays "starting", as vLLM does while it loads.
health = {{ http = "http://127.0.0.1:{port + 4}/health" }}

[services.embed]
type = "command"
command = {model_command("bge-m3")}
port = {port + 5}
gpus = [6]

[services.rerank]
type = "command"
command = {crash}
gpus = [7]
backoff_initial = 60
backoff_max = 60

[services.gateway]
type = "command"
command = ["python3", "-c", "import time; time.sleep(86400)"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="status-page-shot-"))
    host = root / "host.json"
    host.write_text(FAKE_HOST.read_text())
    exporter = free_port()
    # The services follow the [exporter] table Citadel writes: ui_logs lands in it.
    citadel = Citadel(root / "citadel", "ui_logs = true\n" + fleet(free_port_run(6)),
                      exporter_listen=f"127.0.0.1:{exporter}", env={"CITADEL_FAKE_NVML": str(host)})
    browser = Chromium(root / "chromium", window=(1360, 900))
    try:
        citadel.start()
        running = ["hermes.0", "hermes.1", "mixtral", "phi3", "embed", "gateway"]
        wait_until(lambda: citadel.all_running(running), 60, "the fleet")
        # phi3 was killed once, and came back.
        pid = citadel.status()["phi3"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (w := citadel.status()["phi3"])["state"] == "running" and w["pid"] != pid,
                   60, "phi3 back")
        hold_gpus(citadel, host)
        browser.start()
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{exporter}/")
        wait_until(lambda: page.evaluate("document.querySelectorAll('#workers tbody tr').length") == 8,
                   30, "the workers on the page")
        page.evaluate("document.querySelector('tr[data-worker=\"hermes.0\"]').click()")
        wait_until(lambda: "Uvicorn running" in page.evaluate("document.getElementById('log-lines').textContent"),
                   30, "hermes.0's output")
        wait_until(lambda: "66.0 / 79.6 GiB" in page.evaluate("document.getElementById('gpus').textContent"),
                   30, "the GPUs' memory")
        wait_until(lambda: page.evaluate("document.querySelector('tr[data-worker=\"rerank\"]').dataset.state")
                   == "backoff", 30, "rerank in backoff")
        errors = page.errors()
        if errors:
            raise SystemExit(f"the page reported errors: {errors}")
        page.screenshot(args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    finally:
        browser.close()
        citadel.stop()
        shutil.rmtree(root, ignore_errors=True)


def hold_gpus(citadel: Citadel, host: Path) -> None:
    """Give each GPU its workers' processes and memory in the fake host file (read again
    when it changes), as the models' weights and KV caches would take them."""
    status = citadel.status()
    used = {"hermes.0": 66, "hermes.1": 64, "mixtral": 71, "phi3": 18, "embed": 9}
    utilization = {"hermes.0": 63, "hermes.1": 48, "mixtral": 81, "phi3": 12, "embed": 4}
    data = json.loads(host.read_text())
    for name, gib in used.items():
        worker = status[name]
        for index in worker["gpus"]:
            share = gib // len(worker["gpus"]) if name != "mixtral" else gib
            data["gpus"][index].update(
                memory_used_mib=share * 1024, utilization=utilization[name],
                temperature=data["gpus"][index]["temperature"] + utilization[name] // 3,
                processes=[{"pid": worker["pid"], "used_mib": share * 1024}])
    host.write_text(json.dumps(data))


if __name__ == "__main__":
    main()
