"""The node's HTTP face: one twisted.web Site for clients, peers and health checks.

``/`` upgrades to the client WebSocket protocol (a plain ``GET /`` gets the status page
of ``/status``, :mod:`swarm.edge.status`), ``/peer`` to the peer protocol, and a
plain ``GET /health`` answers a small JSON document: 200 while serving, 503 otherwise
(``"status": "stopping"``, or ``"conflict"`` with a ``reason`` while the swarm refuses
the node's id because another live node has it).

Every connection, whatever its path, counts against ``max_connections`` and must send a
whole request within ``handshake_timeout``; ``/`` also checks client tokens and browser
origins (:mod:`swarm.edge.admission`), and so does ``GET /metrics`` (Prometheus,
:mod:`swarm.node.metrics`). ``/peer`` and ``/health`` take no token.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import notFound
from twisted.web.resource import Resource

from swarm.edge.admission import Admission, AdmittingSite, GuardedResource
from swarm.edge.status import ClientOrPage, StatusResource
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
    metrics: Resource | None = None,
) -> "NodeSite":
    """The node's Site: clients, peers or both (a ``--peer-port`` splits them).
    ``metrics`` answers ``GET /metrics`` on a client site, behind its tokens.

    Raises ValueError when the client token file cannot be read or holds no token.
    """
    root = _Root()
    # A peer-only site has no clients to admit.
    admission = Admission.from_config(config) if client_factory is not None else Admission()
    if client_factory is not None:
        client_factory.admission = admission  # who may run admin ops
        status = StatusResource(admission)
        websocket = GuardedResource(WebSocketResource(client_factory), admission)
        root.putChild(b"", ClientOrPage(websocket, status.page))
        root.putChild(b"status", status)
        if metrics is not None:
            root.putChild(b"metrics", GuardedResource(metrics, admission))
    if peer_resource is not None:
        root.putChild(b"peer", GuardedResource(peer_resource))  # peers: no token, no Origin
    root.putChild(b"health", HealthResource(health))
    return NodeSite(root, admission, config, clock)


def build_metrics_site(metrics: Resource, config: NodeConfig, clock: Any) -> "NodeSite":
    """The Site of ``--metrics-port``: ``GET /metrics`` alone, with no token (it is
    meant for an internal interface)."""
    root = _Root()
    root.putChild(b"metrics", metrics)
    return NodeSite(root, Admission(), config, clock)


class _Root(Resource):
    def getChild(self, path: bytes, request) -> Resource:
        return notFound()


class NodeSite(AdmittingSite):
    """No access log: load balancers probe /health every few seconds.

    ``admission.reload()`` rereads the client token file (SIGHUP).
    """

    noisy = False

    def __init__(self, root: Resource, admission: Admission, config: NodeConfig,
                 clock: Any) -> None:
        super().__init__(root, max_connections=config.max_connections,
                         handshake_timeout=config.handshake_timeout, clock=clock)
        self.admission = admission

    def log(self, request) -> None:
        pass
