"""``${VAR}`` substitution in config values, from the environment and credentials.

Secrets never sit in the config file. A value may say:

- ``${NAME}`` or ``${NAME:-default}``: the daemon's environment (and the
  ``[daemon] env_file``);
- ``${credential:NAME}``: the file ``$CREDENTIALS_DIRECTORY/NAME`` that
  systemd's ``LoadCredential=`` provides;
- ``$${`` for a literal ``${``.

Values taken from credentials, and from variables whose names mark them
secret, are registered with the masker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..logs.masking import is_secret_name

_REF_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InterpolationError(ValueError):
    """A reference that cannot be resolved; the message names the reference."""


@dataclass
class Interpolator:
    """Resolves references against an environment and a credentials directory."""

    environ: Mapping[str, str]
    credentials_dir: Path | None = None
    #: Values that must be masked wherever they would be shown.
    secrets: set[str] = field(default_factory=set)

    @classmethod
    def from_process(cls, extra_env: Mapping[str, str] | None = None) -> Interpolator:
        """Build one from ``os.environ`` (plus ``extra_env``) and ``$CREDENTIALS_DIRECTORY``."""
        environ = {**(extra_env or {}), **os.environ}
        cred = os.environ.get("CREDENTIALS_DIRECTORY")
        return cls(environ=environ, credentials_dir=Path(cred) if cred else None)

    def resolve(self, text: str) -> str:
        """Return ``text`` with every reference replaced."""
        if "$" not in text:
            return text
        return _REF_RE.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        ref = match.group(1)
        if ref.startswith("credential:"):
            return self._credential(ref.removeprefix("credential:"))
        name, sep, default = ref.partition(":-")
        if not _NAME_RE.match(name):
            raise InterpolationError(f"${{{ref}}} is not a valid reference")
        if name in self.environ:
            value = self.environ[name]
        elif sep:
            value = default
        else:
            raise InterpolationError(
                f"${{{name}}} is not set in citadeld's environment "
                f"(set it, or write ${{{name}:-default}})"
            )
        if is_secret_name(name):
            self.secrets.add(value)
        return value

    def _credential(self, name: str) -> str:
        if not name or "/" in name:
            raise InterpolationError(f"${{credential:{name}}}: not a credential name")
        if self.credentials_dir is None:
            raise InterpolationError(
                f"${{credential:{name}}}: $CREDENTIALS_DIRECTORY is not set "
                "(systemd sets it for LoadCredential=)"
            )
        path = self.credentials_dir / name
        try:
            value = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise InterpolationError(
                f"${{credential:{name}}}: cannot read {path}: {exc.strerror}"
            ) from None
        self.secrets.add(value)
        return value


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` file (``#`` comments, optional quotes, ``export``)."""
    env: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _NAME_RE.match(key):
            raise InterpolationError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env
