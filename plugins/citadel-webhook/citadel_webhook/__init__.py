"""citadel-webhook: posts Citadel's worker events to HTTP endpoints, signed with HMAC-SHA256.

The plugin object citadeld loads is ``citadel_webhook.plugin:plugin`` (entry
point ``webhook`` in the ``citadel`` group); its settings are the
``[plugin.webhook]`` table, validated by ``WebhookConfig``.
"""

from __future__ import annotations

from .config import WebhookConfig
from .signing import SIGNATURE_HEADER, sign, verify

__version__ = "0.1.0"

__all__ = ["SIGNATURE_HEADER", "WebhookConfig", "__version__", "sign", "verify"]
