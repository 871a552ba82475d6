"""The client-facing WebSocket protocol: frames in, replies out, at the client's pace.

:class:`FrameHandler` holds the logic (decode, validate, route, encode) with no I/O so it
is tested without sockets; :class:`ClientSession` holds one connection's limits (requests
in flight, a client that does not read, an idle client), also without I/O;
:class:`ClientProtocol` is the thin Autobahn adapter that feeds them frames and carries
out what they decide.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from swarm.cluster.router import QueryRouter
from swarm.connections import ConnectionTracker
from swarm.errors import InternalError, SwarmError, TooLarge, Unauthorized
from swarm.logs import logger
from swarm.protocol.ops import ADMIN_OPS
from swarm.node.config import NodeConfig
from swarm.protocol.wire import (
    RequestParser,
    cbor_array_head,
    decode_frame,
    encode_frame,
    error_reply,
    join_frame,
    request_id,
    weigh,
)

_log = logger(__name__)

#: WebSocket close codes the edge sends (RFC 6455, section 7.4.1).
CLOSE_GOING_AWAY = 1001  # the node is stopping
CLOSE_IDLE = 1000  # normal closure, reason "idle": the client sent nothing for too long
CLOSE_NOT_READING = 1008  # policy violation: replies pile up for a client that does not read
CLOSE_TOO_BIG = 1009  # message too big: as for a frame over --max-message-size


class CloseConnection(Exception):
    """A frame the node answers by closing the connection, with a WebSocket close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameHandler:
    """Turns one frame's payload into the payload of its reply."""

    def __init__(self, parser: RequestParser, router: QueryRouter) -> None:
        self.parser = parser
        self.router = router

    def handle(self, payload: bytes, is_binary: bool, admin: bool = True) -> bytes | Deferred:
        """The reply frame's payload, or a Deferred of it when a reply must wait."""
        return self.process(payload, is_binary, admin)[0]

    def process(self, payload: bytes, is_binary: bool,
                admin: bool = True) -> tuple[bytes | Deferred, int]:
        """Like :meth:`handle`, and how many requests the frame holds (what the
        connection counts against ``max_in_flight``). Raises :class:`CloseConnection`
        for a batch whose reply could not be sent at all. Without ``admin`` (a
        connection whose client token is not an admin's), admin ops are refused
        ``unauthorized``."""
        try:
            decoded = decode_frame(payload, is_binary)
        except SwarmError as e:
            return encode_frame(error_reply(None, e), is_binary), 1
        try:
            requests, is_batch = self.parser.split(decoded)
        except SwarmError as e:
            return self._refuse_batch(decoded, e, is_binary), len(decoded)
        if not is_batch:
            reply = self._handle_one(requests[0], admin)
            if isinstance(reply, Deferred):
                return reply.addCallback(lambda r: self._encode([r], False, is_binary)), 1
            return self._encode([reply], False, is_binary), 1
        replies: list = [None] * len(requests)
        parsed, where = [], []
        for i, obj in enumerate(requests):
            try:
                parsed.append(_permitted(self.parser.parse(obj), admin))
                where.append(i)
            except SwarmError as e:
                replies[i] = error_reply(request_id(obj), e)
        routed, waiting = self.router.handle_all(parsed)

        def fill(_: object = None) -> bytes:
            for i, reply in zip(where, routed):
                replies[i] = reply
            return self._encode(replies, True, is_binary)

        if not waiting:
            return fill(), len(requests)
        return gatherResults(waiting).addCallback(fill), len(requests)

    def _refuse_batch(self, batch: list, error: SwarmError, is_binary: bool) -> bytes:
        """A batch over ``max_batch``: the contract's reply, one error per request in
        order, encoded from one template so that each request costs its bytes in the
        reply and no dict (a 4 MB frame can hold 4 million one-byte requests).

        A batch whose reply would pass ``max_reply_bytes`` cannot be answered that
        way, so the connection is closed with 1009, as for a frame too big to read.
        """
        marker = "\x00id\x00"
        head, _, tail = encode_frame(error_reply(marker, error), is_binary).partition(
            encode_frame(marker, is_binary)
        )
        null = encode_frame(None, is_binary)
        budget = self.parser.limits.max_reply_bytes
        refusal = CloseConnection(CLOSE_TOO_BIG, f"{error.message}; this one holds {len(batch)}")
        if len(batch) * (len(head) + len(null) + len(tail)) > budget:
            raise refusal  # before a byte of it is built
        out = bytearray(cbor_array_head(len(batch)) if is_binary else b"[")
        for i, obj in enumerate(batch):
            if i and not is_binary:
                out += b","
            rid = request_id(obj)
            out += head
            out += null if rid is None else encode_frame(rid, is_binary)
            out += tail
            if len(out) > budget:
                raise refusal
        if not is_binary:
            out += b"]"
        return bytes(out)

    def _handle_one(self, obj: Any, admin: bool) -> dict | Deferred:
        try:
            request = _permitted(self.parser.parse(obj), admin)
        except SwarmError as e:
            return error_reply(request_id(obj), e)
        return self.router.handle(request)

    def _encode(self, replies: list, is_batch: bool, is_binary: bool) -> bytes:
        """The reply frame, at most about ``max_reply_bytes`` long.

        Replies are encoded one by one, so the frame's size is counted in encoded bytes
        as it grows; from the reply that would take it past the limit on, each is
        replaced by ``too_large``, and a reply that cannot be encoded by
        ``internal``, costing none of the others. A single-key reply is as big as
        one value (``--max-value-size``), but one holding many (``mget``) could be far
        bigger than the limit, so a reply that carries a container is first weighed
        (:func:`weigh`, a walk that stops at the budget) before it is encoded.
        """
        budget = self.parser.limits.max_reply_bytes
        spent = 0
        parts = []
        for reply in replies:
            data = None
            if spent <= budget and (not _holds_container(reply)
                                    or weigh(reply, budget - spent) <= budget - spent):
                data = self._encode_one(reply, is_binary)
                if spent + len(data) > budget:
                    data = None
            if data is None:
                spent = budget + 1  # every reply after it is refused too
                data = encode_frame(error_reply(request_id(reply), TooLarge(
                    f"the reply would take more than {budget} bytes; ask for less at once"
                )), is_binary)
            else:
                spent += len(data)
            parts.append(data)
        return join_frame(parts, is_binary) if is_batch else parts[0]

    @staticmethod
    def _encode_one(reply: dict, is_binary: bool) -> bytes:
        try:
            return encode_frame(reply, is_binary)
        except Exception:
            _log.failure("cannot encode a reply")
            return encode_frame(
                error_reply(request_id(reply), InternalError("reply could not be encoded")),
                is_binary,
            )


def _permitted(request: dict, admin: bool) -> dict:
    if not admin and request["op"] in ADMIN_OPS:
        raise Unauthorized(f"{request['op']} needs an admin client token")
    return request


def _holds_container(reply: dict) -> bool:
    for value in reply.values():  # a loop: any() over a generator costs twice as much
        if isinstance(value, (list, dict)):
            return True
    return False


class Connection(Protocol):
    """What a :class:`ClientSession` needs of its connection."""

    peer: str

    def send_reply(self, payload: bytes, is_binary: bool) -> None: ...

    def stop_reading(self) -> None: ...

    def start_reading(self) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...


@implementer(IPushProducer)
class ClientSession:
    """One client connection's limits: what it may have in flight, and when to give up.

    - At most ``max_in_flight`` requests are worked on at once (a batch counts its
      items, and is admitted whole while the count is below the limit). Frames past
      that wait here, and the connection is not read until replies drain, so a
      client's requests cost the node memory only in proportion to the limit.
    - The session is the transport's streaming producer: Twisted pauses it when the
      write buffer is full (the client is not reading fast enough) and resumes it
      once the buffer is empty. While paused no new frame is handled. Replies already
      being worked on still go out; when more than ``backlog_cap`` bytes of them pile
      up behind the full buffer the connection is closed with 1008.
    - A connection from which no frame arrived, to which no reply went out and whose
      buffer did not drain for ``idle_timeout`` seconds, with no request being worked
      on, is closed with 1000, reason "idle". Pings and pongs do not count: the
      protocol has no subscriptions, so a client that sends nothing needs nothing.
      Frames waiting because the client does not read do not count as being worked
      on: a client stuck that way is idle.
    - A stopping node drains every session (:meth:`drain`): nothing more is read,
      and every frame already read is worked on and answered before the node closes
      the connection, so a request either gets its reply or was never read.
    """

    def __init__(
        self, connection: Connection, frames: FrameHandler, config: NodeConfig, clock: Any,
        admin: bool = True,
    ) -> None:
        self.connection = connection
        self.admin = admin  # may run admin ops (see FrameHandler.process)
        self.frames = frames
        self.clock = clock
        self.max_in_flight = config.max_in_flight
        self.idle_timeout = config.idle_timeout
        #: Bytes that may wait behind a full write buffer: one reply at the limit.
        self.backlog_cap = config.limits.max_reply_bytes
        self.in_flight = 0  # requests handed to the router and not answered yet
        self.handled = 0  # requests handled since the connection opened
        self.queue: deque[tuple[bytes, bool]] = deque()  # frames read, not handled yet
        self.write_full = False  # the transport paused us: its write buffer is full
        self.backlog = 0  # reply bytes written while the buffer was full
        self.reading = True
        self.closed = False
        self._drained: Deferred | None = None  # set by drain(): fires when all answered
        self._pumping = False
        self._last_active = clock.seconds()
        self._idle_call: Any = None
        if self.idle_timeout > 0:
            self._idle_call = clock.callLater(self.idle_timeout, self._check_idle)

    # -- what the connection reports ---------------------------------------------------

    def received(self, payload: bytes, is_binary: bool) -> None:
        """A frame from the client."""
        if self.closed:
            return
        self._last_active = self.clock.seconds()
        self.queue.append((payload, is_binary))
        self._pump()

    def pauseProducing(self) -> None:
        """The transport's write buffer is full."""
        if not self.write_full:
            self.write_full, self.backlog = True, 0

    def resumeProducing(self) -> None:
        """The transport's write buffer has drained."""
        self.write_full, self.backlog = False, 0
        self._last_active = self.clock.seconds()
        self._pump()

    def stopProducing(self) -> None:
        """The transport is going away; :meth:`connection_lost` follows."""

    def connection_lost(self) -> None:
        self._shut()

    def drain(self) -> Deferred:
        """Read nothing more; fire once every frame read so far is answered (or the
        connection is gone). Frames that cannot be worked on because the client does
        not read stay unanswered, and so unapplied, until the caller gives up."""
        if self._drained is None:
            self._drained = Deferred()
            if self.reading:
                self.reading = False
                self.connection.stop_reading()
            self._pump()
        return self._drained

    @property
    def pending(self) -> int:
        """Requests read and not answered: being worked on, or frames waiting."""
        return self.in_flight + len(self.queue)

    # -- decisions ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle waiting frames while the limits allow, and read only while none wait."""
        if self._pumping:
            return  # a reply that fired at once, inside the loop below
        self._pumping = True
        try:
            while (self.queue and not self.closed and not self.write_full
                   and self.in_flight < self.max_in_flight):
                self._work(*self.queue.popleft())
        finally:
            self._pumping = False
        if self._drained is not None:
            if self.closed or (not self.queue and not self.in_flight):
                self._fire_drained()
            return
        if self.closed:
            return
        if self.queue and self.reading:
            self.reading = False
            self.connection.stop_reading()
        elif not self.queue and not self.reading:
            self.reading = True
            self.connection.start_reading()

    def _work(self, payload: bytes, is_binary: bool) -> None:
        try:
            reply, count = self.frames.process(payload, is_binary, self.admin)
        except CloseConnection as e:
            _log.warn("closing client {peer} ({code}): {reason}",
                      peer=self.connection.peer, code=e.code, reason=e.reason)
            self.close(e.code, e.reason)
            return
        self.handled += count
        if not isinstance(reply, Deferred):
            self._send(reply, is_binary)
            return
        self.in_flight += count
        reply.addCallback(self._send, is_binary)
        reply.addErrback(
            lambda f: _log.failure("reply lost for {peer}", f, peer=self.connection.peer)
        )
        reply.addBoth(self._answered, count)

    def _answered(self, _: Any, count: int) -> None:
        self.in_flight -= count
        self._pump()

    def _send(self, payload: bytes, is_binary: bool) -> None:
        if self.closed:
            return  # the client went while its reply was on the way
        behind = self.write_full  # the reply that fills the buffer is not a backlog
        self.connection.send_reply(payload, is_binary)
        self._last_active = self.clock.seconds()
        if behind:
            self.backlog += len(payload)
            if self.backlog > self.backlog_cap:
                reason = (f"not reading replies: {self.backlog} bytes wait behind a full "
                          f"buffer (at most {self.backlog_cap})")
                _log.warn("closing client {peer} ({code}): {reason}",
                          peer=self.connection.peer, code=CLOSE_NOT_READING, reason=reason)
                self.close(CLOSE_NOT_READING, reason)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        quiet = self.clock.seconds() - self._last_active
        if self.in_flight == 0 and quiet >= self.idle_timeout:
            _log.info("closing client {peer}: idle for {seconds:.1f} s",
                      peer=self.connection.peer, seconds=quiet)
            self.close(CLOSE_IDLE, "idle")
            return
        left = self.idle_timeout - quiet
        self._idle_call = self.clock.callLater(
            left if left > 0 else self.idle_timeout, self._check_idle
        )

    def close(self, code: int, reason: str) -> None:
        """Close the connection; frames not handled yet are dropped unanswered."""
        if self.closed:
            return
        self._shut()
        self.connection.close_with(code, reason)
        if not self.reading:  # so the client's answer to the close can be read
            self.reading = True
            self.connection.start_reading()

    def _shut(self) -> None:
        self.closed = True
        self.queue.clear()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._fire_drained()

    def _fire_drained(self) -> None:
        if self._drained is not None and not self._drained.called:
            self._drained.callback(None)


class ClientProtocol(WebSocketServerProtocol):
    """One client connection. Replies go out as they are ready (pipelining)."""

    factory: "ClientFactory"
    session: ClientSession | None = None
    admin = True

    def onConnect(self, request: Any) -> None:
        admission = self.factory.admission
        if admission is not None:
            self.admin = admission.admin(request.headers.get("authorization"),
                                         request.params.get("token"))

    def onOpen(self) -> None:
        factory = self.factory
        self.session = ClientSession(self, factory.frames, factory.config, factory.clock,
                                     self.admin)
        # The session learns when the write buffer fills and drains by being the
        # transport's producer. Twisted Web registered its HTTP channel there, which
        # has nothing more to produce once the connection is a WebSocket.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self.session, True)
        factory.opened(self)
        if factory.draining:
            self.session.drain()  # opened while the node stops: it reads nothing
        _log.debug("client {peer} connected", peer=self.peer)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.received(payload, isBinary)

    def send_reply(self, payload: bytes, is_binary: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        if 0 < self.maxMessagePayloadSize < len(payload):
            # sendMessage holds outgoing messages to the incoming limit too; the
            # streaming API does not (and writes the payload without copying it).
            # What bounds a reply is max_reply_bytes (FrameHandler).
            self.beginMessage(isBinary=is_binary)
            self.sendMessageFrame(payload)
            self.endMessage()
        else:
            self.sendMessage(payload, is_binary)

    def stop_reading(self) -> None:
        self.transport.pauseProducing()

    def start_reading(self) -> None:
        self.transport.resumeProducing()

    def close_with(self, code: int, reason: str) -> None:
        # sendCloseFrame: Autobahn's sendClose allows only 1000 and 3000-4999.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    def going_away(self) -> None:
        """The node stops: close with 1001."""
        if self.session is not None:
            self.session.close(CLOSE_GOING_AWAY, "node shutting down")
        else:
            self.close_with(CLOSE_GOING_AWAY, "node shutting down")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.connection_lost()
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
        self.draining = False
        #: The client listener's admission policy, which says who may run admin ops
        #: (set by the site; None: everyone may).
        self.admission: Any = None
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

    def drain(self) -> Deferred:
        """Stop reading every client connection, those opened from now on included;
        fire once every request already read has been answered."""
        self.draining = True
        sessions = [p.session for p in self.connections if p.session is not None]
        return DeferredList([session.drain() for session in sessions])

    def pending(self) -> int:
        """Requests read from clients and not answered yet."""
        return sum(p.session.pending for p in self.connections if p.session is not None)
