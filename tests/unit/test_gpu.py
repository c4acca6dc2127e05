"""GPU inventory, allocation, placement and release, against a FAKE NVML.

This machine has no GPU, so every test but the real-NVML ones runs on
``fake_nvml.FakeNvml`` (the fake hosts are in ``tests/fixtures``). The
real ``pynvml`` is exercised where it can be here: it fails to start, and its
names and error classes are what the fake copies.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
from loguru import logger

from citadel_supervisor import gpu as gpu_module
from citadel_supervisor.config import CitadelConfig, ServiceConfig, load_config
from citadel_supervisor.gpu import (
    FAKE_NVML_ENV,
    GpuInventory,
    WorkerGpus,
    allocate_gpus,
    check_memory_fractions,
    detect_gpus,
    format_cpulist,
    parse_cpulist,
    wait_released,
    worker_placement,
)
from citadel_supervisor.gpu.fake_nvml import FakeNvml, GiB

FIXTURES = Path(__file__).parents[1] / "fixtures"
HOST_8GPU = FIXTURES / "fake_host_8gpu.json"
HOST_MIG = FIXTURES / "fake_host_mig.json"
NODE0, NODE1 = set(range(32)), set(range(32, 64))
HAS_NVML_LIBRARY = ctypes.util.find_library("nvidia-ml") is not None


@pytest.fixture
def fake() -> FakeNvml:
    """A fresh fake 8-GPU host: GPUs 0-3 on NUMA node 0, 4-7 on node 1, all empty."""
    return FakeNvml(json.loads(HOST_8GPU.read_text()), source=str(HOST_8GPU))


@pytest.fixture
def inventory(fake: FakeNvml) -> Iterator[GpuInventory]:
    found = GpuInventory.detect(fake)
    assert found is not None
    yield found
    found.close()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="DEBUG", format="{message}")
    yield seen
    logger.remove(sink)


def services(**tables: dict[str, Any]) -> CitadelConfig:
    """A config with these services (every key of ServiceConfig may be given)."""
    return CitadelConfig(services={n: ServiceConfig(type="command", **t) for n, t in tables.items()})


def uuid(fake: FakeNvml, index: int) -> str:
    return fake.fake_gpu(index).uuid


def use_memory(fake: FakeNvml, inventory: GpuInventory, used_gib: dict[int, float]) -> None:
    for index, gib in used_gib.items():
        fake.fake_set_memory_used(index, int(gib * GiB))
    inventory.refresh()


# --------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------


def test_inventory_reads_every_gpu_of_the_fake_host(fake: FakeNvml, inventory: GpuInventory) -> None:
    assert inventory.fake is True
    assert [g.index for g in inventory.gpus] == list(range(8))
    assert [g.uuid for g in inventory.gpus] == [uuid(fake, i) for i in range(8)]
    gpu0, gpu7 = inventory.gpus[0], inventory.gpus[7]
    assert gpu0.name == "NVIDIA H100 80GB HBM3 (FAKE)"
    assert gpu0.pci_bus_id == "00000000:18:00.0"
    assert gpu0.memory_total == 81559 * 2**20 and gpu0.memory_free == gpu0.memory_total
    assert (gpu0.numa_node, gpu7.numa_node) == (0, 1)
    assert gpu0.cpu_affinity == NODE0 and gpu7.cpu_affinity == NODE1
    assert gpu0.processes == [] and gpu0.xid_errors == 0
    assert (gpu7.temperature_c, gpu7.power_w, gpu7.power_limit_w) == (38, 70.0, 700.0)
    assert inventory.driver_version == "550.54.15 (FAKE)"


def test_refresh_rereads_memory_and_processes(fake: FakeNvml, inventory: GpuInventory) -> None:
    fake.fake_add_process(3, pid=4242, used_bytes=20 * GiB)
    assert inventory.gpus[3].processes == []  # static until refreshed
    inventory.refresh()
    gpu3 = inventory.gpus[3]
    assert [(p.pid, p.used_memory) for p in gpu3.processes or []] == [(4242, 20 * GiB)]
    assert gpu3.memory_used == 20 * GiB
    assert gpu3.memory_free == gpu3.memory_total - 20 * GiB  # type: ignore[operator]
    fake.fake_remove_process(3, 4242)
    inventory.refresh()
    assert inventory.gpus[3].processes == [] and inventory.gpus[3].memory_used == 0


def test_a_refused_nvml_call_leaves_that_field_unknown(fake: FakeNvml) -> None:
    refused = ["nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature", "nvmlDeviceGetNumaNodeId",
               "nvmlDeviceGetCpuAffinity", "nvmlDeviceGetComputeRunningProcesses",
               "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetSupportedEventTypes"]
    fake.fake_set_unsupported(2, *refused)
    inventory = GpuInventory.detect(fake)
    assert inventory is not None
    gpu2 = inventory.gpus[2]
    assert (gpu2.power_w, gpu2.temperature_c, gpu2.numa_node, gpu2.cpu_affinity, gpu2.processes,
            gpu2.utilization, gpu2.xid_errors) == (None,) * 7
    assert gpu2.uuid == uuid(fake, 2) and gpu2.memory_total is not None
    assert inventory.gpus[1].power_w == 70.0  # the other GPUs are untouched


def test_a_gpu_lost_later_reads_as_unknown_and_one_lost_at_start_is_left_out(fake: FakeNvml) -> None:
    fake.fake_lose_gpu(5)
    inventory = GpuInventory.detect(fake)
    assert inventory is not None
    assert [g.index for g in inventory.gpus] == [0, 1, 2, 3, 4, 6, 7]
    assert inventory.unusable == {5: "GPU is lost"}
    fake.fake_lose_gpu(1)
    inventory.refresh()
    assert inventory.gpus[1].memory_free is None and inventory.gpus[1].processes is None
    assert inventory.to_json()["unusable"] == {"5": "GPU is lost"}


def test_numa_node_and_its_cpus_come_from_sysfs_when_nvml_does_not_say(
    fake: FakeNvml, tmp_path: Path
) -> None:
    fake.fake_set_unsupported(0, "nvmlDeviceGetNumaNodeId", "nvmlDeviceGetCpuAffinity")
    pci = tmp_path / "bus/pci/devices/0000:18:00.0"
    pci.mkdir(parents=True)
    (pci / "numa_node").write_text("1\n")
    node = tmp_path / "devices/system/node/node1"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("32-63\n")
    inventory = GpuInventory.detect(fake, sysfs=tmp_path)
    assert inventory is not None
    assert inventory.gpus[0].numa_node == 1
    assert inventory.gpus[0].cpu_affinity == NODE1


def test_xid_errors_are_counted_from_nvml_events(fake: FakeNvml, inventory: GpuInventory) -> None:
    fake.fake_inject_xid(5, 79)
    fake.fake_inject_xid(5, 48)
    assert inventory.gpus[5].xid_errors == 0
    inventory.refresh()
    assert (inventory.gpus[5].xid_errors, inventory.gpus[5].last_xid) == (2, 48)
    assert inventory.gpus[4].xid_errors == 0
    inventory.refresh()  # drained: not counted twice
    assert inventory.gpus[5].xid_errors == 2


def test_to_json_labels_processes_and_workers(fake: FakeNvml, inventory: GpuInventory) -> None:
    fake.fake_add_process(0, pid=100, used_bytes=GiB)
    inventory.refresh()
    data = inventory.to_json(owners={100: "chat"}, assigned={uuid(fake, 0): ["chat"]})
    json.dumps(data)  # plain JSON
    assert data["available"] is True and data["fake"] is True
    gpu0 = data["gpus"][0]
    assert gpu0["processes"] == [{"pid": 100, "used_memory": GiB, "worker": "chat"}]
    assert gpu0["workers"] == ["chat"] and data["gpus"][1]["workers"] == []
    assert gpu0["cpu_affinity"] == "0-31" and gpu0["numa_node"] == 0


def test_mig_devices_are_listed_with_their_memory() -> None:
    inventory = GpuInventory.detect(FakeNvml.from_file(HOST_MIG))
    assert inventory is not None
    gpu0, gpu1 = inventory.gpus
    assert gpu0.mig_enabled is True and gpu1.mig_enabled is False
    assert [m.uuid for m in gpu0.mig_devices] == ["MIG-fa4e0001-0000-4000-8000-0000000000a0",
                                                  "MIG-fa4e0001-0000-4000-8000-0000000000a1"]
    assert gpu0.mig_devices[0].memory_total == 9984 * 2**20
    assert gpu0.numa_node is None and gpu0.cpu_affinity == set(range(16))
    assert inventory.gpu("mig-fa4e0001-0000-4000-8000-0000000000a1") is gpu0  # any case


# --------------------------------------------------------------------------
# Detection: real NVML, the fake's env var, hosts with no GPU
# --------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML_LIBRARY, reason="this host has an NVIDIA driver")
def test_real_nvml_without_a_driver_gives_no_inventory_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAKE_NVML_ENV, raising=False)
    detection = detect_gpus()
    assert detection.inventory is None
    assert detection.reason == ("NVML could not start: NVML Shared Library Not Found "
                                "(no NVIDIA driver is installed here)")
    assert GpuInventory.detect() is None
    assert detection.to_json() == {"available": False, "reason": detection.reason, "fake": False,
                                   "gpus": []}


def test_the_fake_nvml_looks_like_pynvml() -> None:
    """Every NVML name gpu/inventory.py calls exists in pynvml and in the fake, and they fail alike."""
    source = "".join(p.read_text() for p in Path(gpu_module.__file__).parent.glob("*.py")
                     if p.name != "fake_nvml.py")
    used = set(re.findall(r"\b(nvml[A-Z]\w+|NVML_[A-Z_]+|NVMLError\w*)\b", source))
    assert {"nvmlInit", "nvmlDeviceGetComputeRunningProcesses", "nvmlEventSetWait_v2"} <= used
    for name in sorted(used):
        assert hasattr(pynvml, name), f"pynvml has no {name}"
        assert hasattr(FakeNvml, name), f"the fake has no {name}"
    for name in [n for n in dir(FakeNvml) if n.startswith("NVMLError")]:
        fake_error, real_error = getattr(FakeNvml, name), getattr(pynvml, name)
        assert issubclass(real_error, pynvml.NVMLError) and issubclass(fake_error, FakeNvml.NVMLError)
        if name != "NVMLError":
            assert str(fake_error()) == str(real_error()) and fake_error().value == real_error().value
    # Before nvmlInit, both refuse in the same way.
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    with pytest.raises(FakeNvml.NVMLError_Uninitialized):
        FakeNvml.from_file(HOST_8GPU).nvmlDeviceGetCount()


def test_the_fake_is_used_only_when_its_env_var_is_set(logs: list[str]) -> None:
    detection = detect_gpus(environ={FAKE_NVML_ENV: str(HOST_8GPU)})
    assert detection.inventory is not None and detection.inventory.fake is True
    assert any("FAKE" in line and str(HOST_8GPU) in line for line in logs)
    detection.inventory.close()
    if not HAS_NVML_LIBRARY:
        real = detect_gpus(environ={})
        assert real.inventory is None and "NVML could not start" in (real.reason or "")
    broken = detect_gpus(environ={FAKE_NVML_ENV: "/nonexistent/host.json"})
    assert broken.inventory is None
    assert (broken.reason or "").startswith(f"{FAKE_NVML_ENV}=/nonexistent/host.json: cannot read")


def test_without_the_env_var_the_fake_is_not_even_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != FAKE_NVML_ENV}
    code = ("import sys; from citadel_supervisor.gpu import detect_gpus, load_nvml; d = detect_gpus(); "
            "print(load_nvml()[0].__name__, 'citadel_supervisor.gpu.fake_nvml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pynvml", "False"]


def test_no_gpu_and_a_broken_driver_give_reasons() -> None:
    assert detect_gpus(FakeNvml({"gpus": []})).reason == "NVML found no GPU"
    broken = detect_gpus(FakeNvml({"init_error": "DriverNotLoaded", "gpus": [{}]}))
    assert broken.reason == "NVML could not start: Driver Not Loaded (is the nvidia kernel module loaded?)"


def test_a_fake_host_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    host = json.loads(HOST_8GPU.read_text())
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host))
    inventory = GpuInventory.detect(environ={FAKE_NVML_ENV: str(path)})
    assert inventory is not None and inventory.gpus[2].processes == []
    host["gpus"][2]["processes"] = [{"pid": 777, "used_mib": 1024}]
    path.write_text(json.dumps(host))
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    inventory.refresh()
    assert [(p.pid, p.used_memory) for p in inventory.gpus[2].processes or []] == [(777, GiB)]


# --------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------


def test_indices_and_uuids_pin_exactly_those_gpus(fake: FakeNvml, inventory: GpuInventory) -> None:
    config = services(chat={"gpus": [0, 1]}, embed={"gpus": [uuid(fake, 5), 6]}, tool={})
    result = allocate_gpus(config, inventory)
    assert result.issues == []
    assert result.workers["chat"] == WorkerGpus("chat", (0, 1), (uuid(fake, 0), uuid(fake, 1)))
    assert result.workers["embed"].indices == (5, 6)
    assert result.workers["embed"].uuids == (uuid(fake, 5), uuid(fake, 6))
    assert not result.workers["tool"]  # gpus unset: unpinned


def test_a_gpu_that_does_not_exist_is_named_with_the_key_path(inventory: GpuInventory) -> None:
    result = allocate_gpus(services(chat={"gpus": [0, 9]}), inventory)
    assert [str(i) for i in result.issues] == [
        "services.chat.gpus[1]: GPU 9 does not exist (this host has GPUs 0-7)"]
    bad_uuid = allocate_gpus(services(chat={"gpus": ["GPU-nope"]}), inventory)
    assert str(bad_uuid.issues[0]).startswith("services.chat.gpus[0]: no GPU or MIG device has UUID 'GPU-nope'")
    twice = allocate_gpus(services(chat={"gpus": [3, 3]}), inventory)
    assert str(twice.issues[0]) == "services.chat.gpus[1]: GPU 3 is listed twice"


def test_a_count_takes_the_gpus_with_most_free_memory(fake: FakeNvml, inventory: GpuInventory) -> None:
    use_memory(fake, inventory, {0: 60, 1: 60, 2: 10, 3: 60, 4: 50, 5: 5, 6: 50, 7: 50})
    result = allocate_gpus(services(solo={"gpus": 1}), inventory)
    assert result.workers["solo"].indices == (5,)
    auto = allocate_gpus(services(solo={"gpus": "auto"}), inventory)
    assert auto.workers["solo"].indices == (5,)


def test_auto_keeps_a_tensor_parallel_group_on_one_numa_node(fake: FakeNvml, inventory: GpuInventory) -> None:
    # Node 0 has the two emptiest GPUs, but node 1 is the better home for a group of four.
    use_memory(fake, inventory, {0: 0, 1: 0, 2: 70, 3: 70, 4: 20, 5: 20, 6: 20, 7: 20})
    result = allocate_gpus(services(big={"gpus": "auto"}), inventory, group_sizes={"big": 4})
    assert result.issues == []
    assert result.workers["big"].indices == (4, 5, 6, 7)
    pair = allocate_gpus(services(pair={"gpus": 2}), inventory)
    assert pair.workers["pair"].indices == (0, 1)


def test_groups_spread_over_nodes_only_when_no_node_can_hold_them(
    fake: FakeNvml, inventory: GpuInventory
) -> None:
    result = allocate_gpus(services(huge={"gpus": 6}), inventory)
    assert result.workers["huge"].indices == (0, 1, 2, 3, 4, 5)


def test_replicas_each_get_their_own_gpus(fake: FakeNvml, inventory: GpuInventory) -> None:
    result = allocate_gpus(services(chat={"gpus": 2, "replicas": 3}), inventory)
    assert result.issues == []
    groups = [result.workers[f"chat.{i}"].indices for i in range(3)]
    assert len({g for group in groups for g in group}) == 6
    for group in groups:  # each pair on one NUMA node
        assert len({inventory.gpus[g].numa_node for g in group}) == 1
    listed = allocate_gpus(services(emb={"gpus": [0, 1, 2, 3], "replicas": 2}), inventory)
    assert (listed.workers["emb.0"].indices, listed.workers["emb.1"].indices) == ((0, 1), (2, 3))
    uneven = allocate_gpus(services(emb={"gpus": [0, 1, 2], "replicas": 2}), inventory)
    assert str(uneven.issues[0]).startswith(
        "services.emb.gpus: 3 GPUs cannot be split evenly among 2 replicas")


def test_asking_for_more_gpus_than_are_free_is_refused(inventory: GpuInventory) -> None:
    config = services(pinned={"gpus": [0, 1, 2, 3, 4, 5]}, big={"gpus": 4})
    result = allocate_gpus(config, inventory)
    assert [str(i) for i in result.issues] == [
        ("services.big.gpus: asks for 4 GPUs but only 2 are free "
         "(6 of this host's 8 are pinned by other services)")]
    many = allocate_gpus(services(chat={"gpus": 3, "replicas": 3}), inventory)
    assert str(many.issues[0]).startswith(
        "services.chat.gpus: asks for 3 GPUs for each of 3 replicas (9 in all) but only 8 are free")


def test_counts_and_auto_never_take_gpus_that_a_list_names(fake: FakeNvml, inventory: GpuInventory) -> None:
    use_memory(fake, inventory, {i: 50 for i in range(1, 8)})  # GPU 0 is the emptiest...
    result = allocate_gpus(services(chat={"gpus": [0]}, helper={"gpus": "auto"}), inventory)
    assert result.workers["chat"].indices == (0,)
    assert result.workers["helper"].indices == (1,)  # ...but chat pinned it


def test_a_gpu_claimed_by_two_services_is_refused_naming_both(inventory: GpuInventory) -> None:
    result = allocate_gpus(services(chat={"gpus": [0, 1]}, embed={"gpus": [1]}), inventory)
    assert [str(i) for i in result.issues] == [
        ("services.embed.gpus[0]: GPU 1 is claimed by both services 'chat' and 'embed'; "
         "set gpus_shared = true in both to let them share it")]
    one_sided = allocate_gpus(
        services(chat={"gpus": [1], "gpus_shared": True}, embed={"gpus": [1]}), inventory)
    assert "'chat' and 'embed'" in str(one_sided.issues[0])


def test_gpus_shared_lets_two_services_share_a_gpu(fake: FakeNvml, inventory: GpuInventory) -> None:
    config = services(chat={"gpus": [1], "gpus_shared": True}, embed={"gpus": [1], "gpus_shared": True})
    result = allocate_gpus(config, inventory)
    assert result.issues == []
    assert result.by_device() == {uuid(fake, 1): ["chat", "embed"]}


def test_memory_fractions_over_one_on_a_shared_gpu_are_refused(inventory: GpuInventory) -> None:
    config = services(chat={"gpus": [1], "gpus_shared": True}, embed={"gpus": [1], "gpus_shared": True},
                      solo={"gpus": [2]})
    result = allocate_gpus(config, inventory)
    issues = check_memory_fractions(result, {"chat": 0.6, "embed": 0.5, "solo": 0.92})
    assert [str(i) for i in issues] == [
        ("services.embed.gpu_memory_utilization: GPU 1 is shared by chat (0.6) and embed (0.5), "
         "whose gpu_memory_utilization add up to 1.10, more than 1.0; "
         "lower them so they add up to at most 1.0")]
    assert check_memory_fractions(result, {"chat": 0.45, "embed": 0.45, "solo": 0.92}) == []


def test_a_reload_keeps_running_workers_on_their_gpus(fake: FakeNvml, inventory: GpuInventory) -> None:
    first = allocate_gpus(services(chat={"gpus": "auto"}), inventory)
    assert first.workers["chat"].indices == (0,)
    # chat now fills GPU 0, so another GPU has more free memory: it must still stay put.
    fake.fake_add_process(0, pid=10, used_bytes=70 * GiB)
    inventory.refresh()
    previous = {w: g.uuids for w, g in first.workers.items()}
    again = allocate_gpus(services(chat={"gpus": "auto"}, new={"gpus": 1}), inventory, previous=previous)
    assert again.workers["chat"].indices == (0,) and again.workers["new"].indices == (1,)


def test_a_cpu_host_runs_unpinned_services_and_refuses_gpu_requests() -> None:
    reason = "NVML could not start: NVML Shared Library Not Found"
    plain = allocate_gpus(services(tool={}, other={"gpus": []}), None, no_gpu_reason=reason)
    assert plain.issues == [] and not plain.workers["tool"] and not plain.workers["other"]
    asking = allocate_gpus(services(chat={"gpus": [0]}, tool={}), None, no_gpu_reason=reason)
    assert [str(i) for i in asking.issues] == [
        f"services.chat.gpus: this host has no GPU: {reason}; remove gpus to run this service on the CPU"]


def test_issues_name_the_config_file(tmp_path: Path, inventory: GpuInventory) -> None:
    path = tmp_path / "citadel.toml"
    path.write_text('[services.chat]\ntype = "plain"\ngpus = [8]\n')
    config = load_config(path, {"plain": ServiceConfig})
    issue = allocate_gpus(config, inventory).issues[0]
    assert issue.file == path.resolve() and issue.path == "services.chat.gpus[0]"


def test_mig_devices_are_pinned_by_uuid_and_never_picked_automatically() -> None:
    inventory = GpuInventory.detect(FakeNvml.from_file(HOST_MIG))
    assert inventory is not None
    mig = inventory.gpus[0].mig_devices[1].uuid
    result = allocate_gpus(services(small={"gpus": [mig]}, other={"gpus": "auto"}), inventory)
    assert result.issues == []
    assert result.workers["small"] == WorkerGpus("small", (0,), (mig,))
    assert result.workers["other"].indices == (1,)
    whole = allocate_gpus(services(big={"gpus": [0]}), inventory)
    assert str(whole.issues[0]).startswith(
        "services.big.gpus[0]: GPU 0 is in MIG mode: name one of its MIG devices by UUID")


# --------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------


def test_a_pinned_worker_gets_uuids_and_its_gpus_cpus(fake: FakeNvml, inventory: GpuInventory) -> None:
    gpus = allocate_gpus(services(chat={"gpus": [0, 1]}), inventory).workers["chat"]
    placement = worker_placement(gpus, inventory, allowed_cpus=range(64))
    assert placement.env == {"CUDA_VISIBLE_DEVICES": f"{uuid(fake, 0)},{uuid(fake, 1)}",
                             "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert placement.cpus == NODE0
    across = allocate_gpus(services(x={"gpus": [3, 4]}), inventory).workers["x"]
    assert worker_placement(across, inventory, allowed_cpus=range(64)).cpus == NODE0 | NODE1
    assert worker_placement(across, inventory, allowed_cpus={1, 40, 99}).cpus == {1, 40}
    assert worker_placement(gpus, inventory, allowed_cpus={40}).cpus is None  # none allowed
    # By default, the daemon's own CPUs bound the set.
    expected = NODE0 & os.sched_getaffinity(0)
    assert worker_placement(gpus, inventory).cpus == (expected or None)


def test_unknown_affinity_and_unpinned_workers_get_no_cpu_set(fake: FakeNvml) -> None:
    fake.fake_set_unsupported(2, "nvmlDeviceGetCpuAffinity")
    inventory = GpuInventory.detect(fake)
    assert inventory is not None
    gpus = allocate_gpus(services(chat={"gpus": [1, 2]}), inventory).workers["chat"]
    assert worker_placement(gpus, inventory, allowed_cpus=range(64)).cpus is None
    unpinned = worker_placement(WorkerGpus("tool"), inventory)
    assert unpinned.env == {} and unpinned.cpus is None


def test_cpulists_round_trip() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert format_cpulist({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"


# --------------------------------------------------------------------------
# Release before a restart
# --------------------------------------------------------------------------


def test_wait_released_returns_once_the_dead_workers_process_is_gone(
    fake: FakeNvml, inventory: GpuInventory, logs: list[str]
) -> None:
    fake.fake_add_process(2, pid=4242, used_bytes=30 * GiB)
    fake.fake_add_process(2, pid=5151, used_bytes=10 * GiB)  # someone else's: not waited for

    async def scenario() -> bool:
        waiting = asyncio.create_task(
            wait_released(inventory, [uuid(fake, 2)], pids={4242, 4243}, timeout=30, poll=0.02))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        fake.fake_remove_process(2, 4242)
        return await waiting

    assert asyncio.run(scenario()) is True
    assert any("pid 4242 (30.0 GiB on GPU 2)" in line for line in logs)
    assert any(line.startswith("GPU memory on GPU 2 released after") for line in logs)


def test_wait_released_gives_up_after_its_timeout(fake: FakeNvml, inventory: GpuInventory,
                                                  logs: list[str]) -> None:
    fake.fake_add_process(2, pid=4242, used_bytes=GiB)
    released = asyncio.run(wait_released(inventory, [uuid(fake, 2)], {4242}, timeout=0.2, poll=0.05))
    assert released is False
    assert any("still held after" in line and "pid 4242" in line for line in logs)


def test_without_pids_every_process_but_other_workers_counts(fake: FakeNvml, inventory: GpuInventory) -> None:
    fake.fake_add_process(4, pid=1111, used_bytes=GiB)  # the other worker sharing GPU 4
    gpus = [uuid(fake, 4)]
    assert asyncio.run(wait_released(inventory, gpus, None, timeout=5, other_pids={1111})) is True
    fake.fake_add_process(4, pid=2222, used_bytes=GiB)  # an orphan of the dead worker
    assert asyncio.run(wait_released(inventory, gpus, None, timeout=0.2, poll=0.05,
                                     other_pids={1111})) is False


def test_wait_released_cannot_tell_when_nvml_lists_no_processes(
    fake: FakeNvml, inventory: GpuInventory, logs: list[str]
) -> None:
    fake.fake_set_unsupported(6, "nvmlDeviceGetComputeRunningProcesses")
    assert asyncio.run(wait_released(inventory, [uuid(fake, 6)], {1}, timeout=5)) is True
    assert any("cannot tell" in line for line in logs)
