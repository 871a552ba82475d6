"""One reconnecting link per ``--peer``: a ClientService with a retry policy of its own.

``ClientService`` counts only failed TCP connects, and starts again from zero on every
connect, so a peer that accepts TCP but fails or refuses the WebSocket handshake would
be redialled every couple of seconds forever. The policy here also counts handshake
failures and resets only once a link is really up (the peer accepted this node's hello),
with exponential backoff and jitter so a swarm restarting at once does not redial in
lockstep. A node refused because its id is still live in the swarm (a restart before its
old links were noticed dead) keeps trying on that backoff, and rejoins once they are.
"""

from __future__ import annotations

import random
from urllib.parse import urlsplit

from twisted.application.internet import ClientService
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from swarm.logs import logger
from swarm.mesh.link import PeerLink
from swarm.mesh.overlay import Overlay
from swarm.mesh.protocol import PeerClientFactory
from swarm.protocol.urls import ws_client_endpoint

_log = logger(__name__)

#: Seconds to wait for TCP to connect to a peer.
CONNECT_TIMEOUT = 5


def peer_endpoint_description(url: str) -> tuple[str, str]:
    """(Twisted client endpoint description, WebSocket URL at /peer) for ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"a peer URL looks like ws://host:port, not {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    peer_url = f"{parts.scheme}://{netloc}:{port}/peer"
    return ws_client_endpoint(peer_url, CONNECT_TIMEOUT), peer_url


class RetryPolicy:
    """Exponential backoff with full jitter over connect *and* handshake failures."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng=random.random):
        self.initial = initial
        self.maximum = maximum
        self.rng = rng
        self.handshake_failures = 0

    def __call__(self, failed_connects: int) -> float:
        attempts = failed_connects + self.handshake_failures
        ceiling = min(self.maximum, self.initial * 2 ** min(attempts, 32))
        return round(ceiling * (0.5 + 0.5 * self.rng()), 3)


@implementer(IStreamClientEndpoint)
class _PeerEndpoint:
    """The peer's endpoint, named by its URL in ClientService's retry lines, and saying
    why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, url: str) -> None:
        self._endpoint = endpoint
        self._url = url

    def connect(self, factory):
        return self._endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure):
        _log.warn("cannot reach peer {url}: {reason}", url=self._url,
                  reason=failure.getErrorMessage())
        return failure

    def __repr__(self) -> str:
        return self._url


class Upstream(ClientService):
    """Keeps a link to one configured peer URL."""

    def __init__(self, url: str, overlay: Overlay, reactor, ping_interval: float,
                 ping_timeout: float) -> None:
        description, ws_url = peer_endpoint_description(url)
        self.url = url
        self.policy = RetryPolicy()
        self.peer_id: str | None = None
        factory = PeerClientFactory(
            ws_url, overlay, ping_interval, ping_timeout,
            on_linked=self._linked, on_handshake_failed=self._handshake_failed,
        )
        self.factory = factory
        super().__init__(
            _PeerEndpoint(clientFromString(reactor, description), ws_url), factory,
            retryPolicy=self.policy, clock=reactor,
        )

    def _linked(self, link: PeerLink) -> None:
        self.policy.handshake_failures = 0
        self.peer_id = link.peer

    def _handshake_failed(self, reason: str) -> None:
        self.policy.handshake_failures += 1
        _log.warn("link to {url} failed before it was accepted: {reason}", url=self.url,
                  reason=reason)
