"""``citadelctl``: control citadeld over its Unix socket.

Exit codes (the contract): 0 success; 1 the operation failed; 2 usage
error; 3 daemon not reachable. Imports are kept lazy and light (no aiohttp,
no pydantic, no ``http.client``) so that ``citadelctl status`` answers fast;
``bench/bench_ctl_status.py`` measures it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import click

from ..control import API_PREFIX
from ..control.client import ControlClient, ControlError, DaemonUnreachableError

DEFAULT_SOCKET = "/run/citadel/control.sock"
DEFAULT_CONFIG = "/etc/citadel/citadeld.toml"
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

_STATE_COLOURS = {"running": "green", "starting": "yellow", "backoff": "yellow",
                  "stopping": "yellow", "stopped": None, "fatal": "red", "idle": "cyan", "asleep": "cyan"}
_HEALTH_COLOURS = {"pass": "green", "warn": "yellow", "fail": "red"}


def _mask(text: str) -> str:
    """The one masking step (answers are masked by citadeld already; this catches the rest)."""
    from ..logs.masking import masker

    return masker.mask(text)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(_mask(f"citadelctl: {message}"), err=True)
    sys.exit(code)


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _socket_from_config(path: str) -> str | None:
    """``daemon.control_socket`` from the config, read without validating it (fast)."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            value = tomllib.load(fh).get("daemon", {}).get("control_socket")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, str) or "${" in value:
        return None
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(path)), value)


def _exit_code(exc: ControlError) -> int:
    return EXIT_USAGE if exc.status in (400, 404, 405) else EXIT_FAILED


class Ctl:
    """What every subcommand needs: the client, and failures turned into the contract's exit codes."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.client = ControlClient(socket_path)

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0) -> Any:
        """Call the API; exit 3 when citadeld is unreachable, 1 or 2 when it says no."""
        try:
            return self.client.call(method, API_PREFIX + path, body, timeout)
        except DaemonUnreachableError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except ControlError as exc:
            _fail(str(exc), _exit_code(exc))

    def stream(self, path: str) -> Iterator[str]:
        """Lines of a streamed answer."""
        try:
            yield from self.client.stream(API_PREFIX + path)
        except DaemonUnreachableError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except ControlError as exc:
            _fail(str(exc), _exit_code(exc))


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of worker and service names, asked of the running citadeld."""
    socket_path = (ctx.find_root().params.get("socket_path") or os.environ.get("CITADEL_SOCKET")
                   or _socket_from_config(DEFAULT_CONFIG) or DEFAULT_SOCKET)
    try:
        workers = ControlClient(socket_path, timeout=2.0).call("GET", API_PREFIX + "/status")["workers"]
    except Exception:  # noqa: BLE001  (completion must never fail loudly)
        return []
    names = sorted({w["service"] for w in workers} | {w["name"] for w in workers})
    return [n for n in names if n.startswith(incomplete)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="CITADEL_SOCKET", metavar="PATH",
              help=f"The control socket (default: the config's daemon.control_socket, else "
                   f"{DEFAULT_SOCKET}; env CITADEL_SOCKET).")
@click.option("--config", "config_path", envvar="CITADEL_CONFIG", metavar="FILE",
              help=f"Read the control socket's path from this config (default {DEFAULT_CONFIG}).")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, config_path: str | None) -> None:
    """Control citadeld, the supervisor of LLM servers.

    Exit codes: 0 success, 1 the operation failed, 2 usage error,
    3 citadeld is not reachable.
    """
    if socket_path is None:
        socket_path = _socket_from_config(config_path or DEFAULT_CONFIG) or DEFAULT_SOCKET
    ctx.obj = Ctl(socket_path)


# -- status -------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _state_cell(w: dict[str, Any], now: float) -> str:
    state = w["state"]
    if state == "starting":
        detail = [f"for {_duration(now - w['since'])}"] + ([w["phase"]] if w.get("phase") else [])
        return f"starting ({', '.join(detail)})"
    demand = w.get("demand") or {}
    if state in ("idle", "asleep") and demand.get("down_reason"):
        return f"{state} ({demand['down_reason']})"
    exit_ = w.get("last_exit")
    if state in ("fatal", "backoff") and exit_:
        return state + (f" (exit {exit_['code']})" if exit_.get("signal") is None
                        else f" (signal {exit_['signal']})")
    return state


def _padded(header: list[str], rows: list[list[str]]) -> list[list[str]]:
    """The header and the rows, each cell padded to its column's width."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return [[cell.ljust(widths[i]) for i, cell in enumerate(row)] for row in [header] + rows]


def status_table(workers: list[dict[str, Any]], colour: bool, now: float | None = None) -> str:
    """The ``systemctl``-like table: one row per worker."""
    now = time.time() if now is None else now
    header = ["NAME", "STATE", "PID", "GPUS", "PORT", "UPTIME", "RESTARTS", "READY"]
    rows = [[
        w["name"], _state_cell(w, now), str(w["pid"] or "-"),
        ",".join(str(g) for g in w["gpus"]) or "-", str(w["port"] or "-"),
        _duration(w.get("uptime")) if w["state"] in ("running", "starting") else "-",
        str(w["restarts"]), "yes" if w["ready"] else "no",
    ] for w in workers]
    padded = _padded(header, rows)
    lines = ["  ".join(padded[0]).rstrip()]
    for w, cells in zip(workers, padded[1:]):
        fg = _STATE_COLOURS.get(w["state"])
        if colour and fg:
            cells[1] = click.style(cells[1], fg=fg)
        lines.append("  ".join(cells).rstrip())
    lines += [group_line(w) for w in workers if w.get("multinode")]
    return "\n".join(lines)


def group_line(worker: dict[str, Any]) -> str:
    """A multinode worker's group, under the table: its rank, generation, state and every node."""
    group = worker["multinode"]
    summary = group["group"]
    nodes = []
    for node in group["nodes"]:
        if node["rank"] == group["rank"]:
            nodes.append(f"{node['rank']}={node['name']} (this node, {worker['state']})")
            continue
        peer = node.get("peer") or {}
        seen = (f"{peer.get('state')}, gen {peer.get('generation')}" if peer.get("reachable")
                else "unreachable")
        nodes.append(f"{node['rank']}={node['name']} ({seen})")
    return (f"{worker['service']}: multinode rank {group['rank']} of {group['size']}, generation "
            f"{summary['generation']}, group {summary['state']}, {summary['restarts']} group restarts; "
            f"ranks {', '.join(nodes)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"workers": [...]}.')
@click.argument("names", nargs=-1, shell_complete=_complete_names)
@click.pass_obj
def status(ctl: Ctl, as_json: bool, names: tuple[str, ...]) -> None:
    """Show every worker (or those of the NAMES given)."""
    workers = ctl.call("GET", "/status")["workers"]
    if names:
        workers = [w for w in workers if w["name"] in names or w["service"] in names]
        if not workers:
            _fail(f"no worker or service named {', '.join(names)}", EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"workers": workers}, indent=2))
    elif not workers:
        click.echo("no workers configured")
    else:
        click.echo(status_table(workers, _colour()))


# -- start, stop, restart -----------------------------------------------------


class _Progress:
    """Prints the state changes of the workers being acted on, from ``GET /v1/events``."""

    def __init__(self, ctl: Ctl, names: tuple[str, ...], everything: bool):
        import threading

        self.names = set(names)
        self.everything = everything
        self.lock = threading.Lock()
        self.done = False
        lines, self.sock = ctl.client.open_stream(API_PREFIX + "/events")
        self.thread = threading.Thread(target=self._print, args=(lines,), daemon=True)
        self.thread.start()

    def _print(self, lines: Iterator[str]) -> None:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("kind") != "state" or not (
                    self.everything or event["worker"] in self.names or event["service"] in self.names):
                continue
            text = f"{event['worker']}: {event['old_state']} -> {event['state']}"
            pid = event.get("detail", {}).get("pid")
            with self.lock:
                if self.done:
                    return
                click.echo(text + (f" (pid {pid})" if pid else ""), err=True)

    def close(self) -> None:
        """Stop printing and end the stream."""
        import socket

        with self.lock:
            self.done = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _act(ctl: Ctl, action: str, names: tuple[str, ...], everything: bool, wait: bool,
         rolling: bool = False) -> None:
    if not names and not everything:
        _fail(f"name the workers or services to {action}, or give --all", EXIT_USAGE)
    if names and everything:
        _fail("give names or --all, not both", EXIT_USAGE)
    wait = wait or rolling  # a rolling restart answers when it is done
    progress = None
    if wait:
        try:
            progress = _Progress(ctl, names, everything)
        except (DaemonUnreachableError, ControlError):
            progress = None  # the call below reports the problem
    body = {"names": list(names), "all": everything, "wait": wait}
    if action in ("start", "stop", "restart"):
        body["rolling"] = rolling
    try:
        data = ctl.call("POST", f"/{action}", body, timeout=None if wait else 30.0)
    finally:
        if progress is not None:
            progress.close()
    wanted = {"stop": ("stopped", "fatal"), "sleep": ("asleep", "idle", "stopped")}.get(action, ("running",))
    failed = []
    for w in data["workers"]:
        line = f"{w['name']}: {w['state']}" + (f" (pid {w['pid']})" if w["pid"] else "")
        if wait and w["state"] not in wanted:
            failed.append(w["name"])
            if w.get("last_error"):
                line += f": {w['last_error']}"
        click.echo(_mask(line))
    if failed:
        _fail(f"not {' or '.join(wanted)}: {', '.join(failed)} "
              "(see `citadelctl status` and `citadelctl logs NAME`)")


_NAMES = click.argument("names", nargs=-1, shell_complete=_complete_names)
_ALL = click.option("--all", "everything", is_flag=True, help="Every worker.")
_WAIT = click.option("--wait", is_flag=True,
                     help="Block until the workers are running (or stopped), showing progress; "
                          "exit 1 if one is not.")


@main.command()
@_NAMES
@_ALL
@_WAIT
@click.pass_obj
def start(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool) -> None:
    """Start workers or services (clears fatal)."""
    _act(ctl, "start", names, everything, wait)


@main.command()
@_NAMES
@_ALL
@_WAIT
@click.pass_obj
def stop(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool) -> None:
    """Stop workers or services (their whole process trees)."""
    _act(ctl, "stop", names, everything, wait)


@main.command()
@_NAMES
@_ALL
@_WAIT
@click.option("--rolling", is_flag=True,
              help="One worker at a time, each once the last is ready again (implies --wait).")
@click.pass_obj
def restart(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool, rolling: bool) -> None:
    """Restart workers or services."""
    _act(ctl, "restart", names, everything, wait, rolling)


@main.command()
@_NAMES
@_ALL
@click.option("--wait", is_flag=True, help="Block until they are asleep (or idle); exit 1 if one is not.")
@click.pass_obj
def sleep(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool) -> None:
    """Put running workers to sleep (vLLM's sleep mode); where the build has none, stop them
    into idle. A request through the gateway, or `citadelctl wake`, brings them back."""
    _act(ctl, "sleep", names, everything, wait)


@main.command()
@_NAMES
@_ALL
@_WAIT
@click.pass_obj
def wake(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool) -> None:
    """Wake asleep workers and start idle ones (making room in their swap group)."""
    _act(ctl, "wake", names, everything, wait)


# -- reload ---------------------------------------------------------------------


@main.command()
@click.pass_obj
def reload(ctl: Ctl) -> None:
    """Reload the config and apply what changed; on a config error nothing changes (exit 1)."""
    try:
        data = ctl.client.call("POST", API_PREFIX + "/reload", {}, timeout=None)
    except DaemonUnreachableError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except ControlError as exc:
        if exc.status == 422 and isinstance(exc.data, dict):
            issues = exc.data.get("issues") or [str(exc)]
            _fail("\n".join(["reload failed, nothing changed:"] + [f"  {i}" for i in issues]))
        _fail(str(exc), _exit_code(exc))
    changes = [(key, data.get(key) or []) for key in ("added", "removed", "changed")]
    for key, services in changes:
        if services:
            click.echo(f"{key}: {', '.join(services)}")
    if not any(services for _, services in changes):
        click.echo("no changes")


# -- reading ----------------------------------------------------------------------


@main.command()
@click.argument("name", shell_complete=_complete_names)
@click.option("-n", "lines", type=click.IntRange(min=0), default=100, show_default=True,
              help="Recent lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.pass_obj
def logs(ctl: Ctl, name: str, lines: int, follow: bool) -> None:
    """Show a worker's recent output (from its in-memory ring)."""
    from urllib.parse import quote

    from ..logs.daemon_log import escape_control

    try:
        for line in ctl.stream(f"/logs/{quote(name, safe='')}?n={lines}&follow={int(follow)}"):
            # A worker's output is hostile: its escape sequences must not reach the terminal.
            click.echo(escape_control(_mask(line)))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they happen.")
@click.pass_obj
def events(ctl: Ctl, follow: bool) -> None:
    """Worker events as JSON lines: a snapshot of every worker, then (-f) each state change."""
    try:
        for line in ctl.stream(f"/events?snapshot=1&follow={int(follow)}"):
            click.echo(_mask(line))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
@click.pass_obj
def health(ctl: Ctl, as_json: bool) -> None:
    """citadeld's health: every check, pass, warn or fail (exit 1 on fail)."""
    try:
        data = ctl.client.call("GET", API_PREFIX + "/health")
    except DaemonUnreachableError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except ControlError as exc:  # a failing report may come with an error status
        if not (isinstance(exc.data, dict) and "status" in exc.data):
            _fail(str(exc), _exit_code(exc))
        data = exc.data
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        colour = _colour()
        overall = str(data.get("status", "?"))
        click.echo("status: " + (click.style(overall, fg=_HEALTH_COLOURS.get(overall)) if colour
                                 else overall))
        for check, results in (data.get("checks") or {}).items():
            for r in results if isinstance(results, list) else [results]:
                who = str(r.get("componentId") or r.get("component") or "")
                value = r.get("observedValue")
                shown = f"{check} {who}" if who and not check.startswith(f"{who}:") else check
                text = f"  {shown}: {r.get('status', '?')}"
                if value is not None and not isinstance(value, bool):
                    text += f" ({value}{' ' + r['observedUnit'] if r.get('observedUnit') else ''})"
                if r.get("output"):
                    text += f": {r['output']}"
                click.echo(_mask(text))
    if data.get("status") == "fail":
        sys.exit(EXIT_FAILED)


def _mib(value: Any) -> str:
    return str(value // (1024 * 1024)) if isinstance(value, int) else "?"


def _gpu_row(g: dict[str, Any]) -> list[str]:
    memory: dict[str, Any] = g["memory"] if isinstance(g.get("memory"), dict) else {}
    used = memory.get("used", g.get("memory_used"))
    total = memory.get("total", g.get("memory_total"))
    util = g.get("utilization_percent")
    return [str(g.get("index", "?")), str(g.get("name", "?")), f"{_mib(used)}/{_mib(total)}",
            "-" if util is None else f"{util}%", ",".join(g.get("workers") or []) or "-",
            str(g.get("uuid", "?"))]


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
@click.pass_obj
def gpus(ctl: Ctl, as_json: bool) -> None:
    """The GPUs, their memory, and which worker holds which GPU."""
    data = ctl.call("GET", "/gpus")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data.get("available"):
        click.echo(f"no GPUs: {data.get('reason') or 'NVML found none'}")
        return
    if data.get("fake"):
        click.echo("FAKE GPUs (CITADEL_FAKE_NVML is set): no real GPU is used", err=True)
    header = ["INDEX", "NAME", "MEMORY MiB", "UTIL", "WORKERS", "UUID"]
    rows = [_gpu_row(g) for g in data.get("gpus", [])]
    for cells in _padded(header, rows):
        click.echo("  ".join(cells).rstrip())


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _engine_row(e: dict[str, Any]) -> list[str]:
    kv, queries, hits = e.get("kv_cache_usage"), e.get("prefix_cache_queries"), e.get("prefix_cache_hits")
    hit_rate = f"{100 * hits / queries:.1f}%" if queries and hits is not None else "-"
    return [str(e["worker"]), str(e["service"]), _count(e.get("waiting")), _count(e.get("running")),
            "-" if kv is None else f"{100 * kv:.1f}%", hit_rate, f"{e['age']:.1f}s",
            _mask(str(e.get("error") or "-"))]


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
@click.pass_obj
def engines(ctl: Ctl, as_json: bool) -> None:
    """Each running vLLM worker's own load, read from its /metrics: requests waiting and
    running, KV-cache use, prefix-cache hit rate (since the engine started), the reading's age."""
    data = ctl.call("GET", "/engines")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data.get("engines"):
        click.echo("no running vLLM worker")
        return
    header = ["WORKER", "SERVICE", "WAITING", "RUNNING", "KV-CACHE", "PREFIX-HITS", "AGE", "ERROR"]
    for cells in _padded(header, [_engine_row(e) for e in data["engines"]]):
        click.echo("  ".join(cells).rstrip())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
@click.pass_obj
def plugins(ctl: Ctl, as_json: bool) -> None:
    """List plugins, Citadel's own parts first: name, version, hooks, and why one failed to load."""
    data = ctl.call("GET", "/plugins")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for p in data["plugins"]:
        version = f"{p['distribution']} {p['version']}" if p.get("distribution") else "unknown"
        if p.get("builtin"):
            version += " (built-in)"
        click.echo(f"{p['name']:<16} {p['status']:<9} {version}")
        if p.get("hooks"):
            click.echo(f"  hooks: {', '.join(p['hooks'])}")
        if p.get("error"):
            click.echo(_mask(f"  error: {p['error']}"))


@main.command()
@click.pass_obj
def version(ctl: Ctl) -> None:
    """Show citadelctl's and citadeld's versions."""
    from .. import __version__

    click.echo(f"citadelctl {__version__}")
    data = ctl.call("GET", "/version")
    click.echo(f"citadeld {data['version']} (pid {data['pid']}, API {data['api']})")


if __name__ == "__main__":
    main()
