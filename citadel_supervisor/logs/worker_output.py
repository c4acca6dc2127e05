"""Worker output: read from pipes without blocking, to a rotated file, a ring and the log.

Each worker's stdout and stderr are read by the event loop as they become
readable, in chunks, never line by line, so a worker writing as fast as it
can costs the loop a few short callbacks per 64 KiB. Every complete line (a
longer one is cut, never through a secret) is masked, appended to ``log_dir/NAME.log`` (rotated by size, by one writer
thread, so a rename or a slow disk never stalls the loop), kept in a ring
of recent lines, and forwarded to the daemon's log at a bounded rate; the
lines over the rate are counted and reported as "N lines suppressed".
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from ..waits import wait_event
from .daemon_log import escape_control
from .masking import masker

_READ_SIZE = 65536
# One thread writes every worker's log file, chunk by chunk in order: a rotation's
# renames or a slow disk cost the writer thread, never the event loop.
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-logs")
# Bytes waiting for that thread, per worker, beyond which chunks are dropped (counted).
_MAX_PENDING = 4 * 1024 * 1024
# A "line" longer than this is cut, so one endless line cannot grow memory.
_MAX_LINE = 65536


class RotatingFile:
    """An append-only byte file rotated by size, keeping ``backups`` old files.

    Write errors (a full disk) never raise: the lines are counted as dropped
    and the file is retried on the next write.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped_lines = 0
        self._fh: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fh is None:
            self._fh = _open_log(self.path)
            self._size = os.fstat(self._fh).st_size
        return self._fh

    def write(self, data: bytes, lines: int) -> None:
        """Append ``data`` (``lines`` whole lines), rotating whenever the file is full.

        The lines that fit fill the current file first; the rest go to the
        next, so each file stays within ``max_bytes`` (a single line longer
        than that has a file to itself).
        """
        try:
            while data:
                fh = self._open()
                piece = _lines_within(data, self.max_bytes - self._size)
                if not piece:
                    if self._size:
                        self._rotate()
                        continue
                    end = data.find(b"\n")
                    piece = data if end < 0 else data[: end + 1]
                os.write(fh, piece)
                self._size += len(piece)
                data = data[len(piece):]
        except OSError:
            self.dropped_lines += lines
            self.close()

    def _rotate(self) -> None:
        self.close()
        if self.backups == 0:
            # Through a descriptor opened as the file is: truncate() follows a symlink.
            fd = _open_log(self.path)
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        """Close the file (it reopens on the next write)."""
        if self._fh is not None:
            try:
                os.close(self._fh)
            except OSError:
                pass
            self._fh = None


def _open_log(path: Path) -> int:
    """Open a worker's log file to append, refusing a symlink or anything not a regular file.

    A worker may write in the log directory (or share the daemon's uid): had it
    put a symlink or a FIFO where its log file goes, citadeld would append its
    output to whatever file the link names, or block on the FIFO. Raises
    ``OSError`` (the lines are then counted as dropped).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def _lines_within(data: bytes, room: int) -> bytes:
    """The longest run of whole lines at the start of ``data`` that fits in ``room`` bytes."""
    if len(data) <= room:
        return data
    cut = data.rfind(b"\n", 0, room) if room > 0 else -1
    return data[: cut + 1] if cut >= 0 else b""


class RateLimiter:
    """A token bucket of lines per second, with a burst of ``4 x rate``."""

    def __init__(self, rate: float):
        self.rate = rate
        self.burst = max(rate * 4, 1.0)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, wanted: int) -> int:
        """How many of ``wanted`` lines may pass now."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


class WorkerOutput:
    """One worker's captured output, across all its restarts."""

    def __init__(
        self,
        worker: str,
        service: str,
        log_dir: Path | None,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 5,
        ring_lines: int = 1000,
        forward_rate: float = 50.0,
    ):
        self.worker = worker
        self.service = service
        self.file = RotatingFile(log_dir / f"{worker}.log", max_bytes, backups) if log_dir else None
        self.ring: deque[bytes] = deque(maxlen=ring_lines)
        self.limiter = RateLimiter(forward_rate)
        self.suppressed = 0
        self.total_lines = 0
        self._partial: dict[int, bytes] = {}
        self._open: set[int] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._followers: set[asyncio.Queue[str | None]] = set()
        self._log = logger.bind(worker=worker, service=service)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        #: Called with each new line while set (the worker watches its startup phase).
        self.line_watcher: Callable[[str], None] | None = None

    # -- reading ------------------------------------------------------------

    def attach(self, fds: Iterable[int]) -> None:
        """Start reading these pipe fds; they are closed at end of file."""
        loop = asyncio.get_running_loop()
        for fd in fds:
            os.set_blocking(fd, False)
            self._open.add(fd)
            self._partial[fd] = b""
            loop.add_reader(fd, self._on_readable, fd)
        self._drained.clear()

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd(fd)
            return
        buf = self._partial[fd] + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) < _MAX_LINE:
                self._partial[fd] = buf
                return
            self._cut_endless_line(fd, buf)
            return
        self._partial[fd] = buf[cut + 1:]
        self._take(buf[: cut + 1])

    def _cut_endless_line(self, fd: int, buf: bytes) -> None:
        """Pass on the start of a line longer than ``_MAX_LINE``, never cutting through a secret.

        The last ``masker.longest`` bytes wait for the next read: they may be the
        start of a secret whose end has not arrived yet. A secret spanning the
        cut lies whole in ``buf``, and the cut moves past it.
        """
        keep = min(masker.longest, _MAX_LINE // 2)
        at = masker.cut_point(buf, len(buf) - keep)
        self._partial[fd] = buf[at:]
        self._take(buf[:at] + b"\n")

    def _close_fd(self, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        rest = self._partial.pop(fd, b"")
        if rest:
            self._take(rest + b"\n")
        try:
            os.close(fd)
        except OSError:
            pass
        self._open.discard(fd)
        if not self._open:
            self._drained.set()

    async def drained(self, timeout: float) -> None:
        """Wait (bounded) until every attached pipe reached end of file."""
        await wait_event(self._drained, timeout)

    def detach(self) -> None:
        """Stop reading (the pipes' remaining holders are gone or ignored)."""
        for fd in list(self._open):
            self._close_fd(fd)

    # -- one chunk of complete lines ----------------------------------------

    def _take(self, chunk: bytes) -> None:
        chunk = masker.mask_bytes(chunk)
        lines = chunk.split(b"\n")
        lines.pop()  # the chunk ends with a newline
        count = len(lines)
        self.total_lines += count
        if self.file is not None:
            self._write_file(chunk, count)
        self.ring.extend(lines)
        if self.line_watcher is not None:
            for line in lines:
                self.line_watcher(line.decode("utf-8", "replace"))
        if self._followers:
            for line in lines:
                text = line.decode("utf-8", "replace")
                for queue in list(self._followers):
                    if queue.qsize() < 10000:
                        queue.put_nowait(text)
        granted = self.limiter.take(count)
        for line in lines[:granted]:
            self._log.info(escape_control(line.decode("utf-8", "replace")))
        if granted < count:
            self.suppressed += count - granted
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(1.0, self.flush_suppressed)

    def flush_suppressed(self) -> None:
        """Log how many lines the rate limit held back since the last report."""
        self._flush_handle = None
        if self.suppressed:
            self._log.warning("{} lines suppressed (rate limit); all are in the worker's log file",
                              self.suppressed)
            self.suppressed = 0

    # -- reading back -------------------------------------------------------

    def recent(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines (all the ring holds when None), already masked."""
        lines = list(self.ring)
        if n is not None:
            lines = lines[-n:] if n > 0 else []
        return [line.decode("utf-8", "replace") for line in lines]

    def follow(self) -> asyncio.Queue[str | None]:
        """A queue of every new line from now on; ``unfollow`` it when done."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        """Stop feeding ``queue``."""
        self._followers.discard(queue)

    def _write_file(self, chunk: bytes, count: int) -> None:
        """Hand a chunk to the writer thread; past ``_MAX_PENDING`` bytes, count it dropped."""
        assert self.file is not None
        with self._pending_lock:
            if self._pending > _MAX_PENDING:
                self.file.dropped_lines += count
                return
            self._pending += len(chunk)
        _WRITER.submit(self._write_now, self.file, chunk, count)

    def _write_now(self, file: RotatingFile, chunk: bytes, count: int) -> None:
        try:
            file.write(chunk, count)
        finally:
            with self._pending_lock:
                self._pending -= len(chunk)

    def close(self) -> None:
        """Stop reading, report what was suppressed, write what is pending and close the file."""
        self.detach()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush_suppressed()
        if self.file is not None:
            _WRITER.submit(self.file.close).result()
