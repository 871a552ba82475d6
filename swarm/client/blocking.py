"""The blocking client: the same op methods as :class:`swarm.client.SwarmClient`,
returning their results, for threads (web workers, scripts) with no event loop.

A small pool of ``websockets.sync`` connections serves the threads: each call takes an
idle connection (or dials one, up to ``pool_size``), sends one frame, reads until its
reply, and gives the connection back. A connection that breaks is dropped, and the
next call dials a new one, so a client outlives a node's restart.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import websockets
from websockets.protocol import State
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from swarm.client.frames import (
    MAX_PAYLOAD,
    auth_headers,
    handshake_error,
    ConnectionClosed,
    binary_for,
    check_reply,
    replies_in,
    request_frame,
)
from swarm.errors import Timeout
from swarm.protocol.api import Ops
from swarm.protocol.wire import encode_frame

_log = logging.getLogger(__name__)


class BlockingSwarmClient(Ops):
    """A thread-safe pool of connections to one node; every op method blocks and
    returns its result (or raises the :class:`~swarm.errors.SwarmError` of its reply).

    Retries: a request is sent again, on a newly dialled connection, only when it
    never left, i.e. the pooled connection was found closed before the frame was
    written (a node that restarted), at most ``retries`` times. A request whose frame
    was written is never resent, read or write: once it left, the node may have applied
    it, so a lost connection then raises :class:`ConnectionClosed` (an ``Unavailable``)
    and a missing reply :class:`~swarm.errors.Timeout`; the caller knows whether its op
    is safe to repeat.
    """

    def __init__(
        self,
        url: str,
        encoding: str = "cbor",
        timeout: float | None = 10.0,
        connect_timeout: float = 10.0,
        token: str | None = None,
        pool_size: int = 4,
        retries: int = 1,
        **ws_options: Any,
    ) -> None:
        """Nothing is dialled until the first call. ``timeout`` bounds each request
        (and the wait for a free connection when all ``pool_size`` are busy);
        ``token`` is sent as ``Authorization: Bearer``; ``ws_options`` go to
        :func:`websockets.sync.client.connect` (e.g. ``ssl=``)."""
        self._binary = binary_for(encoding)
        if not (isinstance(pool_size, int) and pool_size >= 1):
            raise ValueError(f"pool_size must be an integer >= 1, not {pool_size!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        self.url = url
        self.encoding = encoding
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self.retries = retries
        self._token = token
        self._ws_options = ws_options
        self._ids = itertools.count(1)  # next() on a count is atomic under the GIL
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._idle: list[ClientConnection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<BlockingSwarmClient {self.url} {self.encoding} pool {self.pool_size}>"

    # -- the pool ------------------------------------------------------------------------

    def _dial(self) -> ClientConnection:
        try:
            ws = ws_connect(
                self.url, additional_headers=auth_headers(self._token),
                open_timeout=self.connect_timeout, max_size=MAX_PAYLOAD,
                compression=None, **self._ws_options,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException,
                ValueError) as e:
            raise handshake_error(self.url, e) from None
        _log.info("connected to %s", self.url)
        # The pool closes it itself; entering says so (websockets >= 17.1 warns otherwise).
        return ws.__enter__()

    def _take(self) -> ClientConnection:
        """An open idle connection, or a new one; the caller holds a slot."""
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectionClosed(f"client of {self.url} is closed")
                ws = self._idle.pop() if self._idle else None
            if ws is None:
                return self._dial()
            if ws.protocol.state is State.OPEN:
                return ws
            ws.close()  # closed while idle (the node restarted): drop it

    def _give_back(self, ws: ClientConnection) -> None:
        with self._lock:
            if not self._closed and ws.protocol.state is State.OPEN:
                self._idle.append(ws)
                return
        ws.close()

    def _exchange(self, frame: Any, ids: list[int]) -> dict[int, dict]:
        """Send ``frame`` and return the replies to ``ids``, retrying only what never left."""
        data = encode_frame(frame, self._binary)
        message: bytes | str = data if self._binary else data.decode("utf-8")
        if not self._slots.acquire(timeout=-1 if self.timeout is None else self.timeout):
            raise Timeout(f"no free connection to {self.url} within {self.timeout:g}s")
        try:
            for attempt in itertools.count():
                ws = self._take()
                try:
                    ws.send(message)
                except websockets.exceptions.ConnectionClosed as e:
                    ws.close()
                    if attempt >= self.retries:
                        raise ConnectionClosed(f"connection to {self.url} closed: {e}") from None
                    continue  # it never left: safe on a new connection
                try:
                    replies = self._read(ws, ids)
                except BaseException:
                    ws.close()  # a reply may still come: the connection is not reusable
                    raise
                self._give_back(ws)
                return replies
        finally:
            self._slots.release()

    def _read(self, ws: ClientConnection, ids: list[int]) -> dict[int, dict]:
        wanted = set(ids)
        replies: dict[int, dict] = {}
        while wanted:
            try:
                message = ws.recv(timeout=self.timeout)
            except TimeoutError:
                raise Timeout(f"no reply from {self.url} within {self.timeout:g}s") from None
            except websockets.exceptions.ConnectionClosed as e:
                raise ConnectionClosed(f"connection to {self.url} closed: {e}") from None
            binary = isinstance(message, bytes)
            payload = message if binary else message.encode("utf-8")
            for rid, reply in replies_in(payload, binary, _log.warning):
                if rid in wanted:
                    wanted.discard(rid)
                    replies[rid] = reply
        return replies

    # -- requests ------------------------------------------------------------------------

    def request(self, op: str, **args: Any) -> dict:
        """Run any op; the whole success reply, or raise the SwarmError it carries."""
        rid = next(self._ids)
        return check_reply(self._exchange(request_frame(rid, op, args), [rid])[rid])

    def _call(self, op: str, args: dict[str, Any], pick: Callable[[dict], Any]) -> Any:
        return pick(self.request(op, **args))

    def batch(self, requests: Iterable[dict]) -> list[dict]:
        """Send the requests in ONE frame; their reply dicts in order (errors stay
        dicts, ``ok`` false: a batch mixes results). Ids are assigned here."""
        frame = []
        for request in requests:
            if not isinstance(request, dict):
                raise TypeError(f"a request must be a dict, not {request!r}")
            frame.append(dict(request, id=next(self._ids)))
        if not frame:
            return []
        ids = [item["id"] for item in frame]
        replies = self._exchange(frame, ids)
        return [replies[rid] for rid in ids]

    def close(self) -> None:
        """Close the idle connections; those in use close when their call returns.
        Later calls raise :class:`ConnectionClosed`."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for ws in idle:
            ws.close()

    def __enter__(self) -> BlockingSwarmClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

