"""Peer WebSocket protocols: the accepting side (at ``/peer``) and the dialling side.

Thin adapters: they exchange ``hello`` messages, refuse a peer whose swarm, protocol
version or id does not fit (closing with a logged reason), then hand every decoded
message to the :class:`~swarm.overlay.Overlay`. Autobahn's pings watch the link: a
peer that stops answering (killed, frozen, cut off) is dropped within
``ping_interval + ping_timeout`` seconds.
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
from swarm.errors import TooLarge
from swarm.logs import logger
from swarm.mesh.link import PeerLink
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REFUSED,
    MAX_PEER_MESSAGE,
    PeerProtocolError,
    check_hello,
    decode_peer_frame,
    encode_message,
    frames_of,
)
from swarm.protocol.wire import error_reply

_log = logger(__name__)



class _PeerProtocolMixin:
    """What both ends of a link do; ``factory.overlay`` is this node's overlay.

    Outgoing messages wait in an outbox until the end of the reactor turn and leave
    as one frame: the requests forwarded for a client's batch, and their replies,
    cost one frame per link instead of one each.
    """

    link: PeerLink | None = None
    _outbox: list | None = None

    def onOpen(self) -> None:
        self.factory.opened(self)
        self._send([self.factory.overlay.hello()])

    def _send(self, messages: list[dict]) -> None:
        if self._outbox is None:
            self._outbox = []
            self.factory.overlay.clock.callLater(0, self._flush)
        self._outbox.extend(messages)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, None
        if not messages or self.state != self.STATE_OPEN:
            return
        for frame in frames_of(messages, self._too_large):
            self.sendMessage(frame, isBinary=True)

    def _too_large(self, msg: dict, size: int) -> bytes | None:
        """A message no peer would accept: answer with an error instead of sending it
        (sending it would make the peer close the whole link)."""
        error = TooLarge(f"a {size}-byte peer message exceeds the limit of {MAX_PEER_MESSAGE}")
        _log.warn("not sending to {peer}: {error}", peer=self.peer, error=error.message)
        if msg["t"] == "rep":
            rid, rep = msg["rid"], msg["rep"]
            return encode_message({"t": "rep", "rid": rid, "rep": error_reply(rep.get("id"), error)})
        if msg["t"] == "req" and self.link is not None:
            self.link.on_reply(msg["rid"], error_reply(msg["req"].get("id"), error))
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        overlay: Overlay = self.factory.overlay
        try:
            messages = decode_peer_frame(payload, isBinary)
        except PeerProtocolError as e:
            return self._refuse(CLOSE_PROTOCOL_ERROR, str(e))
        for msg in messages:
            if self.link is None:
                reason = check_hello(msg, overlay.node_id, overlay.swarm_name)
                if reason is not None:
                    return self._refuse(CLOSE_REFUSED, reason)
                self.link = PeerLink(msg["node"], self._send, overlay.clock)
                overlay.link_up(self.link)
                self.factory.linked(self.link)
            elif msg["t"] == "lsa":
                overlay.receive_announcements(self.link, msg["anns"])
            elif msg["t"] == "req":
                overlay.receive_request(self.link, msg)
            elif msg["t"] == "rep":
                overlay.receive_reply(self.link, msg)

    def _refuse(self, code: int, reason: str) -> None:
        _log.warn("refusing peer link with {peer}: {reason}", peer=self.peer, reason=reason)
        self.sendClose(code=code, reason=reason[:120])

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(self)
        if self.link is not None:
            self.factory.overlay.link_down(self.link, reason or f"closed ({code})")
        else:
            self.factory.handshake_failed(reason or f"closed ({code})")


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
    pass


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
    """Dials one ``--peer``; tells its upstream how each attempt went."""

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
