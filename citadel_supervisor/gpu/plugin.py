"""The GPU part of citadeld, a built-in plugin: the ``/v1/gpus`` route, the wait for a dead
worker's GPU memory before its restart, and the GPUs' families on every scrape.

The daemon registers one ``GpuPlugin`` (named ``gpu``) when it assembles its
parts, with the GPUs it detected; on a host without GPUs the route answers
why there are none, and the other hooks answer nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import hookimpl
from ..control.responses import json_response
from ..control.route import Route
from ..process.procstat import process_table
from ..worker.restart_policy import RestartWait
from .inventory import GpuDetection
from .metrics import GpuCollector, GpuReader
from .placement import wait_released

if TYPE_CHECKING:
    from ..exporter.snapshot import Scrape
    from ..process.spawn import ProcessTree
    from ..services.base import WorkerInfo
    from ..worker.lifecycle import Worker

#: The answer of ``GET /v1/gpus``, for the OpenAPI document.
GPUS_ANSWER: dict[str, Any] = {
    "type": "object", "required": ["available", "gpus"],
    "properties": {
        "available": {"type": "boolean"}, "reason": {"type": ["string", "null"]},
        "gpus": {"type": "array", "items": {
            "type": "object",
            "properties": {"index": {"type": "integer"}, "uuid": {"type": "string"},
                           "name": {"type": "string"}, "memory_total": {"type": "integer"},
                           "memory_used": {"type": "integer"},
                           "workers": {"type": "array", "items": {"type": "string"}}}}}},
}


class GpuPlugin:
    """The GPU part's hooks, over the detected GPUs and the running workers."""

    def __init__(self, detection: GpuDetection, reader: GpuReader | None,
                 workers: Callable[[], Iterable[Worker]],
                 assigned: Callable[[], Mapping[str, Sequence[str]]]):
        """``reader``: the one ``GpuReader`` of the inventory (None without GPUs), which the
        exporter's host checks share; ``workers``: the supervisor's workers now;
        ``assigned``: the GPU allocation now, ``{uuid: [worker, ...]}``."""
        self.detection = detection
        self.reader = reader
        self.workers = workers
        self.assigned = assigned

    @hookimpl
    def citadel_control_routes(self) -> list[Route]:
        """``GET /v1/gpus``."""
        return [Route("GET", "/gpus", self.gpus_route,
                      "the GPUs: inventory, memory, and which worker holds which GPU",
                      answer=GPUS_ANSWER)]

    @hookimpl
    def citadel_before_restart(self, worker: WorkerInfo) -> RestartWait | None:
        """Wait (bounded by ``gpu_release_timeout``) until the dead worker's GPU memory is free."""
        if self.detection.inventory is None or not worker.gpu_uuids:
            return None
        return RestartWait("GPU memory release", self._released(worker))

    @hookimpl
    def citadel_scrape_collectors(self, scrape: Scrape) -> list[GpuCollector]:
        """The GPUs' families (reads NVML, at most once a second)."""
        if self.reader is None:
            return []
        return [GpuCollector(self.reader.read(), scrape.workers, scrape.members)]

    async def _released(self, worker: WorkerInfo) -> None:
        inventory = self.detection.inventory
        assert inventory is not None
        others = {pid for w in self.workers()
                  if w.name != worker.name and w.proc is not None for pid in w.proc.members()}
        await wait_released(inventory, worker.gpu_uuids, None,
                            worker.config.gpu_release_timeout, other_pids=others)

    async def gpus_route(self, request: web.Request) -> web.Response:
        """GET /v1/gpus: the inventory, and which worker holds which GPU."""
        return json_response(await self.answer())

    async def answer(self, fresh: bool = True) -> dict[str, Any]:
        """What ``GET /v1/gpus`` answers. Read from NVML now when ``fresh``; else through the
        reader the scrapes share, at most once a second (for the status page)."""
        trees = [(w.name, w.proc) for w in self.workers() if w.proc is not None]
        owners = await asyncio.to_thread(self._read, fresh, trees) if self.detection.inventory else {}
        return self.detection.to_json(owners, self.assigned())

    def _read(self, fresh: bool, trees: list[tuple[str, ProcessTree]]) -> dict[int, str]:
        """Refresh the GPUs; the worker of each process on them (NVML and /proc: in a thread)."""
        inventory = self.detection.inventory
        assert inventory is not None
        if fresh or self.reader is None:
            inventory.refresh()
        else:
            self.reader.read()
        if not any(gpu.processes for gpu in inventory.gpus):
            return {}
        owners: dict[int, str] = {}
        table = None
        for name, tree in trees:
            if table is None and tree.cgroup is None:
                table = process_table()  # one read of /proc for every tree without a cgroup
            try:
                owners.update((pid, name) for pid in tree.members(table))
            except OSError:
                continue
        return owners
