"""The config's models: typed, frozen pydantic models of every table.

Service types extend ``ServiceConfig``; ``CitadelConfig`` is the whole,
validated config that ``load_config`` returns.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..process.accounts import RunAs, can_switch_users
from .durations import Duration


class Model(BaseModel):
    """Base of every config model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------

ProbeRole = Literal["startup", "liveness", "readiness"]


class ProbeConfig(Model):
    """One health probe: what to check, and how often."""

    kind: str = Field(description="http, tcp, exec, inference, progress, or a kind a plugin adds")
    url: str | None = Field(None, description="http: the URL; 2xx and 3xx pass")
    path: str | None = Field(
        None, description="http: a path on the worker's own port, instead of a full url"
    )
    expect_body: str | None = Field(None, description="http: text the body must contain")
    address: str | None = Field(None, description="tcp: host:port to connect to")
    command: list[str] | None = Field(None, description="exec: an argv; exit status 0 passes")
    period: Duration = Field(10.0, gt=0, description="seconds between checks")
    timeout: Duration = Field(2.0, gt=0, description="seconds before one check fails")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that count")
    success_threshold: int = Field(1, ge=1, description="consecutive successes that count")
    stall_after: Duration = Field(
        120.0, gt=0, description="progress: requests pending and no token processed for this long is a stall")

    @model_validator(mode="after")
    def _kind_has_its_target(self) -> ProbeConfig:
        needs = {"http": ("url", "path"), "tcp": ("address",), "exec": ("command",)}
        fields = needs.get(self.kind)
        if fields and all(getattr(self, f) is None for f in fields):
            raise ValueError(f"a {self.kind} probe needs {' or '.join(fields)}")
        return self


class HealthShorthand(Model):
    """``health = { http = URL }`` or ``{ tcp = "host:port" }``: startup and readiness."""

    http: str | None = Field(None, description="a URL; 2xx and 3xx pass")
    tcp: str | None = Field(None, description="host:port that must accept a connection")
    expect_body: str | None = Field(None, description="http: text the body must contain")
    period: Duration = Field(1.0, gt=0, description="seconds between checks")
    timeout: Duration = Field(2.0, gt=0, description="seconds before one check fails")

    @model_validator(mode="after")
    def _one_target(self) -> HealthShorthand:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("give exactly one of http or tcp")
        return self


class ProbesConfig(Model):
    """The three probe roles, as Kubernetes has them."""

    startup: ProbeConfig | None = Field(None, description="until it passes the worker is starting")
    liveness: ProbeConfig | None = Field(None, description="failing: the worker is restarted")
    readiness: ProbeConfig | None = Field(None, description="failing: the worker is not ready")


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


def _signal_number(value: object) -> object:
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"{value!r} is not a signal name (e.g. SIGTERM, SIGINT)") from None
    return value


class MultinodeNode(Model):
    """One node of a multinode service: ``{ name = "a", address = "10.0.0.1", citadel = "http://10.0.0.1:9180" }``."""

    name: str = Field(description="the node's name, as its citadeld knows itself (daemon.node)")
    address: str = Field(description="the address the node's rank is reached at (rank 0's: the master)")
    citadel: str = Field(description="the node citadeld's exporter URL, where its peers read its state")


class MultinodeConfig(Model):
    """``[services.NAME.multinode]``: one deployment across nodes, rank N on ``nodes[N]``."""

    nodes: list[MultinodeNode] = Field(
        min_length=2, description="every node of the group, rank 0 (the head, which serves the API) first")
    master_port: int = Field(29500, ge=1, le=65535,
                             description="rank 0's port for the group's own traffic (vLLM's --master-port)")
    secret: SecretStr = Field(
        min_length=16, description="shared by every node's citadeld: signs what they tell each other")
    poll: Duration = Field(1.0, gt=0, description="how often each citadeld reads its peers' state")
    peer_timeout: Duration = Field(
        10.0, gt=0, description="a peer silent this long is lost: the group stops, and restarts when it is back")
    start_grace: Duration = Field(
        30.0, gt=0, description="how long the head waits for every rank to start a new generation")

    @model_validator(mode="after")
    def _unique_names(self) -> MultinodeConfig:
        names = [node.name for node in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must differ: {names}")
        return self


class ServiceConfig(Model):
    """Keys every service has, whatever its type. Service types extend this."""

    type: str = Field(description="the service type: command, vllm, or one a plugin adds")
    replicas: int = Field(1, ge=1, le=256, description="workers: NAME.0 ... NAME.N-1")
    restart: Literal["always", "on-failure", "never"] = Field(
        "always", description="on-failure: unless it exited 0"
    )
    backoff_initial: Duration = Field(1.0, ge=0, description="before the first restart; doubles")
    backoff_max: Duration = Field(60.0, ge=0, description="the longest wait between restarts")
    stable_after: Duration = Field(
        60.0, ge=0, description="a worker up this long restarts at once after a failure"
    )
    start_limit_burst: int = Field(
        5, ge=1, description="this many failures within start_limit_interval: fatal"
    )
    start_limit_interval: Duration = Field(300.0, ge=0, description="see start_limit_burst")
    stop_signal: int = Field(int(signal.SIGTERM), description="a name such as SIGINT, or a number")
    stop_timeout: Duration = Field(30.0, ge=0, description="after stop_signal, SIGKILL the tree")
    startup_timeout: Duration = Field(900.0, gt=0, description="to pass the startup probe")
    after: list[str] = Field(default_factory=list, description="services to start first")
    required: bool = Field(True, description="counts for /readyz")
    cwd: Path | None = Field(None, description="the working directory")
    env: dict[str, str] = Field(default_factory=dict, description="on top of what it inherits from citadeld")
    env_file: Path | None = Field(None, description="KEY=VALUE lines added to env")
    health: HealthShorthand | None = Field(None, description="startup and readiness probes in one")
    probes: ProbesConfig = Field(default_factory=ProbesConfig, description="overrides health")
    gpus: list[int | str] | int | Literal["auto"] | None = Field(
        None, description="GPU indices or UUIDs, a count, or 'auto'"
    )
    gpus_shared: bool = Field(False, description="other services may use these GPUs too")
    gpu_release_timeout: Duration = Field(
        60.0, ge=0, description="before a restart, wait this long for the GPUs' memory to be freed"
    )
    host: str = Field(
        "127.0.0.1",
        description="the address the worker listens on: its probes, scrapes and port check reach it there",
    )
    metrics: str | None = Field(
        None, description="the worker's own Prometheus page to federate: a URL, or a path on its port"
    )
    user: str | None = Field(
        None, description="run the worker as this user (name or uid), not citadeld's; needs CAP_SETUID"
    )
    group: str | None = Field(
        None, description="and this group (name or gid); default: the user's own; needs CAP_SETGID"
    )
    multinode: MultinodeConfig | None = Field(
        None, description="run as one group across nodes, a rank on each (docs/multinode.md)")
    start: Literal["always", "on-demand"] = Field(
        "always", description='"on-demand": not started with citadeld, but at the first request for '
                              "it through a gateway that names it in on_demand (docs/on-demand.md)")
    idle_stop: Duration = Field(
        0.0, ge=0, description="stop (or put to sleep, with vLLM's sleep) a worker that served nothing "
                               "for this long; 0 never")
    swap_group: str | None = Field(
        None, description="a [swap_groups.NAME]: its members take turns (least recently used out)")

    _stop_signal = field_validator("stop_signal", mode="before")(_signal_number)

    @model_validator(mode="after")
    def _backoff_order(self) -> ServiceConfig:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self

    @model_validator(mode="after")
    def _one_rank_per_node(self) -> ServiceConfig:
        if self.multinode is not None and self.replicas != 1:
            raise ValueError("a multinode service runs one rank per node: replicas must be 1")
        if self.multinode is not None and (self.start != "always" or self.idle_stop or self.swap_group):
            raise ValueError("a multinode group runs as one: start, idle_stop and swap_group are "
                             "not supported for it")
        return self

    @property
    def demand_driven(self) -> bool:
        """True when the worker may be down for want of requests: started on demand, stopped
        or put to sleep when idle, or evicted by a swap group's other members."""
        return self.start == "on-demand" or self.idle_stop > 0 or self.swap_group is not None

    @model_validator(mode="after")
    def _account_exists(self) -> ServiceConfig:
        if self.user is None and self.group is None:
            return self
        try:
            run_as = RunAs.resolve(self.user, self.group)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        if run_as.switches() and not can_switch_users():
            raise ValueError(
                f"citadeld runs as uid {os.geteuid()} without CAP_SETUID and CAP_SETGID, so it cannot "
                "start workers as another user: run it as root, or grant them in its unit "
                "(AmbientCapabilities=CAP_SETUID CAP_SETGID; see docs/install.md)")
        return self

    def port_for(self, replica: int) -> int | None:
        """The port replica ``replica`` listens on, or None (types with ports override)."""
        return None


# --------------------------------------------------------------------------
# The daemon, exporter and plugins
# --------------------------------------------------------------------------


class DaemonConfig(Model):
    """``[daemon]``: where citadeld keeps its socket, state and logs."""

    control_socket: Path = Field(
        Path("/run/citadel/control.sock"), description="the socket citadelctl talks to"
    )
    state_dir: Path = Field(Path("/run/citadel"), description="workers.json: what to clean up")
    log_dir: Path = Field(Path("/var/log/citadel"), description="one NAME.log per worker")
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="citadeld's own log"
    )
    log_format: Literal["auto", "console", "journal", "json"] = Field(
        "auto", description="auto: journal under systemd, else console"
    )
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=4096, description="rotate a worker log at")
    log_backups: int = Field(5, ge=0, description="rotated worker logs kept")
    log_ring_lines: int = Field(1000, ge=10, description="recent lines kept in memory per worker")
    log_forward_rate: float = Field(
        50.0, ge=0, description="worker lines per second forwarded to the daemon's log"
    )
    env_file: Path | None = Field(None, description="variables for ${VAR} references")
    socket_group: str | None = Field("citadel", description="group owning the control socket")
    control_groups: list[str] = Field(default_factory=list, description="may start/stop/reload")
    read_groups: list[str] = Field(default_factory=list, description="may read status/logs")
    cgroups: Literal["auto", "off"] = Field("auto", description="a cgroup per worker, if possible")
    port_range: tuple[int, int] = Field((8100, 8999), description="for services with port = 0")
    node: str | None = Field(
        None, description="this citadeld's name among a multinode service's nodes "
                          "(default: $CITADEL_NODE, else the host name)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def node_name(self) -> str:
        """This citadeld's node name: ``node``, else ``$CITADEL_NODE``, else the host name."""
        return self.node or os.environ.get("CITADEL_NODE") or socket.gethostname()


class HostChecksConfig(Model):
    """``[exporter.host_checks]``: warn and fail thresholds of the host's health checks.

    Ratios are fractions (0.1 is 10 %); a threshold of ``None`` turns that level off.
    """

    disk_free_warn_ratio: float | None = Field(0.10, ge=0, le=1, description="free disk below")
    disk_free_fail_ratio: float | None = Field(0.05, ge=0, le=1, description="free disk below")
    memory_available_warn_ratio: float | None = Field(0.10, ge=0, le=1, description="available below")
    memory_available_fail_ratio: float | None = Field(0.03, ge=0, le=1, description="available below")
    load_warn_per_cpu: float | None = Field(2.0, ge=0, description="5-minute load per CPU above")
    load_fail_per_cpu: float | None = Field(None, ge=0, description="5-minute load per CPU above")
    gpu_temperature_warn_celsius: float | None = Field(85.0, description="GPU temperature above")
    gpu_temperature_fail_celsius: float | None = Field(95.0, description="GPU temperature above")
    gpu_memory_used_warn_ratio: float | None = Field(0.98, ge=0, le=1, description="GPU memory used above")
    gpu_memory_used_fail_ratio: float | None = Field(None, ge=0, le=1, description="GPU memory used above")
    gpu_xid_warn: int | None = Field(1, ge=1, description="XID errors since start, at least")
    gpu_xid_fail: int | None = Field(None, ge=1, description="XID errors since start, at least")


class ExporterConfig(Model):
    """``[exporter]``: the Prometheus and health listener, and the status page."""

    listen: str | None = Field("127.0.0.1:9180", description="host:port, or empty to disable")
    scrape_timeout: Duration = Field(2.0, gt=0, description="per worker /metrics fetch")
    disk_paths: list[Path] = Field(
        default_factory=lambda: [Path("/")], description="file systems to report and check"
    )
    host_checks: HostChecksConfig = Field(
        default_factory=HostChecksConfig, description="thresholds of the host's health checks"
    )
    health_period: Duration = Field(5.0, gt=0, description="seconds between host checks")
    compression: Literal["auto", "always", "never"] = Field(
        "auto",
        description="gzip /metrics when the scraper asks: auto (unless it scrapes over loopback, "
                    "where compressing costs CPU and saves nothing), always, or never",
    )
    ui: bool = Field(
        True, description="serve the status page at / and /ui/: read-only, live (docs/status-page.md)"
    )
    ui_logs: bool = Field(
        False,
        description="let the status page show a worker's output (its last lines): off, as the "
                    "listener faces the network and a worker may print what only operators "
                    "should read",
    )


class SwapGroupConfig(Model):
    """``[swap_groups.NAME]``: services that cannot all run at once (they share GPUs, or
    host memory); starting one evicts the least recently used (docs/on-demand.md)."""

    max_running: int = Field(1, ge=1, description="members awake at once (an asleep one does not count)")
    eviction: Literal["lru", "cost"] = Field(
        "lru", description='"lru": the least recently used goes first; "cost": idle time divided by '
                           "its measured start time, so that a slow-starting model goes last")
    busy_wait: Duration = Field(
        60.0, ge=0, description="how long a start waits for a member with requests in flight to "
                                "finish them before it is evicted anyway")


class PluginsConfig(Model):
    """``[plugins]``: which plugins not to load."""

    disable: list[str] = Field(default_factory=list, description="plugin names not to load")


class CitadelConfig(Model):
    """The whole, validated config."""

    include: list[str] = Field(default_factory=list, description="globs of drop-in files to merge")
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    exporter: ExporterConfig = Field(default_factory=ExporterConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    swap_groups: dict[str, SwapGroupConfig] = Field(
        default_factory=dict, description="[swap_groups.NAME] tables: services that take turns")
    plugin: dict[str, Any] = Field(
        default_factory=dict, description="[plugin.NAME] sections, validated by their plugins"
    )
    #: The files this config was read from, main file first.
    files: tuple[Path, ...] = ()
    #: Secret values found while loading (credentials, secret-named variables).
    secrets: frozenset[str] = frozenset()

    def worker_names(self, service: str) -> list[str]:
        """The names of a service's workers: NAME, or NAME.0 ... NAME.N-1."""
        replicas = self.services[service].replicas
        return [service] if replicas == 1 else [f"{service}.{i}" for i in range(replicas)]

