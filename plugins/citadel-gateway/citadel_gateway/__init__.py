"""citadel-gateway: one OpenAI-compatible front door for the workers citadeld runs.

The plugin (``service.py``) adds the ``gateway`` service type; citadeld runs
the gateway process (``python -m citadel_gateway``) as one of its workers.
"""

from __future__ import annotations

__version__ = "0.1.0"
