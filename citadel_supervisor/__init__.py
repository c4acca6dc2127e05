"""Citadel: a supervisor for self-hosted LLM servers.

The public plugin API is what this module exports: the ``hookimpl`` marker
that plugins decorate their hooks with, and the version.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: The project name; also the entry-point group and the pluggy marker name.
PROJECT_NAME = "citadel"

#: Decorate plugin functions with this to implement a hook from ``hookspecs``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
