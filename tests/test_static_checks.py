"""The package stays typed and lint-clean: mypy (disallow_untyped_defs) and ruff, as configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_mypy_is_clean() -> None:
    result = subprocess.run([str(BIN / "mypy"), "citadel_supervisor"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", "citadel_supervisor"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
