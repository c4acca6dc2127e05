"""Waiting with a timeout, without ``asyncio.wait_for``.

On Python 3.10 and 3.11, ``wait_for`` can swallow a cancellation of the
waiting task that lands just as the awaited thing completes (fixed in 3.12):
the task runs on when it was told to end, and whoever awaits its end (a stop,
citadeld's exit) waits for ever. Both helpers here wait through
``asyncio.wait``, which never does: a cancellation always reaches the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """True once ``event`` is set; False when ``timeout`` seconds pass first (None: no limit)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``awaitable``'s result; ``TimeoutError`` (after cancelling it) when it takes
    longer than ``timeout`` seconds."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})  # let it finish cancelling, as wait_for does
        raise TimeoutError(f"not done within {timeout:g}s" if timeout is not None else "not done")
    return task.result()


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task (None is skipped) and wait until it has ended, so that nothing it
    holds outlives the caller's close; its cancellation is not raised here."""
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
