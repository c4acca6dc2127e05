"""citadeld beside supervisord 4.3.0: restart latency, stop-all, idle cost.

    .venv/bin/python bench/bench_supervisor.py [--kills 20] [--rounds 3] [--idle 30]

Both daemons run at once, each with 8 small Python workers that take 0.5 s
to exit on SIGTERM; every measurement alternates between them, so both see
the same noise. Prints Markdown tables (see docs/benchmarks.md).

Restart latency: a worker that has run stably (citadeld: ``stable_after =
1``; supervisord: ``startsecs = 1``, ``autorestart = true``) is killed with
SIGKILL, and three delays are taken from the kill:

- fork: the new process's start time in ``/proc/PID/stat`` (CLOCK_BOOTTIME,
  1/CLK_TCK = 10 ms resolution, truncated down);
- exec: the first poll (every 1 ms) of ``/proc`` that shows the new process
  with the worker's argv;
- status: the first poll (every 5 ms, from the exec on) of the daemon's own
  status (citadeld ``/v1/status``, supervisord ``getAllProcessInfo``) that
  shows the new pid as running.

Stop-all: ``citadelctl stop --all --wait`` and ``supervisorctl stop all``,
against the slowest single stop (``citadelctl stop NAME --wait``,
``supervisorctl stop NAME``), through the CLIs (wall time, start-up of the
CLI included) and through the APIs in-process.

Idle: CPU time of the daemon process itself (``/proc/PID/stat`` utime +
stime; its children excluded) over ``--idle`` seconds with nothing polling
it, and its RSS.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Citadel,
    Supervisord,
    boottime,
    cpu_seconds,
    loadavg,
    machine,
    median,
    ms,
    percentile,
    rss_bytes,
    start_boottime,
    table,
    wait_until,
    worker_pids,
)

WORKERS = 8
STABLE = 1.0          # citadeld stable_after, supervisord startsecs
STABLE_MARGIN = 0.5   # a worker is killed only once up STABLE + this
EXIT_DELAY = 0.5      # how long a worker takes to exit on SIGTERM
MARKER = "benchw"
# Worker names unique to this run: citadeld names each worker's cgroup after the
# worker, host-wide, so a common name ("w0") would meet another citadeld's worker.
NAMES = [f"bench{os.getpid()}w{i}" for i in range(WORKERS)]

WORKER_CODE = f"""\
import signal, sys, time
def on_term(signum, frame):
    time.sleep({EXIT_DELAY})  # a worker that takes a moment to exit
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    signal.pause()
"""


class Side:
    """One daemon under test, with the calls the measurements need."""

    def __init__(self, name: str, daemon: Any, names: list[str], running: Callable[[], dict[str, int]],
                 stop_one_cli: Callable[[str], float], stop_all_cli: Callable[[], float],
                 stop_one_api: Callable[[str], None], stop_all_api: Callable[[], None],
                 start_all: Callable[[], None]):
        self.name = name
        self.daemon = daemon
        self.names = names
        self.running = running
        self.stop_one_cli = stop_one_cli
        self.stop_all_cli = stop_all_cli
        self.stop_one_api = stop_one_api
        self.stop_all_api = stop_all_api
        self.start_all = start_all

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.daemon.pid

    def pids(self) -> dict[str, int]:
        """``{worker: pid}`` of the live workers, from /proc."""
        return {label[len(MARKER) + 1:]: pid for label, pid in worker_pids(self.pid, MARKER).items()}

    def wait_all_up(self, stable: bool = False, timeout: float = 30) -> dict[str, int]:
        """Wait until all workers run (and with ``stable``, have run long enough); their pids."""
        def ready() -> dict[str, int] | None:
            pids = self.pids()
            if len(pids) < len(self.names):
                return None
            if stable and any(boottime() - start_boottime(p) < STABLE + STABLE_MARGIN for p in pids.values()):
                return None
            running = self.running()
            return pids if all(running.get(n) == pids[n] for n in self.names) else None
        return wait_until(ready, timeout, f"{self.name}'s workers to run", 0.05)


def make_citadel(root: Path, python: str, script: Path, label: str = "citadeld",
                 env: dict[str, str] | None = None, names: list[str] | None = None) -> Side:
    names = names or list(NAMES)
    services = "".join(f"""
        [services.{name}]
        type = "command"
        command = ["{python}", "{script}", "{MARKER}-{name}"]
        restart = "always"
        stable_after = {STABLE}
        start_limit_burst = 10000
        stop_timeout = 10
        """ for name in names)
    d = Citadel(root, services, env=env).start()

    def running() -> dict[str, int]:
        return {n: w["pid"] for n, w in d.status().items() if w["state"] == "running"}

    return Side(
        label, d, names, running,
        stop_one_cli=lambda n: d.ctl("stop", n, "--wait"),
        stop_all_cli=lambda: d.ctl("stop", "--all", "--wait"),
        stop_one_api=lambda n: d.request("POST", "/v1/stop", {"names": [n], "wait": True}),
        stop_all_api=lambda: d.request("POST", "/v1/stop", {"all": True, "wait": True}),
        start_all=lambda: d.request("POST", "/v1/start", {"all": True}),
    )


def make_supervisord(root: Path, python: str, script: Path) -> Side:
    names = list(NAMES)
    programs = {name: f"""\
        command = {python} {script} {MARKER}-{name}
        autostart = true
        autorestart = true
        startsecs = {STABLE:g}
        startretries = 10000
        stopsignal = TERM
        stopwaitsecs = 10
        """ for name in names}
    d = Supervisord(root, programs).start()

    def running() -> dict[str, int]:
        return {n: p["pid"] for n, p in d.info().items() if p["statename"] == "RUNNING"}

    return Side(
        "supervisord", d, names, running,
        stop_one_cli=lambda n: d.ctl("stop", n),
        stop_all_cli=lambda: d.ctl("stop", "all"),
        stop_one_api=lambda n: d.rpc.supervisor.stopProcess(n, True),
        stop_all_api=lambda: d.rpc.supervisor.stopAllProcesses(True),
        start_all=lambda: d.rpc.supervisor.startAllProcesses(False),
    )


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def measure_idle(sides: list[Side], seconds: float) -> dict[str, dict[str, float]]:
    """CPU share of one core and RSS of each daemon, over the same ``seconds``."""
    for side in sides:
        side.wait_all_up()
    time.sleep(2.0)  # let start-up work settle
    before = {s.name: (cpu_seconds(s.pid), time.monotonic()) for s in sides}
    time.sleep(seconds)
    out = {}
    for s in sides:
        cpu0, t0 = before[s.name]
        used = cpu_seconds(s.pid) - cpu0
        out[s.name] = {"cpu_pct": 100 * used / (time.monotonic() - t0), "cpu_s": used,
                       "rss_mb": rss_bytes(s.pid) / 1e6}
    return out


def kill_once(side: Side, worker: str) -> dict[str, float]:
    """SIGKILL a stably running worker; delays from the kill to fork, exec and status."""
    pids = side.wait_all_up(stable=True)
    old = pids[worker]
    t_boot = boottime()
    t0 = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    deadline = t0 + 30
    new = None
    while time.perf_counter() < deadline:
        new = side.pids().get(worker)
        if new is not None and new != old:
            break
        time.sleep(0.001)
    else:
        raise TimeoutError(f"{side.name}: {worker} did not come back")
    t_exec = time.perf_counter() - t0
    t_fork = start_boottime(new) - t_boot
    while time.perf_counter() < deadline:
        if side.running().get(worker) == new:
            break
        time.sleep(0.005)
    t_status = time.perf_counter() - t0
    return {"fork": t_fork, "exec": t_exec, "status": t_status}


def measure_restarts(sides: list[Side], kills: int) -> dict[str, dict[str, list[float]]]:
    """``kills`` kills per daemon, alternating between the daemons and round the workers."""
    out: dict[str, dict[str, list[float]]] = {s.name: {"fork": [], "exec": [], "status": []} for s in sides}
    for i in range(kills):
        for side in sides:
            worker = side.names[i % len(side.names)]
            for key, value in kill_once(side, worker).items():
                out[side.name][key].append(value)
        print(f"  kill {i + 1}/{kills} done (load {loadavg()})", file=sys.stderr)
    return out


def measure_stops(sides: list[Side], rounds: int) -> dict[str, dict[str, float]]:
    """Stop-all vs the slowest single stop, by CLI and by API; medians over ``rounds``."""
    found: dict[str, dict[str, list[float]]] = {
        s.name: {"all_cli": [], "one_cli": [], "all_api": [], "one_api": []} for s in sides}
    for r in range(rounds):
        for via in ("cli", "api"):
            for side in sides:
                singles = []
                for worker in side.names:
                    side.wait_all_up()
                    t0 = time.perf_counter()
                    if via == "cli":
                        side.stop_one_cli(worker)
                    else:
                        side.stop_one_api(worker)
                    singles.append(time.perf_counter() - t0)
                    side.start_all()
                found[side.name][f"one_{via}"].append(max(singles))
                side.wait_all_up()
                t0 = time.perf_counter()
                if via == "cli":
                    side.stop_all_cli()
                else:
                    side.stop_all_api()
                found[side.name][f"all_{via}"].append(time.perf_counter() - t0)
                if side.pids():
                    raise RuntimeError(f"{side.name}: workers left after stop-all: {side.pids()}")
                side.start_all()
        print(f"  stop round {r + 1}/{rounds} done (load {loadavg()})", file=sys.stderr)
    return {name: {k: median(v) for k, v in d.items()} for name, d in found.items()}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def report(idle: dict[str, dict[str, float]], restarts: dict[str, dict[str, list[float]]],
           stops: dict[str, dict[str, float]], kills: int, rounds: int, idle_s: float) -> str:
    names = list(idle)
    out = []
    rows = []
    for metric in ("fork", "exec", "status"):
        for n in names:
            v = restarts[n][metric]
            rows.append([f"{metric}", n, ms(percentile(v, 50)), ms(percentile(v, 95)), ms(max(v))])
    out.append(f"### Restart latency after SIGKILL of a stable worker ({kills} kills each)\n")
    out.append(table(["from the kill to", "daemon", "p50", "p95", "max"], rows))
    if len(names) == 2:
        a, b = names
        ratio = percentile(restarts[b]["status"], 50) / max(percentile(restarts[a]["status"], 50), 1e-9)
        ratio_f = percentile(restarts[b]["exec"], 50) / max(percentile(restarts[a]["exec"], 50), 1e-9)
        out.append(f"\n{b} / {a}, p50: status {ratio:.1f}x, exec {ratio_f:.1f}x")
    p50 = percentile(restarts["citadeld"]["status"], 50)
    out.append(f"\nTarget citadeld status p50 <= 50 ms: {'met' if p50 <= 0.050 else 'MISSED'} ({ms(p50)})")

    rows = []
    for n in names:
        s = stops[n]
        rows.append([n, "CLI", ms(s["all_cli"]), ms(s["one_cli"]), ms(s["all_cli"] - s["one_cli"])])
        rows.append([n, "API", ms(s["all_api"]), ms(s["one_api"]), ms(s["all_api"] - s["one_api"])])
    out.append(f"\n### Stopping {WORKERS} workers that take {EXIT_DELAY:g} s to exit (median of {rounds} rounds)\n")
    out.append(table(["daemon", "via", "stop all", "slowest single stop", "difference"], rows))
    if len(names) == 2:
        a, b = names
        out.append(f"\n{b} / {a}, stop all via CLI: {stops[b]['all_cli'] / stops[a]['all_cli']:.1f}x")
    c = stops["citadeld"]
    worst = max(c["all_cli"] - c["one_cli"], c["all_api"] - c["one_api"])
    out.append(f"\nTarget citadeld stop-all within 0.2 s of the slowest single stop: "
               f"{'met' if worst <= 0.2 else 'MISSED'} (worst difference {ms(worst)})")

    rows = [[n, f"{idle[n]['cpu_pct']:.3f} %", f"{idle[n]['cpu_s'] * 1000:.0f} ms", f"{idle[n]['rss_mb']:.1f} MB"]
            for n in names]
    out.append(f"\n### Idle with {WORKERS} workers running, over {idle_s:g} s (daemon process only)\n")
    out.append(table(["daemon", "CPU (% of one core)", "CPU time", "RSS"], rows))
    ci = idle["citadeld"]
    out.append(f"\nTarget citadeld idle <= 0.1 % of a core and <= 60 MB RSS: "
               f"{'met' if ci['cpu_pct'] <= 0.1 and ci['rss_mb'] <= 60 else 'MISSED'}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per daemon")
    parser.add_argument("--rounds", type=int, default=3, help="stop-all rounds per daemon and way")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    parser.add_argument("--no-supervisord", action="store_true", help="citadeld alone")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (daemon logs)")
    args = parser.parse_args()

    python = os.path.realpath(sys.executable)  # the interpreter itself, not a venv or pyenv shim
    root = Path(tempfile.mkdtemp(prefix="citadel-bench-sup-"))
    script = root / "worker.py"
    script.write_text(WORKER_CODE)
    sides: list[Side] = []
    try:
        sides.append(make_citadel(root / "citadeld", python, script))
        if not args.no_supervisord:
            sides.append(make_supervisord(root / "supervisord", python, script))
        print(f"machine: {machine()}; load {loadavg()}", file=sys.stderr)
        print(f"idle for {args.idle:g} s ...", file=sys.stderr)
        idle = measure_idle(sides, args.idle)
        print(f"restart latency, {args.kills} kills each ...", file=sys.stderr)
        restarts = measure_restarts(sides, args.kills)
        print(f"stop-all, {args.rounds} rounds ...", file=sys.stderr)
        stops = measure_stops(sides, args.rounds)
        print(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {machine()}; load at end {loadavg()} -->\n")
        print(report(idle, restarts, stops, args.kills, args.rounds, args.idle))
    finally:
        for side in sides:
            side.daemon.stop()
        if args.keep:
            print(f"\nlogs kept in {root}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
