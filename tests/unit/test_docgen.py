"""docs/config-reference.md is what the config models say: regenerated here and compared."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import SecretStr

from citadel_supervisor import config as cfg
from citadel_supervisor.cli import docgen
from citadel_supervisor.config.durations import Duration
from citadel_supervisor.plugins import load_plugins

DOC = Path(__file__).parents[2] / "docs" / "config-reference.md"
REGENERATE = "python -m citadel_supervisor.cli.docgen --write docs/config-reference.md"


@pytest.fixture(scope="module")
def generated() -> str:
    registry = load_plugins()
    distributions = docgen.first_party_distributions()
    missing = docgen.missing_distributions(registry, distributions)
    assert not missing, f"first-party plugins not loaded: {missing} (scripts/test installs them)"
    return docgen.config_reference(registry, distributions)


def test_the_reference_is_up_to_date(generated: str) -> None:
    current = DOC.read_text() if DOC.exists() else ""
    if current != generated:
        diff = "".join(list(difflib.unified_diff(
            current.splitlines(keepends=True), generated.splitlines(keepends=True),
            "docs/config-reference.md", "generated"))[:60])
        pytest.fail(f"docs/config-reference.md is out of date; run `{REGENERATE}`:\n{diff}")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{1,4} ", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + following.start()] if following else text[start:]


@pytest.mark.parametrize(("heading", "model"), [
    ("### `[daemon]`", cfg.DaemonConfig),
    ("### `[exporter]`", cfg.ExporterConfig),
    ("### `[plugins]`", cfg.PluginsConfig),
    ("### `[services.NAME]`", cfg.ServiceConfig),
    ("#### `[services.NAME.health]`", cfg.HealthShorthand),
    ("##### `[services.NAME.probes.startup]`", cfg.ProbeConfig),
])
def test_every_key_of_the_core_tables_has_a_row(generated: str, heading: str, model: type) -> None:
    section = _section(generated, heading)
    missing = [name for name in model.model_fields if f"| `{name}` |" not in section]
    assert not missing, f"{heading} lacks rows for {missing}"


def test_every_first_party_service_type_and_plugin_section_is_there(generated: str) -> None:
    registry = load_plugins()
    first_party = docgen.first_party_distributions()
    ours = {p for p, r in registry.records.items() if r.distribution in first_party}
    types = [t.name for p, found in registry.call_each("citadel_service_types") if p in ours
             for t in found]
    sections = [s for p, found in registry.call_each("citadel_config_sections") if p in ours
                for s in found]
    assert "command" in types and "webhook" in sections  # the lists are not empty by mistake
    for name in types:
        assert f'### `type = "{name}"`' in generated
    for name in sections:
        assert f"### `[plugin.{name}]`" in generated


@pytest.mark.parametrize(("annotation", "expected"), [
    (Duration, "duration"),
    (list[int | str] | int | Literal["auto"] | None, 'one of: list of integers or strings; integer; "auto"'),
    (Literal["always", "never"], '"always" or "never"'),
    (SecretStr | None, "string (secret)"),
    (dict[str, str], "table of strings"),
    (tuple[int, int], "[integer, integer]"),
    (Path | None, "path"),
])
def test_type_names(annotation: object, expected: str) -> None:
    assert docgen.type_name(annotation) == expected


def test_defaults_are_written_as_toml() -> None:
    fields = cfg.DaemonConfig.model_fields
    assert docgen.default_text(fields["control_socket"]) == '`"/run/citadel/control.sock"`'
    assert docgen.default_text(fields["port_range"]) == "`[8100, 8999]`"
    assert docgen.default_text(fields["env_file"]) == "*none*"
    assert docgen.default_text(cfg.ServiceConfig.model_fields["type"]) == "*required*"
    assert docgen.default_text(cfg.ServiceConfig.model_fields["required"]) == "`true`"
