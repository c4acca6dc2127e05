"""``citadeld``: run the supervisor in the foreground, or ``--check`` a config."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

DEFAULT_CONFIG = "/etc/citadel/citadeld.toml"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), default=DEFAULT_CONFIG,
              show_default=True, envvar="CITADEL_CONFIG", help="The TOML config file.")
@click.option("--check", is_flag=True, help="Validate the config and exit: 0 valid, 1 invalid.")
@click.option("--log-level", type=click.Choice(["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False),
              help="Overrides daemon.log_level.")
@click.option("--log-format", type=click.Choice(["auto", "console", "journal", "json"]),
              help="Overrides daemon.log_format.")
@click.version_option(package_name="citadel-supervisor")
def main(config_path: Path, check: bool, log_level: str | None, log_format: str | None) -> None:
    """Supervise LLM servers and other workers, as the config says."""
    from ..config import ConfigError
    from ..daemon import Daemon, disabled_plugins, load_and_plan
    from ..gpu import detect_gpus
    from ..logs.daemon_log import setup_logging
    from ..logs.masking import masker
    from ..plugins import load_plugins

    setup_logging((log_level or "INFO").upper(), log_format or "auto")
    registry = load_plugins(disabled_plugins(config_path))
    gpus = detect_gpus()
    try:
        config, allocation = load_and_plan(config_path, registry, gpus)
    except ConfigError as exc:
        click.echo(masker.mask(f"citadeld: invalid config:\n{exc}"), err=True)
        sys.exit(1)
    masker.add_secrets(config.secrets)
    if check:
        failed = [r.name for r in registry.records.values() if r.status == "failed"]
        gpu_note = (f"{len(gpus.inventory.gpus)} GPUs" if gpus.inventory
                    else f"no GPU ({gpus.reason}): workers run on the CPU")
        click.echo(f"{config_path}: OK ({len(config.services)} services; {gpu_note}"
                   + (f"; plugins that failed to load: {', '.join(failed)}" if failed else "") + ")")
        sys.exit(0)
    setup_logging((log_level or config.daemon.log_level).upper(), log_format or config.daemon.log_format)
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(Daemon(config_path, config, registry, gpus, allocation).run())
    except (OSError, RuntimeError) as exc:
        click.echo(masker.mask(f"citadeld: {exc}"), err=True)
        sys.exit(1)
    # Every worker is stopped and every log and state file is flushed: exit now, so that
    # no leftover task or library thread (an executor thread blocked in a system call)
    # can hold the process, and systemd's stop, up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
