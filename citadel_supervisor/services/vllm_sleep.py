"""vLLM's sleep mode: whether the running build has it, and sleeping and waking a worker.

``sleep = 1`` or ``2`` starts vLLM with ``--enable-sleep-mode`` and
``VLLM_SERVER_DEV_MODE=1``, which serves ``POST /sleep``, ``POST /wake_up`` and
the other development endpoints on the worker's port (without its API key:
vLLM guards only ``/v1`` paths). That is why a sleeping service must listen on
loopback, where only citadeld (and the local host) reach it; the gateway
forwards none of those paths.

Level 1 moves the weights to host memory and drops the KV cache; level 2
drops both, so waking reallocates the weights, reloads them from disk
(``collective_rpc reload_weights``), reallocates the KV cache and resets the
prefix cache. Either way the worker is awake only once a 1-token request has
been served, so the first real request does not pay for the warm-up.

Sleep mode exists on CUDA, ROCm and XPU builds only (``current_platform.
is_sleep_mode_available()``; the CPU build refuses ``--enable-sleep-mode``).
``sleep_mode_available`` asks the worker's interpreter once; where the build
lacks it the worker is stopped and started instead, and the log says so once.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import aiohttp
from loguru import logger

from .base import SleepError

#: What the worker's interpreter runs to say whether its vLLM build has a sleep mode.
SLEEP_CHECK = ("from vllm.platforms import current_platform\n"
               "print('sleep-mode', bool(current_platform.is_sleep_mode_available()))\n")
#: Seconds the check may take (importing vLLM's platform detection took 8.5 s here).
SLEEP_CHECK_TIMEOUT = 120.0

_available: dict[str, bool] = {}


def _ask(python: str) -> tuple[bool, str]:
    """Run the check in ``python``; (available, why not)."""
    try:
        done = subprocess.run([python, "-c", SLEEP_CHECK], capture_output=True, text=True,
                              timeout=SLEEP_CHECK_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot ask {python}: {exc}"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("sleep-mode "):
            answer = line.split()[1] == "True"
            return answer, "" if answer else "the build has no sleep mode (CUDA, ROCm and XPU builds have it)"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return False, f"{python} could not tell (exit {done.returncode}: {tail})"


async def sleep_mode_available(python: str, service: str) -> bool:
    """Whether the vLLM of interpreter ``python`` has a sleep mode; asked once per
    interpreter (off the event loop), and said once in the log when it has not."""
    if python not in _available:
        available, why = await asyncio.to_thread(_ask, python)
        if python not in _available:
            _available[python] = available
            if not available:
                logger.warning("services.{}: sleep is set, but {}; idle and evicted workers are "
                               "stopped and started instead of sleeping", service, why)
    return _available[python]


def known_sleep_mode(python: str) -> bool | None:
    """The cached answer for ``python``, or None before it was asked."""
    return _available.get(python)


class VllmSleep:
    """Sleeps and wakes one vLLM worker through its own endpoints, on loopback."""

    def __init__(self, base_url: str, level: int, warmup: tuple[str, dict[str, object]],
                 headers: dict[str, str], session: aiohttp.ClientSession, timeout: float):
        """``warmup``: the path and body of the 1-token request served after waking."""
        self.base_url = base_url
        self.level = level
        self.warmup = warmup
        self.headers = headers
        self.session = session
        self.timeout = timeout

    async def sleep(self) -> None:
        """``POST /sleep?level=N``; in-flight requests are aborted (vLLM's default)."""
        await self._post("/sleep", params={"level": str(self.level)})

    async def wake(self) -> None:
        """``POST /wake_up`` (level 2: weights, reload, KV cache, prefix cache reset), then a
        1-token request, so that readiness holds until a request has been served."""
        if self.level == 2:
            await self._post("/wake_up", params={"tags": "weights"})
            await self._post("/collective_rpc", json={"method": "reload_weights"})
            await self._post("/wake_up", params={"tags": "kv_cache"})
            await self._post("/reset_prefix_cache")
        else:
            await self._post("/wake_up")
        path, body = self.warmup
        await self._post(path, headers=self.headers, json=body)

    async def _post(self, path: str, **kwargs: Any) -> None:
        try:
            async with self.session.post(self.base_url + path, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                         **kwargs) as resp:
                body = (await resp.content.read(512)).decode(errors="replace")
                if resp.status != 200:
                    raise SleepError(f"POST {path} answered HTTP {resp.status}: {body.strip()[:200]}")
        except TimeoutError:
            raise SleepError(f"POST {path}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise SleepError(f"POST {path}: {type(exc).__name__}: {exc}") from None
