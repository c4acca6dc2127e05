"""Per-key rate limits: token buckets for requests per minute and tokens per minute.

A request takes one token from the requests bucket before it is sent. Its
tokens are only known once the worker reports its ``usage``, so the tokens
bucket is charged afterwards and may go below zero; a key whose tokens
bucket is empty (or in debt) waits until it refills.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .keys import ApiKey


class TokenBucket:
    """A bucket of ``capacity`` tokens that refills at ``capacity`` per minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` if the bucket holds it: 0.0. Else take nothing: seconds until it will."""
        level = self._refill()
        if level >= amount:
            self._level = level - amount
            return 0.0
        return (amount - level) / self.rate

    def wait_for_positive(self) -> float:
        """0.0 when the bucket holds more than nothing, else seconds until it will."""
        level = self._refill()
        return 0.0 if level > 0 else max(-level / self.rate, 1e-3)

    def charge(self, amount: float) -> None:
        """Take ``amount`` now, even into debt (for usage learned after the fact)."""
        self._level = self._refill() - amount


@dataclass
class KeyLimits:
    """The two buckets of one key (either may be absent)."""

    requests: TokenBucket | None
    tokens: TokenBucket | None


@dataclass
class RateLimited:
    """Why a request was refused: which limit, and when to try again."""

    limit: str  # "requests" or "tokens"
    retry_after: int
    per_minute: int


@dataclass
class RateLimiter:
    """The buckets of every key that has limits."""

    clock: Callable[[], float] = time.monotonic
    _limits: dict[str, KeyLimits] = field(default_factory=dict)

    def _for(self, key: ApiKey) -> KeyLimits:
        limits = self._limits.get(key.name)
        if limits is None:
            limits = KeyLimits(
                TokenBucket(key.requests_per_minute, self.clock) if key.requests_per_minute else None,
                TokenBucket(key.tokens_per_minute, self.clock) if key.tokens_per_minute else None,
            )
            self._limits[key.name] = limits
        return limits

    def admit(self, key: ApiKey) -> RateLimited | None:
        """Take one request from ``key``'s budget; None if admitted, else why not."""
        if key.requests_per_minute is None and key.tokens_per_minute is None:
            return None
        limits = self._for(key)
        if limits.tokens is not None:
            wait = limits.tokens.wait_for_positive()
            if wait > 0:
                return RateLimited("tokens", max(1, math.ceil(wait)), int(limits.tokens.capacity))
        if limits.requests is not None:
            wait = limits.requests.take(1.0)
            if wait > 0:
                return RateLimited("requests", max(1, math.ceil(wait)), int(limits.requests.capacity))
        return None

    def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count the tokens a worker reported for one of ``key``'s requests."""
        if key.tokens_per_minute is None or tokens <= 0:
            return
        bucket = self._for(key).tokens
        assert bucket is not None
        bucket.charge(tokens)
