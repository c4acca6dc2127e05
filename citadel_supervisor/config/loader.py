"""Loading the config: one loader, ``load_config``, from files to validated models.

It reads the main file and its ``include`` drop-ins, resolves ``${VAR}``
references, validates every table (services by their type's model, plugin
sections by their plugin's model), runs the checks across services, and
reports every problem at once in one ``ConfigError``.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from ..logs.masking import SecretMasker, is_secret_name
from .cross_checks import check_probe_kinds, check_services, check_swap_groups
from .errors import ConfigError, ConfigIssue, did_you_mean, format_path
from .interpolation import InterpolationError, Interpolator, read_env_file
from .models import CitadelConfig, ServiceConfig
from .sources import _interpolate, _merge, _read_toml, _resolve_path, _Sources, disabled_from_env
from .validation_errors import _issues_from_validation

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


ServiceModels = Mapping[str, type[ServiceConfig]]
SectionModels = Mapping[str, type[BaseModel]]


def load_config(
    path: str | Path,
    service_types: ServiceModels,
    plugin_sections: SectionModels | None = None,
    environ: Mapping[str, str] | None = None,
    probe_kinds: Collection[str] | None = None,
) -> CitadelConfig:
    """Read, merge, interpolate and validate a config; raise ``ConfigError`` listing every issue.

    ``service_types`` maps each ``type = "..."`` to its config model (from the
    plugins' ``citadel_service_types`` hook); ``plugin_sections`` maps a
    ``[plugin.NAME]`` section to its model. ``probe_kinds``, when given, are
    the kinds a probe may have (built-in and the plugins'
    ``citadel_probe_kinds``); others are errors. Relative paths are taken from
    the main file's folder.
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
    issues.extend(check_services(services, set(raw_services), sources))
    issues.extend(check_swap_groups(services, top.swap_groups if top is not None else {}, sources))
    if probe_kinds is not None:
        issues.extend(check_probe_kinds(services, probe_kinds, sources))
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
        if service.multinode is not None:
            interp.secrets.add(service.multinode.secret.get_secret_value())
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

