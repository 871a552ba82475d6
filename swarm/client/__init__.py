"""The Python clients: Twisted (:class:`SwarmClient`, a Deferred API), asyncio
(:mod:`swarm.client.aio`) and blocking (:mod:`swarm.client.blocking`).

The Twisted names are imported on first use, so the asyncio and blocking clients load
without Twisted or Autobahn.
"""

from typing import Any

from swarm.client.frames import ConnectionClosed

__all__ = ["ConnectionClosed", "Pipeline", "RequestTracker", "SwarmClient"]

_TWISTED = ("Pipeline", "RequestTracker", "SwarmClient")


def __getattr__(name: str) -> Any:
    if name in _TWISTED:
        from swarm.client import connection

        return getattr(connection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
