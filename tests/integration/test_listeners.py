"""A worker's API key goes only to its own listener: the lookup of a port's holder in /proc,
and the inference probe and ``/v1/status`` against a stranger on the worker's port.

Real sockets and processes: the stranger is a process the test starts (not citadeld),
listening on the worker's port and recording every byte it is sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningDaemon, free_port

from citadel_supervisor.process.listeners import (
    command_line,
    listener_pid,
    listening_sockets,
    port_owner,
    reaches,
)

SQUATTER = Path(__file__).parents[1] / "workers" / "squatter.py"
KEY = "sk-worker-key-never-for-strangers-7f3a"


def _listening(host: str = "127.0.0.1", port: int = 0, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, port))
    sock.listen()
    return sock


# -- the lookup ---------------------------------------------------------------------------


def test_the_listener_is_found_among_the_given_pids_only() -> None:
    with _listening() as sock:
        port = sock.getsockname()[1]
        assert any(s.port == port and str(s.address) == "127.0.0.1" for s in listening_sockets(port))
        assert listener_pid("127.0.0.1", port, {os.getpid()}) == os.getpid()
        assert listener_pid("127.0.0.1", port, set()) is None
        assert port_owner("127.0.0.1", port, lambda: {os.getpid()}).owner == "worker"
        stranger = port_owner("127.0.0.1", port, set)
        assert stranger.owner == "other" and stranger.strangers
        assert stranger.holder() == (os.getpid(), command_line(os.getpid()))
        assert f"port {port} is held by pid {os.getpid()} (" in stranger.refusal()


#: Run as citadeld would without CAP_SYS_PTRACE (PR_CAPBSET_DROP = 24, CAP_SYS_PTRACE = 19):
#: then another user's /proc/PID/fd cannot be read. Prints port_owner's verdict.
_OWNER_WITHOUT_PTRACE = (
    "import ctypes, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(24, 19, 0, 0, 0) != 0: sys.exit('drop failed')\n"
    "import os\n"
    "os.execv(sys.executable, [sys.executable, '-c', "
    "'import sys; from citadel_supervisor.process.listeners import port_owner; "
    "print(port_owner(\"127.0.0.1\", int(sys.argv[1]), lambda: [int(sys.argv[2])]).owner)', "
    "*sys.argv[1:]])\n"
)
_LISTEN_AS_NOBODY = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); "
                     "s.listen(); print('up', flush=True); time.sleep(600)")


def _owner_without_ptrace(port: int, member: int) -> str:
    result = subprocess.run([sys.executable, "-c", _OWNER_WITHOUT_PTRACE, str(port), str(member)],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_a_worker_run_as_its_own_user_is_known_by_its_sockets_owner() -> None:
    """A citadeld that may not read the fds of a worker run as another user (no
    CAP_SYS_PTRACE) knows the worker's listener by the socket's uid; a listener of
    citadeld's own uid on that port is still a stranger's."""
    port = free_port()
    worker = subprocess.Popen(["/usr/bin/python3", "-c", _LISTEN_AS_NOBODY, str(port)], user="nobody",
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "up\n"
        assert _owner_without_ptrace(port, worker.pid) == "worker"
    finally:
        worker.kill()
        worker.wait()
    with _listening(port=port):
        member = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(600)"], user="nobody")
        try:
            assert _owner_without_ptrace(port, member.pid) == "other"
        finally:
            member.kill()
            member.wait()


def test_a_bound_socket_that_does_not_listen_is_no_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # holds the port, so that nothing else can listen there
        port = sock.getsockname()[1]
        calls: list[int] = []
        owner = port_owner("127.0.0.1", port, lambda: calls.append(1) or {os.getpid()})
        assert owner.owner == "none" and not calls, "the worker's pids are read only when needed"
        assert listener_pid("127.0.0.1", port, {os.getpid()}) is None
        assert "nothing listens on 127.0.0.1:" in owner.refusal()


def test_a_wildcard_listener_reaches_loopback_and_another_address_does_not() -> None:
    with _listening("0.0.0.0") as everywhere:
        port = everywhere.getsockname()[1]
        assert listener_pid("127.0.0.1", port, {os.getpid()}) == os.getpid()
        assert port_owner("127.0.0.1", port, set).owner == "other"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # keeps 127.0.0.1 free of listeners on this port
        port = holder.getsockname()[1]
        with _listening("127.0.0.2", port):
            assert listener_pid("127.0.0.2", port, {os.getpid()}) == os.getpid()
            assert port_owner("127.0.0.1", port, set).owner == "none"


def test_an_ipv6_listener_is_decoded() -> None:
    try:
        sock = _listening("::1", 0, socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with sock:
        port = sock.getsockname()[1]
        assert any(str(s.address) == "::1" for s in listening_sockets(port))
        assert listener_pid("::1", port, {os.getpid()}) == os.getpid()
        assert port_owner("127.0.0.1", port, set).owner == "none"


@pytest.mark.parametrize(("host", "address", "reached"), [
    ("127.0.0.1", "127.0.0.1", True), ("127.0.0.1", "0.0.0.0", True), ("127.0.0.1", "::", True),
    ("127.0.0.1", "::ffff:127.0.0.1", True), ("127.0.0.1", "127.0.0.2", False),
    ("127.0.0.1", "::1", False), ("::1", "::", True), ("::1", "0.0.0.0", False),
    ("[::1]", "::1", True), ("0.0.0.0", "127.0.0.5", True), ("localhost", "10.1.2.3", True),
])
def test_which_listeners_a_host_may_reach(host: str, address: str, reached: bool) -> None:
    assert reaches(host, ipaddress.ip_address(address)) is reached


# -- the inference probe and /v1/status, under a real citadeld ------------------------------


class Stranger:
    """A process of the test's own (not citadeld's) that listens on a port and records."""

    def __init__(self, port: int, record: Path):
        self.record = record
        self.proc = subprocess.Popen([sys.executable, str(SQUATTER), "--port", str(port),
                                      "--record", str(record)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "listening", "the stranger could not listen"

    def received(self) -> str:
        """Every request it got so far (JSON lines)."""
        return self.record.read_text() if self.record.exists() else ""

    def stop(self) -> None:
        """Kill it."""
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def strangers() -> Iterator[list[Stranger]]:
    """Strangers started by a test; killed afterwards."""
    made: list[Stranger] = []
    yield made
    for stranger in made:
        stranger.stop()


def _fake_python(folder: Path, script: str) -> Path:
    """An executable that stands in for vLLM's interpreter (``python`` of a vllm service)."""
    path = folder / "fake-python"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def _vllm_service(python: Path, port: int) -> str:
    return f"""
        [services.chat]
        type = "vllm"
        model = "fake-org/fake-model"
        served_model_name = "chat"
        python = "{python}"
        port = {port}
        api_key = "${{CHAT_KEY}}"
        stop_timeout = 5
        probes.liveness = {{ kind = "inference", period = 0.1, timeout = 5, failure_threshold = 1000000 }}
        """


def _liveness(status: dict[str, Any]) -> dict[str, Any]:
    return status["chat"]["probes"].get("liveness") or {}


def _detail(status: dict[str, Any]) -> str:
    last = _liveness(status).get("last") or {}
    return str(last.get("detail", ""))


def test_the_inference_probe_never_sends_the_key_to_a_stranger_on_the_port(
        daemon_factory: Any, tmp_path: Path, strangers: list[Stranger]) -> None:
    port = free_port()
    python = _fake_python(tmp_path, "exec sleep 600")  # a worker that never listens
    daemon: RunningDaemon = daemon_factory(_vllm_service(python, port), env={"CHAT_KEY": KEY})
    daemon.wait_state("chat", "running")
    before = daemon.wait_for(lambda s: _liveness(s).get("failures_total") and s, what="a failed check")

    stranger = Stranger(port, tmp_path / "received.jsonl")
    strangers.append(stranger)
    # Either the probe refuses, naming the stranger, or (the bug) the stranger got a request.
    status = daemon.wait_for(lambda s: (f"held by pid {stranger.proc.pid} (" in _detail(s)
                                        or stranger.received()) and s,
                             what="the probe to check the stranger's port")
    assert KEY not in stranger.received(), "the worker's API key reached a stranger on its port"
    assert stranger.received() == "", "the probe sent a request to a stranger"
    detail = _detail(status)
    assert f"port {port} is held by pid {stranger.proc.pid} ({sys.executable}" in detail, detail
    assert "not by the worker: the API key is not sent" in detail, detail
    assert status["chat"]["port_owner"] == "other"
    assert status["chat"]["state"] == "running"
    # Before the stranger came, nothing listened: refused too (nobody to name).
    assert f"nothing listens on 127.0.0.1:{port}: the API key is not sent" in _detail(before)
    assert before["chat"]["port_owner"] == "none"
    # A few more checks: still nothing sent.
    failures = _liveness(status)["failures_total"]
    daemon.wait_for(lambda s: _liveness(s)["failures_total"] >= failures + 3, what="more checks")
    assert stranger.received() == ""
    assert KEY not in daemon.logs()


def test_the_inference_probe_sends_the_key_to_the_workers_own_listener(
        daemon_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    record = tmp_path / "worker-received.jsonl"
    python = _fake_python(tmp_path, f'exec "{sys.executable}" "{SQUATTER}" --record "{record}" "$@"')
    daemon: RunningDaemon = daemon_factory(_vllm_service(python, port), env={"CHAT_KEY": KEY})
    status = daemon.wait_for(lambda s: (_liveness(s).get("last") or {}).get("ok") and s,
                             what="a passing inference check")
    assert _detail(status) == "HTTP 200"
    assert status["chat"]["port_owner"] == "worker"
    requests = [json.loads(line) for line in record.read_text().splitlines()]
    completions = [r for r in requests if r["path"] == "/v1/completions"]
    assert completions and completions[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_status_says_none_for_a_port_nobody_holds_and_null_without_a_port(daemon_factory: Any) -> None:
    port = free_port()
    daemon: RunningDaemon = daemon_factory(f"""
        [services.quiet]
        type = "command"
        command = ["sleep", "600"]
        port = {port}

        [services.portless]
        type = "command"
        command = ["sleep", "600"]
        """)
    status = daemon.wait_for(lambda s: all(w["state"] == "running" for w in s.values()) and s,
                             what="both running")
    assert status["quiet"]["port_owner"] == "none"
    assert status["portless"]["port_owner"] is None
