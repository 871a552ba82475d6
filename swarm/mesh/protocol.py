"""Peer WebSocket protocols: the accepting side (at ``/peer``) and the dialling side.

Thin adapters around a :class:`~swarm.mesh.session.PeerSession`: they decode each
frame, feed the messages to the session, send what it gives them (coalesced per reactor
turn and cut into frames of a size peers accept) and close when it says so. Autobahn's
pings watch the link: a peer that stops answering (killed, frozen, cut off) is dropped
within ``ping_interval + ping_timeout`` seconds.

Until the session trusts the peer (its hello, and with a secret its proof, accepted),
frames are capped at :data:`~swarm.mesh.peer_wire.MAX_HANDSHAKE_MESSAGE` bytes, so an
outsider cannot make the node buffer or decode a large frame; this node's own
handshake messages leave at once, each in a frame of its own, so nothing that follows
them shares a frame the peer still reads with the small cap.
"""

from __future__ import annotations

from typing import Callable

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)

from swarm.connections import ConnectionTracker
from swarm.errors import SwarmError
from swarm.logs import logger
from swarm.mesh.link import PeerLink
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_PEER_MESSAGE,
    PeerProtocolError,
    decode_peer_frame,
    encode_message,
    encode_peer_frame,
    frames_of,
    reply_count,
    unpack_replies,
)
from swarm.mesh.session import PeerSession
from swarm.protocol.wire import error_reply, request_id

_log = logger(__name__)


class _PeerProtocolMixin:
    """What both ends of a link do; ``factory.overlay`` is this node's overlay.

    Outgoing messages wait in an outbox until the end of the reactor turn and leave
    as one frame: the requests forwarded for a client's batch, and their replies,
    cost one frame per link instead of one each.
    """

    session: PeerSession
    _outbox: list | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        self.maxMessagePayloadSize = self.maxFramePayloadSize = MAX_HANDSHAKE_MESSAGE
        self.session = PeerSession(
            factory.overlay, self._send, self._close, address=self.peer,
            on_linked=factory.linked, on_failed=factory.handshake_failed,
            on_trusted=self._trusted,
        )

    def _trusted(self) -> None:
        self.maxMessagePayloadSize = self.maxFramePayloadSize = MAX_PEER_MESSAGE

    def onOpen(self) -> None:
        self.factory.opened(self)
        self.session.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        traffic = self.factory.overlay.traffic
        traffic["bytes_received"] += len(payload)
        traffic["frames_received"] += 1
        try:
            messages = decode_peer_frame(payload, isBinary)
        except PeerProtocolError as e:
            return self.session.protocol_error(str(e))
        self.session.received(messages)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(self)
        self.session.connection_lost(reason or f"closed ({code})", code)

    def _close(self, code: int, reason: str) -> None:
        self.sendClose(code=code, reason=reason)  # Autobahn cuts it to 123 bytes

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False) -> None:
        """Every close (the session's, a stopping node's, a reply to the peer's) goes
        out after what is waiting in the outbox: a reply answered in this reactor turn
        would otherwise be dropped, and the peer would fail the request it answers."""
        self._flush()
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def _send(self, messages: list[dict]) -> None:
        if self.session.handshaking:
            if self.state == self.STATE_OPEN:
                self._counted_send(encode_peer_frame(messages))
            return
        if self._outbox is None:
            self._outbox = []
            self.factory.overlay.clock.callLater(0, self._flush)
        self._outbox.extend(messages)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, None
        if not messages or self.state != self.STATE_OPEN:
            return
        for frame in frames_of(messages, self._refuse):
            self._counted_send(frame)

    def _counted_send(self, frame: bytes) -> None:
        traffic = self.factory.overlay.traffic
        traffic["bytes_sent"] += len(frame)
        traffic["frames_sent"] += 1
        self.sendMessage(frame, isBinary=True)

    def _refuse(self, msg: dict, error: SwarmError) -> bytes | None:
        """A message no peer would accept (too large, or unencodable): answer with an
        error instead of sending it (sending it would make the peer close the link)."""
        _log.warn("not sending to {peer}: {error}", peer=self.peer, error=error.message)
        t, link = msg.get("t"), self.session.link
        if t == "rep":
            return encode_message(dict(msg, rep=error_reply(request_id(msg["rep"]), error)))
        if t == "brep":
            return encode_message({"t": t, "rid": msg["rid"], "at": msg["at"], "reps": [
                error_reply(request_id(rep), error) for rep in _replies(msg)]})
        if link is not None:
            if t == "req":
                link.on_reply(msg["rid"], error_reply(request_id(msg["req"]), error))
            elif t == "breq":
                link.on_group_reply(msg["rid"], msg.get("at", 0), [
                    error_reply(request_id(req), error) for req in msg["reqs"]])
        return None


def _replies(msg: dict) -> list:
    """A ``brep``'s replies, for their ids; a ``raw`` that does not decode stands
    for as many replies of unknown ids."""
    if "reps" in msg:
        return msg["reps"]
    try:
        return unpack_replies(msg["raw"])
    except PeerProtocolError:
        return [None] * (reply_count(msg["raw"]) or 1)


def _link_options(factory, ping_interval: float, ping_timeout: float) -> None:
    factory.setProtocolOptions(
        maxMessagePayloadSize=MAX_PEER_MESSAGE,
        maxFramePayloadSize=MAX_PEER_MESSAGE,
        failByDrop=False,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=2,
        autoPingInterval=ping_interval,
        autoPingTimeout=ping_timeout,
    )


class PeerServerProtocol(_PeerProtocolMixin, WebSocketServerProtocol):
    pass


class PeerClientProtocol(_PeerProtocolMixin, WebSocketClientProtocol):
    #: Nagle off: Autobahn's connectionMade reads this before it copies the factory's
    #: options, so without it a dialled link keeps Nagle on and a small message sent
    #: behind an unacknowledged one waits for the delayed ACK (up to 40 ms).
    tcpNoDelay = True


class PeerServerFactory(WebSocketServerFactory, ConnectionTracker):
    """Accepts links at ``/peer``."""

    protocol = PeerServerProtocol
    noisy = False

    def __init__(self, overlay: Overlay, ping_interval: float, ping_timeout: float):
        WebSocketServerFactory.__init__(self)
        ConnectionTracker.__init__(self)
        self.overlay = overlay
        _link_options(self, ping_interval, ping_timeout)

    def linked(self, link: PeerLink) -> None:
        pass

    def handshake_failed(self, reason: str) -> None:
        pass


class PeerClientFactory(WebSocketClientFactory, ConnectionTracker):
    """Dials one ``--peer``; tells its upstream how each attempt went: ``on_linked``
    once the peer accepted this node, ``on_handshake_failed`` for a connection lost
    before that."""

    protocol = PeerClientProtocol
    noisy = False  # no "Starting factory" line on every redial

    def __init__(
        self,
        url: str,
        overlay: Overlay,
        ping_interval: float,
        ping_timeout: float,
        on_linked: Callable[[PeerLink], None],
        on_handshake_failed: Callable[[str], None],
    ):
        WebSocketClientFactory.__init__(self, url)
        ConnectionTracker.__init__(self)
        self.overlay = overlay
        self.linked = on_linked
        self.handshake_failed = on_handshake_failed
        _link_options(self, ping_interval, ping_timeout)
