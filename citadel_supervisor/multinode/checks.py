"""Config checks of multinode services that need the whole config: this node is one of each group's."""

from __future__ import annotations

from .. import hookimpl
from ..config import CitadelConfig, ConfigIssue


@hookimpl
def citadel_check_config(config: CitadelConfig) -> list[ConfigIssue]:
    """Each multinode service lists this citadeld's node (``daemon.node``)."""
    node = config.daemon.node_name()
    issues = []
    for name, service in config.services.items():
        if service.multinode is None:
            continue
        names = [n.name for n in service.multinode.nodes]
        if node not in names:
            issues.append(ConfigIssue(None, f"services.{name}.multinode.nodes",
                                      f"this citadeld is node {node!r} (daemon.node, $CITADEL_NODE or the "
                                      f"host name), which is not one of {names}"))
    return issues
