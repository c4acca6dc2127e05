"""A multinode group: two citadelds on this machine, one per "node", each running its rank
(a real process), coordinating through their exporters, signed. Gang restarts, generations,
a partition (a citadeld frozen with SIGSTOP), and the signatures."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import RunningDaemon, free_ports

from citadel_supervisor.multinode.auth import check_answer, sign_request

#: A rank: says who it is, from the variables citadeld gives it, then waits.
RANK_PROGRAM = ("import os, time; e = os.environ; print('rank', e['CITADEL_GROUP_RANK'], 'of', "
                "e['CITADEL_GROUP_SIZE'], 'generation', e['CITADEL_GROUP_GENERATION'], 'master', "
                "e['CITADEL_GROUP_MASTER_ADDR'] + ':' + e['CITADEL_GROUP_MASTER_PORT'], flush=True); "
                "time.sleep(3600)")

SERVICES = """
[exporter]
listen = "${{CITADEL_TEST_LISTEN}}"

[services.gang]
type = "command"
command = ["{python}", "-c", "{program}"]
backoff_initial = 0
start_limit_burst = 20

[services.gang.multinode]
secret = "${{CITADEL_TEST_GROUP_SECRET}}"
master_port = {master_port}
poll = 0.2
peer_timeout = 2
start_grace = 10
nodes = [
  {{ name = "a", address = "127.0.0.1", citadel = "http://127.0.0.1:{port_a}" }},
  {{ name = "b", address = "127.0.0.1", citadel = "http://127.0.0.1:{port_b}" }},
]
"""


class Group:
    """The two citadelds, ``a`` (the head) and ``b``."""

    def __init__(self, head: RunningDaemon, follower: RunningDaemon, ports: list[int], secret: str):
        self.head, self.follower, self.ports, self.secret = head, follower, ports, secret

    def rank(self, daemon: RunningDaemon) -> dict[str, Any]:
        """The ``gang`` worker's status on one node."""
        return daemon.status()["gang"]

    def wait_generation_ready(self, generation: int, timeout: float = 30) -> None:
        """Until both ranks run ``generation``, and both nodes see the group ready."""
        def both(_: object) -> bool:
            views = [self.rank(d) for d in (self.head, self.follower)]
            return all(v["state"] == "running" and v["multinode"]["generation"] == generation
                       and v["multinode"]["group"]["ready"] for v in views)
        self.head.wait_for(both, timeout, f"both ranks ready in generation {generation}")


@pytest.fixture
def group(tmp_path: Any) -> Iterator[Group]:
    ports = free_ports(3)
    secret = secrets.token_hex(16)
    services = SERVICES.format(python=sys.executable, program=RANK_PROGRAM.replace('"', '\\"'),
                               master_port=ports[2], port_a=ports[0], port_b=ports[1])
    daemons = []
    for node, port in (("a", ports[0]), ("b", ports[1])):
        root = tmp_path / node
        root.mkdir()
        daemons.append(RunningDaemon(root, services, env={
            "CITADEL_NODE": node, "CITADEL_TEST_LISTEN": f"127.0.0.1:{port}",
            "CITADEL_TEST_GROUP_SECRET": secret}).start())
    yield Group(daemons[0], daemons[1], ports, secret)
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.proc.terminate()
            daemon.proc.wait(60)


def test_the_group_starts_head_first_with_one_generation_and_is_ready(group: Group) -> None:
    group.wait_generation_ready(1)
    head, follower = group.rank(group.head), group.rank(group.follower)
    assert (head["multinode"]["rank"], follower["multinode"]["rank"]) == (0, 1)
    assert head["multinode"]["group"]["state"] == "ready"
    assert group.head.ctl("logs", "gang").stdout.strip() == \
        f"rank 0 of 2 generation 1 master 127.0.0.1:{group.ports[2]}"
    assert group.follower.ctl("logs", "gang").stdout.strip() == \
        f"rank 1 of 2 generation 1 master 127.0.0.1:{group.ports[2]}"
    assert head["multinode"]["nodes"][1]["peer"]["reachable"] is True
    table = group.head.ctl("status").stdout
    assert "gang: multinode rank 0 of 2, generation 1, group ready, 0 group restarts" in table, table
    assert "ranks 0=a (this node, running), 1=b (running, gen 1)" in table, table
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{group.ports[0]}/metrics", timeout=10).read().decode()
    assert 'citadel_multinode_ready{node="a",rank="0",service="gang"} 1.0' in metrics
    assert 'citadel_multinode_generation{node="a",rank="0",service="gang"} 1.0' in metrics
    assert 'citadel_multinode_rank_info{node="a",rank="0",service="gang",worker="gang"} 1.0' in metrics
    assert 'citadel_multinode_peer_up{node="a",peer="b",rank="0",service="gang"} 1.0' in metrics
    for port in group.ports[:2]:  # the group's readiness, on every node
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz?service=gang", timeout=10) as ready:
            assert ready.status == 200


def test_a_rank_that_dies_restarts_the_whole_group_in_a_new_generation(group: Group) -> None:
    group.wait_generation_ready(1)
    head_pid = group.rank(group.head)["pid"]
    killed = time.monotonic()
    os.kill(group.rank(group.follower)["pid"], signal.SIGKILL)
    group.wait_generation_ready(2)
    recovered = time.monotonic() - killed
    assert group.rank(group.head)["pid"] != head_pid  # the healthy head was restarted too
    assert group.rank(group.head)["multinode"]["group"]["restarts"] == 1
    assert recovered < 15, f"the group took {recovered:.1f}s to run again"
    assert "rank 1 failed in generation 1" in group.head.logs()

    # The head's own rank dying does the same.
    os.kill(group.rank(group.head)["pid"], signal.SIGKILL)
    group.wait_generation_ready(3)


def test_a_partitioned_follower_stops_the_group_until_it_is_back(group: Group) -> None:
    group.wait_generation_ready(1)
    assert group.follower.proc is not None
    group.follower.proc.send_signal(signal.SIGSTOP)  # its citadeld is silent; its rank runs on
    try:
        group.head.wait_for(lambda s: s["gang"]["multinode"]["group"]["state"] == "waiting"
                            and s["gang"]["state"] == "stopped", 20, "the head to stop and wait")
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{group.ports[0]}/readyz?service=gang", timeout=10)
        assert not_ready.value.code == 503
    finally:
        group.follower.proc.send_signal(signal.SIGCONT)
    group.wait_generation_ready(2)  # the follower's old rank left; no rank of 1 joined 2
    assert "lost node b" in group.head.logs()


def test_a_silent_head_makes_the_follower_stop_its_rank(group: Group) -> None:
    group.wait_generation_ready(1)
    assert group.head.proc is not None
    group.head.proc.send_signal(signal.SIGSTOP)
    try:
        group.follower.wait_for(lambda s: s["gang"]["state"] == "stopped", 20,
                                "the follower to stop its rank")
    finally:
        group.head.proc.send_signal(signal.SIGCONT)
    group.wait_generation_ready(2)


def test_peers_answer_only_signed_requests_and_sign_their_answers(group: Group) -> None:
    group.wait_generation_ready(1)
    path = "/v1/multinode/gang"
    url = f"http://127.0.0.1:{group.ports[1]}{path}"
    for header in (None, sign_request("wrong-secret-0123456789", "GET", path)[0],
                   sign_request(group.secret, "GET", path, now=time.time() - 3600)[0]):
        request = urllib.request.Request(url, headers={"Authorization": header} if header else {})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert group.secret not in refused.value.read().decode()
    header, ts = sign_request(group.secret, "GET", path)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": header}),
                                timeout=10) as answer:
        body = answer.read()
        assert check_answer(group.secret, ts, body, answer.headers["X-Citadel-Signature"])
    assert b'"rank": 1' in body
    assert group.secret not in group.head.logs() + group.follower.logs()
