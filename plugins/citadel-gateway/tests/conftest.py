"""Fixtures for the gateway's tests: a real citadeld running fake upstreams and the gateway.

The main repo's ``tests/conftest.py`` provides ``daemon_factory`` and
``RunningDaemon``. It is loaded by path under its own module name, and its
public names are re-exported here: both files are named ``conftest``, and
whichever pytest imported last is the one ``from conftest import ...`` finds,
in the main tests as in these. The gateway's helpers live in
``gateway_harness.py`` for that reason.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
MAIN_TESTS = HERE.parents[2] / "tests"

if str(MAIN_TESTS) not in sys.path:
    sys.path.append(str(MAIN_TESTS))
# One instance, shared with any other plugin's tests that load it the same way.
if "citadel_main_conftest" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("citadel_main_conftest", MAIN_TESTS / "conftest.py")
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["citadel_main_conftest"] = _module
    _spec.loader.exec_module(_module)
main_conftest = sys.modules["citadel_main_conftest"]
globals().update({name: value for name, value in vars(main_conftest).items()
                  if not name.startswith(("_", "pytest_")) and name not in globals()})
RunningDaemon = main_conftest.RunningDaemon


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``module_daemon(config_text)`` -> a RunningDaemon shared by one test module."""
    made: list[Any] = []

    def make(config_text: str, env: dict[str, str] | None = None) -> Any:
        root = tmp_path_factory.mktemp("citadel")
        daemon = RunningDaemon(root, config_text, env)
        made.append(daemon)
        return daemon.start()

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
