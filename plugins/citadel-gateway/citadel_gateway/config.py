"""The gateway's config: the service table citadeld validates, and the settings the process runs on.

``GatewaySettings`` holds what the gateway process needs besides its
listener, control socket and keys; citadeld passes it as JSON on the
command line. The keys travel in the environment (``CITADEL_GATEWAY_KEYS``),
as sha256 digests only, so no key is ever in an argv.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from citadel_supervisor.config import Model, ServiceConfig
from citadel_supervisor.config.durations import Duration

_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class RetrySettings(Model):
    """``retry = { attempts = 1, statuses = [...] }``: what is retried on another worker."""

    attempts: int = Field(1, ge=0, le=3, description="retries on another worker; 0 disables")
    statuses: list[int] = Field(
        default_factory=lambda: [500, 502, 503, 504],
        description="upstream statuses that count as a failure before any byte was sent",
    )


class EngineLoadSettings(Model):
    """``engine_load = { poll_period = 0.5, stale_after = 3 }``: reading the engines' own load."""

    poll_period: Duration = Field(
        0.5, ge=0.1, le=10, description="seconds between two reads of citadeld's GET /v1/engines")
    stale_after: Duration = Field(
        3.0, gt=0, le=60,
        description="a reading older than this is ignored: the policy counts outstanding requests")

    @model_validator(mode="after")
    def _stale_after_a_poll(self) -> EngineLoadSettings:
        if self.stale_after <= self.poll_period:
            raise ValueError(f"stale_after ({self.stale_after:g}s) must be longer than poll_period "
                             f"({self.poll_period:g}s), or every reading would be stale")
        return self


class PrefixAffinity(Model):
    """``prefix_affinity = { prefix_chars = 1024 }``: requests whose prompts start alike go to one
    worker (while it is not overloaded), so that vLLM's prefix cache hits."""

    prefix_chars: int = Field(
        1024, ge=64, le=65536,
        description="characters of the prompt (chat messages or prompt text) that are hashed; "
                    "a shorter prompt gets no affinity")
    max_waiting: int = Field(
        0, ge=0,
        description="the worker is overloaded when its engine has more requests waiting than this")
    slack: int = Field(
        4, ge=0,
        description="the worker is overloaded when it has this many more requests in flight "
                    "than the least busy one")


class GatewaySettings(Model):
    """What the gateway process runs on, besides its listener, control socket and keys."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body")
    per_worker_concurrency: int = Field(
        64, ge=1, description="requests in flight to one worker; more wait in the queue"
    )
    queue_size: int = Field(256, ge=0, description="requests waiting for a worker; more get 429")
    queue_timeout: Duration = Field(60.0, gt=0, description="longest wait in the queue")
    retry_after: int = Field(1, ge=1, description="seconds in Retry-After when the queue is full")
    require_key: bool | None = Field(
        None, description="refuse requests without a key (default: true when keys are given)"
    )
    retry: RetrySettings = Field(default_factory=RetrySettings,
                                 description="retrying on another worker")
    upstream_timeout: Duration = Field(
        600.0, gt=0, description="longest silence from a worker: before its answer or between chunks"
    )
    connect_timeout: Duration = Field(5.0, gt=0, description="to open a connection to a worker")
    routes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="model name -> services that serve it, beside the models workers report",
    )
    stream_usage: bool = Field(
        True, description="ask streams for a final usage chunk (stream_options.include_usage)"
    )
    on_demand: list[str] = Field(
        default_factory=list,
        description="services this gateway starts or wakes when a request for their model finds them "
                    "down (they have start = \"on-demand\", idle_stop, a swap_group or sleep); the only "
                    "right it has over citadeld (docs/on-demand.md)")
    hold_timeout: Duration = Field(
        300.0, gt=0, description="the longest a request waits for its on-demand model to start or wake; "
                                 "then 503 with Retry-After")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="the gateway process's own log level")
    policy: Literal["least-outstanding", "engine-load"] = Field(
        "least-outstanding",
        description="how a worker is chosen: fewest requests in flight, or by the engines' own "
                    "load as well (waiting requests, KV-cache use; docs/gateway.md)")
    engine_load: EngineLoadSettings = Field(
        default_factory=EngineLoadSettings, description="reading the engines' own load")
    prefix_affinity: PrefixAffinity | None = Field(
        None, description="send prompts that start alike to one worker (off when absent)")

    @field_validator("routes")
    @classmethod
    def _routes_name_services(cls, routes: dict[str, list[str]]) -> dict[str, list[str]]:
        for model, services in routes.items():
            if not model:
                raise ValueError("a model name must not be empty")
            if not services:
                raise ValueError(f"routes.{model}: name at least one service")
        return routes

    def settings_only(self) -> GatewaySettings:
        """These settings as a plain ``GatewaySettings`` (dropping the service's keys)."""
        return GatewaySettings.model_validate(
            self.model_dump(include=set(GatewaySettings.model_fields))
        )


class KeyConfig(Model):
    """One API key: ``[[services.NAME.keys]]``."""

    name: str = Field(min_length=1, description="what logs and metrics call this key")
    hash: str | None = Field(None, description='"sha256:<hex>" of the key')
    key: str | None = Field(None, min_length=8, description='the key itself, from "${credential:NAME}"')
    models: list[str] | Literal["*"] = Field("*", description='the models it may use, or "*"')
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.hash is None) == (self.key is None):
            raise ValueError(
                'give exactly one of hash ("sha256:<hex>") or key (from "${credential:NAME}")'
            )
        if self.hash is not None and not _HASH_RE.match(self.hash):
            raise ValueError(
                'hash: expected "sha256:" and 64 lowercase hex digits '
                "(printf %s \"$KEY\" | sha256sum)"
            )
        return self


class GatewayConfig(ServiceConfig, GatewaySettings):
    """``type = "gateway"``: the OpenAI-compatible front door."""

    listen: str | None = Field(None, description='"HOST:PORT", instead of host and port')
    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int | None = Field(
        None, ge=0, le=65535, description="the port (replica N gets port + N); 0 allocates one"
    )
    control_socket: Path | None = Field(
        None, description="citadeld's control socket (default: the daemon's own)"
    )
    keys: list[KeyConfig] = Field(default_factory=list,
                                  description="API keys: [[services.NAME.keys]] tables")

    @model_validator(mode="before")
    @classmethod
    def _split_listen(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("listen") is None:
            return data
        listen = data["listen"]
        host, sep, port = str(listen).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError('listen: expected "HOST:PORT", such as "127.0.0.1:8000"')
        if "port" in data or "host" in data:
            raise ValueError("listen: give listen, or host and port, not both")
        return {**data, "host": host.strip("[]"), "port": int(port)}

    @model_validator(mode="after")
    def _port_and_keys(self) -> GatewayConfig:
        if self.port is None:
            raise ValueError('port: missing; give port (or listen = "HOST:PORT")')
        names = [k.name for k in self.keys]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"keys: the name {name!r} is used twice")
        if self.require_key and not self.keys:
            raise ValueError("require_key: true, but no keys are given ([[services.NAME.keys]])")
        return self

    def port_for(self, replica: int) -> int | None:
        """``port + replica``, or 0 to allocate."""
        if self.port is None or self.port == 0:
            return self.port
        return self.port + replica
