"""A small client for the control API over the Unix socket (stdlib only, for a fast CLI)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any


class DaemonUnreachableError(Exception):
    """Nothing answers on the control socket."""


class ControlError(Exception):
    """The daemon answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, data: Any = None):
        super().__init__(message)
        self.status = status
        self.data = data


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("citadel", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnreachableError(
                f"citadeld is not reachable on {self.socket_path}: {exc.strerror} "
                "(is it running? --socket or CITADEL_SOCKET pick another socket)"
            ) from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachableError(
                f"permission denied on {self.socket_path}: ask to be added to its group"
            ) from None
        self.sock = sock


class ControlClient:
    """Calls the control API; raises ``DaemonUnreachableError`` or ``ControlError``."""

    def __init__(self, socket_path: str, timeout: float | None = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any, timeout: float | None) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket_path, timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn.getresponse()
        except DaemonUnreachableError:
            raise
        except OSError as exc:
            raise DaemonUnreachableError(f"citadeld on {self.socket_path} did not answer: {exc}") from None

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0) -> Any:
        """One request; the decoded JSON answer."""
        resp = self._open(method, path, body, self.timeout if timeout == -1.0 else timeout)
        raw = resp.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = {"error": raw.decode("utf-8", "replace")}
        if resp.status >= 400:
            message = data.get("error", f"HTTP {resp.status}") if isinstance(data, dict) else str(data)
            raise ControlError(resp.status, message, data)
        return data

    def stream(self, path: str) -> Iterator[str]:
        """A streaming GET; yields lines until the daemon closes the answer."""
        resp = self._open("GET", path, None, None)
        if resp.status >= 400:
            raw = resp.read()
            try:
                message = json.loads(raw).get("error", raw.decode())
            except ValueError:
                message = raw.decode("utf-8", "replace")
            raise ControlError(resp.status, message)
        while True:
            line = resp.readline()
            if not line:
                return
            yield line.decode("utf-8", "replace").rstrip("\n")
