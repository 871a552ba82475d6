"""The embedding API's stable name: ``from swarm.service import SwarmNode``."""

from swarm.node.node import SwarmNode, endpoint_description

__all__ = ["SwarmNode", "endpoint_description"]
