"""Which members of a swap group make room for another: the choice, apart from acting on it.

A swap group lets at most ``max_running`` of its members be awake (starting,
running, backing off or stopping; an asleep one has released its GPU memory
and does not count). To start one more, enough awake members are evicted:

- never one that is busy (requests in flight, used in the last moments, or
  still starting) unless ``force`` (the start waited ``busy_wait`` for them);
- ``lru``: the one idle longest first;
- ``cost``: the one with the highest idle time divided by its measured start
  time (at least one second; unknown counts as one second), so that of two
  members idle as long, the one that takes minutes to load stays; ties go to
  the one idle longer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Eviction = Literal["lru", "cost"]


@dataclass(frozen=True)
class Member:
    """One other member of the group, as the choice sees it."""

    name: str
    awake: bool
    busy: bool
    #: Seconds since a request last wanted it.
    idle_for: float
    #: Seconds its last start (spawn to ready) took; None when never measured.
    start_seconds: float | None = None


def eviction_score(member: Member, eviction: Eviction) -> tuple[float, float]:
    """The order of eviction: the highest goes first (``lru``: idle time; ``cost``: idle
    time per second of start), ties broken by idle time."""
    if eviction == "cost":
        return member.idle_for / max(member.start_seconds or 1.0, 1.0), member.idle_for
    return member.idle_for, member.idle_for


def choose_victims(others: Sequence[Member], max_running: int, eviction: Eviction,
                   force: bool = False) -> list[str] | None:
    """The members to evict so that one more can be awake: [] when there is room already,
    None when only busy members could make room (and not ``force``)."""
    awake = [m for m in others if m.awake]
    excess = len(awake) + 1 - max_running
    if excess <= 0:
        return []
    idle = [m for m in awake if not m.busy]
    pool = awake if force and len(idle) < excess else idle
    if len(pool) < excess:
        return None
    ranked = sorted(pool, key=lambda m: (not m.busy, *eviction_score(m, eviction)), reverse=True)
    return [m.name for m in ranked[:excess]]
