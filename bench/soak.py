"""Chaos against one citadeld with 16 workers, with its invariants checked all along.

    .venv/bin/python bench/soak.py [--minutes 10] [--seed 1] [--nofile 1024]

citadeld runs with ``RLIMIT_NOFILE`` at ``--nofile`` (systemd's default soft
limit) and its exporter on; its 16 workers (``soak_worker.py``) serve
/health and a /metrics page, half of them with a child process, six of them
with a hostile page (labels that clash when relabelled, malformed lines,
8 MiB, an answer after 30 s). For ``--minutes``, one action at a time, drawn
with ``--seed``:

- SIGKILL of a worker, or of a worker's child; SIGSTOP of a worker for 3-8 s
  (its liveness probe fails and citadeld restarts it; then SIGCONT, through a
  pidfd, so the bench never signals a reused pid);
- a reload with a changed config (one service's env changed, a 17th service
  added or removed);
- control-socket abuse: 100 follows of logs and events that hang up, 64
  concurrent status requests, malformed HTTP, a body that claims 100 MB;
- the exporter: 300 idle TCP connections held 15 s, 20 that send a header
  byte a second.

Meanwhile it checks, and reports with its figures:

- citadeld is alive; ``/v1/status`` (as root) answers within 1 s, every 0.5 s;
- every wanted worker is running again within ``RECOVERY_BOUND`` of going down;
- no process of the run (found by the ``SOAK_RUN`` variable every worker
  inherits) lives outside citadeld's tree; none is left after citadeld stops;
- every scrape of ``/metrics`` (every 2 s) answers, parses as OpenMetrics (the strict
  parser) and has no label twice on a sample;
- citadeld's open file descriptors and RSS stay flat (first full minute
  against the last);
- the secret in the workers' environment, which they print URL-encoded, is
  in no log.

Exits 1 when an invariant was broken. Needs Linux 5.3+ (pidfds) and root for
reading other processes' environments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Citadel,
    free_ports,
    machine,
    percentile,
    rss_bytes,
    table,
    wait_until,
)

WORKER = Path(__file__).resolve().parent / "soak_worker.py"
PAGES = ["normal"] * 10 + ["duplicate-labels"] * 2 + ["malformed"] * 2 + ["huge", "slow"]
#: A worker down longer than this is a broken invariant: backoff_max (2 s) plus a
#: Python start and a passing probe, with room for a loaded 2-core machine.
RECOVERY_BOUND = 20.0
STATUS_BOUND = 1.0
#: A label name in a sample's label set (the bench's pages hold no '="' inside a value).
LABEL_NAME = re.compile(r'[{,]\s*([a-zA-Z_][a-zA-Z0-9_]*)="')


@dataclass
class Findings:
    """What the checkers saw; every list holds one line per broken invariant."""

    status_latencies: list[float] = field(default_factory=list)
    status_misses: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    slow_recoveries: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    scrape_latencies: list[float] = field(default_factory=list)
    scrape_failures: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, fds, rss)
    actions: dict[str, int] = field(default_factory=dict)
    died: str = ""

    def count(self, action: str) -> None:
        """Count one chaos action."""
        self.actions[action] = self.actions.get(action, 0) + 1


def service(name: str, port: int, page: str, child: bool, generation: int) -> str:
    """One worker's config table."""
    argv = [sys.executable, str(WORKER), "--port", str(port), "--page", page] + (["--child"] if child else [])
    argv.append(f"soak-{name}")
    url = f"http://127.0.0.1:{port}"
    quoted = ", ".join(f'"{a}"' for a in argv)
    return f"""
[services.{name}]
type = "command"
command = [{quoted}]
metrics = "{url}/metrics"
backoff_initial = 0.5
backoff_max = 2
stable_after = 1
start_limit_burst = 100000
stop_timeout = 3
env = {{ SOAK_SECRET = "${{SOAK_SECRET}}", SOAK_RUN = "${{SOAK_RUN}}", GENERATION = "{generation}" }}
[services.{name}.probes]
startup = {{ kind = "http", url = "{url}/health", period = 0.2, timeout = 1 }}
liveness = {{ kind = "http", url = "{url}/health", period = 1, timeout = 1, failure_threshold = 3 }}
readiness = {{ kind = "http", url = "{url}/health", period = 1, timeout = 1 }}
"""


class Fleet:
    """The config: 16 workers, an optional 17th, and one generation per service."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.names = [f"w{i:02d}" for i in range(16)]
        self.generation = {name: 0 for name in self.names + ["extra"]}
        self.extra = False

    def wanted(self) -> list[str]:
        """The workers that should be running."""
        return self.names + (["extra"] if self.extra else [])

    def text(self) -> str:
        """The services' config text."""
        parts = [service(n, self.ports[i], PAGES[i], i % 2 == 0, self.generation[n])
                 for i, n in enumerate(self.names)]
        if self.extra:
            parts.append(service("extra", self.ports[16], "normal", True, self.generation["extra"]))
        return "".join(parts)


def raw(path: Path, data: bytes, read: bool = False, timeout: float = 2.0) -> bytes:
    """Send bytes to the control socket; the first answer bytes when ``read``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(data)
        return sock.recv(4096) if read else b""
    except OSError:
        return b""
    finally:
        sock.close()


class Soak:
    """One run: a citadeld, its checkers, and the chaos."""

    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.rng = random.Random(args.seed)
        self.findings = Findings()
        self.run_id = secrets.token_hex(6)
        self.secret = "soak/" + secrets.token_hex(8) + "+key="
        *ports, self.exporter_port = free_ports(18)
        self.fleet = Fleet(ports)
        self.citadel = Citadel(root, self.fleet.text(), daemon_extra="cgroups = \"off\"",
                               exporter_listen=f"127.0.0.1:{self.exporter_port}",
                               argv_prefix=["prlimit", f"--nofile={args.nofile}:{args.nofile}", "--"],
                               env={"SOAK_SECRET": self.secret, "SOAK_RUN": self.run_id})
        self.stop = threading.Event()
        self.down_since: dict[str, float] = {}
        self.chaos_running = threading.Event()

    # -- checkers -----------------------------------------------------------

    def check_status(self) -> None:
        """Every 0.5 s: /v1/status answers within 1 s; wanted workers come back in time."""
        while not self.stop.wait(0.5):
            if self.citadel.proc is not None and self.citadel.proc.poll() is not None:
                self.findings.died = f"citadeld exited {self.citadel.proc.returncode}"
                return
            t0 = time.monotonic()
            try:
                workers = {w["name"]: w for w in self.citadel.get("/v1/status", timeout=10)["workers"]}
            except (OSError, RuntimeError, ValueError) as exc:
                self.findings.status_misses.append(f"{time.strftime('%X')}: {exc}")
                continue
            took = time.monotonic() - t0
            self.findings.status_latencies.append(took)
            if took > STATUS_BOUND:
                self.findings.status_misses.append(f"{time.strftime('%X')}: answered in {took:.2f} s")
            self.check_recovery(workers)

    def check_recovery(self, workers: dict[str, dict[str, Any]]) -> None:
        """Track how long each wanted worker is not running."""
        now = time.monotonic()
        for name in self.fleet.wanted():
            running = workers.get(name, {}).get("state") == "running"
            since = self.down_since.get(name)
            if running and since is not None:
                took = now - since
                self.findings.recoveries.append(took)
                if took > RECOVERY_BOUND:
                    self.findings.slow_recoveries.append(f"{name}: down {took:.1f} s")
                del self.down_since[name]
            elif not running and since is None:
                self.down_since[name] = now
        for name in list(self.down_since):
            if name not in self.fleet.wanted():
                del self.down_since[name]

    def run_processes(self) -> dict[int, int]:
        """``{pid: ppid}`` of every live process carrying this run's SOAK_RUN."""
        found = {}
        marker = f"SOAK_RUN={self.run_id}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] != "Z":
                    found[int(entry.name)] = int(fields[1])
            except (OSError, ValueError):
                continue
        return found

    def outside_citadeld(self) -> set[int]:
        """Processes of the run whose ancestors do not include citadeld."""
        found = self.run_processes()
        outside = set()
        for pid in found:
            if pid == self.citadel.pid:
                continue  # citadeld itself has the variable: the bench started it with it
            walk = pid
            for _ in range(64):
                walk = found.get(walk) or _ppid(walk)
                if walk in (0, 1) or walk == self.citadel.pid:
                    break
            if walk != self.citadel.pid:
                outside.add(pid)
        return outside

    def check_orphans(self) -> None:
        """Every 5 s: a process of the run outside citadeld's tree, seen twice, is an orphan."""
        seen: set[int] = set()
        while not self.stop.wait(5):
            outside = self.outside_citadeld()
            for pid in outside & seen:
                self.findings.orphans.append(f"pid {pid} outside citadeld's tree for 5 s or more")
            seen = outside

    def check_scrapes(self) -> None:
        """Every 2 s: /metrics answers within 10 s, as OpenMetrics that the strict parser takes,
        with no label twice on a sample (Prometheus rejects such a scrape whole)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.exporter_port}/metrics",
                                         headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        while not self.stop.wait(2):
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    text = resp.read().decode()
                families = list(openmetrics_families(text))
                assert any(f.name.startswith("citadel_") for f in families), "no citadel_ families"
                for line in text.splitlines():
                    names = LABEL_NAME.findall(line.partition("}")[0]) if not line.startswith("#") else []
                    assert len(names) == len(set(names)), f"a label twice: {line[:160]}"
                self.findings.scrape_latencies.append(time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 (any failure is a finding)
                self.findings.scrape_failures.append(f"{time.strftime('%X')}: {type(exc).__name__}: {exc}"[:200])

    def sample_resources(self) -> None:
        """Every 5 s: citadeld's open file descriptors and RSS."""
        start = time.monotonic()
        while not self.stop.wait(5):
            try:
                fds = len(os.listdir(f"/proc/{self.citadel.pid}/fd"))
                self.findings.samples.append((time.monotonic() - start, fds, rss_bytes(self.citadel.pid)))
            except OSError:
                return

    # -- chaos --------------------------------------------------------------

    def worker_pid(self, name: str) -> int | None:
        """A running worker's pid, from the status."""
        try:
            worker = self.citadel.status().get(name, {})
        except (OSError, RuntimeError):
            return None
        return worker.get("pid") if worker.get("state") == "running" else None

    def kill_worker(self) -> None:
        """SIGKILL a worker's leader."""
        pid = self.worker_pid(self.rng.choice(self.fleet.wanted()))
        if pid:
            _pidfd_signal(pid, signal.SIGKILL)
            self.findings.count("SIGKILL a worker")

    def kill_child(self) -> None:
        """SIGKILL a worker's child (the worker lives on without it)."""
        name = self.rng.choice(self.fleet.names[::2])
        pid = self.worker_pid(name)
        kids = _children(pid) if pid else []
        if kids:
            _pidfd_signal(kids[0], signal.SIGKILL)
            self.findings.count("SIGKILL a worker's child")

    def stop_and_continue(self) -> None:
        """SIGSTOP a worker for 3-8 s, then SIGCONT it through a pidfd (if it still exists)."""
        pid = self.worker_pid(self.rng.choice(self.fleet.wanted()))
        if not pid:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            signal.pidfd_send_signal(fd, signal.SIGSTOP)
            self.stop.wait(self.rng.uniform(3, 8))
            try:
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            except ProcessLookupError:
                pass  # citadeld restarted it meanwhile
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
        self.findings.count("SIGSTOP a worker 3-8 s")

    def reload(self) -> None:
        """Change one service's env, or add or remove the 17th service; then reload."""
        if self.rng.random() < 0.3:
            self.fleet.extra = not self.fleet.extra
            what = "reload: add or remove a service"
        else:
            self.fleet.generation[self.rng.choice(self.fleet.names)] += 1
            what = "reload: one service's env changed"
        self.citadel.write_services(self.fleet.text())
        try:
            self.citadel.request("POST", "/v1/reload", {}, timeout=30)
        except (OSError, RuntimeError) as exc:
            self.findings.status_misses.append(f"{time.strftime('%X')}: reload failed: {exc}")
        self.findings.count(what)

    def abuse_control(self) -> None:
        """Follows that hang up, a flood of status requests, malformed HTTP, an oversized body."""
        sock = self.citadel.socket
        name = self.rng.choice(self.fleet.names)
        for i in range(100):
            target = f"/v1/logs/{name}?follow=1" if i % 2 else "/v1/events?follow=1"
            raw(sock, f"GET {target} HTTP/1.1\r\nHost: citadel\r\n\r\n".encode())
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: raw(sock, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n", read=True),
                          range(64)))
        for junk in (b"\x00\xff\xfe garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                     b"GET /v1/status HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                     b"POST /v1/start HTTP/1.1\r\nHost: c\r\nContent-Length: 100000000\r\n\r\n"
                     + b"{" * (1 << 20)):
            raw(sock, junk, read=True)
        self.findings.count("control abuse (100 follows hung up, 64 status, 4 malformed)")

    def abuse_exporter(self) -> None:
        """300 idle connections and 20 slow ones to the exporter, held 15 s."""
        idle: list[socket.socket] = []
        slow: list[socket.socket] = []
        try:
            for i in range(320):
                s = socket.socket()
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", self.exporter_port))
                except OSError:
                    s.close()
                    continue
                (slow if i < 20 else idle).append(s)
            for s in slow:
                _send_quietly(s, b"GET /metrics HTTP/1.1\r\n")
            for _ in range(15):
                for s in slow:
                    _send_quietly(s, b"X")
                if self.stop.wait(1):
                    break
        finally:
            for s in idle + slow:
                s.close()
        self.findings.count("exporter: 300 idle + 20 slow connections, 15 s")

    def chaos(self) -> None:
        """One action at a time until the time is up."""
        actions = [self.kill_worker] * 4 + [self.kill_child] * 2 + [self.stop_and_continue] * 2 + \
            [self.reload] * 2 + [self.abuse_control] * 2 + [self.abuse_exporter]
        deadline = time.monotonic() + self.args.minutes * 60
        while time.monotonic() < deadline and not self.stop.is_set():
            self.rng.choice(actions)()
            self.stop.wait(self.rng.uniform(0.5, 3))

    # -- the run ------------------------------------------------------------

    def run(self) -> int:
        """Start, soak, stop; print the report; 1 when an invariant was broken."""
        self.citadel.start()
        wait_until(lambda: self.citadel.all_running(self.fleet.wanted()), 120, "the 16 workers to run", 0.2)
        checkers = [threading.Thread(target=f, daemon=True) for f in
                    (self.check_status, self.check_orphans, self.check_scrapes, self.sample_resources)]
        for thread in checkers:
            thread.start()
        t0 = time.monotonic()
        try:
            self.chaos()
            # The chaos is over: every wanted worker comes back.
            wait_until(lambda: self.citadel.all_running(self.fleet.wanted()), RECOVERY_BOUND,
                       "every wanted worker running after the chaos", 0.2)
        except TimeoutError as exc:
            self.findings.slow_recoveries.append(str(exc))
        finally:
            self.stop.set()
            for thread in checkers:
                thread.join(15)
            soaked = time.monotonic() - t0
            secret_hits = self.secret_in_logs()
            leftovers = self.stop_citadeld()
        return self.report(soaked, secret_hits, leftovers)

    def secret_in_logs(self) -> list[str]:
        """Log files (citadeld's and the workers') that hold the secret, plain or URL-encoded."""
        forms = {self.secret, urllib.parse.quote(self.secret, safe="")}
        hits = []
        for path in [self.citadel.root / "citadeld.out", *self.citadel.log_dir.glob("*.log*")]:
            text = path.read_text(errors="replace") if path.exists() else ""
            hits += [f"{path.name}: {form!r}" for form in forms if form in text]
        return hits

    def stop_citadeld(self) -> list[int]:
        """SIGTERM citadeld; the run's processes still alive 30 s later."""
        self.citadel.stop()
        try:
            return wait_until(lambda: not self.run_processes(), 30, "the run's processes to end", 0.2) and []
        except TimeoutError:
            return sorted(self.run_processes())

    def report(self, soaked: float, secret_hits: list[str], leftovers: list[int]) -> int:
        """Print the figures; 1 when an invariant was broken."""
        f = self.findings
        minute = [s for s in f.samples if s[0] <= 60] or f.samples[:1]
        last = [s for s in f.samples if s[0] >= f.samples[-1][0] - 60] if f.samples else []
        fds = (max(s[1] for s in minute), max(s[1] for s in last)) if minute and last else (0, 0)
        rss = (max(s[2] for s in minute) / 2**20, max(s[2] for s in last) / 2**20) if minute and last else (0, 0)
        fds_flat = fds[1] <= fds[0] + 16
        rss_flat = rss[1] <= rss[0] * 1.25 + 8
        print(f"# Soak: {soaked / 60:.1f} minutes, seed {self.args.seed}, RLIMIT_NOFILE {self.args.nofile}\n")
        print(machine() + "\n")
        print(table(["action", "times"], sorted(f.actions.items())) + "\n")
        rows = [
            ["citadeld alive throughout", "yes" if not f.died else f.died, "ok" if not f.died else "BROKEN"],
            ["/v1/status answered within 1 s", (f"{len(f.status_latencies)} answers, p50 "
             f"{percentile(f.status_latencies, 50) * 1000:.0f} ms, p99 {percentile(f.status_latencies, 99) * 1000:.0f} ms,"
             f" max {max(f.status_latencies, default=0) * 1000:.0f} ms; {len(f.status_misses)} misses"),
             "ok" if not f.status_misses else "BROKEN"],
            [f"workers back within {RECOVERY_BOUND:g} s", (f"{len(f.recoveries)} recoveries, p50 "
             f"{percentile(f.recoveries, 50):.1f} s, max {max(f.recoveries, default=0):.1f} s"),
             "ok" if not f.slow_recoveries else "BROKEN"],
            ["no process outside citadeld's tree", f"{len(f.orphans)} sightings", "ok" if not f.orphans else "BROKEN"],
            ["nothing left after citadeld stopped", f"{len(leftovers)} processes", "ok" if not leftovers else "BROKEN"],
            ["every scrape answered and parsed", (f"{len(f.scrape_latencies)} scrapes, p50 "
             f"{percentile(f.scrape_latencies, 50) * 1000:.0f} ms; {len(f.scrape_failures)} failed"),
             "ok" if not f.scrape_failures else "BROKEN"],
            ["file descriptors flat", f"{fds[0]} in the first minute, {fds[1]} in the last",
             "ok" if fds_flat else "BROKEN"],
            ["RSS flat", f"{rss[0]:.1f} MiB in the first minute, {rss[1]:.1f} MiB in the last",
             "ok" if rss_flat else "BROKEN"],
            ["the secret in no log", f"{len(secret_hits)} logs hold it", "ok" if not secret_hits else "BROKEN"],
        ]
        print(table(["invariant", "measured", "verdict"], rows))
        details = f.status_misses + f.slow_recoveries + f.orphans + f.scrape_failures + secret_hits + \
            [f"left running: pid {p}" for p in leftovers]
        if details:
            print("\nFirst findings:\n" + "\n".join(f"- {d}" for d in details[:20]))
        print(f"\ncitadeld's files: {self.citadel.root}")
        return 1 if any(r[2] == "BROKEN" for r in rows) else 0


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _pidfd_signal(pid: int, sig: int) -> None:
    """Signal ``pid`` through a pidfd (a pid that is gone is left alone)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nofile", type=int, default=1024, help="citadeld's RLIMIT_NOFILE")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="citadel-soak-"))
    sys.exit(Soak(args, root).run())


if __name__ == "__main__":
    main()
