"""The Twisted client: a Deferred API over one WebSocket connection to any node."""

from swarm.client.connection import (
    ConnectionClosed,
    RequestTracker,
    SwarmClient,
    endpoint_description,
)

__all__ = ["ConnectionClosed", "RequestTracker", "SwarmClient", "endpoint_description"]
