"""Nobody locks the operator out: whatever readers, scrapers or a second citadeld do,
root's ``citadelctl`` is answered and the workers keep running.

Every test drives a real citadeld over real sockets: dropped follows give their
slots back, read-only callers cannot take every slot, a flood of idle exporter
connections cannot starve the control socket of file descriptors, a second
citadeld on the same state_dir stops at the lock, and a probe kind that does
not exist is a config error (and a probe that cannot be built never hangs the
exit).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CITADELD,
    Accounts,
    GuardedDaemon,
    RunningDaemon,
    drop_to,
    free_port,
    process_gone,
    wait_until,
)

from citadel_supervisor.control.server import SocketInUseError, bind_socket

SLEEPER = """
    [services.sleeper]
    type = "command"
    command = ["sleep", "600"]
    """


# -- helpers ------------------------------------------------------------------


def open_stream(path: Path, target: str, timeout: float = 10) -> tuple[socket.socket, int]:
    """GET ``target`` on the control socket and read the answer's head; the open socket and
    the status (a follow's stream stays open, so only the head is read)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        try:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: citadel\r\n\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was read: the 503 waits in the receive buffer
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except OSError:
        sock.close()
        raise
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return sock, int(match.group(1)) if match else 0


def follow_once(path: Path, target: str) -> socket.socket | None:
    """An accepted follow (200), or None when it was refused (the caller may try again)."""
    try:
        sock, status = open_stream(path, target)
    except OSError:
        return None
    if status == 200:
        return sock
    sock.close()
    return None


def worker_pid(daemon: RunningDaemon) -> int:
    """The sleeper worker's pid, once it runs."""
    pid: int = daemon.wait_state("sleeper", "running")["pid"]
    return pid


# -- 1. a follow ends when its caller hangs up ---------------------------------------------


def test_dropped_follows_give_their_slots_back(daemon_factory: Any) -> None:
    """Four times max_connections follows (logs and events), each dropped by its caller;
    then root's ``citadelctl status`` answers."""
    limit = 6
    daemon = daemon_factory(SLEEPER, env={"CITADEL_CONTROL_MAX_CONNECTIONS": str(limit),
                                          "CITADEL_CONTROL_MAX_REQUESTS": str(limit)})
    worker_pid(daemon)
    targets = ["/v1/logs/sleeper?follow=1", "/v1/events?follow=1"]
    for _ in range(4):
        # A whole round at once: every slot is taken, then every caller hangs up.
        held = [wait_until(lambda i=i: follow_once(daemon.socket, targets[i % 2]), timeout=20,
                           what="a follow to be accepted (earlier ones were dropped)")
                for i in range(limit)]
        for sock in held:
            sock.close()
    result = wait_until(lambda: daemon.ctl("status", check=False, timeout=10).returncode == 0 or None,
                        timeout=20, what="citadelctl status to answer after the dropped follows")
    assert result
    assert "sleeper" in daemon.ctl("status").stdout


# -- 2. read-only callers cannot take every slot -------------------------------------------


@pytest.fixture
def reader_setup() -> Iterator[dict[str, Any]]:
    """A citadeld whose socket group has a read-only user, with 8 connection slots, 3 reserved."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create a read-only user")
    tag = os.urandom(3).hex()
    accounts = Accounts()
    # A folder every user may traverse (pytest's own tmp folders are 0700 under root's).
    root = Path(tempfile.mkdtemp(prefix="citadel-lockout-", dir="/tmp"))
    root.chmod(0o755)
    daemon = None
    try:
        sock_group, read_group = f"clsock{tag}", f"clread{tag}"
        accounts.group(sock_group)
        accounts.group(read_group)
        reader = accounts.user(f"clrd{tag}", [sock_group, read_group])
        access = f'socket_group = "{sock_group}"\nread_groups = ["{read_group}"]\n'
        env = {"CITADEL_CONTROL_MAX_CONNECTIONS": "8", "CITADEL_CONTROL_MAX_REQUESTS": "8",
               "CITADEL_CONTROL_RESERVED_CONNECTIONS": "3"}
        daemon = GuardedDaemon(root, SLEEPER, access, {**os.environ, **env}).start()
        worker_pid(daemon)
        yield {"daemon": daemon, "reader": reader}
    finally:
        if daemon is not None:
            daemon.stop()
        accounts.remove()
        shutil.rmtree(root, ignore_errors=True)


class HeldFollows:
    """A forked child that becomes ``user``, opens ``count`` event follows and holds the
    accepted ones open until ``release``; ``statuses`` are the answers it got."""

    def __init__(self, user: pwd.struct_passwd, path: Path, count: int):
        report_r, report_w = os.pipe()
        self._hold_r, self._hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(report_r)
                os.close(self._hold_w)
                drop_to(user)
                socks, statuses = [], []
                for _ in range(count):
                    sock, status = open_stream(path, "/v1/events?follow=1")
                    statuses.append(status)
                    if status == 200:
                        socks.append(sock)
                    else:
                        sock.close()
                os.write(report_w, json.dumps({"uid": os.getuid(), "statuses": statuses}).encode() + b"\n")
                os.read(self._hold_r, 1)  # until the parent closes its end
                code = 0
            except BaseException as exc:  # noqa: BLE001  (the parent reads what went wrong)
                os.write(report_w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(self._hold_r)
        with os.fdopen(report_r) as src:
            self.report: dict[str, Any] = json.loads(src.readline() or '{"error": "no report"}')

    def release(self) -> None:
        """Let the child close its follows and exit; reap it."""
        os.close(self._hold_w)
        os.waitpid(self.pid, 0)


def test_read_only_callers_cannot_take_every_slot(reader_setup: dict[str, Any]) -> None:
    """A read-group member opens 12 follows against 8 slots with 3 reserved: it gets 5,
    and root's citadelctl is still answered (and may act) while it holds them."""
    daemon, reader = reader_setup["daemon"], reader_setup["reader"]
    pid = worker_pid(daemon)
    held = HeldFollows(reader, daemon.socket, 12)
    try:
        assert "error" not in held.report, held.report
        assert held.report["uid"] == reader.pw_uid
        statuses = held.report["statuses"]
        assert statuses.count(200) == 5 and statuses.count(503) == 7, statuses
        assert daemon.status()["sleeper"]["pid"] == pid
        daemon.ctl("restart", "sleeper", "--wait")
        assert daemon.status()["sleeper"]["state"] == "running"
    finally:
        held.release()
    assert f"refusing a read-only caller, uid {reader.pw_uid}" in daemon.logs()


# -- 3. an exporter flood cannot starve the control socket ---------------------------------


@pytest.fixture
def low_nofile_daemon(tmp_path: Path) -> Iterator[tuple[RunningDaemon, int]]:
    """A citadeld under RLIMIT_NOFILE 256 (systemd's default is 1024) with an exporter."""
    port = free_port()
    daemon = RunningDaemon(tmp_path, SLEEPER + f'\n[exporter]\nlisten = "127.0.0.1:{port}"\n',
                           wrapper=["prlimit", "--nofile=256:256", "--"])
    try:
        daemon.start()
        yield daemon, port
    finally:
        daemon.stop()


def test_idle_exporter_connections_cannot_starve_the_control_socket(
        low_nofile_daemon: tuple[RunningDaemon, int]) -> None:
    """400 idle TCP connections to the exporter (more than citadeld has descriptors):
    citadelctl status answers, a worker restarts, and idle ones are closed in time."""
    daemon, port = low_nofile_daemon
    pid = worker_pid(daemon)
    socks: list[socket.socket] = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(sock)
        started = time.monotonic()
        assert "sleeper" in daemon.ctl("status", timeout=10).stdout
        assert time.monotonic() - started < 5
        daemon.ctl("restart", "sleeper", "--wait", timeout=30)
        worker = daemon.status()["sleeper"]
        assert worker["state"] == "running" and worker["pid"] != pid
        assert re.search(r"exporter: at most \d+ connections \(RLIMIT_NOFILE 256", daemon.logs())

        def healthz() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                    probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return probe.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        # The held connections say nothing: the exporter closes them after its idle timeout.
        wait_until(healthz, timeout=30, what="the exporter to close idle connections and answer")
    finally:
        for sock in socks:
            sock.close()


# -- 4. one citadeld per state_dir -------------------------------------------------------


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connect to ``path`` until its listen backlog is full (connect fails with EAGAIN)."""
    socks = []
    for _ in range(10_000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return socks
        socks.append(sock)
    raise AssertionError(f"{path}'s backlog never filled")


def test_a_full_backlog_is_not_a_stale_socket(tmp_path: Path) -> None:
    """A socket whose listener does not accept (EAGAIN on connect) is in use, not stale."""
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    socks = fill_backlog(path)
    try:
        inode = path.stat().st_ino
        with pytest.raises(SocketInUseError, match=str(path)):
            bind_socket(path, None)
        assert path.stat().st_ino == inode
    finally:
        for sock in socks:
            sock.close()
        listener.close()
    # Nobody listens any more (ECONNREFUSED): now it is stale, and replaced.
    bind_socket(path, None).close()


def test_a_second_citadeld_stops_at_the_lock(daemon_factory: Any) -> None:
    """The first citadeld is stopped (SIGSTOP) with a full backlog, so its socket looks
    dead to a connect; a second one on the same config exits at the lock, naming it and
    the first one's pid, and the first one's socket and worker are untouched."""
    first = daemon_factory(SLEEPER)
    pid = worker_pid(first)
    assert first.proc is not None
    inode = first.socket.stat().st_ino
    lock = first.root / "run" / "citadeld.lock"
    first.proc.send_signal(signal.SIGSTOP)
    socks: list[socket.socket] = []
    second = None
    try:
        socks = fill_backlog(first.socket)
        second = subprocess.Popen([CITADELD, "--config", str(first.config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=first.env)
        try:
            _, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            second.terminate()
            _, err = second.communicate(timeout=60)
            raise AssertionError(f"the second citadeld kept running:\n{err}") from None
        assert second.returncode != 0, err
        assert str(lock) in err and f"pid {first.proc.pid}" in err, err
        assert first.socket.stat().st_ino == inode
        assert not process_gone(pid)
    finally:
        for sock in socks:
            sock.close()
        first.proc.send_signal(signal.SIGCONT)
    # Woken, the first citadeld accepts the closed backlog connections, and they count
    # against its connection cap until it has read their ends: a caller in that moment
    # is told to try again (503). It must answer again, with its worker untouched.
    answer = wait_until(lambda: _served_status(first), timeout=30, what="the first citadeld to answer again")
    assert answer["sleeper"]["pid"] == pid


def _served_status(daemon: RunningDaemon) -> dict[str, Any] | None:
    """``status --json`` by worker, or None when citadeld said "too many connections"."""
    result = daemon.ctl("status", "--json", check=False)
    if result.returncode != 0 and "too many connections" in result.stderr:
        return None
    assert result.returncode == 0, result.stderr
    return {w["name"]: w for w in json.loads(result.stdout)["workers"]}


# -- 5. probe kinds ----------------------------------------------------------------------------


def _probe_config(liveness: str) -> str:
    """The sleeper with this liveness probe."""
    return SLEEPER + f"probes.liveness = {liveness}\n"


def test_check_rejects_an_unknown_probe_kind(tmp_path: Path) -> None:
    """``citadeld --check`` names the key path, the bad kind and the known ones."""
    daemon = RunningDaemon(tmp_path, _probe_config('{ kind = "htpp", url = "http://127.0.0.1:1/" }'))
    result = subprocess.run([CITADELD, "--check", "--config", str(daemon.config)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "services.sleeper.probes.liveness.kind: no probe kind 'htpp'" in result.stderr
    assert "did you mean 'http'?" in result.stderr
    assert re.search(r"known kinds: exec, http, inference, progress, tcp", result.stderr), result.stderr


def test_reload_rejects_an_unknown_probe_kind(daemon_factory: Any) -> None:
    """A reload to an unknown probe kind fails, naming it, and changes nothing."""
    daemon = daemon_factory(SLEEPER)
    pid = worker_pid(daemon)
    daemon.write_config(_probe_config('{ kind = "htpp", url = "http://127.0.0.1:1/" }'))
    result = daemon.ctl("reload", check=False)
    assert result.returncode != 0
    assert "services.sleeper.probes.liveness.kind: no probe kind 'htpp'" in result.stdout + result.stderr
    assert daemon.status()["sleeper"]["pid"] == pid


def test_a_probe_that_cannot_be_built_never_hangs_the_exit(daemon_factory: Any) -> None:
    """A tcp probe whose address has no port fails to build: it fails as a probe does
    (the worker, restart = "never", stops), and SIGTERM ends citadeld."""
    daemon = daemon_factory(SLEEPER + 'restart = "never"\n'
                            + 'probes.liveness = { kind = "tcp", address = "no-port", period = 0.2, '
                            + 'failure_threshold = 1 }\n')
    wait_until(lambda: "liveness probe failed 1 times: the tcp probe could not be built" in daemon.logs(),
               what="the liveness probe to fail")
    daemon.wait_state("sleeper", "stopped")
    (pid,) = re.findall(r"stopped -> starting, pid=(\d+)", daemon.logs())
    assert process_gone(int(pid))
    assert daemon.stop(timeout=30) == 0
