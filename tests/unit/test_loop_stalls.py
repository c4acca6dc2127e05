"""The stall reporter names where a stuck event loop is, and says when it runs again."""

from __future__ import annotations

import asyncio
import threading
import time

from loguru import logger

from citadel_supervisor.loop_stalls import LoopStallReporter


def _block_until(event: threading.Event) -> None:
    """A blocking call on the loop: it holds the loop until the stall is reported."""
    assert event.wait(30), "the stall was never reported"


def test_a_stuck_loop_is_reported_with_its_stack_then_its_recovery() -> None:
    lines: list[str] = []
    reported = threading.Event()

    def sink(message: object) -> None:
        lines.append(str(message))
        if "has not run" in str(message):
            reported.set()

    sink_id = logger.add(sink, level="WARNING", format="{message}")

    async def main() -> LoopStallReporter:
        reporter = LoopStallReporter(threshold=0.2)
        reporter.start()
        try:
            await asyncio.sleep(0)
            _block_until(reported)
            deadline = time.monotonic() + 30
            while not any("runs again" in line for line in lines):  # the next beat logs it
                assert time.monotonic() < deadline, lines
                await asyncio.sleep(0.01)
        finally:
            reporter.stop()
        return reporter

    try:
        reporter = asyncio.run(main())
    finally:
        logger.remove(sink_id)
    stall = next(line for line in lines if "has not run" in line)
    assert "_block_until" in stall and "test_loop_stalls.py" in stall, stall
    assert "host load" in stall and "of CPU" in stall
    assert reporter.stalls == 1
    assert sum("runs again" in line for line in lines) == 1

