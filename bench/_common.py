"""What the benchmarks share: running citadeld and supervisord, and reading /proc.

Every figure is read from outside the daemons (``/proc``, their control
sockets), except the event-loop lag probe, which runs inside a citadeld
started through ``lag_probe_main`` (the bench's own launcher: the package
has no probe of its own).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from citadel_supervisor.testing import free_port, free_ports, wait_until  # noqa: F401 (the benches' too)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CITADELD = BIN / "citadeld"
CITADELCTL = BIN / "citadelctl"
SUPERVISOR_VERSION = "4.3.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------


def boottime() -> float:
    """Seconds since boot, the clock ``/proc/PID/stat`` start times use."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` itself (its children excluded)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def start_boottime(pid: int) -> float:
    """When ``pid`` was forked, in seconds since boot (1/CLK_TCK resolution)."""
    return int(_stat_fields(pid)[19]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_pids(parent: int) -> dict[int, list[str]]:
    """The live children of ``parent`` and their argv."""
    found: dict[int, list[str]] = {}
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return found
    for kid in kids:
        try:
            argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
            state = _stat_fields(int(kid))[0]
        except (OSError, ValueError):
            continue
        if state != "Z":
            found[int(kid)] = [a.decode(errors="replace") for a in argv if a]
    return found


def worker_pids(parent: int, marker: str) -> dict[str, int]:
    """``{worker label: pid}`` of the children of ``parent`` whose last argv item
    starts with ``marker`` (the bench tags every worker that way)."""
    return {argv[-1]: pid for pid, argv in child_pids(parent).items()
            if argv and argv[-1].startswith(marker)}


def loadavg() -> str:
    """The 1-minute load average, as text."""
    return Path("/proc/loadavg").read_text().split()[0]


def machine() -> str:
    """One line about this machine."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} CPUs ({model}), {mem} GiB, Linux {os.uname().release}, Python {sys.version.split()[0]}"


# --------------------------------------------------------------------------
# Statistics and tables
# --------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for a table."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain Markdown table."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------
# citadeld
# --------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (for citadeld's control API and supervisord's XML-RPC)."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def _timed_cli(argv: list[str]) -> float:
    """Run a CLI command (its output captured, shown only if it fails); its wall time."""
    t0 = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    took = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout.decode(errors='replace')}")
    return took


class Citadel:
    """A citadeld subprocess on a config in ``root``, driven through its control API."""

    def __init__(self, root: Path, services: str, daemon_extra: str = "", lag_probe: Path | None = None,
                 env: dict[str, str] | None = None, exporter_listen: str = "",
                 argv_prefix: Sequence[str] = ()):
        """``argv_prefix``: a command that execs citadeld (``prlimit ... --``), so its pid is citadeld's."""
        self.root = root
        self.daemon_extra = daemon_extra
        self.exporter_listen = exporter_listen
        self.argv_prefix = list(argv_prefix)
        self.env = {**os.environ, **(env or {})}
        # The state file and socket go on tmpfs, as /run/citadel is under systemd
        # (on a disk, ext4 makes each state-file rewrite cost milliseconds).
        shm = Path("/dev/shm")
        self.run_dir = Path(tempfile.mkdtemp(prefix="citadel-bench-", dir=shm if os.access(shm, os.W_OK) else None))
        self.socket = self.run_dir / "control.sock"
        self.log_dir = root / "log"
        self.config = root / "citadeld.toml"
        self.lag_probe = lag_probe
        root.mkdir(parents=True, exist_ok=True)
        self.write_services(services)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_services(self, services: str) -> None:
        """Write the config: the bench's [daemon] and [exporter] tables, then ``services``."""
        self.config.write_text(textwrap.dedent(f"""\
            [daemon]
            control_socket = "{self.socket}"
            state_dir = "{self.run_dir}"
            log_dir = "{self.log_dir}"
            log_level = "INFO"
            socket_group = ""
            {self.daemon_extra}
            [exporter]
            listen = "{self.exporter_listen}"
            """) + textwrap.dedent(services))

    @property
    def pid(self) -> int:
        """citadeld's pid."""
        assert self.proc is not None
        return self.proc.pid

    def citadeld_argv(self) -> list[str]:
        """The command that runs citadeld, before its options (a subclass may run another)."""
        if self.lag_probe is not None:
            return [sys.executable, str(Path(__file__)), "lag-probe", str(self.lag_probe), "--"]
        return [str(CITADELD)]

    def start(self) -> Citadel:
        """Start citadeld and wait until its socket answers."""
        argv = self.argv_prefix + self.citadeld_argv() + ["--config", str(self.config), "--log-format", "json"]
        with (self.root / "citadeld.out").open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"citadeld exited {self.proc.returncode}; see {self.root / 'citadeld.out'}")
            try:
                self.get("/v1/version")
                return True
            except OSError:
                return False

        wait_until(answers, 30, "citadeld's control socket", 0.05)
        return self

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """One control API call; the decoded JSON."""
        conn = UnixHTTPConnection(str(self.socket), timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload,
                         headers={"Content-Type": "application/json"} if payload else {})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:300]!r}")
            return json.loads(data) if data else None
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 60.0) -> Any:
        """GET ``path``."""
        return self.request("GET", path, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        """``/v1/status`` keyed by worker name."""
        return {w["name"]: w for w in self.get("/v1/status")["workers"]}

    def all_running(self, names: Iterable[str]) -> bool:
        """True when every named worker is running."""
        status = self.status()
        return all(status.get(n, {}).get("state") == "running" for n in names)

    def ctl(self, *args: str) -> float:
        """Run ``citadelctl ARGS``; its wall time in seconds."""
        return _timed_cli([str(CITADELCTL), "--socket", str(self.socket), *args])

    def stop(self) -> None:
        """SIGTERM citadeld and wait for it (SIGKILL after 30 s); remove its run folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# supervisord
# --------------------------------------------------------------------------


def supervisord_venv() -> Path:
    """A venv with supervisor==4.3.0 from PyPI, created on first use.

    It lives outside the repository (``$CITADEL_BENCH_CACHE`` or
    ``~/.cache/citadel-bench``) so that nothing untracked lands in the tree.
    """
    cache = Path(os.environ.get("CITADEL_BENCH_CACHE", Path.home() / ".cache" / "citadel-bench"))
    venv = cache / f"supervisor-{SUPERVISOR_VERSION}"
    if (venv / "bin" / "supervisord").exists():
        return venv
    print(f"installing supervisor=={SUPERVISOR_VERSION} into {venv} ...", file=sys.stderr)
    python = shutil.which("python3") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                    f"supervisor=={SUPERVISOR_VERSION}"], check=True)
    return venv


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return UnixHTTPConnection(self.path)


class Supervisord:
    """A supervisord subprocess, driven over XML-RPC on its Unix socket and by supervisorctl."""

    def __init__(self, root: Path, programs: dict[str, str], extra: str = ""):
        """``programs``: ``{name: the body of its [program:name] section}``."""
        self.venv = supervisord_venv()
        self.root = root
        self.socket = root / "supervisor.sock"
        self.config = root / "supervisord.conf"
        root.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(f"""\
            [unix_http_server]
            file = {self.socket}

            [supervisord]
            logfile = {root / 'supervisord.log'}
            pidfile = {root / 'supervisord.pid'}
            childlogdir = {root}
            loglevel = info
            nodaemon = true

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [supervisorctl]
            serverurl = unix://{self.socket}
            """)
        for name, body in programs.items():
            text += f"\n[program:{name}]\n" + textwrap.dedent(body) + extra
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """supervisord's pid."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def rpc(self) -> Any:
        """A fresh XML-RPC proxy (one connection per call, as supervisorctl does)."""
        return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(str(self.socket)))

    def start(self) -> Supervisord:
        """Start supervisord in the foreground and wait until it answers."""
        with (self.root / "supervisord.out").open("ab") as out:
            self.proc = subprocess.Popen([str(self.venv / "bin" / "supervisord"), "-n", "-c", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited {self.proc.returncode}; see {self.root}")
            try:
                return self.rpc.supervisor.getState()["statename"] == "RUNNING"
            except OSError:
                return False

        wait_until(answers, 30, "supervisord's socket", 0.05)
        return self

    def info(self) -> dict[str, dict[str, Any]]:
        """``getAllProcessInfo`` keyed by program name."""
        return {p["name"]: p for p in self.rpc.supervisor.getAllProcessInfo()}

    def all_running(self, names: Iterable[str]) -> bool:
        """True when every named program is RUNNING."""
        info = self.info()
        return all(info.get(n, {}).get("statename") == "RUNNING" for n in names)

    def ctl(self, *args: str) -> float:
        """Run ``supervisorctl ARGS``; its wall time in seconds."""
        return _timed_cli([str(self.venv / "bin" / "supervisorctl"), "-c", str(self.config), *args])

    def stop(self) -> None:
        """SIGTERM supervisord (it stops its programs) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --------------------------------------------------------------------------
# The event-loop lag probe (runs inside citadeld)
# --------------------------------------------------------------------------

LAG_PROBE_PERIOD = 0.01


async def _probe_loop(out_path: Path) -> None:
    """Sleep ``LAG_PROBE_PERIOD`` again and again; record how late each wake-up is."""
    loop = asyncio.get_running_loop()
    batch: list[str] = []
    flushed = time.monotonic()
    with out_path.open("a") as out:
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_PROBE_PERIOD)
            now = loop.time()
            batch.append(f"{time.time():.4f} {now - t0 - LAG_PROBE_PERIOD:.6f}\n")
            if now - flushed >= 1.0:  # one small write a second: the probe must not be the load
                out.write("".join(batch))
                out.flush()
                batch.clear()
                flushed = now


def lag_probe_main(argv: list[str]) -> None:
    """``_common.py lag-probe OUT -- citadeld args``: citadeld with a loop-lag probe task."""
    out_path = Path(argv[0])
    from citadel_supervisor.cli.citadeld import main
    from citadel_supervisor.daemon import Daemon

    real_run = Daemon.run

    async def run_with_probe(self: Daemon) -> Any:
        probe = asyncio.get_running_loop().create_task(_probe_loop(out_path))
        try:
            return await real_run(self)
        finally:
            probe.cancel()

    Daemon.run = run_with_probe  # type: ignore[method-assign]
    sys.argv = ["citadeld", *argv[2:]]
    main()


def read_lag_probe(path: Path) -> list[tuple[float, float]]:
    """``(wall time, lag seconds)`` rows the probe wrote; an error when it wrote none
    (the probe did not run, and every lag figure would be empty)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            t, lag = line.split()
            rows.append((float(t), float(lag)))
    if not rows:
        raise RuntimeError(f"the loop-lag probe wrote nothing to {path}: it did not run inside citadeld")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "lag-probe":
        lag_probe_main(sys.argv[2:])
    else:
        sys.exit("usage: _common.py lag-probe OUT -- CITADELD-ARGS")
