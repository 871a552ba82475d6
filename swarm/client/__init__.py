"""The Twisted client: a Deferred API over one WebSocket connection to any node."""

from swarm.client.connection import (
    ConnectionClosed,
    Pipeline,
    RequestTracker,
    SwarmClient,
)

__all__ = ["ConnectionClosed", "Pipeline", "RequestTracker", "SwarmClient"]
