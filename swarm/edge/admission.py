"""Who may connect to a node's listener, and how many at once (issue 8).

Two layers, both in front of Autobahn so nothing in the WebSocket protocols changes:

- :class:`AdmittingSite` is the twisted.web Site a listener serves. Each TCP connection
  it accepts is wrapped in :class:`_Admitted`, which counts it until it closes (an
  upgraded WebSocket included: Autobahn swaps the wrapped protocol, the wrapper stays)
  and gives it ``handshake_timeout`` seconds to deliver a whole HTTP request. Past
  ``max_connections`` a new connection is aborted as it is accepted, before a byte is
  read. Twisted's own channel timeout restarts on every byte received, so a request
  dripped one byte at a time (Slowloris) would never expire under it; this deadline
  does not move.
- :class:`GuardedResource` wraps the client WebSocket resource at ``/`` and refuses an
  upgrade before Autobahn sees it: without a valid client token when tokens are
  required (401 missing, 403 wrong), or from a browser Origin not allowed (403) unless
  the request carries a valid token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any, Iterable

from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from swarm.logs import logger
from swarm.node.config import NodeConfig

_log = logger(__name__)


# -- client tokens ----------------------------------------------------------------------


def _digest(token: bytes) -> bytes:
    # Comparing fixed-size digests keeps even a token's length out of the timing.
    return hashlib.sha256(token).digest()


#: The word after a token that marks it an admin's (``TOKEN admin``): it may flush.
ADMIN = b"admin"


class TokenFile:
    """The client tokens of ``--client-token-file``: one a line, optionally followed
    by the word ``admin`` (that token may also run admin ops: flush); blank lines and
    ``#`` comments ignored. Read at start (no tokens there is an error: the operator
    asked for tokens and would otherwise lock every client out) and on :meth:`reload`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests, self._admins = self._read()

    def __repr__(self) -> str:  # never the tokens
        return f"<TokenFile {self.path!r}: {self.count} tokens>"

    @property
    def count(self) -> int:
        return len(self._digests)

    def _read(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(
                f"client token file {self.path}: cannot read it ({e.strerror or e})"
            ) from None
        digests, admins = [], []
        for number, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith(b"#"):
                continue
            if words[1:] not in ([], [ADMIN]):
                raise ValueError(
                    f"client token file {self.path}, line {number}: a token may be "
                    "followed only by the word admin")
            digests.append(_digest(words[0]))
            if words[1:]:
                admins.append(digests[-1])
        if not digests:
            raise ValueError(
                f"client token file {self.path}: no client tokens in it (one a line; "
                "blank lines and # comments are ignored)"
            )
        return tuple(digests), tuple(admins)

    def reload(self) -> bool:
        """Reread the file; on failure keep the tokens held and log why. Whether the
        new tokens are in use."""
        try:
            digests, admins = self._read()
        except ValueError as e:
            _log.error("client tokens not reloaded, keeping {count} old ones: {reason}",
                       path=self.path, count=self.count, reason=str(e))
            return False
        self._digests, self._admins = digests, admins
        _log.info("{count} client tokens loaded from {path}", path=self.path,
                  count=self.count)
        return True

    def valid(self, presented: bytes) -> bool:
        """Whether ``presented`` is one of the tokens, in time independent of which
        one matched or how much of it: every token is compared, with no early exit."""
        return _among(presented, self._digests)

    def admin(self, presented: bytes) -> bool:
        """Whether ``presented`` is one of the tokens marked admin (as :meth:`valid`)."""
        return _among(presented, self._admins)


def _among(presented: bytes, digests: tuple[bytes, ...]) -> bool:
    wanted = _digest(presented)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(digest, wanted)
    return found


# -- origins ----------------------------------------------------------------------------


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str, allowed: Iterable[str]) -> bool:
    """Whether a browser's ``Origin`` is listed (scheme://host[:port], compared exactly
    but for case and a trailing slash), or ``*`` is listed; ``null`` never is."""
    origin = _normal_origin(origin)
    if origin == "null":  # sandboxed frames, file:// pages: anyone can be "null"
        return False
    listed = {_normal_origin(a) for a in allowed}
    return "*" in listed or origin in listed


def _own_origin(request: Any, origin: str) -> bool:
    """Whether ``origin`` is the node's own (its status page), addressed by IP or as
    ``localhost``: a host name is left to ``--allowed-origin``, since a foreign page
    whose name is rebound to the node's address would look like the node's own."""
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
    scheme = "https" if request.isSecure() else "http"
    return _normal_origin(origin) == f"{scheme}://{host}"


# -- the checks of one upgrade request ----------------------------------------------------


def _peer(request: Any) -> str:
    address = request.getClientAddress()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


def _presented_token(request: Any) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, else of ``?token=``."""
    header = request.getHeader(b"authorization")
    token = _bearer(header) if header is not None else None
    if token is not None:
        return token
    values = request.args.get(b"token") if request.args else None
    return values[0] if values else None


def _bearer(header: bytes) -> bytes | None:
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class Admission:
    """The client listener's admission policy: tokens and browser origins.

    ``reload()`` rereads the token file: the node calls it on SIGHUP.
    """

    def __init__(self, token_file: str | None = None,
                 allowed_origins: Iterable[str] = ()) -> None:
        self.tokens: TokenFile | None = TokenFile(token_file) if token_file else None
        self.allowed_origins = tuple(allowed_origins)
        self.refusals: dict[str, int] = {}  # reason -> requests refused (GET /metrics)

    @classmethod
    def from_config(cls, config: NodeConfig) -> "Admission":
        return cls(config.client_token_file, config.allowed_origins)

    def reload(self) -> bool:
        """Reread the client token file (no file configured: nothing to do, True)."""
        return self.tokens.reload() if self.tokens is not None else True

    def admin(self, authorization: str | None, token_params: list[str] | None) -> bool:
        """Whether a connection that presented these (its ``Authorization`` header and
        ``?token=`` values, as Autobahn hands them over) may run admin ops: any
        connection when there are no client tokens, else one with an admin token."""
        if self.tokens is None:
            return True
        presented = _bearer(authorization.encode("latin-1")) if authorization else None
        if presented is None and token_params:
            presented = token_params[0].encode("utf-8")
        return presented is not None and self.tokens.admin(presented)

    def refusal(self, request: Any) -> tuple[int, str] | None:
        """(HTTP status, reason) to refuse ``request`` with, or None to let it in."""
        presented = _presented_token(request)
        token_ok = (self.tokens is not None and presented is not None
                    and self.tokens.valid(presented))
        if self.tokens is not None and not token_ok:
            if presented is None:
                return 401, "no client token"
            return 403, "wrong client token"
        origin = request.getHeader(b"origin")
        if origin is None:
            return None  # not a browser
        text = origin.decode("latin-1")
        if _normal_origin(text) == "null":
            return 403, "null origin"  # Autobahn would refuse it anyway (allowNullOrigin)
        if token_ok or _own_origin(request, text) or origin_allowed(text, self.allowed_origins):
            return None
        return 403, "origin not allowed"


class GuardedResource(Resource):
    """A WebSocket resource behind the :class:`Admission` policy (None: no checks).

    A refused request gets a small plain-text answer and never reaches the resource.
    One let through is upgraded by ``resource`` with the connection's real transport
    (TCP, or the TLS layer Autobahn wants to see for wss), and the site's counting
    wrapper is then put back between the transport and the WebSocket protocol, so the
    upgraded connection is still counted until it closes.
    """

    isLeaf = True

    def __init__(self, resource: Any, admission: Admission | None = None) -> None:
        super().__init__()
        self.resource = resource
        self.admission = admission

    def render(self, request: Any) -> Any:
        refused = self.admission.refusal(request) if self.admission is not None else None
        if refused is None:
            return self._upgrade(request)
        code, reason = refused
        refusals = self.admission.refusals
        refusals[reason] = refusals.get(reason, 0) + 1
        origin = request.getHeader(b"origin")
        _log.warn("refused client {peer}: {reason}", peer=_peer(request), reason=reason,
                  code=code, origin=origin.decode("latin-1") if origin is not None else None)
        request.setResponseCode(code)
        if code == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="swarmcache"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return f"{reason}\n".encode("utf-8")

    def _upgrade(self, request: Any) -> Any:
        wrapper = request.channel.transport
        if not isinstance(wrapper, _Admitted):
            return self.resource.render(request)
        real = wrapper.transport
        request.channel.transport = real
        try:
            return self.resource.render(request)
        finally:
            if request.channel.transport is real:  # answered without taking it over
                request.channel.transport = wrapper
            elif isinstance(real, ProtocolWrapper) and real.wrappedProtocol is not wrapper:
                # TLS: Autobahn made its protocol the TLS layer's; the wrapper goes back
                # in between (a plain TCP transport's protocol is the wrapper itself,
                # whose wrapped protocol Autobahn replaced).
                wrapper.wrappedProtocol, real.wrappedProtocol = real.wrappedProtocol, wrapper


# -- the connection cap and the handshake deadline -----------------------------------------


class _Refused(Protocol):
    """A connection past the cap: aborted as it is made, nothing read or written."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _Admitted(ProtocolWrapper):
    """One admitted connection: counted by its site until it closes, and aborted if no
    whole HTTP request arrives within the site's handshake timeout (from the accept,
    and again from the end of each answered request while the connection idles)."""

    factory: "AdmittingSite"

    def __init__(self, factory: "AdmittingSite", wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._timer: Any = None
        self._requests = 0  # received and not yet answered (an upgraded one: for ever)
        self._lost = False

    def connectionMade(self) -> None:
        self._start_timer()

    def connectionLost(self, reason: Any) -> None:
        self._lost = True
        self._stop_timer()
        super().connectionLost(reason)

    def request_received(self) -> None:
        self._requests += 1
        self._stop_timer()

    def request_finished(self) -> None:
        self._requests -= 1
        if self._requests == 0 and not self._lost and not self.disconnecting:
            self._start_timer()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = self.factory.clock.callLater(self.factory.handshake_timeout,
                                                   self._expired)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        _log.debug("no HTTP request from {peer} within {seconds}s: closed",
                   peer=self.getPeer(), seconds=self.factory.handshake_timeout)
        self.transport.abortConnection()


class AdmissionRequest(Request):
    """A Request that tells its connection's :class:`_Admitted` wrapper when it has
    arrived whole (the deadline stops) and when it has been answered (it restarts)."""

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        wrapper = getattr(self.channel, "transport", None)
        if isinstance(wrapper, _Admitted):
            wrapper.request_received()
            self.notifyFinish().addBoth(lambda _: wrapper.request_finished())
        super().requestReceived(command, path, version)


class AdmittingSite(Site):
    """A Site that holds at most ``max_connections`` connections at once and gives each
    ``handshake_timeout`` seconds (on ``clock``) to send a whole request."""

    def __init__(self, resource: Any, *, max_connections: int, handshake_timeout: float,
                 clock: Any) -> None:
        super().__init__(resource, requestFactory=AdmissionRequest, reactor=clock)
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.clock = clock
        self.connections: set[_Admitted] = set()
        self.refused = 0  # connections refused at the cap, since the start
        self._refusing_since: int | None = None  # self.refused when the cap was reached

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def buildProtocol(self, addr: Any) -> Protocol:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self._refusing_since is None:
                self._refusing_since = self.refused - 1
                _log.warn("{count} connections open, the most allowed: refusing new ones",
                          count=len(self.connections))
            return _Refused()
        return _Admitted(self, super().buildProtocol(addr))

    def registerProtocol(self, protocol: _Admitted) -> None:
        self.connections.add(protocol)

    def unregisterProtocol(self, protocol: _Admitted) -> None:
        self.connections.discard(protocol)
        if self._refusing_since is not None:
            _log.info("accepting connections again, after refusing {count}",
                      count=self.refused - self._refusing_since)
            self._refusing_since = None
