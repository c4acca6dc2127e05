"""A worker writing 50 MB/s to stdout: the daemon's loop lag, memory and disk.

    .venv/bin/python bench/bench_output.py [--rate 50] [--seconds 30] [--no-supervisord]

One worker writes vLLM-like lines of 100 to 200 bytes to its stdout at ``--rate`` MB/s
(paced every 10 ms; a write blocks when the daemon does not read fast
enough, so the achieved rate is what the daemon really took) for
``--seconds``, then goes quiet. Around it, for a baseline before the flood,
during it, and for a while after it:

- loop lag, inside citadeld: a probe task (started by the bench's launcher,
  ``_common.py lag-probe``) sleeps 10 ms again and again and records how late
  each wake-up is;
- answer time, from outside: ``GET /v1/version`` on the control socket every
  10 ms, one new connection each, as ``citadelctl`` does;
- RSS of the daemon, and the bytes in its log folder, every second.

Then the same worker under supervisord 4.3.0 (its ``stdout_logfile`` rotated
at the same size), probed with the XML-RPC ``supervisor.getState`` call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    cpu_seconds,
    loadavg,
    machine,
    ms,
    percentile,
    read_lag_probe,
    rss_bytes,
    table,
    wait_until,
)

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
BASELINE = 5.0   # seconds measured before the flood
AFTER = 5.0      # and after it
PROBE_EVERY = 0.01
# A name unique to this run: citadeld names each worker's cgroup after the
# worker, host-wide, so a common name ("flood") would meet another citadeld's worker.
NAME = f"bench{os.getpid()}flood"

WRITER_CODE = """\
import json, os, random, signal, sys, time
rate, seconds, go, stats = float(sys.argv[1]) * 1e6, float(sys.argv[2]), sys.argv[3], sys.argv[4]
tick = 0.01
rng = random.Random(7)
lines, size, i = [], 0, 0
while size < rate * tick:  # 10 ms worth of vLLM-like lines of 100 to 200 bytes
    ts = f"11-27 13:{(i // 60) % 60:02d}:{i % 60:02d}"
    kind = i % 4
    if kind == 0:
        text = (f"INFO {ts} [metrics.py:455] Avg prompt throughput: {rng.random() * 900:.1f} tokens/s, "
                f"Avg generation throughput: {rng.random() * 90:.1f} tokens/s, Running: {rng.randint(0, 9)} reqs, "
                f"Pending: {rng.randint(0, 3)} reqs, GPU KV cache usage: {rng.random() * 100:.1f}%.")
    elif kind == 1:
        text = f'INFO:     127.0.0.1:{rng.randint(30000, 60000)} - "POST /v1/chat/completions HTTP/1.1" 200 OK'
    elif kind == 2:
        text = (f"DEBUG {ts} [async_llm_engine.py:{rng.randint(100, 999)}] Added request "
                f"chatcmpl-{rng.getrandbits(128):032x}, prompt len {rng.randint(10, 4000)}.")
    else:
        text = (f"INFO {ts} [engine.py:{rng.randint(100, 999)}] Finished request cmpl-{rng.getrandbits(96):024x}: "
                f"{rng.randint(1, 2000)} generated, finish_reason=stop")
    n = rng.randint(100, 200)
    line = (text + " " + "." * n)[: n - 1] + "\\n"
    lines.append(line.encode())
    size += len(line)
    i += 1
block = b"".join(lines)
while not os.path.exists(go):
    time.sleep(0.01)
t0 = time.monotonic()
sent, stall, last_stats = 0, 0.0, t0
def write_stats(now):
    with open(stats + ".tmp", "w") as fh:
        json.dump({"seconds": now - t0, "bytes": sent, "max_write_s": stall}, fh)
    os.replace(stats + ".tmp", stats)
while True:
    now = time.monotonic()
    if now - t0 >= seconds:
        break
    if sent < rate * (now - t0 + tick):
        w0 = time.monotonic()
        view = memoryview(block)
        while view:
            view = view[os.write(1, view):]
        stall = max(stall, time.monotonic() - w0)
        sent += len(block)
    else:
        time.sleep(tick / 2)
    if now - last_stats >= 1.0:
        write_stats(now)
        last_stats = now
write_stats(time.monotonic())
while True:  # quiet, but alive: no restart muddles the figures
    signal.pause()
"""


def folder_bytes(path: Path) -> int:
    """Bytes in the files directly under ``path``."""
    total = 0
    for entry in os.scandir(path):
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat().st_size
        except FileNotFoundError:  # rotated away between the listing and the stat
            continue
    return total


def run_phases(pid: int, probe: Callable[[], None], log_dir: Path, go: Path, flood_s: float
               ) -> dict[str, Any]:
    """Probe every 10 ms through baseline, flood and after; sample RSS and disk each second."""
    phases: dict[str, list[float]] = {"baseline": [], "flood": [], "after": []}
    samples: list[tuple[float, int, int]] = []
    bounds: dict[str, tuple[float, float]] = {}
    cpu: dict[str, float] = {}
    start = time.time()
    plan = [("baseline", BASELINE), ("flood", flood_s), ("after", AFTER)]
    next_sample = 0.0
    for phase, length in plan:
        if phase == "flood":
            go.touch()
        t_begin = time.time()
        cpu0, mono0 = cpu_seconds(pid), time.monotonic()
        end = time.monotonic() + length
        while time.monotonic() < end:
            t0 = time.perf_counter()
            probe()
            took = time.perf_counter() - t0
            phases[phase].append(took)
            if time.monotonic() >= next_sample:
                samples.append((time.time() - start, rss_bytes(pid), folder_bytes(log_dir)))
                next_sample = time.monotonic() + 1.0
            time.sleep(max(0.0, PROBE_EVERY - took))
        bounds[phase] = (t_begin, time.time())
        cpu[phase] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - mono0)
        print(f"  {phase} done (load {loadavg()})", file=sys.stderr)
    return {"answer": phases, "samples": samples, "bounds": bounds, "cpu": cpu}


def writer_stats(path: Path, where: Path) -> dict[str, float]:
    """What the writer says it wrote; an error naming ``where`` (its logs) if it wrote nothing."""
    if not path.exists():
        raise RuntimeError(f"the writer reported nothing: did it start? see the logs under {where} (--keep)")
    return json.loads(path.read_text())


def bench_citadel(root: Path, python: str, writer: Path, rate: float, seconds: float) -> dict[str, Any]:
    go, stats, lag = root / "go", root / "writer.json", root / "lag.txt"
    services = f"""
        [services.{NAME}]
        type = "command"
        command = ["{python}", "{writer}", "{rate}", "{seconds}", "{go}", "{stats}"]
        restart = "never"
        """
    extra = f"log_max_bytes = {MAX_BYTES}\nlog_backups = {BACKUPS}\n"
    d = Citadel(root, services, daemon_extra=extra, lag_probe=lag).start()
    try:
        wait_until(lambda: d.status().get(NAME, {}).get("state") == "running", 30, "the writer to run")
        result = run_phases(d.pid, lambda: d.get("/v1/version"), d.log_dir, go, seconds)
        rows = read_lag_probe(lag)
        result["lag"] = {p: [lag for t, lag in rows if b[0] <= t < b[1]] for p, b in result["bounds"].items()}
        result["writer"] = writer_stats(stats, root)
        result["state"] = d.status()[NAME]["state"]
    finally:
        d.stop()
    return result


def bench_supervisord(root: Path, python: str, writer: Path, rate: float, seconds: float) -> dict[str, Any]:
    go, stats = root / "go", root / "writer.json"
    log_dir = root / "log"
    log_dir.mkdir(parents=True)
    programs = {NAME: f"""\
        command = {python} {writer} {rate} {seconds} {go} {stats}
        autostart = true
        autorestart = false
        startsecs = 1
        stdout_logfile = {log_dir / 'out.log'}
        stdout_logfile_maxbytes = {MAX_BYTES}
        stdout_logfile_backups = {BACKUPS}
        stderr_logfile = {log_dir / 'err.log'}
        """}
    d = Supervisord(root, programs).start()
    try:
        wait_until(lambda: d.info().get(NAME, {}).get("statename") == "RUNNING", 30, "the writer to run")
        result = run_phases(d.pid, lambda: d.rpc.supervisor.getState(), log_dir, go, seconds)
        result["lag"] = None
        result["writer"] = writer_stats(stats, root)
        result["state"] = d.info()[NAME]["statename"]
    finally:
        d.stop()
    return result


def report(results: dict[str, dict[str, Any]], rate: float, seconds: float) -> str:
    cap = MAX_BYTES * (BACKUPS + 1)
    title = (f"### A worker writing {rate:g} MB/s to stdout for {seconds:g} s "
             f"(baseline {BASELINE:g} s before, {AFTER:g} s after)\n")
    out = [title]
    rows = []
    for name, r in results.items():
        for phase in ("baseline", "flood", "after"):
            a = r["answer"][phase]
            lag = r["lag"][phase] if r["lag"] else []
            rows.append([name, phase,
                         ms(percentile(lag, 50)) if lag else "-", ms(percentile(lag, 99)) if lag else "-",
                         ms(max(lag)) if lag else "-",
                         ms(percentile(a, 50)), ms(percentile(a, 99)), ms(max(a)) if a else "n/a"])
    out.append(table(["daemon", "phase", "loop lag p50", "loop lag p99", "loop lag max",
                      "answer p50", "answer p99", "answer max"], rows))
    out.append("\n(answer: citadeld `GET /v1/version`, supervisord XML-RPC `getState`, "
               "each on a new connection, every 10 ms)\n")
    rows = []
    for name, r in results.items():
        w = r["writer"]
        achieved = w["bytes"] / w["seconds"] / 1e6 if w["seconds"] else float("nan")
        s = r["samples"]
        rss = [x[1] for x in s]
        flood_rss = [x[1] for x in s if x[0] >= BASELINE]
        disk = max(x[2] for x in s)
        cpu = r["cpu"]["flood"]
        rows.append([name, f"{achieved:.1f} MB/s", f"{100 * cpu:.0f} %", f"{achieved / cpu:.0f} MB" if cpu else "n/a",
                     f"{w['bytes'] / 1e6:.0f} MB",
                     ms(w["max_write_s"]),
                     f"{rss[0] / 1e6:.1f} / {max(flood_rss or rss) / 1e6:.1f} / {rss[-1] / 1e6:.1f} MB",
                     f"{disk / 1e6:.1f} MB (cap {cap / 1e6:.1f})", r["state"]])
    out.append(table(["daemon", "achieved rate", "daemon CPU (% of a core)", "MB per CPU-second", "written",
                      "longest write()", "RSS first / max / last",
                      "log folder max", "worker at end"], rows))
    c = results["citadeld"]
    p99 = percentile(c["lag"]["flood"], 99)
    w = c["writer"]
    achieved = w["bytes"] / w["seconds"] / 1e6 if w["seconds"] else 0.0
    rss = [x[1] for x in c["samples"]]
    disk = max(x[2] for x in c["samples"])
    out.append("\nRSS over time, citadeld (s: MB): " + ", ".join(
        f"{t:.0f}: {m / 1e6:.1f}" for t, m, _ in c["samples"][:: max(1, len(c["samples"]) // 12)]))
    out.append(f"\nTarget loop lag p99 <= 20 ms during the flood: {'met' if p99 <= 0.020 else 'MISSED'} ({ms(p99)})")
    out.append(f"Target memory flat: RSS {rss[0] / 1e6:.1f} MB before, {max(rss) / 1e6:.1f} MB at most, "
               f"{rss[-1] / 1e6:.1f} MB after")
    out.append(f"Target disk capped at log_max_bytes x (log_backups + 1) = {cap / 1e6:.1f} MB: "
               f"{'met' if disk <= cap + 64 * 1024 else 'MISSED'} ({disk / 1e6:.1f} MB at most)")
    if c["state"] != "running":
        out.append(f"WARNING: the writer was {c['state']} at the end, not running: the figures are not valid")
    out.append(f"Writer achieved {achieved:.1f} of {rate:g} MB/s "
               f"({'kept up' if achieved >= 0.95 * rate else 'the daemon did NOT keep up: back-pressure'})")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="MB/s the worker writes")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long it writes")
    parser.add_argument("--no-supervisord", action="store_true", help="citadeld alone")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (daemon logs)")
    args = parser.parse_args()

    python = os.path.realpath(sys.executable)
    root = Path(tempfile.mkdtemp(prefix="citadel-bench-out-"))
    writer = root / "writer.py"
    writer.write_text(WRITER_CODE)
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"machine: {machine()}; load {loadavg()}", file=sys.stderr)
        print("citadeld ...", file=sys.stderr)
        results["citadeld"] = bench_citadel(root / "citadeld", python, writer, args.rate, args.seconds)
        if not args.no_supervisord:
            print("supervisord ...", file=sys.stderr)
            results["supervisord"] = bench_supervisord(root / "supervisord", python, writer,
                                                       args.rate, args.seconds)
        print(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {machine()}; load at end {loadavg()} -->\n")
        print(report(results, args.rate, args.seconds))
    finally:
        if args.keep:
            print(f"\nlogs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
