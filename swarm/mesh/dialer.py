"""One reconnecting link per ``--peer``: a ClientService with a retry policy of its own.

``ClientService`` counts only failed TCP connects, and starts again from zero on every
connect, so a peer that accepts TCP but fails or refuses the WebSocket handshake would
be redialled every couple of seconds forever. The policy here also counts handshake
failures and resets only once a link is really up (the peer accepted this node's hello),
with exponential backoff and jitter so a swarm restarting at once does not redial in
lockstep. A node refused because its id is still live in the swarm (a restart before its
old links were noticed dead) keeps trying on that backoff, and rejoins once they are.

A peer that refuses the TCP connection (it does not listen yet, or is restarting) is
the exception: redialling it costs next to nothing, so while that is the failure the
delay stays within ``RetryPolicy.refused_maximum`` (1-2 s with jitter) instead of growing
to 30 s, and a swarm started together links up as soon as each node listens rather than
when each dialler's backoff comes round (issue 11: 20 nodes took 36 s once on a busy
machine). The log says once that a peer cannot be reached, then sums up every
``SUMMARY_INTERVAL`` seconds while it stays so, and then says when it is reached;
ClientService's own line per retry comes with those lines (and with ``--log-level
debug``), not every second or two in between.

A ``wss://`` peer's certificate is verified against ``--peer-ca`` (or the system's trust
store) and must name the URL's host; a failed check counts as a failed handshake, and
the retry line says what TLS refused rather than Autobahn's "closed uncleanly".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from urllib.parse import urlsplit

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from swarm.logs import logger
from swarm.mesh.link import PeerLink
from swarm.mesh.overlay import Overlay
from swarm.mesh.protocol import PeerClientFactory, PeerClientProtocol
from swarm.protocol.urls import client_endpoint, ws_client_endpoint

_log = logger(__name__)

#: Seconds to wait for TCP to connect to a peer.
CONNECT_TIMEOUT = 5
#: Seconds between the lines that say a peer is still unreachable.
SUMMARY_INTERVAL = 60.0


def peer_endpoint_description(url: str) -> tuple[str, str]:
    """(Twisted client endpoint description, WebSocket URL at /peer) for ``url``; the
    description of a ``wss://`` URL trusts the system's store only (see Upstream)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"a peer URL looks like ws://host:port, not {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    peer_url = f"{parts.scheme}://{netloc}:{port}/peer"
    return ws_client_endpoint(peer_url, CONNECT_TIMEOUT), peer_url


def tls_failure(reason: Failure, host: str, trust: str) -> str | None:
    """Why TLS refused a connection to ``host``, for the log, or None when ``reason`` is
    no TLS failure; ``trust`` names what the certificate was checked against."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(VerificationError):
        mismatches = ", ".join(type(e).__name__ for e in reason.value.errors)
        return f"TLS: the peer's certificate is not for {host} ({mismatches})"
    if not reason.check(SSL.Error):
        return None
    errors = reason.value.args[0] if reason.value.args else []
    text = "; ".join(e[2] for e in errors if isinstance(e, tuple) and len(e) == 3) or str(
        reason.value)
    if "certificate verify failed" in text:
        text += f" (the peer's certificate is not signed by a CA in {trust})"
    return f"TLS handshake failed: {text}"


class _DialledPeerProtocol(PeerClientProtocol):
    """Says what TLS refused in the reason the session gets for a lost connection."""

    _tls_failure: str | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tls_failure = tls_failure(reason, self.factory.host, self.factory.trust)
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, self._tls_failure or reason)


class _DialFactory(PeerClientFactory):
    protocol = _DialledPeerProtocol
    #: What a wss:// peer's certificate is checked against, said in failures.
    trust = "the system's trust store"


class RetryPolicy:
    """Exponential backoff with full jitter over connect *and* handshake failures, at
    most ``maximum`` seconds; but at most ``refused_maximum`` while the last attempt
    was refused by the peer's TCP stack (``refused``), as nothing listens there yet."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0,
                 refused_maximum: float = 2.0, rng=random.random):
        self.initial = initial
        self.maximum = maximum
        self.refused_maximum = refused_maximum
        self.rng = rng
        self.handshake_failures = 0
        #: The last attempt's TCP connect was refused (ECONNREFUSED).
        self.refused = False

    def __call__(self, failed_connects: int) -> float:
        attempts = failed_connects + self.handshake_failures
        cap = self.refused_maximum if self.refused else self.maximum
        ceiling = min(cap, self.initial * 2 ** min(attempts, 32))
        return round(ceiling * (0.5 + 0.5 * self.rng()), 3)


class Reachability:
    """What the log says about failed connects to one peer: a warning when it becomes
    unreachable, a summary at most every ``interval`` seconds while it stays so, and
    after a summary a line when it is reached again; not a line per attempt, which at
    1-2 s apart would bury everything else."""

    def __init__(self, url: str, clock: IReactorTime,
                 interval: float = SUMMARY_INTERVAL) -> None:
        self.url = url
        self.clock = clock
        self.interval = interval
        #: Failed connects since the peer was last reached.
        self.failures = 0
        self._since = self._said = 0.0

    def failed(self, reason: str) -> bool:
        """Count a failed connect; whether the log said so."""
        now = self.clock.seconds()
        self.failures += 1
        if self.failures == 1:
            self._since = self._said = now
            _log.warn("cannot reach peer {url}: {reason}", url=self.url, reason=reason)
            return True
        if now - self._said < self.interval:
            return False
        self._said = now
        _log.warn("peer {url} still unreachable: {failures} attempts failed in {seconds:.0f} "
                  "s, the last: {reason}", url=self.url, failures=self.failures,
                  seconds=now - self._since, reason=reason)
        return True

    def reached(self) -> None:
        """A connect succeeded: said at info after an outage long enough for a summary
        (a shorter one ends with the overlay's "link to ... up")."""
        if self.failures:
            level = LogLevel.info if self._said > self._since else LogLevel.debug
            _log.emit(level, "reached peer {url} after {failures} failed attempts in "
                      "{seconds:.1f} s", url=self.url, failures=self.failures,
                      seconds=self.clock.seconds() - self._since)
        self.failures = 0


@implementer(IStreamClientEndpoint)
class _PeerEndpoint:
    """The peer's endpoint, named by its URL in ClientService's retry lines; each
    connection attempt ends in ``on_connected(protocol)`` or ``on_failed(failure)``,
    which return what they are given."""

    def __init__(self, endpoint: IStreamClientEndpoint, url: str, on_connected: Callable,
                 on_failed: Callable[[Failure], Failure]) -> None:
        self._endpoint = endpoint
        self._url = url
        self._on_connected = on_connected
        self._on_failed = on_failed

    def connect(self, factory):
        return self._endpoint.connect(factory).addCallbacks(self._on_connected,
                                                            self._on_failed)

    def __repr__(self) -> str:
        return self._url


class _RetryLines(Logger):
    """ClientService's logger in an Upstream (its ``source``): the line it writes for
    each retry ("Scheduling retry N to connect URL in D seconds.") goes out at debug
    after a failed connect that Reachability kept quiet about, so it comes with the
    lines that say what failed and not every second or two in between."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level == LogLevel.info and getattr(self.source, "quiet_retry", False):
            level = LogLevel.debug
        super().emit(level, format, **kwargs)


class Upstream(ClientService):
    """Keeps a link to one configured peer URL; a ``wss://`` peer's certificate is
    checked against the PEM file ``ca_file`` (None: the system's trust store)."""

    #: What ClientService logs through (as ``self._log``).
    _log = _RetryLines(observer=logger(__name__).observer)

    def __init__(self, url: str, overlay: Overlay, reactor, ping_interval: float,
                 ping_timeout: float, ca_file: str | None = None) -> None:
        _description, ws_url = peer_endpoint_description(url)
        self.url = url
        self.policy = RetryPolicy()
        self.reachability = Reachability(ws_url, reactor)
        #: The next retry follows a failed connect that the log did not mention.
        self.quiet_retry = False
        self.peer_id: str | None = None
        factory = _DialFactory(
            ws_url, overlay, ping_interval, ping_timeout,
            on_linked=self._linked, on_handshake_failed=self._handshake_failed,
        )
        if ca_file is not None:
            factory.trust = ca_file
        self.factory = factory
        endpoint = client_endpoint(reactor, ws_url, CONNECT_TIMEOUT, ca_file)
        super().__init__(
            _PeerEndpoint(endpoint, ws_url, self._connected, self._connect_failed), factory,
            retryPolicy=self.policy, clock=reactor,
        )

    def _connected(self, protocol):
        self.policy.refused = self.quiet_retry = False
        self.reachability.reached()
        return protocol

    def _connect_failed(self, reason: Failure) -> Failure:
        if reason.check(CancelledError, ConnectingCancelledError):
            return reason  # the service stops
        self.policy.refused = reason.check(ConnectionRefusedError) is not None
        self.quiet_retry = not self.reachability.failed(reason.getErrorMessage())
        return reason

    def _linked(self, link: PeerLink) -> None:
        self.policy.handshake_failures = 0
        self.peer_id = link.peer

    def _handshake_failed(self, reason: str) -> None:
        self.policy.handshake_failures += 1
        _log.warn("link to {url} failed before it was accepted: {reason}", url=self.url,
                  reason=reason)
