"""Unit tests of swarm.mesh.dialer: the retry policy and peer URLs; no sockets."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from twisted.application.internet import ClientService
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from swarm.mesh.dialer import RetryPolicy, Upstream, peer_endpoint_description
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import CLOSE_DUPLICATE_ID, hello
from swarm.mesh.session import PeerSession

TOP = lambda: 1.0  # noqa: E731  the jitter at its ceiling
BOTTOM = lambda: 0.0  # noqa: E731  the jitter at its floor


# -- RetryPolicy -------------------------------------------------------------------------


def test_delays_grow_exponentially_with_failed_connects():
    policy = RetryPolicy(initial=0.5, maximum=1000.0, rng=TOP)
    assert [policy(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_handshake_failures_count_like_failed_connects():
    policy = RetryPolicy(initial=0.5, maximum=1000.0, rng=TOP)
    # ClientService starts counting again at every TCP connect: a peer that accepts TCP
    # but fails the handshake always reports one failed connect
    delays = []
    for failures in range(6):
        policy.handshake_failures = failures
        delays.append(policy(1))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    policy.handshake_failures = 3
    assert policy(2) == policy(5) / 8 == 0.5 * 2**5  # the two counts add up


def test_delays_are_capped_at_the_maximum():
    policy = RetryPolicy(initial=0.5, maximum=30.0, rng=TOP)
    assert [policy(n) for n in (5, 6, 7, 40, 10**6)] == [16.0, 30.0, 30.0, 30.0, 30.0]
    policy.handshake_failures = 10**9  # no overflow however long a peer stays bad
    assert policy(10**9) == 30.0


def test_jitter_stays_between_half_and_all_of_the_ceiling():
    assert RetryPolicy(initial=1.0, maximum=30.0, rng=BOTTOM)(3) == 4.0
    assert RetryPolicy(initial=1.0, maximum=30.0, rng=TOP)(3) == 8.0
    assert RetryPolicy(initial=1.0, maximum=30.0, rng=lambda: 0.5)(3) == 6.0
    assert RetryPolicy(initial=1.0, maximum=30.0, rng=BOTTOM)(10) == 15.0
    rng = random.Random(7)
    policy = RetryPolicy(initial=0.5, maximum=30.0, rng=rng.random)
    for attempts in range(12):
        ceiling = min(30.0, 0.5 * 2**attempts)
        delays = [policy(attempts) for _ in range(200)]
        assert all(0.5 * ceiling <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > 0.3 * ceiling  # it does jitter


def test_the_default_rng_jitters_within_bounds():
    policy = RetryPolicy()
    delays = [policy(2) for _ in range(200)]
    ceiling = policy.initial * 4
    assert all(0.5 * ceiling <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100


def test_a_reset_brings_the_delays_back_down():
    policy = RetryPolicy(initial=0.5, maximum=30.0, rng=TOP)
    policy.handshake_failures = 12
    assert policy(1) == 30.0
    policy.handshake_failures = 0
    assert policy(1) == 1.0


class OneShotEndpoint:
    """An endpoint whose every connect succeeds at once, over a StringTransport."""

    def __init__(self) -> None:
        self.protocols: list = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


def test_with_client_service_handshake_failures_back_off_until_a_link_is_up():
    """The pitfall: ClientService resets its count on every TCP connect. With the policy
    counting handshake failures (through Upstream's own hooks), the redials slow down."""
    clock = task.Clock()
    endpoint = OneShotEndpoint()
    upstream = SimpleNamespace(url="ws://peer:1", peer_id=None,
                               policy=RetryPolicy(initial=0.5, maximum=30.0, rng=TOP))
    service = ClientService(endpoint, Factory.forProtocol(Protocol),
                            retryPolicy=upstream.policy, clock=clock)
    service.startService()

    def drop_before_hello() -> float:
        Upstream._handshake_failed(upstream, "closed (1006)")
        endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
        (retry,) = clock.getDelayedCalls()
        delay = retry.getTime() - clock.seconds()
        clock.advance(delay)  # redials, and connects
        return delay

    delays = [drop_before_hello() for _ in range(7)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert len(endpoint.protocols) == 8

    Upstream._linked(upstream, SimpleNamespace(peer="n7"))  # hello accepted
    assert upstream.peer_id == "n7"
    endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
    (retry,) = clock.getDelayedCalls()
    assert retry.getTime() - clock.seconds() == 1.0
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_only_a_peer_that_accepted_this_node_resets_the_backoff():
    """This node accepts the peer's hello before it knows whether the peer accepts its
    own: a peer that then refuses it (a duplicate id) must count as a failed handshake,
    or a refused node would redial every half second for ever."""
    clock = task.Clock()
    upstream = SimpleNamespace(url="ws://hub:1", peer_id=None,
                               policy=RetryPolicy(initial=0.5, maximum=30.0, rng=TOP))
    overlay = Overlay("dup", "s", 2, clock)

    def dial() -> PeerSession:
        session = PeerSession(
            overlay, lambda messages: None, lambda code, reason: None,
            on_linked=lambda link: Upstream._linked(upstream, link),
            on_failed=lambda reason: Upstream._handshake_failed(upstream, reason),
        )
        session.start()
        session.received([hello("hub", "s", 1)])
        return session

    for refusals in (1, 2, 3):
        dial().connection_lost("node id 'dup' is already live", CLOSE_DUPLICATE_ID)
        assert upstream.policy.handshake_failures == refusals and upstream.peer_id is None
    assert upstream.policy(1) == 8.0
    accepted = dial()
    accepted.received([{"t": "lsa", "anns": []}])  # the hub's answer: it accepted us
    assert upstream.peer_id == "hub" and upstream.policy.handshake_failures == 0
    accepted.connection_lost("closed (1006)", 1006)  # a link lost later is no refusal
    assert upstream.policy.handshake_failures == 0


# -- peer URLs ---------------------------------------------------------------------------


def dialled(description: str) -> tuple[str, int]:
    """Where a Twisted client endpoint built from ``description`` would connect."""
    reactor = MemoryReactorClock()
    clientFromString(reactor, description).connect(Factory.forProtocol(Protocol))
    host, port = reactor.tcpClients[0][:2]
    return host, port


@pytest.mark.parametrize(
    "url,description,ws_url,target",
    [
        ("ws://example.net:9000", "tcp:host=example.net:port=9000:timeout=5",
         "ws://example.net:9000/peer", ("example.net", 9000)),
        ("ws://10.0.0.7", "tcp:host=10.0.0.7:port=80:timeout=5",
         "ws://10.0.0.7:80/peer", ("10.0.0.7", 80)),
        ("ws://Node-1.local:8765/", "tcp:host=node-1.local:port=8765:timeout=5",
         "ws://node-1.local:8765/peer", ("node-1.local", 8765)),
    ],
)
def test_ws_urls(url, description, ws_url, target):
    assert peer_endpoint_description(url) == (description, ws_url)
    assert dialled(description) == target


@pytest.mark.parametrize(
    "url,description,ws_url",
    [
        ("wss://example.net", "tls:host=example.net:port=443:timeout=5",
         "wss://example.net:443/peer"),
        ("wss://example.net:8443", "tls:host=example.net:port=8443:timeout=5",
         "wss://example.net:8443/peer"),
    ],
)
def test_wss_urls(url, description, ws_url):
    assert peer_endpoint_description(url) == (description, ws_url)


def test_ipv6_url_keeps_its_brackets():
    description, ws_url = peer_endpoint_description("ws://[::1]:9000")
    assert ws_url == "ws://[::1]:9000/peer"
    assert peer_endpoint_description("wss://[2001:db8::5]")[1] == "wss://[2001:db8::5]:443/peer"


def test_ipv6_url_dials_the_right_host_and_port():
    description, _ = peer_endpoint_description("ws://[::1]:9000")
    assert dialled(description) == ("::1", 9000)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.net:9000", "https://example.net", "ftp://example.net",
        "example.net:9000", "//example.net:9000", "ws://", "ws://:9000", "wss://:443",
        "", "ws:example.net", "ws://example.net:99999", "ws://example.net:port",
    ],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        peer_endpoint_description(url)
