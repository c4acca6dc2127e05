"""waits: a cancellation that lands as the awaited event is set still ends the waiting task."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from citadel_supervisor.waits import wait_event, within


async def _cancelled_as_the_event_is_set(wait: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    """A task loops on ``wait`` (as a worker's backoff does); it is cancelled in the very
    loop turn that sets its event. True when the task ended."""
    event = asyncio.Event()

    async def waiter() -> None:
        while True:
            await wait(event)
            event.clear()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)  # it is waiting now
    event.set()
    task.cancel()
    await asyncio.wait({task}, timeout=0.5)
    ended = task.done()
    task.cancel()
    await asyncio.wait({task}, timeout=0.5)
    return ended


def test_wait_event_never_swallows_a_cancellation() -> None:
    for _ in range(20):
        assert asyncio.run(_cancelled_as_the_event_is_set(lambda e: wait_event(e, 10.0)))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was fixed in Python 3.12")
def test_the_same_scenario_does_swallow_it_with_wait_for() -> None:
    """What the test above guards against: asyncio.wait_for on this Python."""
    assert not asyncio.run(_cancelled_as_the_event_is_set(lambda e: asyncio.wait_for(e.wait(), 10.0)))


def test_wait_event_answers_set_or_timed_out() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.05)
        asyncio.get_running_loop().call_later(0.05, event.set)
        later = await wait_event(event, 5.0)
        already = await wait_event(event, 0)
        return timed_out, later, already

    assert asyncio.run(scenario()) == (False, True, True)


def test_within_gives_the_result_or_cancels_and_raises() -> None:
    cancelled = []

    async def slow() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "late"

    async def scenario() -> str:
        assert await within(asyncio.sleep(0.01, result="done"), 1.0) == "done"
        with pytest.raises(TimeoutError):
            await within(slow(), 0.05)
        return "ok"

    assert asyncio.run(scenario()) == "ok"
    assert cancelled == [True]
