"""The asyncio client: the same op methods as :class:`swarm.client.SwarmClient`, as
coroutines, over one ``websockets`` connection.

For programs on asyncio (aiohttp, FastAPI, ...) that have no Twisted reactor. Like the
Twisted client it pipelines: many requests may be in flight on one connection, a
reader task matches replies to them by id, and the requests made in one iteration of
the event loop leave together as batch frames (:func:`swarm.client.frames.autobatches`).
Logging goes to the standard :mod:`logging` module, as asyncio programs expect.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from swarm.client.frames import (
    MAX_PAYLOAD,
    auth_headers,
    handshake_error,
    ConnectionClosed,
    autobatches,
    binary_for,
    check_reply,
    replies_in,
    request_frame,
)
from swarm.errors import Timeout
from swarm.protocol.api import Ops
from swarm.protocol.wire import encode_frame, join_frame

_log = logging.getLogger(__name__)


class AsyncSwarmClient(Ops):
    """One connection to a node; every op method is a coroutine.

    Build it with ``await AsyncSwarmClient.connect(url)``, use it as
    ``async with``. Calls need not wait for each other: ``asyncio.gather`` over many
    of them puts them all in flight at once, in one frame.
    """

    def __init__(self, ws: ClientConnection, url: str, encoding: str = "cbor",
                 timeout: float | None = 10.0, autobatch: bool = True) -> None:
        self._ws = ws
        self.url = url
        self.encoding = encoding
        self.timeout = timeout
        self.autobatch = autobatch
        self._binary = binary_for(encoding)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._queued: list[tuple[asyncio.Future, bytes]] = []
        self._flush_scheduled = False
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._closed: ConnectionClosed | None = None
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())

    def __repr__(self) -> str:
        return f"<AsyncSwarmClient {self.url} {self.encoding}>"

    @classmethod
    async def connect(
        cls,
        url: str,
        encoding: str = "cbor",
        timeout: float | None = 10.0,
        connect_timeout: float = 10.0,
        token: str | None = None,
        autobatch: bool = True,
        **ws_options: Any,
    ) -> AsyncSwarmClient:
        """Open a WebSocket to ``url`` (``ws://`` or ``wss://``).

        Raises :class:`~swarm.errors.Unavailable` when the node cannot be reached within
        ``connect_timeout``, :class:`~swarm.errors.Unauthorized` when it refuses
        ``token`` (sent as ``Authorization: Bearer``). ``timeout`` bounds each request.
        ``autobatch=False`` sends every request in a frame of its own. ``ws_options``
        go to :func:`websockets.asyncio.client.connect` (e.g. ``ssl=`` for a private CA).
        """
        binary_for(encoding)
        try:
            ws = await ws_connect(
                url, additional_headers=auth_headers(token), open_timeout=connect_timeout,
                max_size=MAX_PAYLOAD, compression=None, **ws_options,
            )
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException,
                ValueError) as e:
            raise handshake_error(url, e) from None
        _log.info("connected to %s", url)
        return cls(ws, url, encoding, timeout, autobatch)

    # -- requests ------------------------------------------------------------------------

    def _expect(self, what: str) -> tuple[int, asyncio.Future]:
        """A new id and the future its reply resolves; past the timeout it raises Timeout."""
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        future = loop.create_future()
        self._waiting[rid] = future
        timer = None
        if self.timeout is not None:
            timeout = self.timeout
            timer = loop.call_later(timeout, self._time_out, rid, what, timeout)

        def done(f: asyncio.Future) -> None:
            self._waiting.pop(rid, None)
            if timer is not None:
                timer.cancel()

        future.add_done_callback(done)
        return rid, future

    def _time_out(self, rid: int, what: str, timeout: float) -> None:
        future = self._waiting.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(Timeout(f"no reply to {what} within {timeout:g}s"))

    def _queue(self, future: asyncio.Future, data: bytes) -> None:
        if not self.autobatch:
            self._outbox.put_nowait(data)
            return
        self._queued.append((future, data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this loop iteration queued: a lone request as a plain frame,
        several as batch frames. Those already timed out or cancelled stay behind."""
        self._flush_scheduled = False
        queued, self._queued = self._queued, []
        waiting = [item for item in queued if not item[0].done()]
        for chunk in autobatches(waiting, lambda item: len(item[1])):
            if len(chunk) == 1:
                self._outbox.put_nowait(chunk[0][1])
            else:
                self._outbox.put_nowait(join_frame([d for _, d in chunk], self._binary))

    async def request(self, op: str, **args: Any) -> dict:
        """Run any op; the whole success reply, or raise the SwarmError it carries."""
        if self._closed is not None:
            raise self._closed
        rid, future = self._expect(op)
        try:
            data = encode_frame(request_frame(rid, op, args), self._binary)
        except Exception:
            future.cancel()
            raise
        self._queue(future, data)
        try:
            return check_reply(await future)
        finally:
            future.cancel()  # a caller that gave up stops waiting (and is not sent)

    async def _call(self, op: str, args: dict[str, Any],
                    pick: Callable[[dict], Any]) -> Any:
        return pick(await self.request(op, **args))

    async def batch(self, requests: Iterable[dict]) -> list[dict]:
        """Send the requests in ONE frame; their reply dicts in order (errors stay
        dicts, ``ok`` false: a batch mixes results). Ids are assigned here."""
        if self._closed is not None:
            raise self._closed
        frame = []
        for request in requests:
            if not isinstance(request, dict):
                raise TypeError(f"a request must be a dict, not {request!r}")
            frame.append(dict(request))
        if not frame:
            return []
        futures = []
        for item in frame:
            item["id"], future = self._expect(f"a batch of {len(frame)}")
            futures.append(future)
        try:
            data = encode_frame(frame, self._binary)
            self._flush()  # requests made before it leave before it
            self._outbox.put_nowait(data)
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()

    # -- the connection ------------------------------------------------------------------

    async def _write(self) -> None:
        try:
            while True:
                data = await self._outbox.get()
                await self._ws.send(data if self._binary else data.decode("utf-8"))
        except websockets.exceptions.ConnectionClosed:
            pass  # the reader fails what waits

    async def _read(self) -> None:
        why = "closed"
        try:
            async for message in self._ws:
                binary = isinstance(message, bytes)
                payload = message if binary else message.encode("utf-8")
                for rid, reply in replies_in(payload, binary, _log.warning):
                    future = self._waiting.get(rid)
                    if future is not None and not future.done():
                        future.set_result(reply)
        except websockets.exceptions.ConnectionClosed as e:
            why = f"closed: {e}"
        finally:
            self._fail_all(ConnectionClosed(f"connection to {self.url} {why}"))
            self._writer.cancel()

    def _fail_all(self, reason: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = reason
            _log.info("disconnected from %s (%s)", self.url, reason.message)
        self._queued = []
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_exception(reason)
        self._waiting.clear()

    @property
    def pending(self) -> int:
        """How many requests wait for a reply."""
        return len(self._waiting)

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionClosed."""
        self._fail_all(ConnectionClosed(f"connection to {self.url} closed by the client"))
        await self._ws.close()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def __aenter__(self) -> AsyncSwarmClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
