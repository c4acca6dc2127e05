"""Citadel: a supervisor for self-hosted LLM servers.

The public plugin API is what this module exports: the ``hookimpl`` marker
that plugins decorate their hooks with, and the version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pluggy

__version__ = "0.1.0"

#: The project name; also the entry-point group and the pluggy marker name.
PROJECT_NAME = "citadel"

#: Decorate plugin functions with this to implement a hook from ``hookspecs``.
hookimpl: pluggy.HookimplMarker


def __getattr__(name: str) -> object:
    # ``hookimpl`` is made on first use: importing pluggy costs citadelctl, which loads no
    # plugins, a good part of its start-up time (bench/bench_ctl_status.py).
    if name == "hookimpl":
        import pluggy

        marker = pluggy.HookimplMarker(PROJECT_NAME)
        globals()["hookimpl"] = marker
        return marker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
