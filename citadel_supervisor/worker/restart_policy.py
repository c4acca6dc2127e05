"""The restart policy: whether to restart, after how long, and when to give up."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from ..config import ServiceConfig
from .forensics import FATAL_CAUSES


@dataclass
class RestartDecision:
    """What to do after a worker's process ended."""

    restart: bool
    delay: float = 0.0
    fatal: bool = False
    reason: str = ""


@dataclass
class RestartPolicy:
    """Exponential backoff with jitter, a fast path after a stable run, and a start limit.

    - ``never``: never restart; ``on-failure``: restart unless it exited 0;
      ``always``: restart whatever the exit.
    - The n-th quick failure in a row waits ``backoff_initial * 2**(n-1)``,
      capped at ``backoff_max``, jittered to between half and all of it.
    - A worker that had been up ``stable_after`` seconds restarts at once.
    - ``start_limit_burst`` failures within ``start_limit_interval`` is fatal.
    """

    config: ServiceConfig
    rng: random.Random = field(default_factory=random.Random)
    failures: deque[float] = field(default_factory=deque)
    quick_exits: int = 0
    #: The policy of a whole multinode group (its head applies it); a rank's own never restarts.
    for_group: bool = False

    def decide(self, failed: bool, uptime: float, now: float, cause: str = "") -> RestartDecision:
        """Decide after an exit; ``uptime`` is how long the process ran, ``cause`` why it failed
        (a cause no restart mends, ``forensics.FATAL_CAUSES``, is fatal at once)."""
        cfg = self.config
        if cfg.multinode is not None and not self.for_group:
            return RestartDecision(False, reason="a rank of a multinode group: the group restarts as one")
        if failed and cause in FATAL_CAUSES:
            return RestartDecision(False, fatal=True,
                                   reason=f"the {cause} cannot be loaded or found: no restart mends that; "
                                          "fix the config, then start it")
        if cfg.restart == "never" or (cfg.restart == "on-failure" and not failed):
            return RestartDecision(False, reason=f"restart = {cfg.restart!r}")
        if failed:
            self.failures.append(now)
            while self.failures and now - self.failures[0] > cfg.start_limit_interval:
                self.failures.popleft()
            if len(self.failures) >= cfg.start_limit_burst:
                return RestartDecision(
                    False, fatal=True,
                    reason=f"{len(self.failures)} failures within {cfg.start_limit_interval:g}s "
                           f"(start_limit_burst = {cfg.start_limit_burst})",
                )
        if uptime >= cfg.stable_after:
            self.quick_exits = 0
            return RestartDecision(True, 0.0, reason=f"was stable for {uptime:.0f}s")
        self.quick_exits += 1
        full = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (self.quick_exits - 1))
        delay = full / 2 + self.rng.uniform(0, full / 2)
        return RestartDecision(True, delay, reason=f"quick exit #{self.quick_exits}")

    def reset(self) -> None:
        """Forget past failures (a manual start clears ``fatal``)."""
        self.failures.clear()
        self.quick_exits = 0


@dataclass
class RestartWait:
    """What a plugin holds a restart for (``citadel_before_restart``): shown in the worker's
    status while it waits (``waiting``), and the awaitable that ends when it is over."""

    #: What the worker waits for, in a few words ("GPU memory release").
    what: str
    until: Awaitable[object]
