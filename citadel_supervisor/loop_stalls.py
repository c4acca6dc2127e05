"""Evidence when citadeld's event loop stops running: a watcher thread names where it is stuck.

While the loop is stuck (a blocking call, a starved CPU), citadeld answers nobody:
not the control socket, not the exporter, not a worker's exit. The exporter's
``citadel_loop_lag_seconds`` says so afterwards; this says *where*, while it
happens: when the loop has not run for ``threshold`` seconds, a thread logs the
loop thread's stack, the CPU time citadeld used meanwhile and the host's load, once
per stall, and logs again when the loop runs. Only code locations are logged,
never a variable's value, so no secret can reach the log this way.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback

from loguru import logger

#: Seconds without a loop turn before a stall is reported.
STALL_THRESHOLD = 5.0
#: Stack frames logged, innermost last.
_FRAMES = 15


class LoopStallReporter:
    """Beats on the event loop every ``period`` seconds; a thread reports a beat late by ``threshold``."""

    def __init__(self, threshold: float = STALL_THRESHOLD, period: float | None = None):
        self.threshold = threshold
        self.period = period if period is not None else min(0.5, threshold / 4)
        #: Stalls reported so far.
        self.stalls = 0
        self._last_beat = time.monotonic()
        self._stalled_at: float | None = None  # monotonic time of the last beat before a reported stall
        self._cpu_at_beat = time.process_time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop_thread = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start beating on the running loop (call from it) and watching from a thread."""
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat_on(loop)
        self._thread = threading.Thread(target=self._watch, name="citadel-loop-stalls", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and watching."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join()

    def _beat_on(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        with self._lock:
            stalled_at, self._stalled_at = self._stalled_at, None
            self._last_beat, self._cpu_at_beat = now, time.process_time()
        if stalled_at is not None:
            logger.warning("the event loop runs again after {:.1f}s stuck", now - stalled_at)
        if not self._stop.is_set():
            self._handle = loop.call_later(self.period, self._beat_on, loop)

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                if self._stalled_at is not None:
                    continue
                stuck = time.monotonic() - self._last_beat
                if stuck < self.threshold:
                    continue
                self._stalled_at = self._last_beat
                cpu = time.process_time() - self._cpu_at_beat
                self.stalls += 1
            frame = sys._current_frames().get(self._loop_thread)
            where = "".join(traceback.format_stack(frame)[-_FRAMES:]) if frame is not None else "(no stack)\n"
            logger.warning("the event loop has not run for {:.1f}s: citadeld answers nobody meanwhile "
                           "(it used {:.1f}s of CPU in that time; host load {}); the loop is at:\n{}",
                           stuck, cpu, _load(), where.rstrip("\n"))


def _load() -> str:
    try:
        return " ".join(f"{n:.2f}" for n in os.getloadavg())
    except OSError:
        return "unknown"
