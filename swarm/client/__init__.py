"""The Twisted client: a Deferred API over one WebSocket connection to any node."""

from swarm.client.connection import (
    ConnectionClosed,
    RequestTracker,
    SwarmClient,
)

__all__ = ["ConnectionClosed", "RequestTracker", "SwarmClient"]
