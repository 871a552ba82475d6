"""The Python client: a Deferred API over one WebSocket connection to any node.

Two layers, as in magic-wormhole and Twisted AMP:

* :class:`RequestTracker` is plain logic with no I/O. It numbers requests, keeps
  ``id -> Deferred`` for those in flight, times them out on an injected clock and fails them
  all when the connection goes away, through :class:`swarm.correlate.Correlator` (the core
  the peer links use too). Tests drive it with ``task.Clock`` and a list as the sink.
* :class:`_ClientProtocol` is a thin Autobahn adapter that feeds it frames, and
  :class:`SwarmClient` is the public face, built by :meth:`SwarmClient.connect`.

Many requests may be in flight at once on one connection (pipelining); replies come back in
any order and are matched by id. Sending many requests in one frame is where the throughput
is, so the client does it by itself: requests made in one reactor turn leave together, as one
batch frame, when that turn ends (each caller still gets its own Deferred, timeout and
error). :meth:`SwarmClient.batch` and :meth:`SwarmClient.pipeline` make a batch explicitly.

With ``encoding="json"`` a byte-string value stored by a CBOR client comes back as
``{"$base64": "..."}``, as the wire layer encodes it; JSON cannot carry bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from swarm.client.frames import (  # re-exported: this module's public names
    AUTOBATCH_BYTES,
    AUTOBATCH_COUNT,
    ENCODINGS,
    MAX_PAYLOAD,
    ConnectionClosed,
    auth_headers,
    autobatches,
    check_reply,
)
from swarm.correlate import Correlator
from swarm.errors import SwarmError, Timeout, Unavailable, error_from_wire
from swarm.logs import logger
from swarm.protocol.api import CacheOps
from swarm.protocol.urls import client_endpoint
from swarm.protocol.wire import decode_frame, encode_frame, join_frame

_log = logger(__name__)

# -- the logic ---------------------------------------------------------------------------


class RequestTracker:
    """Numbers requests, matches replies to them by id, times them out.

    ``send(payload, is_binary)`` puts one frame on the wire; ``clock`` schedules the
    timeouts (kept to within :data:`swarm.correlate.SLACK`, late, never early). Ids,
    replies, timeouts and cancellation are a :class:`~swarm.correlate.Correlator`'s, the
    same core the peer links use; this class adds the client's frames, batches, and the
    rule that nothing is sent once the connection has gone. Nothing here touches a
    socket, so it is tested with a list and a ``task.Clock``.

    With ``autobatch`` a request is encoded at once (a value that cannot be fails at
    once) but sent by :meth:`flush`, which the clock runs at the end of the turn: the
    requests of one turn leave in order, a lone one as a plain frame, several as batch
    frames. A request cancelled or timed out before then is not sent.
    """

    def __init__(
        self,
        send: Callable[[bytes, bool], None],
        clock: IReactorTime,
        encoding: str = "cbor",
        timeout: float | None = 10.0,
        autobatch: bool = False,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be 'cbor' or 'json', not {encoding!r}")
        self._send = send
        self._clock = clock
        self._binary = ENCODINGS[encoding]
        self.encoding = encoding
        self.timeout = timeout
        self.autobatch = autobatch
        self._calls = Correlator(clock)
        self._closed: Failure | None = None
        #: Requests of this turn not sent yet: (id, encoded request, its Deferred).
        self._queued: list[tuple[int, bytes, Deferred]] = []
        self._flush_call: IDelayedCall | None = None

    @property
    def pending(self) -> int:
        """How many requests are waiting for a reply (sent or queued)."""
        return self._calls.pending

    def _expect(self, what: str) -> tuple[int, Deferred[dict]]:
        """A new id, and the Deferred its reply fires; past the timeout it raises Timeout."""
        timeout = self.timeout
        return self._calls.expect(
            timeout, lambda: Timeout(f"no reply to {what} within {timeout:g}s")
        )

    def _transmit(self, frame: Any, d: Deferred) -> Failure | None:
        """Encode and send one frame; if that fails, retire ``d`` quietly and return why."""
        try:
            self._send(encode_frame(frame, self._binary), self._binary)
        except Exception:
            why = Failure()
            d.addErrback(lambda _: None)
            d.cancel()
            return why
        return None

    def raw_request(self, request: dict) -> Deferred[dict]:
        """Send one request (its id is assigned here); fire with the reply as it came."""
        if self._closed is not None:
            return fail(self._closed)
        frame = dict(request)
        rid, d = self._expect(str(frame.get("op")))
        frame["id"] = rid
        if not self.autobatch:
            why = self._transmit(frame, d)
            return d if why is None else fail(why)
        try:
            data = encode_frame(frame, self._binary)
        except Exception:
            why = Failure()
            self._calls.fail(rid, why)
            return d
        self._queued.append((rid, data, d))
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """Send the requests queued so far (see the class docstring)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        queued, self._queued = self._queued, []
        waiting = [item for item in queued if not item[2].called]  # not cancelled, not timed out
        for chunk in autobatches(waiting, lambda item: len(item[1])):
            self._send_queued(chunk)

    def _send_queued(self, chunk: list[tuple[int, bytes, Deferred]]) -> None:
        if len(chunk) == 1:
            payload = chunk[0][1]
        else:
            payload = join_frame([data for _, data, _ in chunk], self._binary)
        try:
            self._send(payload, self._binary)
        except Exception:
            why = Failure()
            for rid, _, _ in chunk:
                self._calls.fail(rid, why)

    def request(self, op: str, **args: Any) -> Deferred[dict]:
        """Send ``{"op": op, **args}``; fire with the success reply or raise its error."""
        request = {"op": op}
        request.update(args)
        return self.raw_request(request).addCallback(check_reply)

    def batch(self, requests: Iterable[dict]) -> Deferred[list[dict]]:
        """Send the requests in one frame; fire with their replies in order.

        Error replies stay dicts: a batch mixes results, so one failure must not hide the
        rest. The whole batch shares one timeout.
        """
        if self._closed is not None:
            return fail(self._closed)
        self.flush()  # requests made before it leave before it
        frame = []
        for request in requests:
            if not isinstance(request, dict):
                return fail(TypeError(f"a request must be a dict, not {request!r}"))
            frame.append(dict(request))
        if not frame:
            return succeed([])
        what = f"a batch of {len(frame)}"
        parts = []
        for item in frame:
            item["id"], part = self._expect(what)
            parts.append(part)
        replies: list[Any] = [None] * len(parts)
        remaining = [len(parts)]

        def stop_waiting(_: object = None) -> None:
            for part in parts:
                part.cancel()  # a part already answered ignores this

        batch_d: Deferred[list[dict]] = Deferred(stop_waiting)

        def got(reply: dict, index: int) -> None:
            replies[index] = reply
            remaining[0] -= 1
            if remaining[0] == 0:
                batch_d.callback(replies)

        def failed(reason: Failure) -> None:
            if not batch_d.called:
                batch_d.errback(reason)
                stop_waiting()

        for index, part in enumerate(parts):
            part.addCallbacks(got, failed, callbackArgs=(index,))
        why = self._transmit(frame, batch_d)
        return batch_d if why is None else fail(why)

    def frame_received(self, payload: bytes, is_binary: bool) -> None:
        """Deliver the replies in one frame; what cannot be matched is logged and dropped."""
        try:
            decoded = decode_frame(payload, is_binary)
        except SwarmError as e:
            _log.warn("dropped a frame the client cannot decode: {error}", error=e.message)
            return
        for reply in decoded if isinstance(decoded, list) else [decoded]:
            self._reply_received(reply)

    def _reply_received(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            _log.warn("dropped a reply that is not an object: {reply!r}", reply=reply)
            return
        rid = reply.get("id")
        known = isinstance(rid, int) and not isinstance(rid, bool)
        if known and self._calls.resolve(rid, reply):
            return
        if rid is None and reply.get("ok") is False:
            # The node could not tell which request this answers: nothing to fail.
            _log.warn("node reported an error for no request: {error!r}",
                      error=reply.get("error"))
        else:
            _log.debug("dropped a reply nobody waits for (id {id!r})", id=rid)

    def fail_all(self, reason: Exception | Failure) -> None:
        """Fail every request in flight, and every later one, with ``reason``.

        Called when the connection is lost or closed, like AMP's ``failAllOutgoing``.
        """
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        if self._closed is None:
            self._closed = reason
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._queued = []
        self._calls.fail_all(reason)


# -- the public face ---------------------------------------------------------------------


class SwarmClient(CacheOps):
    """One connection to a node; every method returns a Deferred.

    Build it with :meth:`connect`. Calls need not wait for each other: many may be in
    flight at once, and each fires when its own reply arrives. The op methods (get,
    set, incr, ...) come from :class:`swarm.api.CacheOps`, shared with the in-process
    API of :class:`swarm.service.SwarmNode`.
    """

    def __init__(
        self,
        requests: RequestTracker,
        closer: Callable[[], Deferred[None]],
        url: str = "",
    ) -> None:
        self._requests = requests
        self._closer = closer
        self.url = url

    def __repr__(self) -> str:
        return f"<SwarmClient {self.url} {self._requests.encoding}>"

    @classmethod
    def connect(
        cls,
        url: str,
        reactor: Any = None,
        encoding: str = "cbor",
        timeout: float | None = 10.0,
        connect_timeout: float = 10.0,
        ca: str | None = None,
        autobatch: bool = True,
        token: str | None = None,
    ) -> Deferred[SwarmClient]:
        """Open a WebSocket to the node at ``url`` (``ws://host:port`` or ``wss://``).

        Fires when the WebSocket is open; fails with :class:`~swarm.errors.Unavailable`
        when the node cannot be reached or refuses the handshake within
        ``connect_timeout`` seconds. ``timeout`` bounds each later request. A
        ``wss://`` node's certificate must be signed by a CA of the PEM file ``ca``
        (default: the system's trust store) and name the URL's host. ``autobatch``
        sends the requests made in one reactor turn as one frame when the turn ends
        (a node answers a batch frame once all its requests are done, so a quick
        request waits for the slow ones of its turn); False sends each at once.
        ``token``, for a node with client tokens, goes as ``Authorization: Bearer``.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if encoding not in ENCODINGS:
            return fail(ValueError(f"encoding must be 'cbor' or 'json', not {encoding!r}"))
        try:
            endpoint = client_endpoint(reactor, url, connect_timeout, ca)
            factory = _ClientFactory(url=url, reactor=reactor, headers=auth_headers(token))
        except (ValueError, OSError) as e:
            return fail(Unavailable(f"cannot connect to {url}: {e}"))
        factory.encoding = encoding
        factory.request_timeout = timeout
        factory.autobatch = autobatch
        factory.setProtocolOptions(
            maxMessagePayloadSize=MAX_PAYLOAD,
            maxFramePayloadSize=MAX_PAYLOAD,
            # Our own deadline below covers the handshake on the injected reactor;
            # Autobahn's would run on the global one.
            openHandshakeTimeout=0,
        )
        opened: Deferred[SwarmClient] = Deferred(lambda _: abort())
        factory.opened = opened
        connecting = endpoint.connect(factory)

        def abort() -> None:
            if not connecting.called:
                connecting.cancel()
            elif factory.protocol_instance is not None:
                factory.protocol_instance.transport.abortConnection()

        def tcp_failed(reason: Failure) -> None:
            if not opened.called:
                opened.errback(reason)

        connecting.addErrback(tcp_failed)

        def handshake_timed_out(result: Any, seconds: float) -> Any:
            raise Unavailable(
                f"cannot connect to {url}: no WebSocket handshake within {seconds:g}s"
            )

        def unavailable(reason: Failure) -> Failure:
            if reason.check(Unavailable):
                return reason
            return Failure(Unavailable(f"cannot connect to {url}: {_describe(reason)}"))

        opened.addTimeout(connect_timeout, reactor, onTimeoutCancel=handshake_timed_out)
        opened.addErrback(unavailable)
        return opened

    # -- generic -------------------------------------------------------------------------

    def request(self, op: str, **args: Any) -> Deferred[dict]:
        """Send any op; fire with the whole success reply, or raise the error it carries.

        Every method below is built on this; use it for ops this client does not wrap.
        """
        return self._requests.request(op, **args)

    def batch(self, requests: list[dict]) -> Deferred[list[dict]]:
        """Send many requests in ONE frame; fire with their reply dicts, in order.

        Ids are assigned here (any given are overwritten). Error replies are returned
        as dicts (``ok`` false), not raised, since a batch mixes results.
        """
        return self._requests.batch(requests)

    def pipeline(self) -> Pipeline:
        """A :class:`Pipeline`: op calls collected until ``execute()`` sends them in one frame."""
        return Pipeline(self._requests)

    def close(self) -> Deferred[None]:
        """Close the connection; fires once it is closed.

        Requests still in flight fail with :class:`ConnectionClosed` at once.
        """
        self._requests.fail_all(ConnectionClosed(f"connection to {self.url} closed by the client"))
        return self._closer()


class Pipeline(CacheOps):
    """Op calls (get, set, incr, ...) collected, then sent as one batch frame.

    Each op method returns a Deferred that fires when :meth:`execute` has its reply,
    as the same method of :class:`SwarmClient` would. ``execute()`` fires with every
    op's result in order, with the :class:`~swarm.errors.SwarmError` instance in the
    place of an op that failed (a batch mixes results: one failure must not hide the
    rest). Like a ``DeferredList``, the list holds what each op's Deferred ends with,
    after the callbacks added to it before ``execute()``; an error is not logged as
    unhandled, since the list reports it. After ``execute()`` the pipeline is empty.
    """

    def __init__(self, requests: RequestTracker) -> None:
        self._requests = requests
        self._ops: list[tuple[dict, Deferred]] = []

    def __len__(self) -> int:
        return len(self._ops)

    def request(self, op: str, **args: Any) -> Deferred[dict]:
        request = {"op": op}
        request.update(args)
        d: Deferred[dict] = Deferred()
        self._ops.append((request, d))
        return d

    def execute(self) -> Deferred[list]:
        """Send the ops collected so far in one frame; fire with their results in order."""
        ops, self._ops = self._ops, []
        results: list[Any] = [None] * len(ops)

        def keep(result: Any, index: int) -> None:
            results[index] = result.value if isinstance(result, Failure) else result

        for index, (_, d) in enumerate(ops):
            d.addBoth(keep, index)

        def answered(replies: list[dict]) -> list:
            for (_, d), reply in zip(ops, replies):
                if reply.get("ok") is True:
                    d.callback(reply)
                else:
                    d.errback(error_from_wire(reply.get("error")))
            return results

        def failed(reason: Failure) -> Failure:
            for _, d in ops:
                d.errback(reason)
            return reason

        sent = self._requests.batch([request for request, _ in ops])
        return sent.addCallbacks(answered, failed)


# -- the Autobahn adapter ----------------------------------------------------------------


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    return text.strip()


class _ClientProtocol(WebSocketClientProtocol):
    """Feeds frames to a :class:`RequestTracker`; nothing more."""

    #: Nagle off (Autobahn reads this before it copies the factory's options).
    tcpNoDelay = True

    def connectionMade(self) -> None:
        self.factory.protocol_instance = self
        self._requests: RequestTracker | None = None
        self._closed_waiters: list[Deferred[None]] = []
        self._is_closed = False
        super().connectionMade()

    def onOpen(self) -> None:
        factory = self.factory
        self._requests = RequestTracker(
            self._send, factory.reactor, factory.encoding, factory.request_timeout,
            factory.autobatch,
        )
        client = SwarmClient(self._requests, self._close, factory.url)
        _log.info("connected to {url}", url=factory.url)
        if not factory.opened.called:
            factory.opened.callback(client)

    def _send(self, payload: bytes, is_binary: bool) -> None:
        self.sendMessage(payload, isBinary=is_binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._requests is not None:
            self._requests.frame_received(payload, isBinary)

    def _close(self) -> Deferred[None]:
        if self._is_closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        if self.state == self.STATE_OPEN:
            self.sendClose(code=1000)
        return d

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._is_closed = True
        url = self.factory.url
        if self._requests is not None:
            why = f"connection to {url} closed" + (f": {reason}" if reason else "")
            _log.info("disconnected from {url} ({code}, {reason})",
                      url=url, code=code, reason=reason)
            self._requests.fail_all(ConnectionClosed(why))
        opened = self.factory.opened
        if not opened.called:
            opened.errback(Unavailable(
                f"cannot connect to {url}: {reason or 'WebSocket handshake failed'}"
            ))
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientProtocol
    protocol_instance: _ClientProtocol | None = None
    opened: Deferred
    encoding = "cbor"
    request_timeout: float | None = 10.0
    autobatch = True
