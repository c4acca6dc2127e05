"""sd_notify without dependencies: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

from __future__ import annotations

import os
import socket
import time

from loguru import logger


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; a no-op when not run by systemd."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog_for_us = usec is not None and (pid is None or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None.
        self.watchdog_interval = int(usec) / 2e6 if watchdog_for_us and usec else None

    @property
    def enabled(self) -> bool:
        """True when systemd listens."""
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram."""
        if not self.address:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            logger.warning("sd_notify to {} failed: {}", self.address, exc)

    def ready(self, status: str) -> None:
        """READY=1 with a status line."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Update the status line ``systemctl status`` shows."""
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        """RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload wants)."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def watchdog(self) -> None:
        """WATCHDOG=1: the loop is alive."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """STOPPING=1."""
        self.notify("STOPPING=1", "STATUS=stopping workers")
