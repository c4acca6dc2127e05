"""Per-key rate limits: token buckets for requests per minute and tokens per minute.

A request takes one token from the requests bucket before it is sent. Its
tokens are only known once the worker reports its ``usage``, so the tokens
bucket is charged an estimate when the request is admitted (its prompt's
size and its ``max_tokens``), and settled to the reported usage afterwards:
the difference is charged or refunded. A request that ends without a usage
(the client hung up) keeps the estimate charged. The bucket may go below
zero; a key whose tokens bucket is empty (or in debt) waits until it
refills. Charging up front is what stops N requests sent at once from all
passing an almost empty bucket.
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
        """Take ``amount`` now, even into debt (for usage learned after the fact); a
        negative ``amount`` refunds, up to the capacity."""
        self._level = min(self.capacity, self._refill() - amount)


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

    def admit(self, key: ApiKey, tokens: int = 0) -> RateLimited | None:
        """Take one request, and ``tokens`` (the request's estimate), from ``key``'s budget;
        None if admitted, else why not (and nothing is taken)."""
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
        if limits.tokens is not None and tokens > 0:
            limits.tokens.charge(tokens)
        return None

    def settle(self, key: ApiKey, estimate: int, used: int) -> None:
        """Correct the ``estimate`` charged at admission to the ``used`` tokens reported."""
        if key.tokens_per_minute is None or used == estimate:
            return
        bucket = self._for(key).tokens
        assert bucket is not None
        bucket.charge(used - estimate)

    def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count the tokens a worker reported for one of ``key``'s requests."""
        if key.tokens_per_minute is None or tokens <= 0:
            return
        bucket = self._for(key).tokens
        assert bucket is not None
        bucket.charge(tokens)


#: Tokens of an answer whose request gives no ``max_tokens``: a modest answer's length.
DEFAULT_ANSWER_TOKENS = 256
#: Bytes per token of a prompt, roughly (English text and JSON through a BPE tokenizer).
_BYTES_PER_TOKEN = 4


def estimate_tokens(body: bytes, payload: dict[str, object]) -> int:
    """A request's tokens before it runs: its body's size for the prompt, plus its
    ``max_tokens`` (or ``max_completion_tokens``) for the answer, else ``DEFAULT_ANSWER_TOKENS``."""
    answer = DEFAULT_ANSWER_TOKENS
    for field_name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(field_name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            answer = value
            break
    return math.ceil(len(body) / _BYTES_PER_TOKEN) + answer
