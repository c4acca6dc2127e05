"""Check Citadel's GPU code on a real NVIDIA GPU, in one run of a few minutes.

    python bench/gpu_check.py                      # a real GPU: NVML, torch
    python bench/gpu_check.py --wheels var/wheels  # first install what is missing from wheels
    python bench/gpu_check.py --fake tests/fixtures/fake_host_8gpu.json   # no GPU: the FAKE NVML

A GPU machine without network usually lacks pydantic and loguru: download them
as wheels elsewhere, for its Python and CPU, and bring the folder along
(docs/operations.md, "Checking on a real GPU")::

    python3 -m pip download --dest var/wheels --only-binary=:all: --python-version 3.11
        --platform manylinux2014_x86_64 pydantic==2.14.4 loguru==0.7.3     # one line

It runs citadeld from this working tree (not an installed copy) with one
worker, ``bench/gpu_check_worker.py``, pinned to one GPU by its UUID: the
worker allocates ``--gib`` GiB with torch, keeps the GPU busy, and starts a
child that allocates ``--child-gib`` GiB. Then, in one run, it checks and
reports:

- the inventory citadeld reads (``/v1/gpus`` and ``citadelctl gpus --json``:
  name, UUID, memory, NUMA node, MIG mode, CPUs) against ``nvidia-smi`` and sysfs;
- the worker's view: ``CUDA_VISIBLE_DEVICES`` is the UUID, torch sees one
  device with that UUID, and its CPUs are the GPU's NUMA node's;
- its GPU memory in citadeld's per-process figures (``/v1/gpus`` and
  ``citadel_worker_gpu_memory_bytes``), under the right worker;
- the exporter's GPU families, parsed by prometheus_client's parsers, with sane values;
- SIGKILL of the worker and its child: how long until NVML reports the memory
  free, and that citadeld restarted the worker only after that (the events'
  timestamps);
- every NVML call Citadel makes, with the shape of its answer, and where the
  FAKE NVML answers differently (on a GPU: a fake host mirroring the real GPU).

With ``--fake HOST.json`` (or ``CITADEL_FAKE_NVML`` set) citadeld uses the FAKE
NVML and the worker is plain Python: the script writes the worker's
allocation into (a copy of) the fake host's file, and its release after the
kill, so the same path is exercised without a GPU.

The figures go to ``--out`` (default ``$OUT/gpu_check.json`` when ``OUT`` is
set, else ``gpu_check.json`` in the state folder, which also keeps citadeld's
log and the worker's reports). Everything ends within ``--deadline`` seconds
(480). Exit code: 0 when every check passed, or when there is no GPU here (it
says so); 1 when a check failed or the run could not be set up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this working tree's package
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_harness import REPO, DeadlineExceeded, FakeHost, Report, Run, StepFailed
from gpu_check_steps import WORKER, run_steps, worker_reports

#: What citadeld imports; the first two are missing on a bare GPU machine (bring them as wheels).
NEEDED = {"pydantic": "pydantic", "loguru": "loguru", "aiohttp": "aiohttp", "pluggy": "pluggy",
          "prometheus_client": "prometheus-client", "psutil": "psutil", "click": "click",
          "pynvml": "nvidia-ml-py"}

#: Seconds kept for stopping citadeld and writing the figures after the hard deadline's alarm.
TEARDOWN_RESERVE = 40.0


def find_gpu(fake_host: Path | None) -> tuple[str, str | None]:
    """``("fake" | "real", None)``, ``("no-gpu", why)``, or ``("cannot", why)`` when a GPU is
    here but this run cannot use it."""
    if fake_host is not None:
        return "fake", None
    try:
        import pynvml
    except ImportError:
        if _driver_present():
            return "cannot", "an NVIDIA driver is here but nvidia-ml-py (pynvml) is not installed"
        return "no-gpu", "no NVIDIA driver here (and no nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        if _driver_present():
            return "cannot", f"NVML does not start although a driver is here: {exc}"
        return "no-gpu", f"NVML does not start: {exc}"
    if count == 0:
        return "no-gpu", "NVML found no GPU"
    # A GPU machine's Python may be older than the project's: say so rather than fail on an import.
    if sys.version_info < (3, 11):  # noqa: UP036
        return "cannot", f"citadeld needs Python 3.11 or later; this is {sys.version.split()[0]}"
    return "real", None


def _driver_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()


def ensure_packages(wheels: Path | None, target: Path) -> list[str]:
    """Make citadeld's packages importable, installing missing ones from ``wheels`` into
    ``target`` (no network); the folders to add to PYTHONPATH. ``StepFailed`` if any is
    still missing."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    if wheels is None:
        raise StepFailed(f"missing: {', '.join(missing)}; bring them as wheels and pass --wheels DIR "
                         "(docs/operations.md, 'Checking on a real GPU')")
    if importlib.util.find_spec("pip") is not None:
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                str(wheels), "--target", str(target), *(NEEDED[m] for m in missing)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        if result.returncode != 0:
            raise StepFailed(f"pip could not install {', '.join(missing)} from {wheels}: "
                             f"{result.stderr.strip()[-600:]}")
    else:
        unpack_wheels(wheels, target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    still = [m for m in missing if importlib.util.find_spec(m) is None]
    if still:
        raise StepFailed(f"still missing after installing from {wheels}: {', '.join(still)}")
    return [str(target)]


def unpack_wheels(wheels: Path, target: Path) -> None:
    """Without pip: unpack every wheel in ``wheels`` into ``target`` (a wheel is a zip of what
    goes on the path; these need none of its scripts or data)."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise StepFailed(f"--wheels {wheels}: no wheel there")
    for wheel in found:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)


def open_nvml(run_fake: Path | None) -> Any:
    """The NVML the script itself reads: pynvml, or a FakeNvml on the fake host's copy."""
    if run_fake is None:
        import pynvml

        return pynvml
    from citadel_supervisor.gpu.fake_nvml import FakeNvml

    return FakeNvml.from_file(run_fake)


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", type=Path, default=os.environ.get("CITADEL_FAKE_NVML") or None,
                        metavar="HOST.json", help="use the FAKE NVML on a copy of this host file")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU's NVML index (default 0)")
    parser.add_argument("--gib", type=float, default=20.0, help="GiB the worker allocates (20)")
    parser.add_argument("--child-gib", type=float, default=2.0, help="GiB its child allocates (2)")
    parser.add_argument("--release-timeout", type=float, default=60.0,
                        help="the worker's gpu_release_timeout (60)")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole run (480)")
    parser.add_argument("--out", type=Path, help="the results file (JSON)")
    parser.add_argument("--state-dir", type=Path, help="for citadeld's log and the reports")
    parser.add_argument("--wheels", type=Path, help="install missing packages from these wheels")
    return parser.parse_args()


def out_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The state folder and the results file."""
    env_out = os.environ.get("OUT")
    state = args.state_dir or (Path(env_out) / "gpu-check-state" if env_out else
                               Path(tempfile.mkdtemp(prefix="citadel-gpu-check-")))
    state.mkdir(parents=True, exist_ok=True)
    out = args.out or (Path(env_out) / "gpu_check.json" if env_out else state / "gpu_check.json")
    return state, out


def setup(args: argparse.Namespace, report: Report, state: Path, ends: float) -> Run:
    """The environment citadeld and the worker run in, and the NVML the script reads."""
    # Not in the state folder, which may be $OUT: the packages need not travel back.
    extra = ensure_packages(args.wheels, Path(tempfile.mkdtemp(prefix="citadel-gpu-check-pydeps-")))
    paths = [str(REPO), *extra]  # built-in parts load from DEFAULT_PLUGINS, no install needed
    env = {k: v for k, v in os.environ.items() if k not in ("CITADEL_FAKE_NVML", "CITADEL_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    host = None
    if args.fake is not None:
        copy = state / "fake-host.json"
        try:
            shutil.copyfile(args.fake, copy)
        except OSError as exc:
            raise StepFailed(f"--fake {args.fake}: {exc.strerror}") from None
        env["CITADEL_FAKE_NVML"] = str(copy)
        host = FakeHost(copy)
    return Run(args, report, state, env, open_nvml(host.path if host else None), ends, host=host)


def main() -> int:
    """Run the checks; the exit code."""
    args = parse_args()
    begin = time.monotonic()
    checks_time = max(1.0, args.deadline - TEARDOWN_RESERVE)
    mode, reason = find_gpu(args.fake)
    report = Report(mode if mode != "cannot" else "real", reason=reason)
    state, out = out_paths(args)
    print(f"citadel GPU check: {mode}{f' ({reason})' if reason else ''}; state in {state}", flush=True)
    run: Run | None = None
    if mode in ("fake", "real"):
        signal.signal(signal.SIGALRM, _deadline_reached)
        signal.setitimer(signal.ITIMER_REAL, checks_time)
        try:
            run = setup(args, report, state, begin + checks_time)
            run_steps(run)
        except StepFailed as exc:
            report.add("setup", False, str(exc))
        except DeadlineExceeded:
            report.add("deadline", False, f"the checks took longer than {checks_time:g}s")
        finally:
            signal.setitimer(signal.ITIMER_REAL, TEARDOWN_RESERVE)  # the teardown is bounded too
            teardown(run)
            signal.setitimer(signal.ITIMER_REAL, 0)
    elif mode == "cannot":
        report.add("setup", False, reason or "?")
    write_results(report, out, time.monotonic() - begin, args.deadline, state)
    return 0 if report.passed else 1


def _deadline_reached(signum: int, frame: Any) -> None:
    raise DeadlineExceeded()


def teardown(run: Run | None) -> None:
    """Stop citadeld (and so its worker) and the event stream; kill what it left behind."""
    if run is None:
        return
    try:
        if run.events is not None:
            run.events.close()
        if run.citadel is not None:
            run.citadel.stop()
    except DeadlineExceeded:
        if run.citadel is not None and run.citadel.proc is not None:
            os.killpg(run.citadel.proc.pid, signal.SIGKILL)
        run.report.add("teardown", False, "citadeld did not stop in time: killed")
    left = kill_leftovers(run)
    if left:
        run.report.add("teardown.leftovers", False, f"killed what citadeld left running: pids {left}")


def kill_leftovers(run: Run) -> list[int]:
    """SIGKILL, by pid, the workers and children of this run still alive (none, once citadeld
    stopped them; some, when it had to be killed); their pids."""
    import psutil

    left: list[int] = []
    for report in worker_reports(run):
        for pid in (report.get("pid"), (report.get("child") or {}).get("pid")):
            if not isinstance(pid, int):
                continue
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE and str(WORKER) in proc.cmdline():
                    proc.kill()
                    left.append(pid)
            except psutil.Error:
                continue
    return left


def write_results(report: Report, out: Path, runtime: float, deadline: float, state: Path) -> None:
    """The table on stdout, the figures as JSON in ``out``."""
    data = report.to_json(runtime, deadline, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str))
    print()
    if report.checks:
        print(report.table())
    verdict = "PASSED" if report.passed else "FAILED"
    if report.mode == "no-gpu":
        verdict = f"SKIPPED: no GPU here ({report.reason})"
    print(f"\n{verdict} in {runtime:.1f}s ({report.mode}); figures in {out}")


if __name__ == "__main__":
    sys.exit(main())
