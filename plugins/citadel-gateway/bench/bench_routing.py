#!/usr/bin/env python3
"""The gateway's routing policies side by side, in front of two real vLLM replicas on the CPU.

    .venv/bin/python plugins/citadel-gateway/bench/bench_routing.py [--rounds 3] [--requests 40] [--json]

One run starts a real citadeld (in a temp folder) with two vLLM workers of
SmolLM2-135M (``var/models``, ``.venv-vllm``: ``scripts/setup-models``;
``CITADEL_MODEL_DIR`` and ``CITADEL_VLLM_PYTHON`` point elsewhere), each bound
to one core, and four gateways in front of both, one per policy:

- ``least-outstanding`` (the default);
- ``engine-load``;
- ``engine-load`` with ``prefix_affinity`` (its defaults);
- the same with ``slack = 1``: affinity gives way sooner to a busier worker.

Once both replicas are ready, every thread of each one's process tree (API
server, EngineCore, worker) is pinned to its core, ``fast`` to CPU 0 and
``slow`` to CPU 1: binding only the engine's OpenMP threads
(``VLLM_CPU_OMP_THREADS_BIND``, also set) left the API servers and EngineCores
floating onto the other core, where they slowed ``fast`` as much as the burner
slowed ``slow``. Then ``--burners`` CPU burners (default one) spin on CPU 1 at
``--burner-nice`` (default -5, which leaves the engine about a quarter of the
core; a negative nice needs root, and without it a burner runs at nice 0 and
says so). citadeld, the gateways and this client float. The run prints each
replica's CPU binding, read from ``/proc``.

Then, in rounds that rotate the order of the four so that they share the
machine's noise alike, each gateway gets the same mix: ``--requests`` chat
completions from ``--concurrency`` clients, each with one of ``--prefixes``
long system prompts (about 1500 characters; a new set for every policy and
round, so that no phase finds another's prefixes in the cache) and a short
question of its own, ``max_tokens`` 16, temperature 0.

Per policy: p50 and p99 latency, throughput (requests over the phases' wall
time), the share of requests the slowed replica served, each replica's mean
request time as vLLM measured it (``vllm:e2e_request_latency_seconds``), and
vLLM's own prefix cache hit rate (``vllm:prefix_cache_hits`` over
``vllm:prefix_cache_queries``, in tokens, the delta over the phases, both
replicas together). It prints a Markdown table (and JSON with ``--json``);
ratios are against least-outstanding. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from citadel_supervisor.control.client import ControlClient, ControlError, DaemonUnreachableError
from citadel_supervisor.services.vllm_metrics import read_engine
from citadel_supervisor.testing import free_ports

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
VLLM_PYTHON = Path(os.environ.get("CITADEL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL_DIR = Path(os.environ.get("CITADEL_MODEL_DIR", REPO / "var" / "models"))
CHAT_MODEL = MODEL_DIR / "smollm2-135m-instruct"
GATEWAYS = {
    "least-outstanding": 'policy = "least-outstanding"',
    "engine-load": 'policy = "engine-load"',
    "engine-load + affinity": 'policy = "engine-load"\nprefix_affinity = {}',
    "engine-load + affinity, slack 1": 'policy = "engine-load"\nprefix_affinity = { slack = 1 }',
}
WORDS = ["harbour", "tide", "anchor", "gull", "lantern", "keel", "compass", "reef", "current",
         "voyage", "sail", "beacon", "ridge", "valley", "meadow", "orchard", "river", "stone", "ember",
         "glacier", "canyon", "prairie", "summit", "thicket"]
BURNER = """\
import os, sys
os.sched_setaffinity(0, {%d})
try:
    os.nice(%d)
except PermissionError:
    print("burner: cannot lower its nice value (not root): it runs at nice 0", file=sys.stderr)
while True:
    pass
"""


def system_prompt(rng: random.Random) -> str:
    """About 1500 characters of made-up instructions, different for every seed."""
    words = [rng.choice(WORDS) for _ in range(230)]
    return "You are a helpful assistant for a company that cares about " + " ".join(words) + "."


def questions(rng: random.Random, requests: int, prefixes: int) -> list[list[dict[str, str]]]:
    """``requests`` chats over ``prefixes`` system prompts, shuffled."""
    systems = [system_prompt(rng) for _ in range(prefixes)]
    chats = [[{"role": "system", "content": systems[i % prefixes]},
              {"role": "user", "content": f"In one short sentence, what is a {rng.choice(WORDS)}? ({i})"}]
             for i in range(requests)]
    rng.shuffle(chats)
    return chats


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1), by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def engine_counters(port: int) -> dict[str, float]:
    """A replica's prefix-cache counters and finished requests, from its own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        page = resp.read().decode(errors="replace")
    engine = read_engine(page)
    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                   if line.startswith((name + "{", name + " ")))

    return {"queries": engine.prefix_cache_queries or 0.0, "hits": engine.prefix_cache_hits or 0.0,
            "requests": total("vllm:request_success_total"),
            "e2e_sum": total("vllm:e2e_request_latency_seconds_sum"),
            "e2e_count": total("vllm:e2e_request_latency_seconds_count")}


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            continue
    return found


class Stack:
    """citadeld with the two replicas and the four gateways, and the burner."""

    def __init__(self, root: Path, burners: int, burner_nice: int):
        self.root = root
        self.socket = root / "run" / "control.sock"
        ports = free_ports(2 + len(GATEWAYS))
        self.replica_ports = {"fast": ports[0], "slow": ports[1]}
        self.gateway_ports = dict(zip(GATEWAYS, ports[2:], strict=True))
        self.burner_count = burners
        self.burner_nice = burner_nice
        self.daemon: subprocess.Popen[bytes] | None = None
        self.burners: list[subprocess.Popen[bytes]] = []

    def config(self) -> str:
        """The citadeld config."""
        text = textwrap.dedent(f"""\
            [daemon]
            control_socket = "{self.socket}"
            state_dir = "{self.root / 'run'}"
            log_dir = "{self.root / 'log'}"
            socket_group = ""
            log_level = "WARNING"
            cgroups = "off"
            [exporter]
            listen = ""
            """)
        for core, (name, port) in enumerate(self.replica_ports.items()):
            text += textwrap.dedent(f"""\
                [services.{name}]
                type = "vllm"
                model = "{CHAT_MODEL}"
                served_model_name = "smollm2"
                python = "{VLLM_PYTHON}"
                port = {port}
                max_model_len = 1024
                args = ["--enforce-eager"]
                env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1", VLLM_CPU_OMP_THREADS_BIND = "{core}" }}
                startup_timeout = 600
                """)
        for i, (policy, settings) in enumerate(GATEWAYS.items()):
            text += f'[services.gw{i}]\ntype = "gateway"\nlisten = "127.0.0.1:{self.gateway_ports[policy]}"\n'
            text += f'log_level = "WARNING"\n{settings}\n'
        return text

    def start(self) -> None:
        """Start citadeld, wait until every worker is ready, then start the burner."""
        config = self.root / "citadeld.toml"
        config.write_text(self.config())
        log = (self.root / "citadeld.log").open("wb")
        self.daemon = subprocess.Popen([str(BIN / "citadeld"), "--config", str(config)],
                                       stdout=log, stderr=subprocess.STDOUT)
        client = ControlClient(str(self.socket))
        deadline = time.monotonic() + 900
        while True:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"citadeld exited; see {self.root / 'citadeld.log'}")
            try:
                workers = client.call("GET", "/v1/status")["workers"]
            except (DaemonUnreachableError, ControlError, OSError, ValueError):
                workers = []  # not listening yet
            if workers and all(w["ready"] for w in workers):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker was ready in 900 s; see {self.root}")
            time.sleep(1)
        self.pin()
        self.burners = [subprocess.Popen([sys.executable, "-c", BURNER % (1, self.burner_nice)])
                        for _ in range(self.burner_count)]  # on the slow one's core

    def pin(self) -> None:
        """Pin every thread of each replica's process tree to its core (``fast`` 0, ``slow`` 1)."""
        client = ControlClient(str(self.socket))
        cores = {name: core for core, name in enumerate(self.replica_ports)}
        for worker in client.call("GET", "/v1/status")["workers"]:
            if worker["name"] not in cores or not worker["pid"]:
                continue
            for pid in tree(worker["pid"]):
                for task in Path(f"/proc/{pid}/task").glob("*"):
                    try:
                        os.sched_setaffinity(int(task.name), {cores[worker["name"]]})
                    except OSError:
                        continue  # a thread that ended meanwhile

    def bindings(self) -> dict[str, str]:
        """Each replica's engine threads' CPUs (``Cpus_allowed_list``, from /proc), by replica."""
        client = ControlClient(str(self.socket))
        found = {}
        for worker in client.call("GET", "/v1/status")["workers"]:
            if worker["name"] not in self.replica_ports or not worker["pid"]:
                continue
            cpus: dict[str, int] = {}
            for pid in tree(worker["pid"]):
                for status in Path(f"/proc/{pid}/task").glob("*/status"):
                    try:
                        line = next(x for x in status.read_text().splitlines()
                                    if x.startswith("Cpus_allowed_list:"))
                    except (OSError, StopIteration):
                        continue
                    key = line.split(":", 1)[1].strip()
                    cpus[key] = cpus.get(key, 0) + 1
            found[worker["name"]] = ", ".join(f"{n} threads on CPUs {k}" for k, n in sorted(cpus.items()))
        return found

    def stop(self) -> None:
        """Stop the burner and citadeld (which stops its workers)."""
        for burner in self.burners:
            burner.kill()
            burner.wait()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()


async def phase(port: int, chats: list[list[dict[str, str]]], concurrency: int,
                max_tokens: int) -> tuple[list[float], float]:
    """Send every chat through the gateway on ``port`` from ``concurrency`` clients; each
    request's seconds, and the phase's wall time."""
    todo = list(chats)
    latencies: list[float] = []
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client() -> None:
            while todo:
                messages = todo.pop()
                body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0}
                start = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway on {port}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - start)
        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, time.perf_counter() - began


def run(args: argparse.Namespace, stack: Stack) -> dict[str, dict[str, Any]]:
    """The rounds; the figures per policy."""
    totals: dict[str, dict[str, Any]] = {
        p: {"latencies": [], "seconds": 0.0, "queries": 0.0, "hits": 0.0, "slow": 0.0, "served": 0.0,
            "e2e": {name: [0.0, 0.0] for name in stack.replica_ports}}
        for p in GATEWAYS}
    # Warm-up: the first requests of a fresh vLLM are slow; each replica gets a few.
    asyncio.run(phase(stack.gateway_ports["least-outstanding"],
                      questions(random.Random(-1), 4, 4), 2, args.max_tokens))
    order = list(GATEWAYS)
    for round_no in range(args.rounds):
        for policy in order[round_no % len(order):] + order[:round_no % len(order)]:
            chats = questions(random.Random(f"{round_no}/{policy}"), args.requests, args.prefixes)
            before = {name: engine_counters(port) for name, port in stack.replica_ports.items()}
            latencies, seconds = asyncio.run(phase(stack.gateway_ports[policy], chats,
                                                   args.concurrency, args.max_tokens))
            after = {name: engine_counters(port) for name, port in stack.replica_ports.items()}
            t = totals[policy]
            t["latencies"] += latencies
            t["seconds"] += seconds
            for name in stack.replica_ports:
                delta = {k: after[name][k] - before[name][k] for k in after[name]}
                t["queries"] += delta["queries"]
                t["hits"] += delta["hits"]
                t["served"] += delta["requests"]
                t["e2e"][name][0] += delta["e2e_sum"]
                t["e2e"][name][1] += delta["e2e_count"]
                if name == "slow":
                    t["slow"] += delta["requests"]
            print(f"round {round_no + 1} {policy}: {len(latencies)} requests in {seconds:.1f} s",
                  file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for policy, t in totals.items():
        lat = t["latencies"]
        results[policy] = {
            "requests": len(lat),
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
            "mean_s": statistics.fmean(lat),
            "throughput_rps": len(lat) / t["seconds"],
            "slow_share": t["slow"] / t["served"] if t["served"] else float("nan"),
            "prefix_hit_rate": t["hits"] / t["queries"] if t["queries"] else float("nan"),
            "engine_mean_s": {name: (s / n if n else float("nan")) for name, (s, n) in t["e2e"].items()},
        }
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown table, with ratios against least-outstanding."""
    base = results["least-outstanding"]
    header = ("| policy | requests | p50 (s) | p99 (s) | throughput (req/s) | p50 ratio | p99 ratio | "
              "throughput ratio | served by the slowed replica | vLLM mean request time, fast / slow (s) | "
              "vLLM prefix cache hit rate |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, r in results.items():
        lines.append(
            f"| {policy} | {r['requests']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
            f"{r['throughput_rps']:.2f} | {r['p50_s'] / base['p50_s']:.2f} | "
            f"{r['p99_s'] / base['p99_s']:.2f} | {r['throughput_rps'] / base['throughput_rps']:.2f} | "
            f"{r['slow_share']:.0%} | {r['engine_mean_s']['fast']:.2f} / {r['engine_mean_s']['slow']:.2f} | "
            f"{r['prefix_hit_rate']:.1%} |")
    return "\n".join(lines)


def main() -> int:
    """Run the bench; 0 when it ran."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the policies")
    parser.add_argument("--requests", type=int, default=40, help="requests per policy and round")
    parser.add_argument("--concurrency", type=int, default=4, help="clients at once")
    parser.add_argument("--prefixes", type=int, default=8, help="distinct system prompts per phase")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--burners", type=int, default=1,
                        help="CPU burners on the slow replica's core (0: leave it alone)")
    parser.add_argument("--burner-nice", type=int, default=-5,
                        help="the burners' nice value (negative: more of the core; needs root)")
    parser.add_argument("--json", action="store_true", help="print JSON after the table")
    args = parser.parse_args()
    for needed in (VLLM_PYTHON, CHAT_MODEL):
        if not needed.exists():
            print(f"{needed} is missing: run ./scripts/setup-models", file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="citadel-bench-routing-"))
    stack = Stack(root, burners=args.burners, burner_nice=args.burner_nice)
    try:
        started = time.monotonic()
        stack.start()
        print(f"ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        for name, cpus in stack.bindings().items():
            print(f"{name}: {cpus}", file=sys.stderr)
        results = run(args, stack)
    finally:
        stack.stop()
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
