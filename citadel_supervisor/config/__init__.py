"""The config: TOML files validated into typed, frozen models.

One loader (``load_config``) reads the main file and its ``include``
drop-ins, resolves ``${VAR}`` references, and validates every table. Every
problem is reported at once, each naming the file and the key path
(``services.chat.gpus[1]: ...``); unknown keys get a did-you-mean.

Import from here; the modules behind it each hold one concern:
``models`` (the pydantic models), ``errors`` (``ConfigIssue``, ``ConfigError``),
``validation_errors`` (pydantic's errors as issues), ``sources`` (reading,
merging and interpolating the files), ``loader`` (``load_config``) and
``cross_checks`` (checks across services).
"""

from __future__ import annotations

from .cross_checks import find_cycle
from .errors import ConfigError, ConfigIssue, did_you_mean, format_path
from .loader import SERVICE_NAME_RE, SectionModels, ServiceModels, load_config
from .models import (
    CitadelConfig,
    DaemonConfig,
    ExporterConfig,
    HealthShorthand,
    HostChecksConfig,
    Model,
    PluginsConfig,
    ProbeConfig,
    ProbeRole,
    ProbesConfig,
    ServiceConfig,
    SwapGroupConfig,
)

__all__ = [
    "SERVICE_NAME_RE",
    "CitadelConfig",
    "ConfigError",
    "ConfigIssue",
    "DaemonConfig",
    "ExporterConfig",
    "HealthShorthand",
    "HostChecksConfig",
    "Model",
    "PluginsConfig",
    "ProbeConfig",
    "ProbeRole",
    "ProbesConfig",
    "SectionModels",
    "ServiceConfig",
    "ServiceModels",
    "SwapGroupConfig",
    "did_you_mean",
    "find_cycle",
    "format_path",
    "load_config",
]
