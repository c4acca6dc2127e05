"""Every hook is documented, in its docstring and in docs/plugin-hooks.md (as datasette does)."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pluggy
import pytest

from citadel_supervisor import PROJECT_NAME, hookspecs

DOC = Path(__file__).parents[2] / "docs" / "plugin-hooks.md"
HEADING_RE = re.compile(r"^### (citadel_\w+)\((.*)\)\s*$", re.MULTILINE)


def hook_specs() -> dict[str, list[str]]:
    """``{hook name: its parameter names}`` for every hook in hookspecs.py."""
    specs = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, f"{PROJECT_NAME}_spec"):
            specs[name] = list(inspect.signature(fn).parameters)
    return specs


def doc_sections() -> dict[str, tuple[list[str], str]]:
    """``{hook name: (parameters in its heading, the section's text)}`` from the doc."""
    text = DOC.read_text()
    matches = list(HEADING_RE.finditer(text))
    sections = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end():end]
        body = re.split(r"^## ", body, flags=re.MULTILINE)[0]  # up to the next group heading
        params = [p.strip() for p in match.group(2).split(",") if p.strip()]
        sections[match.group(1)] = (params, body)
    return sections


SPECS = hook_specs()
SECTIONS = doc_sections()


def test_hooks_were_found() -> None:
    # Guards the two tests below against passing on nothing.
    assert "citadel_worker_event" in SPECS and len(SPECS) >= 9
    assert all(name.startswith("citadel_") for name in SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_docstring_names_each_parameter(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc, f"{name} has no docstring"
    for param in SPECS[name]:
        assert f":param {param}:" in doc, f"{name}'s docstring does not describe {param!r}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_plugin_hooks_are_documented(name: str) -> None:
    assert name in SECTIONS, f"docs/plugin-hooks.md has no '### {name}(...)' section"
    params, body = SECTIONS[name]
    assert params == SPECS[name], f"the heading of {name} lists {params}, the hook takes {SPECS[name]}"
    for param in params:
        assert re.search(rf"^- `{param}`: ", body, re.MULTILINE), f"{name}: argument {param!r} is not described"
    assert "Called:" in body, f"{name}: the section does not say when it is called"
    assert f"def {name}(" in body, f"{name}: the section has no example implementation"


def test_no_section_for_a_hook_that_does_not_exist() -> None:
    assert set(SECTIONS) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_examples_match_the_hook_specs(name: str) -> None:
    """Each example runs, and pluggy accepts it as an implementation of its hook."""
    _, body = SECTIONS[name]
    blocks = re.findall(r"```python\n(.*?)```", body, re.DOTALL)
    assert len(blocks) == 1, f"{name}: expected one python example"
    module = types.ModuleType(f"example_{name}")
    exec(compile(blocks[0], f"docs/plugin-hooks.md ({name})", "exec"), module.__dict__)  # noqa: S102  (our own doc)
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(module)  # raises PluginValidationError on a wrong name or argument
    impls = getattr(manager.hook, name).get_hookimpls()
    assert [impl.plugin for impl in impls] == [module]
