"""The client-facing WebSocket protocol: frames in, replies out.

:class:`FrameHandler` holds the logic (decode, validate, route, encode) with no I/O so it
is tested without sockets; :class:`ClientProtocol` is the thin Autobahn adapter that feeds
it frames and sends back whatever it answers, once the answer is ready.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, gatherResults

from swarm.cluster.router import QueryRouter
from swarm.connections import ConnectionTracker
from swarm.errors import InternalError, SwarmError, TooLarge
from swarm.logs import logger
from swarm.node.config import NodeConfig
from swarm.protocol.wire import (
    RequestParser,
    decode_frame,
    encode_frame,
    error_reply,
    request_id,
    weigh,
)

_log = logger(__name__)


class FrameHandler:
    """Turns one frame's payload into the payload of its reply."""

    def __init__(self, parser: RequestParser, router: QueryRouter) -> None:
        self.parser = parser
        self.router = router

    def handle(self, payload: bytes, is_binary: bool) -> bytes | Deferred:
        """The reply frame's payload, or a Deferred of it when a reply must wait."""
        try:
            decoded = decode_frame(payload, is_binary)
        except SwarmError as e:
            return encode_frame(error_reply(None, e), is_binary)
        try:
            requests, is_batch = self.parser.split(decoded)
        except SwarmError as e:
            # A batch over the limit: still one reply per request, in order.
            return encode_frame([error_reply(request_id(o), e) for o in decoded], is_binary)
        replies = [self._handle_one(obj) for obj in requests]
        waiting = [(i, r) for i, r in enumerate(replies) if isinstance(r, Deferred)]
        if not waiting:
            return self._encode(replies, is_batch, is_binary)

        def fill(results: list) -> bytes:
            for (i, _), reply in zip(waiting, results):
                replies[i] = reply
            return self._encode(replies, is_batch, is_binary)

        return gatherResults([d for _, d in waiting]).addCallback(fill)

    def _within_budget(self, replies: list) -> None:
        """Replace the replies that would take the frame past max_reply_bytes."""
        budget = self.parser.limits.max_reply_bytes
        spent = 0
        for i, reply in enumerate(replies):
            spent += weigh(reply, budget - spent)
            if spent > budget:
                replies[i] = error_reply(reply.get("id"), TooLarge(
                    f"the reply would take more than {budget} bytes; ask for less at once"
                ))  # and so does every reply after it: spent stays over budget

    def _handle_one(self, obj: Any) -> dict | Deferred:
        try:
            request = self.parser.parse(obj)
        except SwarmError as e:
            return error_reply(request_id(obj), e)
        return self.router.handle(request)

    def _encode(self, replies: list, is_batch: bool, is_binary: bool) -> bytes:
        self._within_budget(replies)
        try:
            return encode_frame(replies if is_batch else replies[0], is_binary)
        except Exception:
            _log.failure("cannot encode a reply")
            failed = [
                error_reply(r.get("id"), InternalError("reply could not be encoded"))
                for r in replies
            ]
            return encode_frame(failed if is_batch else failed[0], is_binary)


class ClientProtocol(WebSocketServerProtocol):
    """One client connection. Replies go out as they are ready (pipelining)."""

    factory: "ClientFactory"

    def onOpen(self) -> None:
        self.factory.opened(self)
        _log.debug("client {peer} connected", peer=self.peer)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        reply = self.factory.frames.handle(payload, isBinary)
        if isinstance(reply, Deferred):
            reply.addCallback(self._send, isBinary)
            reply.addErrback(
                lambda f: _log.failure("reply lost for {peer}", f, peer=self.peer)
            )
        else:
            self._send(reply, isBinary)

    def _send(self, payload: bytes, is_binary: bool) -> None:
        # The client may have gone while its reply was on the way; drop it then.
        if self.state == self.STATE_OPEN:
            self.sendMessage(payload, is_binary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(self)
        _log.debug(
            "client {peer} disconnected ({code})", peer=self.peer, code=code
        )


class ClientFactory(WebSocketServerFactory, ConnectionTracker):
    """Builds :class:`ClientProtocol` with the node's limits; knows every open one."""

    protocol = ClientProtocol
    noisy = False

    def __init__(self, frames: FrameHandler, config: NodeConfig, clock: Any) -> None:
        WebSocketServerFactory.__init__(self)
        ConnectionTracker.__init__(self)
        self.frames = frames
        self.config = config
        self.clock = clock
        max_message_size = config.max_message_size
        # One call: Autobahn resets allowNullOrigin on every setProtocolOptions.
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            # Close with 1009 on oversize frames rather than dropping the TCP link.
            failByDrop=False,
            # Invalid UTF-8 gets a bad_request reply and the connection stays open.
            utf8validateIncoming=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            autoPingInterval=30,
            autoPingTimeout=30,
        )
