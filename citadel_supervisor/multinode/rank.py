"""Who a worker is in a multinode group: its rank and node, and the group as its citadeld sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config.models import MultinodeConfig

#: Variables every rank is spawned with.
RANK_ENV = ("CITADEL_GROUP_RANK", "CITADEL_GROUP_SIZE", "CITADEL_GROUP_GENERATION",
            "CITADEL_GROUP_MASTER_ADDR", "CITADEL_GROUP_MASTER_PORT")


@dataclass
class GroupRank:
    """One rank of a multinode service, as its citadeld runs it."""

    service: str
    rank: int
    node: str
    config: MultinodeConfig
    #: The generation this rank was last spawned for (0: never).
    generation: int = 0
    #: The group's state as this node sees it: stopped, starting, ready, restarting,
    #: waiting (for a lost node), fatal.
    group_state: str = "stopped"
    group_generation: int = 0
    group_ready: bool = False
    #: Gang restarts the head made.
    group_restarts: int = 0
    #: Each other node's last report, with ``reachable`` and ``age`` (seconds since it answered).
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, service: str, config: MultinodeConfig, node: str) -> GroupRank | None:
        """``node``'s rank in the service's group, or None if the group does not list it."""
        names = [n.name for n in config.nodes]
        if node not in names:
            return None
        return cls(service, names.index(node), node, config)

    @property
    def is_head(self) -> bool:
        """Rank 0: it serves the API and numbers the generations."""
        return self.rank == 0

    @property
    def size(self) -> int:
        """How many ranks the group has."""
        return len(self.config.nodes)

    @property
    def master_addr(self) -> str:
        """Rank 0's address: where the other ranks join the group."""
        return self.config.nodes[0].address

    def env(self) -> dict[str, str]:
        """The variables a rank of this generation is spawned with."""
        values = (self.rank, self.size, self.generation, self.master_addr, self.config.master_port)
        return dict(zip(RANK_ENV, (str(v) for v in values)))

    def to_json(self) -> dict[str, Any]:
        """What ``citadelctl status`` shows of the group."""
        return {
            "rank": self.rank, "node": self.node, "size": self.size, "generation": self.generation,
            "group": {"state": self.group_state, "generation": self.group_generation,
                      "ready": self.group_ready, "restarts": self.group_restarts},
            "nodes": [{"rank": i, "name": n.name, "address": n.address,
                       **({"peer": self.peers[n.name]} if n.name in self.peers else {})}
                      for i, n in enumerate(self.config.nodes)],
        }
