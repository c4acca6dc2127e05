"""``citadelctl``: control citadeld over its Unix socket.

Exit codes (the contract): 0 success; 1 the operation failed; 2 usage
error; 3 daemon not reachable. Imports are kept lazy and light so that
``citadelctl status`` answers fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, NoReturn

import click

from ..control import API_PREFIX
from ..control.client import ControlClient, ControlError, DaemonUnreachableError

DEFAULT_SOCKET = "/run/citadel/control.sock"
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

_STATE_COLOURS = {"running": "green", "starting": "yellow", "backoff": "yellow",
                  "stopping": "yellow", "stopped": None, "fatal": "red"}


def _mask(text: str) -> str:
    from ..masking import masker

    return masker.mask(text)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(_mask(f"citadelctl: {message}"), err=True)
    sys.exit(code)


def _socket_from_config(path: str) -> str | None:
    try:
        import tomllib
    except ImportError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            value = tomllib.load(fh).get("daemon", {}).get("control_socket")
    except (OSError, ValueError):
        return None
    if not isinstance(value, str) or "${" in value:
        return None
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(path)), value)


class Ctl:
    """What every subcommand needs: the client."""

    def __init__(self, socket_path: str):
        self.client = ControlClient(socket_path)

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = -1.0) -> Any:
        """Call the API, turning failures into the contract's exit codes."""
        try:
            return self.client.call(method, API_PREFIX + path, body, timeout)
        except DaemonUnreachableError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except ControlError as exc:
            if isinstance(exc.data, dict) and exc.data.get("issues"):
                _fail("\n".join(["reload failed; nothing changed:"] + exc.data["issues"]))
            _fail(str(exc), EXIT_USAGE if exc.status in (400, 404) else EXIT_FAILED)

    def stream(self, path: str) -> Any:
        """Stream lines from the API."""
        try:
            yield from self.client.stream(API_PREFIX + path)
        except DaemonUnreachableError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except ControlError as exc:
            _fail(str(exc), EXIT_USAGE if exc.status in (400, 404) else EXIT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="CITADEL_SOCKET", metavar="PATH",
              help=f"The control socket (default: the config's daemon.control_socket, else {DEFAULT_SOCKET}).")
@click.option("--config", "config_path", envvar="CITADEL_CONFIG", metavar="FILE",
              help="Read the control socket's path from this config.")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, config_path: str | None) -> None:
    """Control citadeld, the supervisor of LLM servers."""
    if socket_path is None:
        socket_path = _socket_from_config(config_path or "/etc/citadel/citadeld.toml") or DEFAULT_SOCKET
    ctx.obj = Ctl(socket_path)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _status_table(workers: list[dict[str, Any]], colour: bool) -> str:
    header = ["NAME", "STATE", "PID", "GPUS", "PORT", "UPTIME", "RESTARTS", "READY"]
    rows = []
    now = time.time()
    for w in workers:
        state = w["state"]
        if state == "starting":
            state += f" ({_duration(now - w['since'])}" + (f", {w['phase']}" if w.get("phase") else "") + ")"
        elif state == "fatal" and w.get("last_exit"):
            exit_ = w["last_exit"]
            state += f" (exit {exit_['code']})" if exit_["signal"] is None else f" (signal {exit_['signal']})"
        rows.append([
            w["name"], state, str(w["pid"] or "-"),
            ",".join(str(g) for g in w["gpus"]) or "-", str(w["port"] or "-"),
            _duration(w.get("uptime")), str(w["restarts"]), "yes" if w["ready"] else "no",
        ])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(header)).rstrip()]
    for w, row in zip(workers, rows):
        cells = [c.ljust(widths[i]) for i, c in enumerate(row)]
        if colour and _STATE_COLOURS.get(w["state"]):
            cells[1] = click.style(cells[1], fg=_STATE_COLOURS[w["state"]])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {\"workers\": [...]}.")
@click.argument("names", nargs=-1)
@click.pass_obj
def status(ctl: Ctl, as_json: bool, names: tuple[str, ...]) -> None:
    """Show every worker (or the NAMES given)."""
    data = ctl.call("GET", "/status")
    workers = data["workers"]
    if names:
        workers = [w for w in workers if w["name"] in names or w["service"] in names]
        if not workers:
            _fail(f"no worker or service named {', '.join(names)}", EXIT_USAGE)
    if as_json:
        click.echo(_mask(json.dumps({"workers": workers}, indent=2)))
        return
    if not workers:
        click.echo("no workers configured")
        return
    click.echo(_mask(_status_table(workers, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))))


def _act(ctl: Ctl, action: str, names: tuple[str, ...], everything: bool, wait: bool,
         rolling: bool = False) -> None:
    if not names and not everything:
        _fail(f"name the workers or services to {action}, or give --all", EXIT_USAGE)
    body = {"names": list(names), "all": everything, "wait": wait, "rolling": rolling}
    data = ctl.call("POST", f"/{action}", body, timeout=None if (wait or rolling) else 30.0)
    failed = []
    for w in data["workers"]:
        click.echo(_mask(f"{w['name']}: {w['state']}" + (f" (pid {w['pid']})" if w["pid"] else "")))
        if wait and action != "stop" and w["state"] not in ("running",):
            failed.append(w["name"])
        if wait and action == "stop" and w["state"] not in ("stopped", "fatal"):
            failed.append(w["name"])
    if failed:
        _fail(f"not {'stopped' if action == 'stop' else 'running'}: {', '.join(failed)}")


_NAMES = click.argument("names", nargs=-1)
_ALL = click.option("--all", "everything", is_flag=True, help="Every worker.")
_WAIT = click.option("--wait", is_flag=True, help="Block until the workers are running (or stopped).")


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
@click.option("--rolling", is_flag=True, help="One replica at a time, each once the last is ready.")
@click.pass_obj
def restart(ctl: Ctl, names: tuple[str, ...], everything: bool, wait: bool, rolling: bool) -> None:
    """Restart workers or services."""
    _act(ctl, "restart", names, everything, wait, rolling)


@main.command()
@click.pass_obj
def reload(ctl: Ctl) -> None:
    """Reload the config; report what changed (nothing changes on error)."""
    data = ctl.call("POST", "/reload", {}, timeout=None)
    for key in ("added", "removed", "changed"):
        if data.get(key):
            click.echo(f"{key}: {', '.join(data[key])}")
    if not any(data.get(k) for k in ("added", "removed", "changed")):
        click.echo("no changes")


@main.command()
@click.argument("name")
@click.option("-n", "lines", type=int, default=100, show_default=True, help="Recent lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.pass_obj
def logs(ctl: Ctl, name: str, lines: int, follow: bool) -> None:
    """Show a worker's recent output (from its in-memory ring)."""
    from urllib.parse import quote

    try:
        for line in ctl.stream(f"/logs/{quote(name)}?n={lines}&follow={int(follow)}"):
            click.echo(_mask(line))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing events (the default streams forever).")
@click.pass_obj
def events(ctl: Ctl, follow: bool) -> None:
    """Stream worker events (state changes, exits, restarts) as JSON lines."""
    try:
        for line in ctl.stream("/events"):
            click.echo(_mask(line))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def plugins(ctl: Ctl, as_json: bool) -> None:
    """List plugins: name, version, hooks, and why one failed to load."""
    data = ctl.call("GET", "/plugins")
    if as_json:
        click.echo(_mask(json.dumps(data, indent=2)))
        return
    for p in data["plugins"]:
        version = f"{p['distribution']} {p['version']}" if p["distribution"] else "-"
        click.echo(f"{p['name']:<16} {p['status']:<9} {version}")
        if p["hooks"]:
            click.echo(f"  hooks: {', '.join(p['hooks'])}")
        if p["error"]:
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
