"""The config: TOML files validated into typed, frozen models.

One loader (``load_config``) reads the main file and its ``include``
drop-ins, resolves ``${VAR}`` references, and validates every table. Every
problem is reported at once, each naming the file and the key path
(``services.chat.gpus[1]: ...``); unknown keys get a did-you-mean.
"""

from __future__ import annotations

import difflib
import glob
import re
import signal
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .durations import Duration
from .interpolation import InterpolationError, Interpolator, read_env_file
from .masking import SecretMasker, is_secret_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class Model(BaseModel):
    """Base of every config model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------

ProbeRole = Literal["startup", "liveness", "readiness"]


class ProbeConfig(Model):
    """One health probe: what to check, and how often."""

    kind: str = Field(description="http, tcp, exec, inference, or a kind a plugin adds")
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
    metrics: str | None = Field(
        None, description="the worker's own Prometheus page to federate: a URL, or a path on its port"
    )

    _stop_signal = field_validator("stop_signal", mode="before")(_signal_number)

    @model_validator(mode="after")
    def _backoff_order(self) -> ServiceConfig:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


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
    """``[exporter]``: the Prometheus and health listener."""

    listen: str | None = Field("127.0.0.1:9180", description="host:port, or empty to disable")
    scrape_timeout: Duration = Field(2.0, gt=0, description="per worker /metrics fetch")
    disk_paths: list[Path] = Field(
        default_factory=lambda: [Path("/")], description="file systems to report and check"
    )
    host_checks: HostChecksConfig = Field(
        default_factory=HostChecksConfig, description="thresholds of the host's health checks"
    )
    health_period: Duration = Field(5.0, gt=0, description="seconds between host checks")


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


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the file, the key path, and what is wrong."""

    file: Path | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(Exception):
    """The config is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def format_path(loc: Iterable[object]) -> str:
    """``("services", "chat", "gpus", 1)`` -> ``services.chat.gpus[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[object, ...]) -> type[BaseModel] | None:
    """The model whose fields sit at ``loc`` under ``model``, if one does."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) is list:
            current = get_args(current)[0]
        # Unwrap Optional[...] / unions to their one model member.
        while get_origin(current) in (Union, types.UnionType):
            models = [a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A `` (did you mean 'x'?)`` hint, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _issues_from_validation(
    exc: ValidationError,
    model: type[BaseModel],
    prefix: tuple[object, ...],
    origin: Callable[[tuple[object, ...]], Path | None],
    data: object,
) -> list[ConfigIssue]:
    """Turn pydantic's errors into issues with clean key paths.

    pydantic reports a value that matches no member of a union once per
    member, each under a tag such as ``list[union[int,str]]``. Tags are
    dropped from the path, only the members that got furthest into the value
    are kept, and what is left at one path becomes one issue.
    """
    found: list[tuple[tuple[object, ...], str, tuple[object, ...] | None, str | None]] = []
    for err in exc.errors():
        raw = tuple(err["loc"])
        loc, union_at, member = _strip_union_tags(raw, data, keep_last=err["type"] == "missing")
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = parent.model_fields if parent else {}
            message = "unknown key" + did_you_mean(str(loc[-1]), known)
        else:
            message = err["msg"].removeprefix("Value error, ")
            loc, message = _key_named_in_message(model, loc, message)
            if err["type"] != "missing" and "input" in err and _is_scalar(err["input"]):
                message += f" (got {err['input']!r})"
        found.append((loc, message, union_at, member))

    # Per union, keep only the members whose errors reach deepest into the value.
    deepest: dict[tuple[object, ...], int] = {}
    for loc, _, union_at, _ in found:
        if union_at is not None:
            deepest[union_at] = max(deepest.get(union_at, 0), len(loc))
    kept = [f for f in found if f[2] is None or len(f[0]) == deepest[f[2]]]

    issues: list[ConfigIssue] = []
    merged: dict[tuple[object, ...], list[str]] = {}
    for loc, message, union_at, _ in kept:
        if union_at is None:
            issues.append(ConfigIssue(origin(prefix + loc), format_path(prefix + loc), message))
        elif message not in merged.setdefault(loc, []):
            merged[loc].append(message)
    for loc, messages in merged.items():
        message = messages[0] if len(messages) == 1 else _one_of(model, loc, messages)
        issues.append(ConfigIssue(origin(prefix + loc), format_path(prefix + loc), message))
    return issues


def _strip_union_tags(
    loc: tuple[object, ...], data: object, keep_last: bool
) -> tuple[tuple[object, ...], tuple[object, ...] | None, str | None]:
    """``loc`` without union tags, the path of the first union, and the member tag there.

    A tag is a part of the path that is no key of the input at that point;
    the last part is kept when it names a missing key.
    """
    clean: list[object] = []
    union_at: tuple[object, ...] | None = None
    member: str | None = None
    node: Any = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        is_key = isinstance(node, dict) and part in node
        is_index = isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node)
        if is_key or is_index:
            node = node[part]
        elif isinstance(part, str) and not (last and keep_last):
            if union_at is None:
                union_at, member = tuple(clean), part
            continue
        else:
            node = None
        clean.append(part)
    return tuple(clean), union_at, member


_KEY_PREFIX_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*): (.+)$", re.DOTALL)


def _key_named_in_message(
    model: type[BaseModel], loc: tuple[object, ...], message: str
) -> tuple[tuple[object, ...], str]:
    """Move a leading ``key[i]: `` of a model validator's message into the path.

    A validator that checks several fields at once names the key it is about
    that way (``command[0]: prog does not exist``).
    """
    match = _KEY_PREFIX_RE.match(message)
    if not match:
        return loc, message
    owner = _model_at(model, loc)
    if owner is None or match.group(1) not in owner.model_fields:
        return loc, message
    indices = tuple(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return loc + (match.group(1),) + indices, match.group(3)


def _one_of(model: type[BaseModel], loc: tuple[object, ...], messages: list[str]) -> str:
    """One message for a value that matched none of a union's members."""
    parent = _model_at(model, loc[:-1]) if loc else None
    field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
    got = ""
    for m in messages:
        if "(got " in m:
            got = m[m.rindex(" (got "):]
            break
    if field is not None and field.description:
        return f"expected {field.description}{got}"
    parts = [m.removesuffix(got) if got else m for m in messages]
    parts = [parts[0]] + [p.removeprefix("Input should be ") for p in parts[1:]]
    return " or ".join(parts) + got


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) and len(str(value)) < 80


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


class _Sources:
    """Which file each key path came from, for error messages."""

    def __init__(self, main: Path):
        self.main = main
        self.by_path: dict[tuple[object, ...], Path] = {}

    def record(self, data: Mapping[str, Any], file: Path, prefix: tuple[object, ...] = ()) -> None:
        for key, value in data.items():
            path = prefix + (key,)
            self.by_path[path] = file
            if isinstance(value, Mapping):
                self.record(value, file, path)

    def __call__(self, loc: tuple[object, ...]) -> Path:
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.by_path:
                return self.by_path[loc[:end]]
        return self.main


def _read_toml(path: Path, issues: list[ConfigIssue]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        issues.append(ConfigIssue(path, "", "file not found"))
    except PermissionError:
        issues.append(ConfigIssue(path, "", "permission denied"))
    except IsADirectoryError:
        issues.append(ConfigIssue(path, "", "is a directory, not a TOML file"))
    except tomllib.TOMLDecodeError as exc:
        issues.append(ConfigIssue(path, "", f"invalid TOML: {exc}"))
    return None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge ``extra`` into ``base``: tables merge key by key, other values replace."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _interpolate(
    data: Any, interp: Interpolator, loc: tuple[object, ...], sources: _Sources, issues: list[ConfigIssue]
) -> Any:
    if isinstance(data, str):
        try:
            return interp.resolve(data)
        except InterpolationError as exc:
            issues.append(ConfigIssue(sources(loc), format_path(loc), str(exc)))
            return data
    if isinstance(data, dict):
        return {k: _interpolate(v, interp, loc + (k,), sources, issues) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, interp, loc + (i,), sources, issues) for i, v in enumerate(data)]
    return data


def _resolve_path(value: Path | None, base: Path) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value)


ServiceModels = Mapping[str, type[ServiceConfig]]
SectionModels = Mapping[str, type[BaseModel]]


def load_config(
    path: str | Path,
    service_types: ServiceModels,
    plugin_sections: SectionModels | None = None,
    environ: Mapping[str, str] | None = None,
) -> CitadelConfig:
    """Read, merge, interpolate and validate a config; raise ``ConfigError`` listing every issue.

    ``service_types`` maps each ``type = "..."`` to its config model (from the
    plugins' ``citadel_service_types`` hook); ``plugin_sections`` maps a
    ``[plugin.NAME]`` section to its model. Relative paths are taken from the
    main file's folder.
    """
    main = Path(path).resolve() if Path(path).exists() else Path(path)
    base_dir = main.parent
    issues: list[ConfigIssue] = []
    sources = _Sources(main)
    data = _read_toml(main, issues)
    if data is None:
        raise ConfigError(issues)
    sources.record(data, main)
    files = [main]

    includes = data.get("include", [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        issues.append(ConfigIssue(main, "include", "must be a list of glob patterns"))
        includes = []
    for pattern in includes:
        full_pattern = str(_resolve_path(Path(pattern), base_dir))
        for extra_path in sorted(glob.glob(full_pattern)):
            extra = _read_toml(Path(extra_path), issues)
            if extra is None:
                continue
            if "include" in extra:
                issues.append(ConfigIssue(Path(extra_path), "include", "drop-in files cannot include others"))
                extra.pop("include")
            _merge(data, extra)
            sources.record(extra, Path(extra_path))
            files.append(Path(extra_path))

    # The daemon's env_file supplies ${VAR} values, so it is read first.
    extra_env: dict[str, str] = {}
    env_file = data.get("daemon", {}).get("env_file") if isinstance(data.get("daemon"), dict) else None
    if isinstance(env_file, str):
        env_path = _resolve_path(Path(env_file), base_dir)
        assert env_path is not None
        try:
            extra_env = read_env_file(env_path)
        except (OSError, InterpolationError) as exc:
            issues.append(ConfigIssue(sources(("daemon", "env_file")), "daemon.env_file", str(exc)))
    interp = Interpolator.from_process(extra_env) if environ is None else Interpolator(
        environ={**extra_env, **environ},
        credentials_dir=Path(environ["CREDENTIALS_DIRECTORY"]) if "CREDENTIALS_DIRECTORY" in environ else None,
    )
    data = _interpolate(data, interp, (), sources, issues)

    raw_services = data.pop("services", {})
    if not isinstance(raw_services, dict):
        issues.append(ConfigIssue(main, "services", "must be a table of services"))
        raw_services = {}
    for internal in ("files", "secrets"):
        # Fields the loader fills in; a config file cannot set them.
        if internal in data:
            data.pop(internal)
            issues.append(ConfigIssue(sources((internal,)), internal, "unknown key"))
    try:
        top = CitadelConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(_issues_from_validation(exc, CitadelConfig, (), sources, data))
        top = None

    services = _validate_services(raw_services, service_types, sources, base_dir, interp, issues)
    plugin_cfg = _validate_plugin_sections(
        data.get("plugin", {}), plugin_sections or {}, top, sources, issues
    )
    # Checks across services run on those that validated, so that one run
    # reports every problem; a service that failed is still a known name.
    issues.extend(_cross_check(services, set(raw_services), sources))
    if top is None or issues:
        raise ConfigError(_masked(issues, interp.secrets))

    daemon = top.daemon.model_copy(update={
        name: _resolve_path(getattr(top.daemon, name), base_dir)
        for name in ("control_socket", "state_dir", "log_dir", "env_file")
    })
    exporter = top.exporter.model_copy(update={
        "disk_paths": [_resolve_path(p, base_dir) for p in top.exporter.disk_paths]
    })
    return top.model_copy(update={
        "daemon": daemon,
        "exporter": exporter,
        "services": services,
        "plugin": plugin_cfg,
        "files": tuple(files),
        "secrets": frozenset(interp.secrets),
    })


def _masked(issues: list[ConfigIssue], secrets: Iterable[str]) -> list[ConfigIssue]:
    """The issues with every secret value met while loading masked out of their messages."""
    local = SecretMasker()
    local.add_secrets(secrets)
    return [ConfigIssue(i.file, i.path, local.mask(i.message)) for i in issues]


def _validate_services(
    raw: dict[str, Any],
    service_types: ServiceModels,
    sources: _Sources,
    base_dir: Path,
    interp: Interpolator,
    issues: list[ConfigIssue],
) -> dict[str, ServiceConfig]:
    services: dict[str, ServiceConfig] = {}
    for name, table in raw.items():
        loc: tuple[object, ...] = ("services", name)
        if not SERVICE_NAME_RE.match(name):
            issues.append(ConfigIssue(sources(loc), format_path(loc),
                                      "service names use letters, digits, '_' and '-' (at most 64)"))
            continue
        if not isinstance(table, dict):
            issues.append(ConfigIssue(sources(loc), format_path(loc), "must be a table"))
            continue
        type_name = table.get("type")
        if type_name is None:
            issues.append(ConfigIssue(sources(loc), format_path(loc + ("type",)),
                                      f"missing; one of: {', '.join(sorted(service_types))}"))
            continue
        model = service_types.get(type_name) if isinstance(type_name, str) else None
        if model is None:
            hint = did_you_mean(str(type_name), service_types)
            issues.append(ConfigIssue(
                sources(loc + ("type",)), format_path(loc + ("type",)),
                f"unknown service type {type_name!r}{hint}; known types: "
                f"{', '.join(sorted(service_types)) or 'none (no plugin loaded)'}",
            ))
            continue
        table = dict(table)
        env_file = table.get("env_file")
        if isinstance(env_file, str):
            env_path = _resolve_path(Path(env_file), base_dir)
            assert env_path is not None
            try:
                file_env = read_env_file(env_path)
            except (OSError, InterpolationError) as exc:
                issues.append(ConfigIssue(sources(loc + ("env_file",)),
                                          format_path(loc + ("env_file",)), str(exc)))
                file_env = {}
            env = table.get("env", {})
            if isinstance(env, dict):
                table["env"] = {**file_env, **env}
        try:
            service = model.model_validate(table, context={"base_dir": base_dir})
        except ValidationError as exc:
            issues.extend(_issues_from_validation(exc, model, loc, sources, table))
            continue
        if service.cwd is not None:
            service = service.model_copy(update={"cwd": _resolve_path(service.cwd, base_dir)})
        interp.secrets.update(v for k, v in service.env.items() if is_secret_name(k))
        interp.secrets.update(v.get_secret_value() for v in service.__dict__.values()
                              if isinstance(v, SecretStr))
        services[name] = service
    return services


def _validate_plugin_sections(
    raw: Any,
    models: SectionModels,
    top: CitadelConfig | None,
    sources: _Sources,
    issues: list[ConfigIssue],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return out
    from .plugins import disabled_from_env  # here: plugins.py is the heavier module

    disabled = (set(top.plugins.disable) if top else set()) | disabled_from_env()
    for name, table in raw.items():
        loc: tuple[object, ...] = ("plugin", name)
        model = models.get(name)
        if model is None:
            if name in disabled:
                continue  # its plugin is disabled on purpose; keep its settings for later
            issues.append(ConfigIssue(
                sources(loc), format_path(loc),
                f"no loaded plugin reads this section{did_you_mean(name, models)}",
            ))
            continue
        try:
            out[name] = model.model_validate(table)
        except ValidationError as exc:
            issues.extend(_issues_from_validation(exc, model, loc, sources, table))
    return out


def check_services(config: CitadelConfig, sources: Callable[[tuple[object, ...]], Path | None]) -> list[ConfigIssue]:
    """Checks across services: ``after`` names and cycles, port clashes."""
    return _cross_check(config.services, set(config.services), sources)


def _cross_check(
    services: Mapping[str, ServiceConfig],
    names: set[str],
    sources: Callable[[tuple[object, ...]], Path | None],
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for name, service in services.items():
        for i, dep in enumerate(service.after):
            loc: tuple[object, ...] = ("services", name, "after", i)
            if dep == name:
                issues.append(ConfigIssue(sources(loc), format_path(loc), "a service cannot come after itself"))
            elif dep not in names:
                issues.append(ConfigIssue(sources(loc), format_path(loc),
                                          f"no service named {dep!r}{did_you_mean(dep, names)}"))
    cycle = find_cycle({n: [d for d in s.after if d in services and d != n] for n, s in services.items()})
    if cycle:
        loc = ("services", cycle[0], "after")
        issues.append(ConfigIssue(sources(loc), format_path(loc),
                                  "startup order has a cycle: " + " -> ".join(cycle)))
    ports: dict[int, str] = {}
    for name, service in services.items():
        for replica in range(service.replicas):
            port = service.port_for(replica)
            if port is None or port == 0:
                continue
            owner = name if service.replicas == 1 else f"{name}.{replica}"
            if port in ports:
                loc = ("services", name, "port")
                issues.append(ConfigIssue(sources(loc), format_path(loc),
                                          f"port {port} of {owner} is also used by {ports[port]}"))
            else:
                ports[port] = owner
    return issues


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle in ``graph`` as a list of names (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
