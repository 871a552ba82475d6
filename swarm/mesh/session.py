"""One peer connection's handshake and dispatch, without I/O: :class:`PeerSession`.

A session is fed decoded, validated peer messages (:mod:`swarm.mesh.peer_wire` decodes
frames) and acts through what it is given: ``send(messages)``, ``close(code, reason)``
and the node's :class:`~swarm.mesh.overlay.Overlay`. The Autobahn protocols in
:mod:`swarm.mesh.protocol` drive one per WebSocket; tests and a simulator drive it with
lists on a ``task.Clock``.

States, each with its own handler for what arrives::

    AWAIT_HELLO --hello accepted (no secret)--------------> LINKED --bye--> PARTED
         |                                                   ^
         +--hello accepted (secret)--> AWAIT_AUTH --proof ok-+
    refused / protocol error in any of them --> CLOSING
    (connection_lost in any state ends in CLOSED)

A peer still in AWAIT_HELLO or AWAIT_AUTH ``Overlay.handshake_timeout`` seconds after
:meth:`PeerSession.start` is refused (4000 without a hello, 4004 without a proof).

With a secret (``Overlay.secret``), a hello is answered with ``auth``, this node's
proof that it holds the secret (:mod:`swarm.mesh.auth`), and the link comes up only
once the peer's proof checks out: before that, nothing but the proof is accepted, and
no membership or request is read. A node with a secret refuses a peer without one and
the other way round, each saying why (close code 4004). The identity checks
(duplicate id) run only after the proof, so they tell an outsider nothing.

PARTED is the first phase of a close (``bye`` in :mod:`swarm.mesh.peer_wire`): the
peer said bye, so nothing new is routed over this connection, but requests and replies
still flow on it until the stopping side closes. A bye is answered with one unless this
node said bye first (:attr:`Overlay.parting <swarm.mesh.overlay.Overlay.parting>`): then
it *is* the answer, and both ends are PARTED.

The session also learns whether the *peer* accepted this node: the peer's first message
after its hello (the overlay always answers an accepted hello with an ``lsa``). Only
then does it report the link as up to ``on_linked``, which resets the dialler's backoff;
a connection lost before that counts as a failed handshake (``on_failed``), so a peer
that refuses this node is redialled with growing delays. A peer that closes with
:data:`~swarm.mesh.peer_wire.CLOSE_DUPLICATE_ID` refused this node's id: the overlay
records the conflict.
"""

from __future__ import annotations

import enum
from typing import Callable

from swarm.logs import logger
from swarm.mesh import auth
from swarm.mesh.link import PeerLink
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import (
    CLOSE_DUPLICATE_ID,
    CLOSE_INTERNAL_ERROR,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REFUSED,
    CLOSE_UNAUTHORIZED,
    bye,
    check_hello,
)
from swarm.mesh.peer_wire import auth as auth_message

_log = logger(__name__)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_AUTH = "await_auth"
    LINKED = "linked"
    PARTED = "parted"
    CLOSING = "closing"
    CLOSED = "closed"


#: The states in which the connection carries a link (routed or parted).
_CARRYING = (State.LINKED, State.PARTED)


def _ignore(_arg) -> None:
    pass


class PeerSession:
    """The peer side of one connection, from the first hello to the last byte.

    ``address`` names the connection in logs until the peer's hello names its node.
    Nothing a peer sends raises out of :meth:`received` or :meth:`connection_lost`: a
    failure inside this node is logged and closes the connection with
    :data:`~swarm.mesh.peer_wire.CLOSE_INTERNAL_ERROR`.
    """

    def __init__(
        self,
        overlay: Overlay,
        send: Callable[[list[dict]], None],
        close: Callable[[int, str], None],
        *,
        address: str = "?",
        on_linked: Callable[[PeerLink], None] = _ignore,
        on_failed: Callable[[str], None] = _ignore,
        on_trusted: Callable[[], None] = lambda: None,
        nonce: Callable[[], bytes] = auth.new_nonce,
    ) -> None:
        """``on_trusted`` hears when the peer's hello (and proof) are accepted: from
        then on it may send large frames."""
        self.overlay = overlay
        self.address = address
        self.state = State.AWAIT_HELLO
        #: Set once the peer's hello is accepted, and kept (it names the peer in logs).
        self.link: PeerLink | None = None
        #: Whether the peer has shown that it accepted this node's hello.
        self.accepted = False
        self._send = send
        self._close = close
        self._on_linked = on_linked
        self._on_failed = on_failed
        self._on_trusted = on_trusted
        self._nonce = nonce()
        #: The peer's hello, kept while its proof is awaited.
        self._hello: dict | None = None
        #: Why this node closed the connection, when it did.
        self._refusal: str | None = None
        #: The handshake's deadline (an IDelayedCall), from :meth:`start` to trust.
        self._deadline = None
        self._handlers: dict[State, Callable[[dict], None]] = {
            State.AWAIT_HELLO: self._await_hello,
            State.AWAIT_AUTH: self._await_auth,
            State.LINKED: self._linked,
            State.PARTED: self._parted,
        }
        #: The parts of a link-up exchange the peer sent (``lsa.sum``, ``lsa.have``):
        #: each comes once per connection, so a peer cannot make this node send its
        #: database over and over without a new handshake each time.
        self._exchanged: set[str] = set()
        self._linked_handlers: dict[str, Callable[[PeerLink, dict], None]] = {
            "lsa": self._lsa,
            "req": overlay.receive_request,
            "rep": overlay.receive_reply,
            "breq": overlay.receive_group,
            "brep": overlay.receive_group_reply,
            "bye": self._bye,
        }

    def __repr__(self) -> str:
        return f"<PeerSession {self._peer()} {self.state.name}>"

    # -- inputs -----------------------------------------------------------------------

    def start(self) -> None:
        """The connection is open: say who this node is, and give the peer
        ``overlay.handshake_timeout`` seconds to do the same."""
        overlay = self.overlay
        self._deadline = overlay.clock.callLater(overlay.handshake_timeout, self._expired)
        self._send([overlay.hello(self._nonce)])

    def _expired(self) -> None:
        self._deadline = None
        if self.state is State.AWAIT_HELLO:
            self._refuse(CLOSE_REFUSED, f"no hello within {self.overlay.handshake_timeout:g} s")
        elif self.state is State.AWAIT_AUTH:
            self._refuse(CLOSE_UNAUTHORIZED,
                         f"no proof (auth) within {self.overlay.handshake_timeout:g} s")

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def received(self, messages: list[dict]) -> None:
        """Messages from the peer, in order, already validated by peer_wire."""
        for i, msg in enumerate(messages):
            handler = self._handlers.get(self.state)
            if handler is None:
                _log.debug("{n} messages from {peer} after the close dropped",
                           n=len(messages) - i, peer=self._peer())
                return
            try:
                handler(msg)
            except Exception:
                _log.failure("failed on a {t} message from {peer}", t=msg.get("t"),
                             peer=self._peer())
                self._refuse(CLOSE_INTERNAL_ERROR, "the node failed on a message")

    def protocol_error(self, reason: str) -> None:
        """The peer sent a frame that does not decode: close the connection."""
        if self.state in self._handlers:
            self._refuse(CLOSE_PROTOCOL_ERROR, reason)

    def connection_lost(self, reason: str, code: int | None = None) -> None:
        """The connection is gone; ``code`` is the peer's close code, when it sent one."""
        if self.state is State.CLOSED:
            return
        was_linked = self.state in _CARRYING
        self.state = State.CLOSED
        self._stop_deadline()
        try:
            if code == CLOSE_DUPLICATE_ID and self._refusal is None:
                self.overlay.refused_as_duplicate(self._peer(), reason)
            if was_linked:
                self.overlay.link_down(self.link, reason)
            if not self.accepted:
                self._on_failed(self._refusal or reason)
        except Exception:
            _log.failure("failed on losing the connection to {peer}", peer=self._peer())

    # -- states -----------------------------------------------------------------------

    def _await_hello(self, msg: dict) -> None:
        overlay = self.overlay
        reason = check_hello(msg, overlay.node_id, overlay.swarm_name)
        if reason is not None:
            return self._refuse(CLOSE_REFUSED, reason)
        secret = overlay.secret
        if msg.get("auth", False) != (secret is not None):
            return self._refuse(CLOSE_UNAUTHORIZED, (
                "this node has a secret (--secret-file) and the peer none"
                if secret is not None else
                "the peer has a secret (--secret-file) and this node none"))
        if secret is None:
            return self._accept(msg)
        if "nonce" not in msg:
            return self._refuse(CLOSE_PROTOCOL_ERROR, "a hello with auth needs a nonce")
        self._hello = msg
        self.state = State.AWAIT_AUTH
        self._send([auth_message(auth.proof(
            secret, overlay.swarm_name, overlay.node_id, msg["node"], self._nonce,
            msg["nonce"]))])

    def _await_auth(self, msg: dict) -> None:
        overlay, peer = self.overlay, self._hello
        if msg["t"] != "auth":
            return self._refuse(CLOSE_PROTOCOL_ERROR,
                                f"a {msg['t']} before the peer's proof (auth)")
        if not auth.verify(overlay.secret, overlay.swarm_name, peer["node"],
                           overlay.node_id, peer["nonce"], self._nonce, msg["mac"]):
            return self._refuse(CLOSE_UNAUTHORIZED, (
                f"{peer['node']!r} did not prove it holds the swarm's secret (another "
                "--secret-file, or a replayed handshake)"))
        self._accept(peer)

    def _accept(self, msg: dict) -> None:
        """The peer's hello (and proof) are good: link, unless its id is taken."""
        overlay = self.overlay
        reason = overlay.identity_conflict(msg["node"], msg["inc"])
        if reason is not None:
            return self._refuse(CLOSE_DUPLICATE_ID, reason)
        self.link = PeerLink(msg["node"], self._send_linked, overlay.clock,
                             batches=msg.get("batch", False), raw=msg.get("raw", False))
        self.state = State.LINKED
        self._stop_deadline()
        self._on_trusted()
        overlay.link_up(self.link, msg["inc"], sync=msg.get("sync", False))

    def _linked(self, msg: dict) -> None:
        handler = self._linked_handlers.get(msg["t"])
        if handler is None:
            return self._refuse(CLOSE_PROTOCOL_ERROR, f"a {msg['t']} on a linked connection")
        if not self.accepted:
            self.accepted = True
            self.overlay.link_accepted(self.link)
            self._on_linked(self.link)
        handler(self.link, msg)

    def _parted(self, msg: dict) -> None:
        if msg["t"] == "bye":
            return self._refuse(CLOSE_PROTOCOL_ERROR, "a second bye")
        self._linked(msg)

    def _lsa(self, link: PeerLink, msg: dict) -> None:
        parts = {"sum", "have"} & msg.keys()
        if parts & self._exchanged:
            return self._refuse(CLOSE_PROTOCOL_ERROR,
                                f"a second lsa.{min(parts & self._exchanged)}")
        self._exchanged |= parts
        overlay = self.overlay
        overlay.receive_announcements(link, msg["anns"])
        if "sum" in msg:
            overlay.receive_summary(link, msg["sum"])
        if "have" in msg:
            overlay.receive_versions(link, msg["have"])

    def _bye(self, link: PeerLink, msg: dict) -> None:
        answer = not self.overlay.parting
        self.state = State.PARTED
        self.overlay.link_parted(link)
        if answer:  # after all this node sent on it: no request of ours follows it
            link.send([bye()])

    # -- outputs ----------------------------------------------------------------------

    def _send_linked(self, messages: list[dict]) -> None:
        """The link's way out: nothing leaves once the session is closing (a reply
        finishing after the close goes nowhere)."""
        if self.state in _CARRYING:
            self._send(messages)

    def _refuse(self, code: int, reason: str) -> None:
        _log.warn("refusing peer link with {peer}: {reason}", peer=self._peer(),
                  reason=reason)
        was_linked = self.state in _CARRYING
        refused = self.overlay.refused_peers
        refused[code] = refused.get(code, 0) + 1
        self.state = State.CLOSING
        self._stop_deadline()
        self._refusal = reason
        if was_linked:
            # at once: nothing more is routed over a link that is closing
            self.overlay.link_down(self.link, reason)
        self._close(code, reason)

    def _peer(self) -> str:
        return f"{self.link.peer} at {self.address}" if self.link else self.address

    @property
    def handshaking(self) -> bool:
        """Whether the peer is not yet trusted (its hello or proof still awaited)."""
        return self.state in (State.AWAIT_HELLO, State.AWAIT_AUTH)
