"""The ``gateway`` service type: the plugin citadeld loads (entry point ``gateway``).

citadeld runs the gateway as one of its workers::

    python -m citadel_gateway --listen HOST:PORT --control-socket PATH --config-json '{...}'

with the keys, as sha256 digests, in ``CITADEL_GATEWAY_KEYS``. Keys given
as ``key = "${credential:NAME}"`` are hashed here, before the spawn, so the
gateway process never holds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import SecretStr

from citadel_supervisor import hookimpl
from citadel_supervisor.config import (
    CitadelConfig,
    ConfigIssue,
    ProbeConfig,
    ProbesConfig,
    format_path,
)
from citadel_supervisor.logs.masking import masker
from citadel_supervisor.services.base import ServiceType, SpawnSpec, WorkerInfo

from .config import GatewayConfig, GatewaySettings
from .keys import KEYS_ENV, UPSTREAM_KEYS_ENV, ApiKey, digest

DEFAULT_SOCKET = Path("/run/citadel/control.sock")


def api_keys(config: GatewayConfig) -> list[ApiKey]:
    """The configured keys as digests (hashing those given as ``key``)."""
    keys = []
    for entry in config.keys:
        sha = entry.hash.removeprefix("sha256:") if entry.hash else digest(entry.key or "")
        models = None if entry.models == "*" else frozenset(entry.models)
        keys.append(ApiKey(entry.name, sha, models, entry.requests_per_minute, entry.tokens_per_minute))
    return keys


def _reachable_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class GatewayService(ServiceType):
    """Runs ``python -m citadel_gateway`` in front of the other workers."""

    name = "gateway"
    config_model = GatewayConfig

    def __init__(self) -> None:
        #: The daemon's control socket, learned from the config (``citadel_check_config``).
        self.daemon_socket: Path | None = None
        #: Each service's own API key (vLLM's ``api_key``), learned the same way.
        self.upstream_keys: dict[str, str] = {}

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """The gateway's argv (no secrets) and env (the key digests)."""
        config = worker.config
        assert isinstance(config, GatewayConfig)
        socket = config.control_socket or self.daemon_socket or DEFAULT_SOCKET
        settings = GatewaySettings.model_validate(
            config.model_dump(include=set(GatewaySettings.model_fields)))
        argv = [
            sys.executable, "-m", "citadel_gateway",
            "--listen", f"{config.host}:{worker.port}",
            "--control-socket", str(socket),
            "--config-json", settings.model_dump_json(),
        ]
        env = dict(config.env)
        env[KEYS_ENV] = json.dumps([k.to_json() for k in api_keys(config)])
        # The workers' own keys go by env, never argv; the daemon masks them as secrets.
        env[UPSTREAM_KEYS_ENV] = json.dumps(self.upstream_keys)
        return SpawnSpec(argv=argv, env=env, cwd=config.cwd)

    def default_probes(self, worker: WorkerInfo) -> ProbesConfig:
        """``/healthz``: ready once the gateway has read citadeld's status."""
        probe = ProbeConfig(kind="http", path="/healthz", period=1.0, timeout=2.0, failure_threshold=3)
        return ProbesConfig(startup=probe.model_copy(update={"period": 0.2}), readiness=probe)

    def control_grants(self, worker: WorkerInfo) -> frozenset[str]:
        """The one right a gateway has over citadeld: starting and waking its ``on_demand``."""
        config = worker.config
        assert isinstance(config, GatewayConfig)
        return frozenset(config.on_demand)

    def metrics_url(self, worker: WorkerInfo) -> str | None:
        """The gateway's own ``/metrics``, for the exporter to federate."""
        config = worker.config
        assert isinstance(config, GatewayConfig)
        return f"http://{_reachable_host(config.host)}:{worker.port}/metrics"


GATEWAY = GatewayService()


@hookimpl
def citadel_service_types() -> list[ServiceType]:
    """The ``gateway`` type."""
    return [GATEWAY]


@hookimpl
def citadel_check_config(config: CitadelConfig) -> list[ConfigIssue]:
    """Check that each gateway's routes and on_demand name services that exist (those of
    on_demand: services that come and go).

    Also notes the daemon's control socket: a gateway without
    ``control_socket`` follows the daemon that runs it; and registers the keys
    written in the config with the masker.
    """
    GATEWAY.daemon_socket = config.daemon.control_socket
    # A key written in the config itself (not from "${credential:NAME}") is a secret all
    # the same: citadeld's logs, answers and federated pages must never show it.
    masker.add_secrets(entry.key for service in config.services.values()
                       if isinstance(service, GatewayConfig) for entry in service.keys if entry.key)
    GATEWAY.upstream_keys = {
        name: key.get_secret_value() for name, service in config.services.items()
        if isinstance(key := getattr(service, "api_key", None), SecretStr)
    }
    issues = []
    for name, service in config.services.items():
        if not isinstance(service, GatewayConfig):
            continue
        for model, targets in service.routes.items():
            for i, target in enumerate(targets):
                if target not in config.services:
                    path = format_path(("services", name, "routes", model, i))
                    issues.append(ConfigIssue(config.files[0] if config.files else None, path,
                                              f"no service named {target!r}"))
                elif target == name:
                    path = format_path(("services", name, "routes", model, i))
                    issues.append(ConfigIssue(config.files[0] if config.files else None, path,
                                              "a gateway cannot route to itself"))
        for i, target in enumerate(service.on_demand):
            path = format_path(("services", name, "on_demand", i))
            other = config.services.get(target)
            if other is None:
                issues.append(ConfigIssue(config.files[0] if config.files else None, path,
                                          f"no service named {target!r}"))
            elif not other.demand_driven and not getattr(other, "sleep", 0):
                issues.append(ConfigIssue(config.files[0] if config.files else None, path,
                                          f"{target!r} always runs: give it start = \"on-demand\", "
                                          "idle_stop, a swap_group or sleep, or leave it out"))
    return issues
