"""How a node reports its endpoints listening, or failing to: in-memory endpoints whose
``listen`` Deferred the test fires when it likes, so no socket is needed."""

from __future__ import annotations

import errno

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from swarm.node.node import SwarmNode


@implementer(IListeningPort)
class FakePort:
    def __init__(self, port: int) -> None:
        self.address = IPv4Address("TCP", "127.0.0.1", port)
        self.listening = True

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> Deferred:
        self.listening = False
        return succeed(None)


@implementer(IStreamServerEndpoint)
class PendingEndpoint:
    """``listen`` answers with a Deferred the test fires later (or ``now``, at once)."""

    def __init__(self, now: Deferred | None = None) -> None:
        self.now = now
        self.listens: list[Deferred] = []

    def listen(self, factory) -> Deferred:
        d = self.now if self.now is not None else Deferred()
        self.listens.append(d)
        return d


def busy(port: int) -> CannotListenError:
    return CannotListenError("127.0.0.1", port, OSError(errno.EADDRINUSE,
                                                        "Address already in use"))


@pytest.fixture
def critical_lines():
    """The text of every critical event logged during the test."""
    lines: list[str] = []

    def observe(event) -> None:
        if event.get("log_level") == LogLevel.critical:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def started(port, **options) -> SwarmNode:
    from twisted.internet import reactor

    node = SwarmNode(port, reactor=reactor, node_id="listener-test", **options)
    node.startService()
    return node


async def failure_of(d: Deferred) -> BaseException:
    with pytest.raises(Exception) as raised:
        await d
    return raised.value


@pytest_twisted.ensureDeferred
async def test_a_listen_that_fails_after_the_start_fails_when_listening_and_is_logged(
    critical_lines,
):
    endpoint = PendingEndpoint()
    node = started(endpoint)  # the start cannot know yet, and does not fail
    try:
        asked_before = node.when_listening()
        assert not asked_before.called
        endpoint.listens[0].errback(busy(8765))
        assert isinstance(await failure_of(asked_before), CannotListenError)
        assert isinstance(await failure_of(node.when_listening()), CannotListenError)
        assert critical_lines == ["cannot listen on 127.0.0.1:8765: Address already in use"]
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_a_late_failure_without_an_address_is_logged_with_the_endpoint(
    critical_lines,
):
    endpoint = PendingEndpoint()
    node = started(endpoint)
    try:
        endpoint.listens[0].errback(OverflowError("bind(): port must be 0-65535."))
        assert isinstance(await failure_of(node.when_listening()), OverflowError)
        [line] = critical_lines
        assert "PendingEndpoint" in line and "port must be 0-65535" in line, line
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_the_peer_port_failing_late_fails_when_listening_though_clients_listen(
    critical_lines,
):
    clients = PendingEndpoint(now=succeed(FakePort(8765)))
    peers = PendingEndpoint()
    node = started(clients, peer_port=peers)
    try:
        waiting = node.when_listening()
        assert not waiting.called, "fired before the peer port listens"
        peers.listens[0].errback(busy(8766))
        assert isinstance(await failure_of(waiting), CannotListenError)
        assert critical_lines == ["cannot listen on 127.0.0.1:8766: Address already in use"]
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_a_listen_that_succeeds_late_fires_when_listening_with_the_client_port():
    clients, peers = PendingEndpoint(), PendingEndpoint()
    node = started(clients, peer_port=peers)
    try:
        waiting = node.when_listening()
        peers.listens[0].callback(FakePort(8766))
        assert not waiting.called, "fired before the client port listens"
        port = FakePort(8765)
        clients.listens[0].callback(port)
        assert await waiting is port
        assert await node.when_listening() is port
    finally:
        await node.stopService()
    assert not port.listening


@pytest_twisted.ensureDeferred
async def test_stopping_while_still_listening_cancels_it_without_a_critical_line(
    critical_lines,
):
    endpoint = PendingEndpoint()
    node = started(endpoint)
    waiting = node.when_listening()
    await node.stopService()
    assert isinstance(await failure_of(waiting), CancelledError)
    assert endpoint.listens[0].called
    assert critical_lines == []
    with pytest.raises(RuntimeError, match="not started"):
        node.when_listening()


def test_a_listen_that_fails_at_once_fails_the_start_and_logs_nothing_critical(
    critical_lines,
):
    with pytest.raises(CannotListenError):
        started(PendingEndpoint(now=fail(busy(8765))))
    assert critical_lines == []  # the caller has the exception (twistd prints one line)
