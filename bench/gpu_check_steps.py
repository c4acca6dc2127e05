"""The steps of ``gpu_check.py``, in order: each checks one part of Citadel's GPU code and
records its verdicts and figures in the run's report."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gpu_check_nvml as nvml_shapes
from _common import free_port, wait_until
from gpu_check_harness import REPO, CheckoutCitadel, EventLog, MiB, ReleaseWatch, Run, StepFailed

GiB = 1 << 30
WORKER = Path(__file__).resolve().parent / "gpu_check_worker.py"


#: The fake's release: seconds between citadeld waiting and the script freeing the memory
#: (a driver's latency, simulated, so that the wait shows in the figures).
FAKE_RELEASE_DELAY = 1.0


def step_nvml_shapes(run: Run) -> None:
    """Every NVML call Citadel makes, described; where the fake differs (from pynvml's
    declarations; on a GPU, from the real NVML answering on this GPU)."""
    import pynvml

    from citadel_supervisor.gpu.fake_nvml import FakeNvml

    index, words = run.args.gpu, max(1, -(-(os.cpu_count() or 1) // 64))
    shapes = nvml_shapes.probe(run.nvml, index, words, inject_xid=run.fake)
    run.report.nvml["calls"] = shapes
    uuid = shapes.get("nvmlDeviceGetUUID(h)", {}).get("value")
    if not uuid:
        raise StepFailed(f"NVML gives no UUID for GPU {index}: {shapes.get('nvmlDeviceGetUUID(h)')}")
    run.uuid = uuid
    declared = nvml_shapes.declared(pynvml)
    if run.fake:
        diffs = nvml_shapes.differences(shapes, declared, errors=False)
        diffs += nvml_shapes.error_differences(FakeNvml, pynvml)
        run.report.add("nvml.fake_matches_pynvml", not diffs,
                       "; ".join(diffs) or "every answer has the fields and types pynvml declares; "
                       "every pynvml error class is in the fake", differences=diffs)
    else:
        real_diffs = nvml_shapes.differences(shapes, declared, ("the real NVML", "pynvml"), errors=False)
        run.report.add("nvml.real_matches_pynvml", not real_diffs,
                       "; ".join(real_diffs) or "every answer has the fields and types pynvml declares",
                       differences=real_diffs)
        mirror = FakeNvml(mirror_host(shapes, index), source="mirror of the real GPU")
        mirrored = nvml_shapes.probe(mirror, index, words)
        run.report.nvml["fake_mirror_calls"] = mirrored
        diffs = nvml_shapes.differences(mirrored, shapes, ("the fake", "the real NVML"), errors=True)
        run.report.add("nvml.fake_matches_real", not diffs,
                       "; ".join(diffs) or "the fake, mirroring this GPU, answers every call alike",
                       differences=diffs)
    run.report.nvml["differences"] = diffs
    unprobed = sorted(nvml_shapes.functions_used(REPO / "citadel_supervisor", pynvml)
                      - nvml_shapes.functions_probed(shapes))
    run.report.add("nvml.every_call_probed", not unprobed,
                   f"not probed: {', '.join(unprobed)}" if unprobed else
                   f"{len(shapes)} calls, covering every NVML function the package calls")


def mirror_host(shapes: dict[str, Any], index: int) -> dict[str, Any]:
    """A fake host whose GPU ``index`` answers as the real one did (what the fake can model)."""
    def value(label: str) -> Any:
        return shapes.get(label, {}).get("value")

    memory = value("nvmlDeviceGetMemoryInfo(h)") or {}
    gpu: dict[str, Any] = {"name": value("nvmlDeviceGetName(h)"), "uuid": value("nvmlDeviceGetUUID(h)"),
                           "memory_total_mib": memory.get("total", 0) / MiB,
                           "memory_used_mib": memory.get("used", 0) / MiB}
    pci = value("nvmlDeviceGetPciInfo(h)") or {}
    if pci.get("busId"):
        gpu["pci_bus_id"] = pci["busId"]
    node = value("nvmlDeviceGetNumaNodeId(h)")
    if isinstance(node, int) and node >= 0:
        gpu["numa_node"] = node
    mode = value("nvmlDeviceGetMigMode(h)")
    if isinstance(mode, list) and mode:
        gpu["mig"] = {"enabled": mode[0] == 1}
    gpu["unsupported"] = sorted({label.split("(")[0] for label, shape in shapes.items()
                                 if shape.get("raises") == "NVMLError_NotSupported"})
    filler = [{"uuid": f"GPU-00000000-0000-0000-0000-{i:012d}"} for i in range(index)]
    return {"driver_version": value("nvmlSystemGetDriverVersion()") or "?", "gpus": [*filler, gpu]}


def step_start_citadeld(run: Run) -> None:
    """citadeld with the worker pinned to the GPU's UUID, and its event stream followed."""
    run.worker = f"gpucheck{os.getpid()}"  # cgroups are named after workers host-wide: be unique
    # The worker gets the caller's PYTHONPATH, not citadeld's (the checkout, the wheels
    # installed for citadeld): those could shadow what torch imports.
    reports = run.state / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(WORKER), "--report", str(reports), "--gib", str(run.args.gib),
               "--child-gib", str(run.args.child_gib)] + (["--fake"] if run.fake else [])
    services = f"""
        [services.{run.worker}]
        type = "command"
        command = {json.dumps(command)}
        gpus = ["{run.uuid}"]
        restart = "always"
        stable_after = 1
        gpu_release_timeout = {run.args.release_timeout}
        stop_timeout = 10
        env = {{ PYTHONPATH = {json.dumps(os.environ.get("PYTHONPATH", ""))} }}
        """
    run.citadel = CheckoutCitadel(run.state / "citadel", services, env=run.env,
                                  exporter_listen=f"127.0.0.1:{free_port()}")
    try:
        run.citadel.start()
    except (RuntimeError, TimeoutError) as exc:
        log = run.state / "citadel" / "citadeld.out"
        raise StepFailed(f"citadeld did not start: {exc}; see {log}") from None
    run.events = EventLog(run.citadel.socket)


def reference_gpus(run: Run) -> dict[int, dict[str, Any]]:
    """What the host says its GPUs are: nvidia-smi and sysfs, or the fake host's file."""
    if run.host is not None:
        nodes = run.host.original.get("numa_nodes", {})
        out = {}
        for i, g in enumerate(run.host.original["gpus"]):
            mig, node = g.get("mig"), g.get("numa_node")
            cpus = g.get("cpu_affinity") or (nodes.get(str(node)) if node is not None else None)
            out[i] = {"uuid": g.get("uuid"), "name": g.get("name"),
                      "memory_total_mib": g.get("memory_total_mib"), "numa_node": node,
                      "mig_enabled": None if mig is None else bool(mig.get("enabled")), "node_cpus": cpus}
        return out
    return nvidia_smi_gpus()


def nvidia_smi_gpus() -> dict[int, dict[str, Any]]:
    """``nvidia-smi --query-gpu`` (CSV), with each GPU's NUMA node and its CPUs from sysfs."""
    fields = "index,uuid,name,memory.total,pci.bus_id,mig.mode.current,driver_version"
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StepFailed(f"nvidia-smi --query-gpu failed: {exc}") from None
    out = {}
    for row in csv.reader(io.StringIO(result.stdout), skipinitialspace=True):
        if len(row) < 7:
            continue
        index, uuid, name, total, bus, mig, driver = row[:7]
        node = _sysfs_numa(bus)
        out[int(index)] = {"uuid": uuid, "name": name, "memory_total_mib": int(total), "pci_bus_id": bus,
                           "mig_enabled": {"Enabled": True, "Disabled": False}.get(mig),
                           "numa_node": node, "driver_version": driver,
                           "node_cpus": _sysfs_read(f"/sys/devices/system/node/node{node}/cpulist")
                           if node is not None else None}
    return out


def _sysfs_read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _sysfs_numa(bus_id: str) -> int | None:
    domain, _, rest = bus_id.lower().partition(":")
    text = _sysfs_read(f"/sys/bus/pci/devices/{int(domain, 16):04x}:{rest}/numa_node")
    return int(text) if text and int(text) >= 0 else None


def step_inventory(run: Run) -> None:
    """citadeld's inventory (API and CLI) against the host's own account of its GPUs."""
    from citadel_supervisor.gpu import parse_cpulist

    assert run.citadel is not None
    api = run.citadel.get("/v1/gpus")
    cli = run.citadel.ctl_json("gpus", "--json")
    reference = reference_gpus(run)
    run.report.figures["inventory"] = {"api": api, "reference": reference}
    by_index = {g["index"]: g for g in api.get("gpus", [])}
    run.api_gpu = by_index.get(run.args.gpu, {})
    run.report.gpu = {"index": run.args.gpu, "uuid": run.uuid, "name": run.api_gpu.get("name")}
    wrong = [f"GPU {i}: {what}" for i, ref in sorted(reference.items())
             for what in _inventory_mismatches(by_index.get(i), ref)]
    run.report.add("inventory.matches_host", not wrong and bool(reference),
                   "; ".join(wrong) or f"{len(reference)} GPU(s): UUID, name, memory, NUMA node and MIG "
                   f"mode agree with {'the fake host file' if run.fake else 'nvidia-smi and sysfs'}")
    static = ("index", "uuid", "name", "pci_bus_id", "numa_node", "cpu_affinity")
    differ = [f"GPU {g.get('index')}: {k}" for g, c in zip(api.get("gpus", []), cli.get("gpus", []))
              for k in static if g.get(k) != c.get(k)]
    run.report.add("inventory.cli_matches_api", not differ and len(cli.get("gpus", [])) == len(by_index),
                   "; ".join(differ) or "citadelctl gpus --json and /v1/gpus agree")
    run.report.add("inventory.fake_flag", api.get("fake") is run.fake, f"fake = {api.get('fake')}")
    ref = reference.get(run.args.gpu, {})
    nvml_cpus = run.api_gpu.get("cpu_affinity")
    if ref.get("node_cpus") is None or nvml_cpus is None:
        run.report.add("inventory.cpus_are_numa_node", None,
                       f"NUMA node CPUs {ref.get('node_cpus')}, citadeld's CPUs for the GPU {nvml_cpus}: "
                       "nothing to compare")
    else:
        same = parse_cpulist(nvml_cpus) == parse_cpulist(ref["node_cpus"])
        run.report.add("inventory.cpus_are_numa_node", same,
                       f"citadeld's CPUs for GPU {run.args.gpu}: {nvml_cpus}; NUMA node "
                       f"{ref.get('numa_node')}: {ref['node_cpus']}")


def _inventory_mismatches(got: dict[str, Any] | None, ref: dict[str, Any]) -> Iterator[str]:
    if got is None:
        yield "missing from citadeld's inventory"
        return
    total = (got.get("memory") or {}).get("total")
    pairs = [("uuid", got.get("uuid"), ref.get("uuid")), ("name", got.get("name"), ref.get("name")),
             ("memory MiB", None if total is None else total // MiB, ref.get("memory_total_mib")),
             ("NUMA node", got.get("numa_node"), ref.get("numa_node")),
             ("MIG enabled", (got.get("mig") or {}).get("enabled"), ref.get("mig_enabled"))]
    for what, mine, theirs in pairs:
        if theirs is not None and mine != theirs:
            yield f"{what}: citadeld {mine!r}, host {theirs!r}"


def wait_report(run: Run, pid_not: int | None = None) -> dict[str, Any]:
    """The running worker's report (the first one whose pid is not ``pid_not``); ``StepFailed``
    at once when a worker reported an error."""
    assert run.citadel is not None
    citadel = run.citadel

    def ready() -> dict[str, Any] | None:
        reports = {r["pid"]: r for r in worker_reports(run) if r["pid"] != pid_not}
        failed = next((r for r in reports.values() if r.get("error")), None)
        if failed is not None:
            raise StepFailed(f"the worker (pid {failed['pid']}) failed: {failed['error']}")
        return reports.get(citadel.status().get(run.worker, {}).get("pid"))

    try:
        return wait_until(ready, run.wait_time(300, 30), "the worker's report", 0.1)
    except TimeoutError:
        raise StepFailed(f"the worker wrote no report; see {run.state / 'citadel' / 'log'}") from None


def worker_reports(run: Run) -> list[dict[str, Any]]:
    """Every report the workers wrote so far."""
    return [json.loads(path.read_text()) for path in sorted((run.state / "reports").glob("worker-*.json"))]


def step_pinning(run: Run) -> None:
    """The worker sees exactly its GPU, by UUID, and runs on the GPU's CPUs."""
    from citadel_supervisor.gpu import parse_cpulist

    report = run.first = wait_report(run)
    run.report.figures["worker"] = report
    visible = report.get("cuda_visible_devices")
    order = report.get("cuda_device_order")
    run.report.add("pin.cuda_visible_devices", visible == run.uuid and order == "PCI_BUS_ID",
                   f"CUDA_VISIBLE_DEVICES={visible}, CUDA_DEVICE_ORDER={order}")
    counted = "the worker counts" if run.fake else "torch.cuda.device_count() ="
    run.report.add("pin.device_count", report.get("device_count") == 1,
                   f"{counted} {report.get('device_count')}")
    if run.fake:
        run.report.add("pin.torch_uuid", None, "no torch with the FAKE NVML")
    elif report.get("device_uuid") is None:
        run.report.add("pin.torch_uuid", None,
                       f"this torch tells no device UUID; it sees {report.get('device_name')} with "
                       f"{_gib(report.get('device_total_memory'))}")
    else:
        seen = str(report["device_uuid"])
        run.report.add("pin.torch_uuid", seen.lower() == run.uuid.lower(),
                       f"torch sees {seen} ({report.get('device_name')}); NVML: {run.uuid}")
    assert run.citadel is not None
    daemon_cpus = os.sched_getaffinity(run.citadel.pid)
    nvml_cpus = run.api_gpu.get("cpu_affinity")
    want = parse_cpulist(nvml_cpus) & daemon_cpus if nvml_cpus else set()
    want = want or daemon_cpus  # nothing known or nothing allowed: not pinned, citadeld's own CPUs
    got = set(report.get("cpus", []))
    run.report.add("pin.cpu_affinity", got == want,
                   f"worker CPUs {_cpus(got)}; the GPU's {nvml_cpus} within citadeld's {_cpus(daemon_cpus)}")
    if run.host is not None:
        run.host.allocate(run.args.gpu, {report["pid"]: int(run.args.gib * GiB),
                                         report["child"]["pid"]: int(run.args.child_gib * GiB)})


def _cpus(cpus: set[int]) -> str:
    from citadel_supervisor.gpu import format_cpulist

    return format_cpulist(cpus) or "none"


def held_bytes(run: Run) -> int:
    """What the worker and its child hold, at least (torch's allocations; the fake's figures)."""
    first = run.first
    if run.fake:
        return int(run.args.gib * GiB) + int(run.args.child_gib * GiB)
    return int(first.get("allocated_bytes", 0)) + int(first.get("child", {}).get("allocated_bytes", 0))


def scrape(run: Run, openmetrics: bool = False) -> str:
    """The exporter's /metrics, as text."""
    assert run.citadel is not None
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
    url = f"http://{run.citadel.exporter_listen}/metrics"
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def samples(text: str, family: str, **labels: str) -> list[float]:
    """The values of ``family``'s samples with these labels (Prometheus text, strictly parsed)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s.value for f in text_string_to_metric_families(text) if f.name == family
            for s in f.samples if s.name in (family, f"{family}_total")
            and all(s.labels.get(k) == v for k, v in labels.items())]


def step_process_memory(run: Run) -> None:
    """The worker's GPU memory, per process, in /v1/gpus and in citadel_worker_gpu_memory_bytes."""
    assert run.citadel is not None
    want = held_bytes(run)
    pids = {run.first["pid"], run.first["child"]["pid"]}

    seen: list[float] = []  # the last value scraped, shown whether or not it is enough

    def shown() -> float | None:
        seen[:] = samples(scrape(run), "citadel_worker_gpu_memory_bytes", worker=run.worker,
                          uuid=run.uuid)
        return seen[0] if seen and seen[0] >= want else None

    try:
        wait_until(shown, run.wait_time(30, 15), "the worker's GPU memory in /metrics", 0.2)
    except TimeoutError:
        pass
    value = seen[0] if seen else None
    api = run.citadel.get("/v1/gpus")
    gpu: dict[str, Any] = next((g for g in api["gpus"] if g["uuid"] == run.uuid), {})
    listed = {p["pid"]: p for p in gpu.get("processes") or []}
    run.report.figures["process_memory"] = {"expected_at_least": want, "metric": value,
                                            "nvml_processes": listed, "worker_pids": sorted(pids),
                                            "nvidia_smi": _smi_apps(run)}
    slack = 0 if run.fake else 4 * GiB  # CUDA contexts, a few hundred MiB each
    run.report.add("metrics.worker_gpu_memory", value is not None and want <= value <= want + slack,
                   f"citadel_worker_gpu_memory_bytes = {_gib(value)} for {run.worker}; "
                   f"its processes hold {_gib(want)} or more" + _pid_hint(run, listed, pids))
    labelled = {pid: p.get("worker") for pid, p in listed.items() if pid in pids}
    run.report.add("api.gpu_processes", len(labelled) == 2 and set(labelled.values()) == {run.worker},
                   f"/v1/gpus lists {len(listed)} process(es) on the GPU; worker and child: {labelled}")
    check_process_shape(run)


def check_process_shape(run: Run) -> None:
    """The process list's items, now that there are some, against pynvml's declaration."""
    import pynvml

    label = "nvmlDeviceGetComputeRunningProcesses(h)"
    shape = nvml_shapes.probe_processes(run.nvml, run.args.gpu)
    run.report.nvml["processes_while_held"] = shape
    names = ("the fake" if run.fake else "the real NVML", "pynvml")
    diffs = nvml_shapes.differences({label: shape}, {label: nvml_shapes.declared(pynvml)[label]}, names,
                                    errors=False)
    items = shape.get("items")
    run.report.add("nvml.process_list_matches_pynvml", isinstance(items, dict) and not diffs,
                   "; ".join(diffs) or (f"items with {', '.join(items['fields'])}" if isinstance(items, dict)
                                        else f"no items to compare: {shape}"),
                   differences=diffs)


def _gib(value: float | None) -> str:
    return "none" if value is None else f"{value / GiB:.2f} GiB"


def _pid_hint(run: Run, listed: dict[int, Any], pids: set[int]) -> str:
    if listed and not set(listed) & pids:
        return " (NVML lists other pids: another pid namespace, a container?)"
    return ""


def _smi_apps(run: Run) -> list[dict[str, str]] | None:
    if run.fake:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [dict(zip(("pid", "used_mib", "gpu_uuid"), row))
            for row in csv.reader(io.StringIO(out), skipinitialspace=True) if row]


def step_exporter(run: Run) -> None:
    """The exporter's GPU families: parsed by both of prometheus_client's parsers, values sane."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    from prometheus_client.parser import text_string_to_metric_families

    text = scrape(run)
    try:
        names = {f.name for f in text_string_to_metric_families(text)}
        run.report.add("exporter.parses_as_prometheus_text", True, f"{len(names)} families")
    except ValueError as exc:
        run.report.add("exporter.parses_as_prometheus_text", False, str(exc)[:200])
        return
    try:
        om = list(openmetrics(scrape(run, openmetrics=True)))
        run.report.add("exporter.parses_as_openmetrics", True, f"{len(om)} families (strict parser)")
    except ValueError as exc:
        run.report.add("exporter.parses_as_openmetrics", False, str(exc)[:200])
    busy = _busy_utilization(run)
    gpu = run.api_gpu
    total = (gpu.get("memory") or {}).get("total") or 0
    limit = gpu.get("power_limit_w")
    bounds: dict[str, Callable[[float], bool]] = {
        "citadel_gpu_utilization_ratio": lambda v: 0 < v <= 1,
        "citadel_gpu_memory_used_bytes": lambda v: held_bytes(run) <= v <= total,
        "citadel_gpu_memory_total_bytes": lambda v: v == total,
        "citadel_gpu_temperature_celsius": lambda v: 5 <= v <= 110,
        "citadel_gpu_power_watts": lambda v: 0 < v <= (limit or 2000) * 1.5,
        "citadel_gpu_xid_errors": lambda v: v >= 0 and v == (gpu.get("xid_errors") or 0),
    }
    figures: dict[str, Any] = {}
    for family, sane in bounds.items():
        values = busy if family == "citadel_gpu_utilization_ratio" and busy else \
            samples(text, family, gpu=str(run.args.gpu), uuid=run.uuid)
        figures[family] = values[0] if values else None
        if family not in names:
            run.report.add(f"exporter.{family}", False, "the family is missing")
        elif not values:
            run.report.add(f"exporter.{family}", None, "no sample: NVML would not say on this GPU")
        else:
            shown = _gib(values[0]) if family.endswith("_bytes") else f"{values[0]:g}"
            run.report.add(f"exporter.{family}", sane(values[0]), shown)
    run.report.figures["exporter"] = figures


def _busy_utilization(run: Run) -> list[float]:
    """The GPU's utilisation once a scrape shows it above 0 (NVML samples it over a period)."""
    def busy() -> list[float] | None:
        values = samples(scrape(run), "citadel_gpu_utilization_ratio", uuid=run.uuid)
        return values if values and values[0] > 0 else None

    try:
        return wait_until(busy, run.wait_time(20, 10), "the GPU's utilisation above 0", 0.5)
    except TimeoutError:
        return []


def step_xid(run: Run) -> None:
    """citadeld watches XID events on the GPU (it cannot make one: it reports the count)."""
    xids = run.api_gpu.get("xid_errors")
    run.report.add("xid.watched", None if xids is None else True,
                   "NVML delivers no XID events here" if xids is None else f"watched; {xids} so far")


def step_kill_and_release(run: Run) -> None:
    """SIGKILL the worker and its child; NVML's release time; citadeld restarted only after it."""
    assert run.events is not None
    events = run.events
    pid, child = run.first["pid"], run.first["child"]["pid"]

    def of_worker(kind: str, state: str | None = None) -> Callable[[dict[str, Any]], bool]:
        return lambda e: (e["worker"] == run.worker and e["time"] >= killed and e["kind"] == kind
                          and (state is None or e["state"] == state))

    watch = ReleaseWatch(run.nvml, run.args.gpu, {pid, child}, held_bytes(run))
    try:
        killed = time.time()
        for target in (child, pid):
            os.kill(target, signal.SIGKILL)
        waits = of_worker("state", "backoff")
        waiting = events.wait(lambda e: waits(e) and e["detail"].get("waiting") == "GPU memory release",
                              run.wait_time(60, 10), "citadeld to wait for the GPU's memory")
        if run.host is not None:
            time.sleep(FAKE_RELEASE_DELAY)  # the simulated driver's latency, not a wait for a condition
            run.host.release(run.args.gpu)
        try:
            wait_until(lambda: watch.released, run.wait_time(run.args.release_timeout + 10, 10),
                       "NVML to report the memory free", 0.01)
        except TimeoutError:
            pass
    finally:
        watch.close()
    spawned = events.wait(of_worker("state", "starting"), run.wait_time(run.args.release_timeout + 20, 20),
                          "the restart")
    exited = events.find(of_worker("exit"))
    report_release(run, watch, {"killed": killed, "exit_event": exited and exited["time"],
                                "wait_event": waiting["time"], "spawned": spawned["time"],
                                "new_pid": spawned["detail"].get("pid")})


def report_release(run: Run, watch: ReleaseWatch, times: dict[str, Any]) -> None:
    """The release's figures and verdicts, from the watch's and citadeld's timestamps."""
    killed, spawned, released = times["killed"], times["spawned"], watch.released
    figures = {**times, "processes_gone": watch.gone, "memory_freed": watch.freed, "released": released,
               "release_s": None if released is None else round(released - killed, 3),
               "citadeld_wait_s": round(spawned - times["wait_event"], 3),
               "restart_after_release_s": None if released is None else round(spawned - released, 3)}
    run.report.figures["release"] = figures
    run.report.add("release.nvml_reports_free", released is not None,
                   f"NVML: processes gone {_after(watch.gone, killed)}, "
                   f"memory free {_after(watch.freed, killed)} after the SIGKILL")
    tolerance = 2 * watch.period + 0.03  # the watch sees a release up to one poll late
    run.report.add("release.restart_after_release",
                   released is not None and spawned >= released - tolerance,
                   f"respawned {_after(spawned, killed)} after the kill, "
                   f"{figures['restart_after_release_s']}s after NVML reported the memory free; "
                   f"citadeld waited {figures['citadeld_wait_s']}s")
    logs = _citadeld_log(run)
    saw = "waiting up to" in logs and "released after" in logs
    run.report.add("release.citadeld_saw_memory_held", saw if run.fake else (True if saw else None),
                   "citadeld logged its wait and the release" if saw else
                   "citadeld found the memory already free when it looked (no wait logged)")


def _after(when: float | None, start: float) -> str:
    return "never" if when is None else f"{when - start:.3f}s"


def _citadeld_log(run: Run) -> str:
    path = run.state / "citadel" / "citadeld.out"
    return path.read_text(errors="replace") if path.exists() else ""


def step_restart(run: Run) -> None:
    """The restarted worker is pinned to the same GPU again."""
    assert run.citadel is not None
    report = wait_report(run, pid_not=run.first["pid"])
    restarts = run.citadel.status()[run.worker]["restarts"]
    run.report.figures["restarted_worker"] = {**report, "restarts": restarts}
    run.report.add("restart.pinned_again",
                   report.get("cuda_visible_devices") == run.uuid and report.get("device_count") == 1
                   and restarts == 1,
                   f"pid {report['pid']}: CUDA_VISIBLE_DEVICES={report.get('cuda_visible_devices')}, "
                   f"{report.get('device_count')} device(s); restarts = {restarts}")


STEPS: list[tuple[str, Callable[[Run], None]]] = [
    ("nvml", step_nvml_shapes), ("citadeld", step_start_citadeld), ("inventory", step_inventory),
    ("pinning", step_pinning), ("process_memory", step_process_memory), ("exporter", step_exporter),
    ("xid", step_xid), ("release", step_kill_and_release), ("restart", step_restart),
]


def run_steps(run: Run) -> None:
    """Every step in order; one that cannot go on fails, and the rest are not run."""
    for position, (name, step) in enumerate(STEPS):
        try:
            step(run)
        except StepFailed as exc:
            run.report.add(f"{name}.step", False, str(exc))
            rest = ", ".join(n for n, _ in STEPS[position + 1:])
            if rest:
                run.report.add("not_run", None, rest)
            return
