"""The parts ``gpu_check.py`` runs on: its report, citadeld from the checkout, the event
stream, the fake host's file (the script plays the driver), and the release watch."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import Citadel, UnixHTTPConnection, machine, table, wait_until

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class DeadlineExceeded(BaseException):
    """The run's time is up (a BaseException: no ``except Exception`` may swallow it)."""


class StepFailed(Exception):
    """A step cannot go on; the message says why."""


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


@dataclass
class Check:
    """One verdict: ok True (pass), False (fail) or None (does not apply here)."""

    name: str
    ok: bool | None
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Every check and figure of the run; written as JSON, printed as a table."""

    mode: str
    started: float = field(default_factory=time.time)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    nvml: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None
    reason: str | None = None

    def add(self, name: str, ok: bool | None, detail: str, **figures: Any) -> Check:
        """Record a check (and print it as it happens)."""
        check = Check(name, ok, detail, figures)
        self.checks.append(check)
        print(f"  {_verdict(ok):4}  {name}: {detail}", flush=True)
        return check

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return all(c.ok is not False for c in self.checks)

    def to_json(self, runtime: float, deadline: float, state_dir: Path | None) -> dict[str, Any]:
        """The results file's content."""
        return {"check": "citadel-gpu-check", "version": 1, "mode": self.mode, "passed": self.passed,
                "reason": self.reason, "started": self.started, "runtime_s": round(runtime, 3),
                "deadline_s": deadline, "machine": machine(), "python": sys.version.split()[0],
                "repo": str(REPO), "state_dir": str(state_dir) if state_dir else None,
                "gpu": self.gpu, "checks": [asdict(c) for c in self.checks],
                "figures": self.figures, "nvml": self.nvml}

    def table(self) -> str:
        """The checks as a Markdown table."""
        return table(["check", "result", "detail"],
                     [[c.name, _verdict(c.ok), c.detail[:140]] for c in self.checks])


def _verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


# --------------------------------------------------------------------------
# citadeld, its events, the fake host, NVML's release
# --------------------------------------------------------------------------


class CheckoutCitadel(Citadel):
    """citadeld run from the working tree (``python -m``), not an installed script."""

    def citadeld_argv(self) -> list[str]:
        """``python -m citadel_supervisor.cli.citadeld``."""
        return [sys.executable, "-m", "citadel_supervisor.cli.citadeld"]

    def ctl_json(self, *args: str) -> Any:
        """``citadelctl --socket S ARGS`` from the working tree; its JSON output."""
        argv = [sys.executable, "-m", "citadel_supervisor.cli.citadelctl", "--socket", str(self.socket), *args]
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60, check=False)
        if result.returncode != 0:
            raise StepFailed(f"citadelctl {' '.join(args)} exited {result.returncode}: {result.stderr[-400:]}")
        return json.loads(result.stdout)


class EventLog:
    """Follows citadeld's ``/v1/events`` in a thread; every event, as citadeld timed it."""

    def __init__(self, socket_path: Path):
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._conn = UnixHTTPConnection(str(socket_path), timeout=None)  # blocks: a stream
        self._conn.request("GET", "/v1/events?follow=1")
        response = self._conn.getresponse()  # subscribed once the headers are here
        self._thread = threading.Thread(target=self._read, args=(response,), daemon=True)
        self._thread.start()

    def _read(self, response: Any) -> None:
        try:
            for line in iter(response.readline, b""):
                if line.strip():
                    with self._lock:
                        self.events.append(json.loads(line))
        except (OSError, ValueError, http.client.HTTPException):
            pass  # hung up (close(), or citadeld stopped)

    def find(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The first event so far that matches."""
        with self._lock:
            return next((e for e in self.events if match(e)), None)

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first event that matches, waiting up to ``timeout`` seconds for it."""
        try:
            return wait_until(lambda: self.find(match), timeout, what, 0.01)
        except TimeoutError as exc:
            raise StepFailed(str(exc)) from None

    def close(self) -> None:
        """Hang up, and let the reading thread end."""
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._conn.close()


class FakeHost:
    """The copy of a fake host's file that citadeld reads; the script plays the driver."""

    def __init__(self, path: Path):
        self.path = path
        self.original = json.loads(path.read_text())

    def write_gpu(self, index: int, **values: Any) -> None:
        """Set dynamic values of one GPU (atomically: citadeld never reads half a file)."""
        data = json.loads(self.path.read_text())
        data["gpus"][index].update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def allocate(self, index: int, held: dict[int, int]) -> None:
        """These pids hold these bytes on GPU ``index``; it is busy."""
        base = self.original["gpus"][index].get("memory_used_mib", 0)
        self.write_gpu(index, processes=[{"pid": p, "used_mib": b / MiB} for p, b in held.items()],
                       memory_used_mib=base + sum(held.values()) / MiB, utilization=97)

    def release(self, index: int) -> None:
        """The memory is free again, as the driver frees a dead process's."""
        gpu = self.original["gpus"][index]
        self.write_gpu(index, processes=gpu.get("processes", []),
                       memory_used_mib=gpu.get("memory_used_mib", 0), utilization=gpu.get("utilization", 0))


class ReleaseWatch:
    """Polls the script's NVML from a thread: when the killed processes are gone from the GPU's
    list, and when its used memory dropped by what they held."""

    def __init__(self, nvml: Any, index: int, pids: set[int], held: int, period: float = 0.01):
        self.nvml, self.pids, self.period = nvml, pids, period
        self.nvml.nvmlInit()
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.before = int(nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        self.drop = int(held * 0.9)
        self.gone: float | None = None
        self.freed: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and (self.gone is None or self.freed is None):
            now = time.time()
            try:
                listed = {int(p.pid) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)}
                used = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            except self.nvml.NVMLError:
                listed, used = self.pids, self.before
            if self.gone is None and not listed & self.pids:
                self.gone = now
            if self.freed is None and self.before - used >= self.drop:
                self.freed = now
            self._stop.wait(self.period)

    @property
    def released(self) -> float | None:
        """When both had happened (the later of the two)."""
        return max(self.gone, self.freed) if self.gone and self.freed else None

    def close(self) -> None:
        """Stop polling and shut NVML down."""
        self._stop.set()
        self._thread.join(2)
        self.nvml.nvmlShutdown()


@dataclass
class Run:
    """What the steps share."""

    args: argparse.Namespace
    report: Report
    state: Path
    env: dict[str, str]
    nvml: Any  # pynvml, or a FakeNvml reading the fake host's copy
    #: ``time.monotonic()`` by which the checks must be done (the teardown comes after).
    ends: float
    host: FakeHost | None = None
    citadel: CheckoutCitadel | None = None
    events: EventLog | None = None
    uuid: str = ""
    worker: str = ""
    api_gpu: dict[str, Any] = field(default_factory=dict)
    first: dict[str, Any] = field(default_factory=dict)  # the first worker's report

    @property
    def fake(self) -> bool:
        """True on the FAKE NVML."""
        return self.host is not None

    def wait_time(self, real: float, fake: float) -> float:
        """A wait's limit: what the mode needs, within the time left."""
        return max(0.5, min(fake if self.fake else real, self.ends - time.monotonic()))
