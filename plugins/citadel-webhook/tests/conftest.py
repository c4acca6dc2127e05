"""Fixtures for the webhook plugin's tests.

``daemon_factory`` is citadeld's own, from the main repository's
tests/conftest.py. That file is loaded by path under another module name, and
its public names are re-exported here: both files are named ``conftest``, and
citadeld's tests ``from conftest import ...`` whichever pytest imported last.
For the same reason the receiver lives in webhook_receiver.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from webhook_receiver import SECRET, WebhookReceiver

_MAIN_CONFTEST = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"
_NAME = "citadel_main_conftest"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _MAIN_CONFTEST)
    if _spec is None or _spec.loader is None or not _MAIN_CONFTEST.exists():
        raise RuntimeError(f"the webhook tests use citadeld's fixtures from {_MAIN_CONFTEST}, "
                           "which is missing: run them from the Citadel repository")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
globals().update({name: value for name, value in vars(sys.modules[_NAME]).items()
                  if not name.startswith("_") and name not in globals()})


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A started webhook receiver; stopped after the test."""
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """A credentials folder, as systemd's LoadCredential= makes, holding ``webhook-secret``."""
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "webhook-secret").write_text(SECRET + "\n")
    return folder
