"""API keys: kept as sha256 digests, each allowed a set of models and its own rate limits.

The gateway process never sees a key in its config: citadeld hashes keys
that come from credentials before the spawn, and passes the digests in
``CITADEL_GATEWAY_KEYS``. Logs and metrics name a key by its configured
``name``, never by the key or its digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The environment variable that carries the key table to the gateway process.
KEYS_ENV = "CITADEL_GATEWAY_KEYS"
#: JSON ``{service: API key}`` of the workers that want one (vLLM's ``api_key``), from the env.
UPSTREAM_KEYS_ENV = "CITADEL_GATEWAY_UPSTREAM_KEYS"


def digest(key: str) -> str:
    """The hex sha256 of a key, as the config's ``hash = "sha256:<hex>"`` holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key, as the gateway checks it."""

    name: str
    sha256: str
    #: The models this key may use; None means every model.
    models: frozenset[str] | None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def allows(self, model: str) -> bool:
        """True when this key may use ``model``."""
        return self.models is None or model in self.models

    def to_json(self) -> dict[str, Any]:
        """The form ``CITADEL_GATEWAY_KEYS`` carries (a digest, never the key)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "models": sorted(self.models) if self.models is not None else "*",
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ApiKey:
        """Read one entry of ``CITADEL_GATEWAY_KEYS``."""
        models = data.get("models", "*")
        return cls(
            name=str(data["name"]),
            sha256=str(data["sha256"]).lower(),
            models=None if models == "*" else frozenset(models),
            requests_per_minute=data.get("requests_per_minute"),
            tokens_per_minute=data.get("tokens_per_minute"),
        )


class KeyRing:
    """Finds the key a request presents, by its digest."""

    def __init__(self, keys: Iterable[ApiKey]):
        self._by_digest = {k.sha256: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest matches ``presented``, or None.

        Comparing digests leaks nothing useful through timing: knowing how
        much of a sha256 matches says nothing about the key behind it.
        """
        return self._by_digest.get(digest(presented))

    @classmethod
    def from_env(cls, value: str | None) -> KeyRing:
        """The key ring from ``CITADEL_GATEWAY_KEYS`` (a JSON list), empty when unset."""
        if not value:
            return cls([])
        return cls(ApiKey.from_json(entry) for entry in json.loads(value))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
