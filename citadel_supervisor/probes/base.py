"""What a probe is: one check's ``ProbeResult``, the ``Probe`` protocol and the factory type.

Three roles, as Kubernetes has them: a *startup* probe runs until its first
success (bounded by the service's ``startup_timeout``); a *liveness* probe
failing ``failure_threshold`` times in a row restarts the worker; a
*readiness* probe sets the worker's ``ready`` flag and never restarts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from ..config import ProbeConfig
from ..services.base import WorkerInfo


@dataclass(frozen=True)
class ProbeResult:
    """One check's outcome."""

    ok: bool
    detail: str
    duration: float
    time: float = field(default_factory=time.time)
    #: Why a failed check failed, in one word an operator can act on, when the probe knows
    #: better than "liveness" (the vLLM ``progress`` probe says ``stalled``).
    cause: str | None = None
    #: The worker served requests since the last check, as its own counters show (the vLLM
    #: ``progress`` probe): use by clients that bypass the gateway keeps its idle clock at 0.
    busy: bool = False


class Probe(Protocol):
    """Anything with ``async check()``; plugins add kinds through ``citadel_probe_kinds``."""

    async def check(self) -> ProbeResult:
        """Run one check."""


#: ``factory(config, worker, session)`` -> a Probe.
ProbeFactory = Callable[[ProbeConfig, WorkerInfo, aiohttp.ClientSession], Probe]
