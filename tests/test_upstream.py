"""Unit tests of swarm.mesh.dialer: the retry policy, what the log says about a peer
that cannot be reached, and peer URLs; no sockets."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from twisted.application.internet import ClientService
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TCPTimedOutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from swarm.mesh.dialer import (
    SUMMARY_INTERVAL,
    Reachability,
    RetryPolicy,
    Upstream,
    peer_endpoint_description,
)
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


def test_refused_connects_back_off_to_at_most_two_seconds():
    """Nothing listens at the peer yet: redialling costs nothing, so the delay stays
    low instead of growing past the moment it starts (issue 11)."""
    policy = RetryPolicy(initial=0.5, maximum=30.0, rng=TOP)
    policy.refused = True
    assert [policy(n) for n in (1, 2, 3, 6, 40, 10**6)] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    policy.rng = BOTTOM
    assert [policy(n) for n in (1, 2, 3, 40)] == [0.5, 1.0, 1.0, 1.0]  # still jittered
    policy.handshake_failures = 9  # however often it refused this node's hello before
    assert policy(1) == 1.0
    policy.refused = False  # anything else: the long backoff, counting every failure
    assert policy(1) == 15.0 and policy(3) == 15.0
    policy.rng = TOP
    assert policy(0) == 30.0


@pytest.fixture
def events() -> Iterator[list[dict]]:
    """The log events that pass swarmcache's level filter (info and above)."""
    found: list[dict] = []
    globalLogPublisher.addObserver(found.append)
    yield found
    globalLogPublisher.removeObserver(found.append)


def said(events: list[dict], *words: str) -> list[str]:
    lines = [formatEvent(e) for e in events]
    return [line for line in lines if all(w in line for w in words)]


def test_an_unreachable_peer_is_logged_once_then_summed_up_then_reached(events):
    clock = task.Clock()
    reach = Reachability("ws://peer:1/peer", clock, interval=60.0)
    assert reach.failed("Connection refused.") is True
    quiet = []
    for _ in range(59):  # one attempt a second for a minute: not a line more
        clock.advance(1.0)
        quiet.append(reach.failed("Connection refused."))
    assert not any(quiet)
    assert said(events, "cannot reach peer ws://peer:1/peer: Connection refused.")
    assert len(events) == 1 and events[0]["log_level"] == LogLevel.warn
    clock.advance(1.0)
    assert reach.failed("User timeout caused connection failure.") is True
    assert said(events, "peer ws://peer:1/peer still unreachable: 61 attempts failed in 60 "
                "s, the last: User timeout caused connection failure.")
    clock.advance(30.0)
    assert reach.failed("Connection refused.") is False  # the next summary: at 120 s
    clock.advance(1.5)
    reach.reached()
    assert said(events, "reached peer ws://peer:1/peer after 62 failed attempts in 91.5 s")
    assert len(events) == 3
    reach.reached()  # a peer reached at the first attempt: nothing to say
    assert len(events) == 3
    assert reach.failed("Connection refused.") is True  # unreachable once more
    assert len(said(events, "cannot reach peer")) == 2
    clock.advance(1.0)
    reach.reached()  # soon: the overlay's "link to ... up" says enough
    assert len(events) == 4 and reach.failures == 0


def dialling(reactor: MemoryReactorClock) -> Upstream:
    """An Upstream dialling ws://127.0.0.1:9 on ``reactor``, its jitter at its ceiling."""
    overlay = Overlay("me", "s", 2, reactor)
    upstream = Upstream("ws://127.0.0.1:9", overlay, reactor, 10.0, 5.0)
    upstream.policy.rng = TOP
    upstream.startService()
    return upstream


def fail_connect(reactor: MemoryReactorClock, error: Exception) -> float:
    """Fail the connect in progress with ``error``; the delay until the next, which
    is then made."""
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(error))
    (retry,) = reactor.getDelayedCalls()
    delay = retry.getTime() - reactor.seconds()
    attempts = len(reactor.tcpClients)
    reactor.advance(delay)
    assert len(reactor.tcpClients) == attempts + 1  # it dialled again
    return delay


def test_an_upstream_redials_a_refusing_peer_every_second_or_two_and_says_so_once(events):
    """A peer that does not listen yet: two minutes of refused connects make one warning,
    one retry line, one summary; not a pair of lines every second or two."""
    reactor = MemoryReactorClock()
    upstream = dialling(reactor)
    delays = []
    while reactor.seconds() < 2 * SUMMARY_INTERVAL + 5:  # tries at 0, 1, 3, 5... 125 s
        delays.append(fail_connect(reactor, ConnectionRefusedError()))
    assert delays[:3] == [1.0, 2.0, 2.0] and set(delays[3:]) == {2.0}
    url = "ws://127.0.0.1:9/peer"
    assert len(said(events, f"cannot reach peer {url}: Connection was refused")) == 1
    assert len(said(events, f"peer {url} still unreachable: 32 attempts failed in 61 s")) == 1
    assert len(said(events, "still unreachable: 62 attempts failed in 121 s")) == 1
    assert len(said(events, f"Scheduling retry 1 to connect {url} in 1.0 seconds")) == 1
    assert len(said(events, "Scheduling retry")) == 3  # each with a line that says why
    assert len(events) == 6

    # a peer that does not answer at all keeps the long backoff
    assert fail_connect(reactor, TCPTimedOutError()) == 30.0
    assert len(events) == 6

    # the peer answers at last: the backoff starts again from the bottom
    factory = reactor.tcpClients[-1][2]
    factory.buildProtocol(None).makeConnection(StringTransport())
    assert said(events, f"reached peer {url} after 64 failed attempts in 155.0 s")
    assert not upstream.policy.refused and not upstream.quiet_retry
    upstream.stopService()


def test_stopping_while_it_dials_says_nothing_of_an_unreachable_peer(events):
    reactor = MemoryReactorClock()
    upstream = dialling(reactor)
    upstream.stopService()
    assert reactor.connectors[-1].stoppedConnecting
    assert events == [] and upstream.reachability.failures == 0


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
