"""The body signature: HMAC-SHA256 of the raw body, as ``X-Citadel-Signature: sha256=HEX``.

A receiver recomputes the HMAC over the bytes it received (before parsing
the JSON) with the shared secret and compares with ``hmac.compare_digest``;
``verify`` does exactly that. The body carries the event's ``time`` and a
``delivery`` id, so a receiver can also refuse old or repeated deliveries.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Citadel-Signature"
_PREFIX = "sha256="


def sign(body: bytes, secret: str) -> str:
    """The header value for ``body``: ``sha256=`` and the hex HMAC-SHA256 with ``secret``."""
    return _PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body`` with ``secret`` (constant-time)."""
    if not header or not header.startswith(_PREFIX):
        return False
    return hmac.compare_digest(sign(body, secret), header)
