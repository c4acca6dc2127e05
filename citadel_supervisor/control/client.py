"""A small client for the control API over the Unix socket.

It speaks just enough HTTP/1.0 on a plain socket (one request per
connection, the answer ends when the daemon closes it), so that
``citadelctl`` imports neither ``http.client`` nor ``email`` and starts fast.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any, BinaryIO


class DaemonUnreachableError(Exception):
    """Nothing answers on the control socket."""


class ControlError(Exception):
    """The daemon answered with an error (or refused the caller); ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, data: Any = None):
        super().__init__(message)
        self.status = status
        self.data = data


def _socket_group(path: str) -> str:
    try:
        import grp

        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "its group"


class _Answer:
    """One HTTP answer: status, headers, and the body as a file."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.file: BinaryIO = sock.makefile("rb")
        line = self.file.readline(65537)
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise OSError(f"not an HTTP answer: {line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        while True:
            header = self.file.readline(65537)
            if header in (b"\r\n", b"\n", b""):
                break
            key, _, value = header.decode("latin-1").partition(":")
            self.headers[key.strip().lower()] = value.strip()

    def read(self) -> bytes:
        length = self.headers.get("content-length")
        return self.file.read(int(length)) if length and length.isdigit() else self.file.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")}


def _error_of(answer: _Answer) -> ControlError:
    data = _decode(answer.read())
    message = data.get("error", f"HTTP {answer.status}") if isinstance(data, dict) else str(data)
    return ControlError(answer.status, message, data)


class ControlClient:
    """Calls the control API; raises ``DaemonUnreachableError`` or ``ControlError``."""

    def __init__(self, socket_path: str, timeout: float | None = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
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
            raise ControlError(403, f"permission denied on {self.socket_path}: only root and "
                                    f"members of {_socket_group(self.socket_path)} may connect") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachableError(f"citadeld is not reachable on {self.socket_path}: {exc}") from None
        return sock

    def _open(self, method: str, path: str, body: Any, timeout: float | None) -> _Answer:
        sock = self._connect(timeout)
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.0\r\nHost: citadel\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        try:
            sock.sendall(head.encode() + b"\r\n" + payload)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # citadeld may answer at once and hang up before the request is sent (a 503 to
            # a connection over its cap): its answer still waits in the socket.
            try:
                return _Answer(sock)
            except OSError:
                sock.close()
                raise DaemonUnreachableError(f"citadeld on {self.socket_path} did not answer: {exc}") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachableError(f"citadeld on {self.socket_path} did not answer: {exc}") from None
        try:
            return _Answer(sock)
        except OSError as exc:
            sock.close()
            raise DaemonUnreachableError(f"citadeld on {self.socket_path} did not answer: {exc}") from None

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0) -> Any:
        """One request; the decoded JSON answer. ``timeout`` None waits as long as it takes."""
        answer = self._open(method, path, body, self.timeout if timeout == -1.0 else timeout)
        try:
            if answer.status >= 400:
                raise _error_of(answer)
            return _decode(answer.read())
        except OSError as exc:
            raise DaemonUnreachableError(f"citadeld on {self.socket_path} did not answer: {exc}") from None
        finally:
            answer.close()

    def stream(self, path: str) -> Iterator[str]:
        """A streaming GET; yields lines until the daemon closes the answer."""
        answer = self._open("GET", path, None, None)
        try:
            if answer.status >= 400:
                raise _error_of(answer)
            for line in answer.file:
                yield line.decode("utf-8", "replace").rstrip("\n")
        finally:
            answer.close()

    def open_stream(self, path: str) -> tuple[Iterator[str], socket.socket]:
        """Like ``stream``, plus the socket, which another thread may ``shutdown`` to end it."""
        answer = self._open("GET", path, None, None)
        if answer.status >= 400:
            try:
                raise _error_of(answer)
            finally:
                answer.close()

        def lines() -> Iterator[str]:
            try:
                for line in answer.file:
                    yield line.decode("utf-8", "replace").rstrip("\n")
            except OSError:
                return
            finally:
                answer.close()

        return lines(), answer.sock
