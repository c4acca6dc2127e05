"""Running probes: each kind's factory guarded so that it cannot raise, and the loop that runs a probe.

A *liveness* probe failing ``failure_threshold`` times in a row restarts the
worker; a *readiness* probe sets its ``ready`` flag; a *startup* probe runs
until its first success (see ``probes.base``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..config import ProbeConfig
from ..services.base import WorkerInfo
from .base import Probe, ProbeFactory, ProbeResult


class BrokenProbe:
    """Stands in for a probe that could not be built: every check fails, saying why.

    A worker's probes are built as it starts; one that raised there would end
    the worker's lifecycle task with the process still running, and citadeld's
    exit would wait for that worker for good. Failing checks instead take the
    ordinary path: a liveness probe restarts the worker, a startup probe times out.
    """

    def __init__(self, detail: str):
        self.detail = detail

    async def check(self) -> ProbeResult:
        """Fail, with the reason it could not be built."""
        return ProbeResult(False, self.detail, 0.0)


class GuardedProbe:
    """A probe whose failures, whatever it raises, are failed checks (see ``BrokenProbe``)."""

    def __init__(self, kind: str, probe: Probe):
        self.kind = kind
        self.probe = probe

    async def check(self) -> ProbeResult:
        """Run the probe's check; an exception is a failure naming it."""
        try:
            return await self.probe.check()
        except Exception as exc:  # noqa: BLE001  (a plugin's probe must not end the worker's task)
            return ProbeResult(False, f"the {self.kind} probe raised {type(exc).__name__}: {exc}", 0.0)


def guarded_factory(kind: str, factory: ProbeFactory | None) -> ProbeFactory:
    """``factory``, made unable to raise: what fails to build is a ``BrokenProbe``."""
    def build(config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession) -> Probe:
        if factory is None:
            return BrokenProbe(f"no probe kind {kind!r} (a plugin may be missing)")
        try:
            return GuardedProbe(kind, factory(config, worker, session))
        except Exception as exc:  # noqa: BLE001  (see BrokenProbe)
            return BrokenProbe(f"the {kind} probe could not be built: {type(exc).__name__}: {exc}")

    return build


class ProbeKinds(dict[str, ProbeFactory]):
    """``{kind: factory}`` whose ``get`` and ``[]`` give factories that cannot raise,
    for every kind: an unknown one (a plugin gone since the config was checked)
    builds a ``BrokenProbe``."""

    def __getitem__(self, kind: str) -> ProbeFactory:
        """The kind's guarded factory."""
        return guarded_factory(kind, super().get(kind))

    def get(self, kind: str, default: Any = None) -> ProbeFactory:  # type: ignore[override]
        """The kind's guarded factory, known or not (``default`` is ignored)."""
        return self[kind]


class ProbeRunner:
    """Runs one probe every ``period`` and reports threshold crossings.

    ``on_change(passing)`` is called when ``success_threshold`` successes or
    ``failure_threshold`` failures in a row flip the probe's verdict. ``on_busy()``
    is called on each result that says the worker served requests (``ProbeResult.busy``).
    """

    def __init__(
        self,
        role: str,
        probe: Probe,
        config: ProbeConfig,
        on_change: Callable[[bool, ProbeResult], Awaitable[None] | None],
        initially_passing: bool = False,
        on_busy: Callable[[], None] | None = None,
    ):
        self.role = role
        self.probe = probe
        self.config = config
        self.on_change = on_change
        self.on_busy = on_busy
        self.passing = initially_passing
        self.last: ProbeResult | None = None
        self.failures_total = 0
        self._streak = 0  # >0 successes in a row, <0 failures in a row

    def record(self, result: ProbeResult) -> bool:
        """Account one result; True when the verdict flipped."""
        self.last = result
        if result.ok:
            self._streak = self._streak + 1 if self._streak > 0 else 1
        else:
            self.failures_total += 1
            self._streak = self._streak - 1 if self._streak < 0 else -1
        if not self.passing and self._streak >= self.config.success_threshold:
            self.passing = True
            return True
        if self.passing and -self._streak >= self.config.failure_threshold:
            self.passing = False
            return True
        return False

    async def run(self) -> None:
        """Probe forever (until cancelled)."""
        while True:
            result = await self.probe.check()
            if result.busy and self.on_busy is not None:
                self.on_busy()
            if self.record(result):
                outcome = self.on_change(self.passing, result)
                if asyncio.iscoroutine(outcome):
                    await outcome
            await asyncio.sleep(self.config.period)

    def to_json(self) -> dict[str, Any]:
        """The probe's state for status and health answers."""
        last = self.last
        return {
            "role": self.role,
            "kind": self.config.kind,
            "passing": self.passing,
            "failures_total": self.failures_total,
            "last": None if last is None else {
                "ok": last.ok, "detail": last.detail, "duration": last.duration, "time": last.time,
            },
        }
