"""Nagle's algorithm is off on every socket a node uses (issue 9): peer links carry
small requests that wait for small replies, and with Nagle on, a reply sent while an
earlier one is unacknowledged waits for the delayed ACK (up to 40 ms on Linux).

Autobahn sets TCP_NODELAY in ``connectionMade`` from the protocol's ``tcpNoDelay``
before it copies its options from the factory, so a protocol that does not define it
silently keeps Nagle on; the sockets are read back with ``getsockopt``.
"""

from __future__ import annotations

import socket

import pytest_twisted
from conftest import start_swarm, stop_all, until

from swarm.client.connection import SwarmClient


def nodelay(protocol) -> int:
    return _option(protocol.transport)


def _option(transport) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def dialling_end(accepted) -> int:
    """TCP_NODELAY of the socket at the other end of the accepted connection
    ``accepted`` (its client's), found among the reactor's readers by its port."""
    from twisted.internet import reactor

    port = accepted.transport.getPeer().port
    ends = [t for t in reactor.getReaders()
            if getattr(t, "getHost", None) and getattr(t.getHost(), "port", None) == port
            and hasattr(t, "getPeer")]
    assert len(ends) == 1, ends
    return _option(ends[0])


@pytest_twisted.ensureDeferred
async def test_both_ends_of_peer_links_and_client_connections_disable_nagle():
    nodes = await start_swarm(2, [(1, 0)])
    client = await SwarmClient.connect(nodes[0].url)
    try:
        await until(lambda: nodes[0].client_factory.connections, what="the client connection")
        dialled = [p for u in nodes[1].upstreams for p in u.factory.connections]
        accepted = list(nodes[0].peer_factory.connections)
        served = list(nodes[0].client_factory.connections)
        assert dialled and accepted and served
        assert [nodelay(p) for p in dialled + accepted + served] == [1] * (
            len(dialled) + len(accepted) + len(served))
        assert [dialling_end(p) for p in served] == [1] * len(served)  # SwarmClient
    finally:
        await client.close()
        await stop_all(nodes)
