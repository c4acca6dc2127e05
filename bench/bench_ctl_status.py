"""Wall time of ``citadelctl status`` (the whole process) beside ``supervisorctl status``.

Starts a citadeld with N small workers (``sleep``) and a supervisord 4.3.0
with N programs, then runs each CLI ``--runs`` times, interleaved, so that
both see the same load on a shared machine; prints p50/p90/min and the ratio.
supervisord is installed from PyPI (``supervisor==4.3.0``) into its own venv
under ``--venv`` the first time.

    .venv/bin/python bench/bench_ctl_status.py [--workers 16] [--runs 30]

Target: ``citadelctl status`` p50 <= 100 ms. Results: docs/benchmarks-ctl.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SUPERVISOR_VERSION = "4.3.0"


def ensure_supervisor(venv: Path) -> Path:
    """The venv's bin folder, with supervisor==4.3.0 installed (installed here if missing)."""
    ctl = venv / "bin" / "supervisorctl"
    if ctl.exists():
        return ctl.parent
    print(f"installing supervisor=={SUPERVISOR_VERSION} into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"supervisor=={SUPERVISOR_VERSION}"],
                   check=True)
    return ctl.parent


def start_citadeld(root: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    """A citadeld with ``workers`` sleeping workers; its process and socket, once all run."""
    root.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)  # worker cgroups are named after workers: keep them unique
    sock = root / "run" / "control.sock"
    lines = [
        "[daemon]", f'control_socket = "{sock}"', f'state_dir = "{root / "run"}"',
        f'log_dir = "{root / "log"}"', 'socket_group = ""', "[exporter]", 'listen = ""',
    ]
    for i in range(workers):
        lines += [f"[services.bench-{tag}-{i:02d}]", 'type = "command"', 'command = ["sleep", "3600"]']
    config = root / "citadeld.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([str(BIN / "citadeld"), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=(root / "citadeld.log").open("wb"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "citadelctl"), "--socket", str(sock), "status", "--json"],
                             capture_output=True, text=True, check=False)
        if out.returncode == 0:
            states = [w["state"] for w in json.loads(out.stdout)["workers"]]
            if states.count("running") == workers:
                return proc, sock
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"citadeld did not start {workers} workers:\n{(root / 'citadeld.log').read_text()}")


def start_supervisord(root: Path, bin_dir: Path, programs: int) -> tuple[subprocess.Popen[bytes], Path]:
    """A supervisord with ``programs`` sleeping programs; its process and config, once all run."""
    sock = root / "supervisor.sock"
    conf = root / "supervisord.conf"
    text = (f"[unix_http_server]\nfile={sock}\n\n[supervisord]\nnodaemon=true\n"
            f"logfile={root / 'supervisord.log'}\npidfile={root / 'supervisord.pid'}\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{sock}\n\n")
    for i in range(programs):
        text += (f"[program:w{i:02d}]\ncommand=sleep 3600\nautostart=true\n"
                 f"stdout_logfile={root / f'w{i:02d}.log'}\nredirect_stderr=true\n\n")
    conf.write_text(text)
    proc = subprocess.Popen([str(bin_dir / "supervisord"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run([str(bin_dir / "supervisorctl"), "-c", str(conf), "status"],
                             capture_output=True, text=True, check=False)
        if out.stdout.count("RUNNING") == programs:
            return proc, conf
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("supervisord did not start its programs")


def wall(argv: list[str]) -> float:
    """Seconds one run of ``argv`` took, start to exit."""
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
            "min_ms": round(ordered[0] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "citadel-bench-supervisor")
    args = parser.parse_args()
    sup_bin = ensure_supervisor(args.venv)
    root = Path(tempfile.mkdtemp(prefix="bench-ctl-"))
    citadeld = supervisord = None
    try:
        citadeld, sock = start_citadeld(root / "citadel", args.workers)
        supervisord, conf = start_supervisord(root, sup_bin, args.workers)
        commands = {
            "citadelctl status": [str(BIN / "citadelctl"), "--socket", str(sock), "status"],
            "citadelctl status --json": [str(BIN / "citadelctl"), "--socket", str(sock), "status", "--json"],
            "supervisorctl status": [str(sup_bin / "supervisorctl"), "-c", str(conf), "status"],
            "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for name, argv in commands.items():  # one warm-up each
            wall(argv)
        for _ in range(args.runs):  # interleaved: the same load for each
            for name, argv in commands.items():
                times[name].append(wall(argv))
        results = {name: summary(t) for name, t in times.items()}
        print(f"{args.workers} workers, {args.runs} runs each, interleaved; "
              f"load average {os.getloadavg()[0]:.2f} at the end")
        print(f"{'command':<38} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8}")
        for name, r in results.items():
            print(f"{name:<38} {r['p50_ms']:>8} {r['p90_ms']:>8} {r['min_ms']:>8}")
        ratio = results["citadelctl status"]["p50_ms"] / results["supervisorctl status"]["p50_ms"]
        print(f"citadelctl / supervisorctl (p50): {ratio:.2f}")
        print(json.dumps({"workers": args.workers, "runs": args.runs, "results": results,
                          "ratio_p50": round(ratio, 3)}))
    finally:
        for proc in (citadeld, supervisord):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
