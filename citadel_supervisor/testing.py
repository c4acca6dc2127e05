"""Helpers for tests and benchmarks of Citadel and its plugins: free ports and waits.

One copy for the test suite, ``bench/`` and the plugins' own tests (a plugin's
tests may use it too, as pytest's ``pytester`` serves pytest's plugins). Waits
poll a condition with a deadline; none sleeps in place of a condition.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import psutil


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open while they are picked, so
    none repeats; free when this returns, for a moment)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One free loopback port."""
    return free_ports(1)[0]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (for replicas at port + N)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65536:
            continue
        socks = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(socks):
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise TimeoutError(f"found no {count} consecutive free ports")


def wait_until(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll ``predicate()`` every ``interval`` seconds until it returns something truthy;
    that value. ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def process_gone(pid: int) -> bool:
    """True when no live process has this pid (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait until every pid is gone; the ones still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not process_gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not process_gone(p)]
