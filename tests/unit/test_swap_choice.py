"""Which members of a swap group make room: least recently used, by start cost, never a busy
one unless forced; and the config checks of swap groups and on-demand keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel_supervisor.config import ConfigError, load_config
from citadel_supervisor.demand.swap import Member, choose_victims
from citadel_supervisor.services.command import CommandConfig


def member(name: str, idle: float, awake: bool = True, busy: bool = False,
           start: float | None = None) -> Member:
    return Member(name, awake, busy, idle, start)


def test_room_left_evicts_nobody() -> None:
    assert choose_victims([member("a", 10)], max_running=2, eviction="lru") == []
    assert choose_victims([member("a", 10, awake=False)], max_running=1, eviction="lru") == []


def test_lru_evicts_the_member_idle_longest() -> None:
    others = [member("a", 5), member("b", 50), member("c", 20)]
    assert choose_victims(others, max_running=3, eviction="lru") == ["b"]
    assert choose_victims(others, max_running=2, eviction="lru") == ["b", "c"]


def test_cost_keeps_the_member_that_is_slow_to_start() -> None:
    # b is idle longer, but takes 300 s to load; a takes 2 s: a goes.
    others = [member("a", 20, start=2.0), member("b", 60, start=300.0)]
    assert choose_victims(others, max_running=2, eviction="lru") == ["b"]
    assert choose_victims(others, max_running=2, eviction="cost") == ["a"]


def test_busy_members_are_waited_for_unless_forced() -> None:
    others = [member("a", 100, busy=True), member("b", 1)]
    assert choose_victims(others, max_running=2, eviction="lru") == ["b"]
    assert choose_victims(others, max_running=1, eviction="lru") is None
    assert choose_victims(others, max_running=1, eviction="lru", force=True) == ["b", "a"]


@given(st.lists(st.tuples(st.floats(0, 1e6), st.booleans(), st.booleans(),
                          st.one_of(st.none(), st.floats(0, 1e4))), max_size=8),
       st.integers(1, 8), st.sampled_from(["lru", "cost"]), st.booleans())
def test_the_choice_always_makes_exactly_enough_room(raw, limit, eviction, force) -> None:
    others = [Member(f"m{i}", awake, busy, idle, start) for i, (idle, awake, busy, start) in enumerate(raw)]
    victims = choose_victims(others, limit, eviction, force)
    awake = [m for m in others if m.awake]
    needed = max(0, len(awake) + 1 - limit)
    if victims is None:
        assert not force and sum(not m.busy for m in awake) < needed
        return
    assert len(victims) == len(set(victims)) == needed
    chosen = [m for m in others if m.name in victims]
    assert all(m.awake for m in chosen)
    assert force or not any(m.busy for m in chosen)
    if eviction == "lru" and not any(m.busy for m in chosen):
        # Nobody left idle was idle longer than someone evicted.
        kept = [m for m in awake if m.name not in victims and not m.busy]
        assert all(k.idle_for <= v.idle_for for k in kept for v in chosen)


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "citadeld.toml"
    path.write_text(text)
    load_config(path, {"command": CommandConfig}, environ={})


def test_a_swap_group_must_exist_and_fit_its_always_members(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, """
            [swap_groups.gpu0]
            max_running = 1
            [services.a]
            type = "command"
            command = ["true"]
            swap_group = "gpu0"
            [services.b]
            type = "command"
            command = ["true"]
            swap_group = "gpu0"
            replicas = 2
            [services.c]
            type = "command"
            command = ["true"]
            swap_group = "gpuO"
            """.replace("\n            ", "\n"))
    text = str(err.value)
    assert "services.c.swap_group: no [swap_groups.gpuO] table (did you mean 'gpu0'?)" in text
    assert "swap_groups.gpu0.max_running: 3 workers of this group start with citadeld (a, b)" in text


def test_on_demand_keys_are_refused_for_a_multinode_group(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, """
            [services.big]
            type = "command"
            command = ["true"]
            start = "on-demand"
            multinode = { nodes = [{ name = "n0", address = "127.0.0.1", citadel = "http://127.0.0.1:1" }, { name = "n1", address = "127.0.0.2", citadel = "http://127.0.0.2:1" }], secret = "0123456789abcdef0123" }
            """.replace("\n            ", "\n"))
    assert "start, idle_stop and swap_group are not supported" in str(err.value)
