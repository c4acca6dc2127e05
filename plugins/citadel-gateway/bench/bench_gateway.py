#!/usr/bin/env python3
"""The gateway's added latency and throughput, side by side with direct calls and LiteLLM's proxy.

    .venv/bin/python plugins/citadel-gateway/bench/bench_gateway.py [--rounds 5] [--batch 400]

One run starts a real citadeld (in a temp folder) with the FAKE upstream
(``tests/fake_upstream.py``: an OpenAI-shaped answer at once) and the
gateway in front of it, and LiteLLM's proxy (``litellm[proxy]``, installed
into its own venv on first use) in front of the same upstream. Then, in
rounds that alternate between the three so that they share the machine's
noise alike:

- latency: one request at a time, keep-alive, ``--batch`` requests per
  target and round; p50 and p99 of each, and the gateway's added p50 and
  p99 (gateway minus direct);
- throughput: ``--concurrency`` clients for ``--seconds`` per target;
- the gateway's CPU time per request (from /proc), which load on a shared
  machine does not skew the way it skews wall-clock latency.

It prints a Markdown table (and JSON with ``--json``). Limits checked:
added p50 <= 1 ms, added p99 <= 5 ms; the exit code is 1 when either fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from citadel_supervisor.testing import free_ports

HERE = Path(__file__).resolve().parent
FAKE = HERE.parent / "tests" / "fake_upstream.py"
BIN = Path(sys.executable).parent
LITELLM_VENV = Path(os.environ.get("CITADEL_BENCH_LITELLM_VENV", "/tmp/citadel-bench-litellm"))
KEY = "sk-bench-" + hashlib.sha256(str(os.getpid()).encode()).hexdigest()[:24]
BODY = json.dumps({"model": "fake", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_litellm() -> Path:
    """The ``litellm`` executable of the bench's own venv, installing it the first time."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print(f"installing litellm[proxy] into {LITELLM_VENV} (once; a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet",
                        "--disable-pip-version-check", "litellm[proxy]"], check=True)
    return exe


class Stack:
    """citadeld running the fake upstream and the gateway; LiteLLM beside them."""

    def __init__(self, root: Path, with_litellm: bool):
        self.root = root
        self.with_litellm = with_litellm
        # Picked together, so that none repeats.
        self.upstream_port, self.gateway_port, self.litellm_port = free_ports(3)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.litellm: subprocess.Popen[bytes] | None = None
        self.socket = root / "run" / "control.sock"

    def start(self) -> None:
        """Start everything and wait until each answers."""
        config = self.root / "citadeld.toml"
        key_hash = hashlib.sha256(KEY.encode()).hexdigest()
        config.write_text(textwrap.dedent(f"""\
            [daemon]
            control_socket = "{self.socket}"
            state_dir = "{self.root / 'run'}"
            log_dir = "{self.root / 'log'}"
            socket_group = ""
            log_level = "WARNING"
            [exporter]
            listen = ""
            [services.upstream]
            type = "command"
            command = {json.dumps([sys.executable, str(FAKE), "--port", str(self.upstream_port)])}
            port = {self.upstream_port}
            health = {{ http = "http://127.0.0.1:{self.upstream_port}/health", period = 0.2 }}
            [services.gateway]
            type = "gateway"
            listen = "127.0.0.1:{self.gateway_port}"
            routes = {{ fake = ["upstream"] }}
            after = ["upstream"]
            log_level = "WARNING"
            [[services.gateway.keys]]
            name = "bench"
            hash = "sha256:{key_hash}"
            """))
        log = (self.root / "citadeld.log").open("wb")
        self.daemon = subprocess.Popen([str(BIN / "citadeld"), "--config", str(config)],
                                       stdout=log, stderr=subprocess.STDOUT)
        if self.with_litellm:
            exe = ensure_litellm()
            (self.root / "litellm.yaml").write_text(textwrap.dedent(f"""\
                model_list:
                  - model_name: fake
                    litellm_params:
                      model: openai/fake
                      api_base: http://127.0.0.1:{self.upstream_port}/v1
                      api_key: none
                """))
            env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                   "LITELLM_TELEMETRY": "False"}
            self.litellm = subprocess.Popen(
                [str(exe), "--config", str(self.root / "litellm.yaml"), "--host", "127.0.0.1",
                 "--port", str(self.litellm_port), "--num_workers", "1"],
                stdout=(self.root / "litellm.log").open("wb"), stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.upstream_port}/health", 60)
        wait_http(f"http://127.0.0.1:{self.gateway_port}/healthz", 60)
        if self.with_litellm:
            wait_http(f"http://127.0.0.1:{self.litellm_port}/health/liveliness", 180)

    def gateway_pid(self) -> int:
        """The gateway worker's pid, from citadeld's status."""
        out = subprocess.run([str(BIN / "citadelctl"), "--socket", str(self.socket), "status", "--json"],
                             capture_output=True, text=True, check=True).stdout
        return next(w["pid"] for w in json.loads(out)["workers"] if w["name"] == "gateway")

    def stop(self) -> None:
        """Stop LiteLLM and citadeld (which stops its workers)."""
        if self.litellm is not None and self.litellm.poll() is None:
            os.killpg(self.litellm.pid, signal.SIGTERM)
            try:
                self.litellm.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.litellm.pid, signal.SIGKILL)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()


async def one(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    """One chat completion; raises on a non-200."""
    async with session.post(url, data=BODY, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")


async def latencies(session: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int) -> list[float]:
    """``n`` sequential requests; each one's seconds."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await one(session, url, headers)
        out.append(time.perf_counter() - start)
    return out


async def throughput(url: str, headers: dict[str, str], concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` clients on keep-alive connections."""
    done = 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await one(session, url, headers)
                done += 1
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one run."""
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    targets = {
        "direct": (f"http://127.0.0.1:{stack.upstream_port}/v1/chat/completions", auth),
        "gateway": (f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions", auth),
    }
    if stack.with_litellm:
        targets["litellm"] = (f"http://127.0.0.1:{stack.litellm_port}/v1/chat/completions", auth)
    samples: dict[str, list[float]] = {name: [] for name in targets}
    gw_pid = stack.gateway_pid()
    gw_cpu = 0.0
    async with aiohttp.ClientSession() as session:
        for url, headers in targets.values():
            await latencies(session, url, headers, args.warmup)
        for _ in range(args.rounds):
            for name, (url, headers) in targets.items():
                before = cpu_seconds(gw_pid)
                samples[name] += await latencies(session, url, headers, args.batch)
                if name == "gateway":
                    gw_cpu += cpu_seconds(gw_pid) - before
    rps = {name: await throughput(url, headers, args.concurrency, args.seconds)
           for name, (url, headers) in targets.items()}
    result: dict[str, Any] = {"load_average": os.getloadavg(), "requests_per_target": len(samples["direct"]),
                              "concurrency": args.concurrency, "targets": {}}
    for name, values in samples.items():
        result["targets"][name] = {"p50_ms": percentile(values, 0.5) * 1e3,
                                   "p99_ms": percentile(values, 0.99) * 1e3, "rps": rps[name]}
    direct, gateway = result["targets"]["direct"], result["targets"]["gateway"]
    result["gateway_added_p50_ms"] = gateway["p50_ms"] - direct["p50_ms"]
    result["gateway_added_p99_ms"] = gateway["p99_ms"] - direct["p99_ms"]
    result["gateway_cpu_us_per_request"] = gw_cpu / len(samples["gateway"]) * 1e6
    if "litellm" in result["targets"]:
        lite = result["targets"]["litellm"]
        result["litellm_added_p50_ms"] = lite["p50_ms"] - direct["p50_ms"]
        result["litellm_added_p99_ms"] = lite["p99_ms"] - direct["p99_ms"]
    return result


def report(result: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    load = " ".join(f"{x:.2f}" for x in result["load_average"])
    lines = [(f"load average at the end: {load}; {result['requests_per_target']} sequential "
              f"requests per target; throughput with {result['concurrency']} concurrent clients"), "",
             "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    direct = result["targets"]["direct"]
    for name, t in result["targets"].items():
        added = ("-", "-") if name == "direct" else (f"{t['p50_ms'] - direct['p50_ms']:.3f}",
                                                     f"{t['p99_ms'] - direct['p99_ms']:.3f}")
        lines.append(f"| {name} | {t['p50_ms']:.3f} | {t['p99_ms']:.3f} | {added[0]} | {added[1]} | "
                     f"{t['rps']:.0f} |")
    lines += ["", f"gateway CPU per request: {result['gateway_cpu_us_per_request']:.0f} µs"]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark; exit 1 when the gateway misses its latency limits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=400, help="sequential requests per target and round")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="of throughput per target")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="citadel-bench-gateway-"))
    stack = Stack(root, with_litellm=not args.no_litellm)
    try:
        stack.start()
        result = asyncio.run(measure(stack, args))
    finally:
        stack.stop()
    print(json.dumps(result, indent=2) if args.json else report(result))
    ok = result["gateway_added_p50_ms"] <= 1.0 and result["gateway_added_p99_ms"] <= 5.0
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"gateway over its limits (added p50 <= 1 ms, p99 <= 5 ms); logs in {root}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
