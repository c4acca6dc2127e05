"""sd_notify: a real datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import sys
import time

import psutil


def _collect(sock: socket.socket, until: str, timeout: float = 20) -> list[str]:
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        messages.append(data)
        if until in data:
            return messages
    raise AssertionError(f"no {until!r} in {messages}")


def test_ready_status_watchdog_reloading_stopping(daemon_factory, tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    daemon = daemon_factory(f"""
        [services.sleeper]
        type = "command"
        command = ["{sys.executable}", "-c", "import time; time.sleep(3600)"]
        """, start=False, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    daemon.start()
    got = _collect(sock, "READY=1")
    ready = next(m for m in got if "READY=1" in m)
    assert "STATUS=" in ready and "workers running" in ready
    assert _collect(sock, "WATCHDOG=1", timeout=30)
    # The worker does not inherit citadeld's own systemd variables.
    worker_env = psutil.Process(daemon.wait_state("sleeper", "running")["pid"]).environ()
    assert "NOTIFY_SOCKET" not in worker_env and "WATCHDOG_USEC" not in worker_env
    daemon.signal(signal.SIGHUP)
    reloading = next(m for m in _collect(sock, "RELOADING=1") if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reloading
    _collect(sock, "READY=1")  # ready again after the reload
    daemon.signal(signal.SIGTERM)
    _collect(sock, "STOPPING=1")
    assert daemon.proc.wait(20) == 0
