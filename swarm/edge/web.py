"""The node's HTTP face: one twisted.web Site for clients, peers and health checks.

``/`` upgrades to the client WebSocket protocol, ``/peer`` to the peer protocol, and a
plain ``GET /health`` answers a small JSON document: 200 while serving, 503 otherwise
(``"status": "stopping"``, or ``"conflict"`` with a ``reason`` while the swarm refuses
the node's id because another live node has it).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from swarm.node.config import NodeConfig


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, health: Callable[[], tuple[bool, dict]]) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request) -> bytes:
        serving, body = self._health()
        request.setResponseCode(200 if serving else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8")


def build_site(
    client_factory,
    peer_resource,
    health: Callable[[], tuple[bool, dict]],
    config: NodeConfig,
    clock: Any,
) -> Site:
    """The node's Site: clients, peers or both (a ``--peer-port`` splits them)."""
    root = _Root()
    if client_factory is not None:
        root.putChild(b"", WebSocketResource(client_factory))
    if peer_resource is not None:
        root.putChild(b"peer", peer_resource)
    root.putChild(b"health", HealthResource(health))
    return NodeSite(root)


class _Root(Resource):
    def getChild(self, path: bytes, request) -> Resource:
        return notFound()


class NodeSite(Site):
    """No access log: load balancers probe /health every few seconds."""

    noisy = False

    def log(self, request) -> None:
        pass
