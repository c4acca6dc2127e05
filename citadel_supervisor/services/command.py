"""The ``command`` service type: any program, as an argv list (a shell only if asked)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .. import hookimpl
from ..config import ServiceConfig
from .base import ServiceType, SpawnSpec, WorkerInfo


class CommandConfig(ServiceConfig):
    """``type = "command"``: ``command = ["prog", "arg", ...]``."""

    command: list[str] | str = Field(description="an argv list; a string only with shell = true")
    shell: bool = Field(False, description="run command through /bin/sh -c")
    port: int | None = Field(
        None, ge=0, le=65535,
        description="the port it listens on (replica N gets port + N); 0 allocates one",
    )

    @field_validator("command")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _program_exists(self, info: ValidationInfo) -> CommandConfig:
        if isinstance(self.command, str) and not self.shell:
            raise ValueError(
                "command: a string needs shell = true (to run it through /bin/sh); "
                "or give an argv list (['prog', 'arg'])"
            )
        if self.shell:
            return self
        program = self.command[0]
        base = (info.context or {}).get("base_dir") if info.context else None
        cwd = self.cwd if self.cwd is None or self.cwd.is_absolute() else (base or Path()) / self.cwd
        if "/" in program:
            path = Path(program) if Path(program).is_absolute() else (cwd or base or Path()) / program
            if not path.exists():
                raise ValueError(f"command[0]: {program} does not exist")
            if not path.is_file() or not shutil.which(str(path)):
                raise ValueError(f"command[0]: {program} is not an executable file")
        elif shutil.which(program, path=self.env.get("PATH")) is None:
            raise ValueError(f"command[0]: {program!r} is not found on PATH")
        return self

    def port_for(self, replica: int) -> int | None:
        """``port + replica``, or 0 to allocate, or None."""
        if self.port is None or self.port == 0:
            return self.port
        return self.port + replica


class CommandService(ServiceType):
    """Runs ``command`` with ``cwd`` and ``env``; ``health`` says when it is ready."""

    name = "command"
    config_model = CommandConfig

    def spawn_spec(self, worker: WorkerInfo) -> SpawnSpec:
        """The argv as configured (``/bin/sh -c`` only with ``shell = true``)."""
        config = worker.config
        assert isinstance(config, CommandConfig)
        if config.shell:
            script = config.command if isinstance(config.command, str) else " ".join(config.command)
            argv = ["/bin/sh", "-c", script]
        else:
            argv = list(config.command)
        env = dict(config.env)
        if worker.port is not None:
            env.setdefault("PORT", str(worker.port))
        return SpawnSpec(argv=argv, env=env, cwd=config.cwd)


@hookimpl
def citadel_service_types() -> list[ServiceType]:
    """The ``command`` type."""
    return [CommandService()]
