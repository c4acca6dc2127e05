"""The package stays typed and lint-clean: mypy (disallow_untyped_defs) and ruff, as configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_mypy_is_clean() -> None:
    result = subprocess.run([str(BIN / "mypy"), "citadel_supervisor"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", "citadel_supervisor"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_states_module_is_a_leaf_and_every_state_has_its_place() -> None:
    """states.py imports nothing of Citadel's, so anything may use it; the worker, the
    metrics, the control API's schema and citadelctl's colours all name the same states."""
    import ast

    from citadel_supervisor.cli.citadelctl import _STATE_COLOURS
    from citadel_supervisor.control.routes import _WORKER as WORKER_SCHEMA
    from citadel_supervisor.exporter.collectors.supervisor import WORKER_STATES
    from citadel_supervisor.states import STATE_NAMES, WorkerState

    tree = ast.parse((REPO / "citadel_supervisor" / "states.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert all(name in ("__future__", "enum") for name in imported), imported
    assert STATE_NAMES == ("stopped", "starting", "running", "backoff", "stopping", "fatal", "idle", "asleep")
    assert [s.value for s in WorkerState] == list(STATE_NAMES) == list(WORKER_STATES)
    assert WORKER_SCHEMA["properties"]["state"]["enum"] == list(STATE_NAMES)
    assert set(_STATE_COLOURS) == set(STATE_NAMES)


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (no __init__.py): two of one name cannot both run."""
    from collections import Counter

    roots = [REPO / "tests", *sorted((REPO / "plugins").glob("*/tests"))]
    names = Counter(p.name for root in roots for p in root.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
