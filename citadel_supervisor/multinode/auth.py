"""What the citadelds of a group tell each other is signed with their shared secret (HMAC-SHA256).

A request carries ``Authorization: Citadel-HMAC ts=T,sig=S`` where S signs the
method, the path and T (Unix seconds); an answer carries ``X-Citadel-Signature``
signing T and its body, so that an answer cannot be replayed for another
request. A request more than ``MAX_SKEW`` seconds from the receiver's clock is
refused: the nodes' clocks must agree within it (NTP). The secret never
travels.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

#: Seconds a signed request stays valid either side of the receiver's clock.
MAX_SKEW = 30.0

_HEADER = re.compile(r"^Citadel-HMAC ts=(\d{1,12}),sig=([0-9a-f]{64})$")


def _mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign_request(secret: str, method: str, path: str, now: float | None = None) -> tuple[str, int]:
    """The ``Authorization`` header for a request, and the timestamp it signs."""
    ts = int(time.time() if now is None else now)
    sig = _mac(secret, f"{method}\n{path}\n{ts}".encode())
    return f"Citadel-HMAC ts={ts},sig={sig}", ts


def check_request(secret: str, method: str, path: str, header: str | None,
                  now: float | None = None) -> int | None:
    """The request's timestamp if ``header`` signs it with ``secret`` within the skew; else None."""
    match = _HEADER.match(header or "")
    if match is None:
        return None
    ts, sig = int(match.group(1)), match.group(2)
    if abs((time.time() if now is None else now) - ts) > MAX_SKEW:
        return None
    expected = _mac(secret, f"{method}\n{path}\n{ts}".encode())
    return ts if hmac.compare_digest(sig, expected) else None


def sign_answer(secret: str, ts: int, body: bytes) -> str:
    """``X-Citadel-Signature`` for an answer to the request signed at ``ts``."""
    return _mac(secret, str(ts).encode() + b"\n" + body)


def check_answer(secret: str, ts: int, body: bytes, signature: str | None) -> bool:
    """True when ``signature`` signs ``body`` as the answer to the request signed at ``ts``."""
    return hmac.compare_digest(signature or "", sign_answer(secret, ts, body))
