"""The gang: each citadeld of a multinode group runs its rank; the head's numbers the generations.

The head (rank 0's citadeld) starts its rank with a new generation, and the
others start theirs once they read that the head runs it. When any rank fails
(its process exits, or its liveness probe restarts it), when a follower reports
a failure, or when a follower does not run the head's generation within
``start_grace``, the head stops its rank and starts the group again with the
next generation, under the service's backoff and start limit. A follower stops
its rank as soon as the head runs another generation, or none, or cannot be
read for ``peer_timeout``: no rank waits in a collective for a peer that is
gone, and a rank of an old generation never joins a new one.

The nodes read each other's ``GET /v1/multinode/SERVICE`` on their exporters,
signed with the group's secret (``auth``). Under a network partition the side
without the head stops its rank; the head, missing a follower, stops its own
and waits for every node to answer again before it starts a new generation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import hookimpl
from ..control.route import Route
from ..process.spawn import SpawnError, check_port_free
from ..states import WorkerState
from ..worker.restart_policy import RestartPolicy
from .auth import check_answer, check_request, sign_answer, sign_request

if TYPE_CHECKING:
    from ..events import WorkerEvent
    from ..exporter.snapshot import Scrape
    from ..services.base import SpawnSpec, WorkerInfo
    from ..worker.lifecycle import Worker
    from .rank import GroupRank

#: A rank's states in which it counts as running its generation.
_UP = ("starting", "running")


class Gang:
    """One multinode service on this node: its rank's worker, and what the peers said."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.policy = RestartPolicy(worker.info.config, for_group=True)
        #: The generation whose rank failed here (a follower reports it to the head).
        self.failed_generation = 0
        #: Monotonic time each peer last answered, by node name.
        self.heard: dict[str, float] = {}
        self.started_at = 0.0
        self.restarting: asyncio.Task[None] | None = None
        self.initialised = False

    @property
    def rank(self) -> GroupRank:
        """The worker's rank (a multinode worker always has one)."""
        rank = self.worker.info.group_rank
        assert rank is not None
        return rank


class MultinodePlugin:
    """The built-in ``multinode`` part: drives every multinode service's rank on this node."""

    def __init__(self, workers: Callable[[], Iterable[Worker]], session: aiohttp.ClientSession):
        """``workers``: the supervisor's workers now; ``session``: citadeld's HTTP client session."""
        self.workers = workers
        self.session = session
        self.gangs: dict[str, Gang] = {}
        #: The head's last generation, per service: it only grows, also across a reload.
        self.generations: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    # -- hooks ----------------------------------------------------------------

    @hookimpl
    def citadel_daemon_started(self) -> None:
        """Start the loop that follows the peers and drives the ranks."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="multinode")

    @hookimpl
    def citadel_daemon_stopping(self) -> None:
        """Stop the loop (the supervisor stops the ranks)."""
        if self._task is not None:
            self._task.cancel()

    @hookimpl
    def citadel_prepare_spawn(self, worker: WorkerInfo, spec: SpawnSpec) -> None:
        """Give a rank its generation (the head's next, a follower's the head's) and variables."""
        rank = worker.group_rank
        if rank is None:
            return
        if rank.is_head:
            rank.generation = self.generations.get(rank.service, 0) + 1
            self.generations[rank.service] = rank.generation
            rank.group_generation = rank.generation
        else:
            rank.generation = rank.group_generation
        gang = self.gangs.get(rank.service)
        if gang is not None:
            gang.started_at = time.monotonic()
        spec.env.update(rank.env())
        logger.info("multinode {}: rank {} on node {} starts generation {}", rank.service, rank.rank,
                    rank.node, rank.generation)

    @hookimpl
    def citadel_worker_event(self, event: WorkerEvent) -> None:
        """A rank that exits while it should run has failed its generation."""
        gang = self.gangs.get(event.service)
        if gang is None or event.kind != "exit" or not gang.worker.wanted:
            return
        gang.failed_generation = gang.rank.generation
        logger.warning("multinode {}: rank {} failed in generation {}", event.service, gang.rank.rank,
                       gang.rank.generation)

    @hookimpl
    def citadel_exporter_routes(self) -> list[Route]:
        """``GET /v1/multinode/{service}`` on the exporter: this node's report, signed."""
        return [Route("GET", "/multinode/{service}", self.report_route,
                      "a multinode service's rank on this node, for its peers (signed)")]

    @hookimpl
    def citadel_scrape_collectors(self, scrape: Scrape) -> list[MultinodeCollector]:
        """The groups' families."""
        return [MultinodeCollector([g.rank for g in self.gangs.values()])] if self.gangs else []

    # -- the report -----------------------------------------------------------

    def report(self, gang: Gang) -> dict[str, Any]:
        """What this node tells its peers of its rank (and, on the head, of the group)."""
        rank = gang.rank
        return {"service": rank.service, "node": rank.node, "rank": rank.rank,
                "generation": rank.generation, "state": gang.worker.state.value,
                "ready": gang.worker.ready, "failed_generation": gang.failed_generation,
                "group": {"generation": rank.group_generation, "state": rank.group_state,
                          "ready": rank.group_ready}}

    async def report_route(self, request: web.Request) -> web.Response:
        """GET /v1/multinode/{service}: 401 unless signed with the group's secret."""
        gang = self.gangs.get(request.match_info["service"])
        secret = gang.rank.config.secret.get_secret_value() if gang is not None else None
        ts = (check_request(secret, "GET", request.path, request.headers.get("Authorization"))
              if secret is not None else None)
        if ts is None or gang is None or secret is None:
            # The same answer for an unknown service and a bad signature: nothing to learn.
            return web.Response(status=401, text="unauthorized\n")
        body = json.dumps(self.report(gang)).encode()
        return web.Response(body=body, content_type="application/json",
                            headers={"X-Citadel-Signature": sign_answer(secret, ts, body)})

    async def read_peer(self, gang: Gang, rank: int) -> dict[str, Any] | None:
        """Node ``rank``'s report, checked; None when it cannot be read or its signature is wrong."""
        config = gang.rank.config
        node = config.nodes[rank]
        path = f"/v1/multinode/{gang.rank.service}"
        secret = config.secret.get_secret_value()
        header, ts = sign_request(secret, "GET", path)
        try:
            async with self.session.get(node.citadel.rstrip("/") + path, headers={"Authorization": header},
                                        timeout=aiohttp.ClientTimeout(total=max(config.poll, 1.0))) as resp:
                body = await resp.content.read(65536)
                signature = resp.headers.get("X-Citadel-Signature")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if status != 200 or not check_answer(secret, ts, body, signature):
            logger.warning("multinode {}: node {} answered {} without a valid signature",
                           gang.rank.service, node.name, status)
            return None
        try:
            report = json.loads(body)
        except ValueError:
            return None
        return report if isinstance(report, dict) and report.get("rank") == rank else None

    # -- the loop -------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._refresh()
            polls = [g.rank.config.poll for g in self.gangs.values()] or [1.0]
            await asyncio.gather(*(self._step(g) for g in list(self.gangs.values())),
                                 return_exceptions=False)
            await asyncio.sleep(min(polls))

    def _refresh(self) -> None:
        """Follow the supervisor's workers (a reload adds, removes or replaces services)."""
        current = {w.info.service: w for w in self.workers() if w.info.group_rank is not None}
        for service in list(self.gangs):
            if current.get(service) is not self.gangs[service].worker:
                del self.gangs[service]
        for service, worker in current.items():
            if service not in self.gangs:
                self.gangs[service] = Gang(worker)

    async def _step(self, gang: Gang) -> None:
        try:
            if gang.rank.is_head:
                await self._head_step(gang)
            else:
                await self._follower_step(gang)
        except Exception as exc:  # noqa: BLE001 (one group's bug must not stop the others')
            logger.opt(exception=exc).error("multinode {}: {}", gang.rank.service, exc)

    async def _reports(self, gang: Gang) -> dict[int, dict[str, Any] | None]:
        ranks = [r for r in range(gang.rank.size) if r != gang.rank.rank]
        answers = await asyncio.gather(*(self.read_peer(gang, r) for r in ranks))
        now = time.monotonic()
        rank = gang.rank
        for r, report in zip(ranks, answers):
            name = rank.config.nodes[r].name
            if report is not None:
                gang.heard[name] = now
            heard = gang.heard.get(name)
            rank.peers[name] = {"reachable": report is not None,
                                "age": None if heard is None else round(now - heard, 1),
                                **({"generation": report.get("generation"), "state": report.get("state"),
                                    "ready": report.get("ready")} if report else {})}
        return dict(zip(ranks, answers))

    def _lost(self, gang: Gang, rank: int) -> bool:
        """A peer not heard from for ``peer_timeout`` (or never, once that long has passed)."""
        name = gang.rank.config.nodes[rank].name
        heard = gang.heard.get(name, gang.started_at or 0.0)
        return time.monotonic() - heard > gang.rank.config.peer_timeout

    # -- the head ---------------------------------------------------------------

    async def _head_step(self, gang: Gang) -> None:
        rank, worker = gang.rank, gang.worker
        reports = await self._reports(gang)
        if gang.restarting is not None and not gang.restarting.done():
            return
        if not gang.initialised:
            gang.initialised = True  # the first start waits until every node answers
            gang.started_at = time.monotonic()
            rank.group_state = "waiting"
            return
        state = worker.state.value
        if rank.group_state in ("fatal", "stopped") and worker.wanted:
            if rank.group_state == "fatal":
                gang.policy.reset()
            rank.group_state = "starting"  # started by the operator (citadelctl start)
        if rank.group_state == "fatal" or (not worker.wanted and gang.failed_generation != rank.generation
                                           and rank.group_state != "waiting"):
            rank.group_ready = False
            if rank.group_state != "fatal":
                rank.group_state = "stopped"  # stopped by the operator (citadelctl stop)
            return
        lost = [r for r in reports if reports[r] is None and self._lost(gang, r)]
        if rank.group_state == "waiting":
            if not any(reports[r] is None for r in reports):
                self._restart(gang, "every node answers again", wait=False)
            return
        if lost:
            names = ", ".join(rank.config.nodes[r].name for r in lost)
            rank.group_state = "waiting"
            rank.group_ready = False
            logger.error("multinode {}: lost node {} (silent for {:g}s): the group stops until it is back",
                         rank.service, names, rank.config.peer_timeout)
            worker.stop()
            return
        reason = self._head_failure(gang, reports, state)
        if reason is not None:
            self._restart(gang, reason, wait=True)
            return
        followers_ready = all(r is not None and r.get("generation") == rank.generation
                              and r.get("state") == "running" and r.get("ready") for r in reports.values())
        rank.group_ready = state == "running" and worker.ready and followers_ready
        rank.group_state = "ready" if rank.group_ready else "starting"

    def _head_failure(self, gang: Gang, reports: dict[int, dict[str, Any] | None], state: str) -> str | None:
        """Why the group must restart now, or None."""
        rank = gang.rank
        if gang.failed_generation == rank.generation:
            return f"rank 0 failed in generation {rank.generation}"
        if state not in _UP:
            return None
        for r, report in reports.items():
            if report is None:
                continue
            if report.get("failed_generation") == rank.generation:
                return f"rank {r} failed in generation {rank.generation}"
            if report.get("generation") == rank.generation and report.get("state") in _UP:
                continue
            if time.monotonic() - gang.started_at > rank.config.start_grace:
                return (f"rank {r} does not run generation {rank.generation} "
                        f"{rank.config.start_grace:g}s after it started")
        return None

    def _restart(self, gang: Gang, reason: str, *, wait: bool) -> None:
        """Stop the head's rank, wait the group's backoff, and start the next generation."""
        gang.restarting = asyncio.get_running_loop().create_task(self._restart_group(gang, reason, wait))

    async def _restart_group(self, gang: Gang, reason: str, backoff: bool) -> None:
        rank, worker = gang.rank, gang.worker
        rank.group_ready = False
        if rank.generation == 0:
            logger.info("multinode {}: every node answers: starting the group", rank.service)
        else:
            rank.group_state = "restarting"
            logger.error("multinode {}: restarting the group ({})", rank.service, reason)
        uptime = time.monotonic() - gang.started_at
        if worker.state != WorkerState.STOPPED:
            worker.stop()
            await worker.wait_for({WorkerState.STOPPED, WorkerState.FATAL})
        await self._master_port_released(rank)
        if backoff:
            decision = gang.policy.decide(True, uptime, time.monotonic())
            if decision.fatal:
                rank.group_state = "fatal"
                logger.error("multinode {}: giving up: {}; `citadelctl start {}` on the head tries again",
                             rank.service, decision.reason, rank.service)
                return
            await asyncio.sleep(decision.delay)
        if rank.generation > 0:
            rank.group_restarts += 1
        rank.group_state = "starting"
        worker.start()

    async def _master_port_released(self, rank: GroupRank) -> None:
        """Wait, up to ``start_grace``, until no process listens on the master port: a process
        of the last generation that outlived it (vLLM's own helpers) would make the next one
        fail to bind it."""
        deadline = time.monotonic() + rank.config.start_grace
        while True:
            try:
                await asyncio.to_thread(check_port_free, rank.master_addr, rank.config.master_port)
                return
            except SpawnError as exc:
                if time.monotonic() >= deadline:
                    logger.error("multinode {}: {}; starting the next generation anyway", rank.service, exc)
                    return
            await asyncio.sleep(0.5)

    # -- a follower ---------------------------------------------------------------

    async def _follower_step(self, gang: Gang) -> None:
        rank, worker = gang.rank, gang.worker
        head = (await self._reports(gang)).get(0)
        if head is None:
            if self._lost(gang, 0) and worker.state.value in _UP:
                logger.error("multinode {}: the head (node {}) is silent for {:g}s: stopping rank {}",
                             rank.service, rank.config.nodes[0].name, rank.config.peer_timeout, rank.rank)
                self._give_up_generation(gang)
            if self._lost(gang, 0):
                rank.group_state, rank.group_ready = "waiting", False
            return
        group = head.get("group") or {}
        generation = int(head.get("generation") or 0)
        rank.group_generation = generation
        rank.group_state = str(group.get("state", "unknown"))
        rank.group_ready = bool(group.get("ready"))
        head_up = head.get("state") in _UP and generation > 0
        mine_up = worker.state.value in _UP
        if mine_up and (not head_up or rank.generation != generation):
            logger.warning("multinode {}: the head runs generation {} ({}); stopping rank {} of generation {}",
                           rank.service, generation, head.get("state"), rank.rank, rank.generation)
            self._give_up_generation(gang)
        elif head_up and worker.state == WorkerState.STOPPED and rank.generation != generation:
            gang.started_at = time.monotonic()
            worker.start()

    @staticmethod
    def _give_up_generation(gang: Gang) -> None:
        """Stop a follower's rank for good in its generation: it reports the generation failed,
        so that the head starts a new one, which it joins; it never rejoins this one."""
        gang.failed_generation = gang.rank.generation
        gang.worker.stop()


class MultinodeCollector:
    """The groups' families: ready, generation, gang restarts, and each peer's reachability."""

    def __init__(self, ranks: list[GroupRank]):
        self.ranks = ranks

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        ready = GaugeMetricFamily("citadel_multinode_ready",
                                  "1 when every rank of the group runs its generation and is ready.",
                                  labels=["service", "node", "rank"])
        generation = GaugeMetricFamily("citadel_multinode_generation",
                                       "The generation the group runs (the head's count of its starts).",
                                       labels=["service", "node", "rank"])
        restarts = CounterMetricFamily("citadel_multinode_restarts",
                                       "Whole-group restarts made by the head.", labels=["service"])
        info = GaugeMetricFamily("citadel_multinode_rank_info",
                                 "Always 1: the node and rank of a multinode service's worker here, to "
                                 "join on `worker` (`* on(worker) group_left(node, rank)`).",
                                 labels=["service", "worker", "node", "rank"])
        peer = GaugeMetricFamily("citadel_multinode_peer_up",
                                 "1 when this node read the peer's signed state at its last try.",
                                 labels=["service", "node", "rank", "peer"])
        for rank in self.ranks:
            key = [rank.service, rank.node, str(rank.rank)]
            info.add_metric([rank.service, rank.service, rank.node, str(rank.rank)], 1.0)
            ready.add_metric(key, 1.0 if rank.group_ready else 0.0)
            generation.add_metric(key, float(rank.group_generation))
            if rank.is_head:
                restarts.add_metric([rank.service], float(rank.group_restarts))
            for name, seen in sorted(rank.peers.items()):
                peer.add_metric(key + [name], 1.0 if seen.get("reachable") else 0.0)
        yield from (info, ready, generation, restarts, peer)
