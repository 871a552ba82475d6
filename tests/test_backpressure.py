"""Issue 8's limits on one client connection: in flight, a client that does not read,
replies past the incoming frame limit, batches past the batch limit, idle clients.

The real-socket tests talk to a node on 127.0.0.1 through the ``websockets`` package;
the :class:`ClientSession` rules are also tested alone on a ``task.Clock``. Memory
figures for the same attacks on a node process: tests/backpressure_rss.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import cbor2
import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio, start_node
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher

from swarm.edge.protocol import (
    CLOSE_IDLE,
    CLOSE_NOT_READING,
    CLOSE_TOO_BIG,
    ClientSession,
    CloseConnection,
    FrameHandler,
)
from swarm.errors import TooLarge
from swarm.node.config import NodeConfig
from swarm.protocol.wire import Limits, RequestParser, encode_frame, error_reply, request_id

#: Upper bound for any single wait on the network.
STEP = 10.0


# -- helpers -----------------------------------------------------------------------------


async def within(check: Callable[[], Any], what: str, timeout: float = STEP) -> Any:
    """Poll ``check`` every 20 ms until it is true; fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


async def call(ws: Any, obj: Any) -> Any:
    await ws.send(json.dumps(obj))
    return json.loads(await asyncio.wait_for(ws.recv(), STEP))


async def hits(url: str) -> int:
    async with websockets.connect(url, open_timeout=STEP) as ws:
        return (await call(ws, {"id": 1, "op": "stats"}))["stats"]["hits"]


async def steady(read: Callable[[], Any], quiet: float = 0.5) -> int:
    """``await read()`` once it has stayed the same for ``quiet`` seconds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    last, since = await read(), loop.time()
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.1)
        now = await read()
        if now != last:
            last, since = now, loop.time()
    return last


async def on_node(body: Callable[[Any], Any], **options: Any) -> None:
    """Run the asyncio ``body(node)`` against a fresh node started with ``options``."""
    node = await start_node(**options)
    try:
        await on_asyncio(body(node))
    finally:
        await node.stopService()


def session_of(node: Any, before: set) -> ClientSession:
    (protocol,) = set(node.client_factory.connections) - before
    return protocol.session


class Events:
    """The log events of swarm.edge.protocol while the test runs."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == "swarm.edge.protocol":
            self.seen.append(event)

    def __enter__(self) -> "Events":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


class Held:
    """The node's FrameHandler, except that ``{"op": "hold"}`` requests (alone or in a
    batch) wait for :meth:`release`; each is answered with ``size`` bytes of filler."""

    def __init__(self, frames: FrameHandler, size: int = 10) -> None:
        self.frames = frames
        self.size = size
        self.waiting: list[tuple[Deferred, bytes]] = []
        self.admitted = 0

    def process(self, payload: bytes, is_binary: bool, admin: bool = True) -> tuple[Any, int]:
        obj = json.loads(payload)
        batch = obj if isinstance(obj, list) else [obj]
        if not all(isinstance(r, dict) and r.get("op") == "hold" for r in batch):
            return self.frames.process(payload, is_binary)
        replies = [{"id": r["id"], "ok": True, "filler": "x" * self.size} for r in batch]
        d: Deferred = Deferred()
        self.waiting.append((d, encode_frame(replies if isinstance(obj, list) else replies[0],
                                             False)))
        self.admitted += len(batch)
        return d, len(batch)

    def release(self, count: int | None = None) -> None:
        ready, self.waiting = self.waiting[:count], self.waiting[len(self.waiting[:count]):]
        for d, reply in ready:
            d.callback(reply)


# -- a client that never reads ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_gets_no_more_work_done_until_it_reads():
    await on_node(_never_reads, node_id="bp-reads")


async def _never_reads(node: Any) -> None:
    value = "v" * 250_000
    gets = 600  # 150 MB of replies
    before = set(node.client_factory.connections)
    async with websockets.connect(node.url, max_size=None, open_timeout=STEP) as ws:
        assert (await call(ws, {"id": 0, "op": "set", "key": "big", "value": value}))["ok"]
        session = session_of(node, before)
        base = await hits(node.url)
        ws.transport.pause_reading()  # never read a byte of the replies
        for i in range(1, gets + 1):
            await asyncio.wait_for(ws.send(cbor2.dumps({"id": i, "op": "get", "key": "big"})),
                                   STEP)
        served = await steady(lambda: hits(node.url)) - base
        # What the socket buffers hold and no more; without backpressure, all 600.
        assert served <= 150, f"{served} of {gets} gets served to a client that reads nothing"
        assert session.write_full and not session.reading
        assert session.handled == served + 1  # and the set
        # Another client is answered at once meanwhile.
        async with websockets.connect(node.url, open_timeout=STEP) as other:
            assert (await asyncio.wait_for(call(other, {"id": 7, "op": "ping"}), 2.0))["ok"]
        # Once the client reads, every request is answered.
        ws.transport.resume_reading()
        ids = set()
        while len(ids) < gets:
            reply = cbor2.loads(await asyncio.wait_for(ws.recv(), STEP))
            assert reply["ok"] and len(reply["value"]) == len(value)
            ids.add(reply["id"])
        assert ids == set(range(1, gets + 1))
        assert session.reading and session.in_flight == 0 and not session.queue


@pytest_twisted.ensureDeferred
async def test_replies_piling_up_behind_a_full_buffer_close_the_connection_with_1008():
    with Events() as events:
        await on_node(_backlog, node_id="bp-backlog", limits=Limits(max_reply_bytes=2_000_000))
    closing = [e for e in events.seen if e.get("code") == CLOSE_NOT_READING]
    assert closing and "not reading" in closing[0]["reason"], events.seen


async def _backlog(node: Any) -> None:
    held = node.client_factory.frames = Held(node.client_factory.frames, size=500_000)
    before = set(node.client_factory.connections)
    async with websockets.connect(node.url, max_size=None, open_timeout=STEP) as ws:
        await within(lambda: set(node.client_factory.connections) - before, "the session")
        (protocol,) = set(node.client_factory.connections) - before
        ws.transport.pause_reading()
        for i in range(30):
            await ws.send(json.dumps({"id": i, "op": "hold"}))
        await within(lambda: held.admitted == 30, "all 30 requests in flight")
        held.release()  # 15 MB of replies at once, to a client that reads nothing
        await within(lambda: protocol not in node.client_factory.connections,
                     "the node to close the connection")
        assert protocol.localCloseCode == CLOSE_NOT_READING
        ws.transport.abort()


# -- requests in flight -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_past_max_in_flight_the_node_stops_reading_until_replies_drain():
    await on_node(_in_flight, node_id="bp-flight", max_in_flight=4)


async def _in_flight(node: Any) -> None:
    held = node.client_factory.frames = Held(node.client_factory.frames)
    before = set(node.client_factory.connections)
    async with websockets.connect(node.url, open_timeout=STEP) as ws:
        for i in range(10):
            await ws.send(json.dumps({"id": i, "op": "hold"}))
        await ws.send(json.dumps({"id": "p", "op": "ping"}))
        session = session_of(node, before)
        await within(lambda: held.admitted == 4, "four requests in flight")
        await within(lambda: not session.reading, "the node to stop reading")
        await asyncio.sleep(0.3)
        assert held.admitted == 4 and session.in_flight == 4  # the rest wait
        held.release(1)
        await within(lambda: held.admitted == 5, "one more admitted as one was answered")
        assert json.loads(await asyncio.wait_for(ws.recv(), STEP))["id"] == 0
        got = {0}
        while len(got) < 11:
            held.release()
            got.add(json.loads(await asyncio.wait_for(ws.recv(), STEP))["id"])
        assert got == set(range(10)) | {"p"}
        await within(lambda: session.reading, "reading again")
        # A batch is admitted whole, past the limit; the next frame waits for it.
        await ws.send(json.dumps([{"id": f"b{i}", "op": "hold"} for i in range(6)]))
        await ws.send(json.dumps({"id": "after", "op": "hold"}))
        await within(lambda: held.admitted == 16, "the batch in flight")
        assert session.in_flight == 6
        await asyncio.sleep(0.2)
        assert held.admitted == 16  # "after" waits for the batch
        held.release()
        assert len(json.loads(await asyncio.wait_for(ws.recv(), STEP))) == 6
        await within(lambda: held.admitted == 17, "the frame after the batch")
        held.release()
        assert json.loads(await asyncio.wait_for(ws.recv(), STEP))["id"] == "after"


# -- replies over the incoming frame limit --------------------------------------------------


@pytest.mark.parametrize("cbor", [False, True], ids=["json", "cbor"])
@pytest_twisted.ensureDeferred
async def test_replies_over_max_message_size_are_delivered(cbor):
    await on_node(lambda node: _big_replies(node, cbor), node_id="bp-big",
                  max_value_size=1_000_000)


async def _big_replies(node: Any, cbor: bool) -> None:
    code = cbor2 if cbor else None

    def enc(obj: Any) -> Any:
        return cbor2.dumps(obj) if code else json.dumps(obj)

    def dec(frame: Any) -> Any:
        return cbor2.loads(frame) if code else json.loads(frame)

    values = {f"k{i}": chr(ord("a") + i) * 999_000 for i in range(5)}
    async with websockets.connect(node.url, max_size=None, open_timeout=STEP) as ws:
        for key, value in values.items():  # one frame each: 5 MB would pass the limit
            await ws.send(enc({"id": 1, "op": "set", "key": key, "value": value}))
            assert dec(await asyncio.wait_for(ws.recv(), STEP))["ok"]
        await ws.send(enc({"id": 2, "op": "mget", "keys": list(values)}))
        frame = await asyncio.wait_for(ws.recv(), STEP)
        assert len(frame) > node.config.max_message_size  # about 5 MB
        assert dec(frame) == {"id": 2, "ok": True, "values": values}
        # The same connection goes on working; incoming frames keep their limit.
        await ws.send(enc({"id": 3, "op": "ping"}))
        assert dec(await asyncio.wait_for(ws.recv(), STEP))["ok"]
        await ws.send(enc([{"id": 4, "op": "ping", "pad": "p" * 4_200_000}]))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), STEP)
        assert ws.close_code == 1009


# -- batches over max_batch ------------------------------------------------------------------


def _cbor_zeros(count: int) -> bytes:
    """A CBOR array of ``count`` zeros: one byte per item."""
    return b"\x9a" + count.to_bytes(4, "big") + b"\x00" * count


@pytest_twisted.ensureDeferred
async def test_a_batch_over_the_limit_gets_one_small_reply_per_item_or_a_1009_close():
    await on_node(_over_the_limit, node_id="bp-batch")


async def _over_the_limit(node: Any) -> None:
    async with websockets.connect(node.url, max_size=None, open_timeout=STEP) as ws:
        await ws.send(_cbor_zeros(200_000))
        frame = await asyncio.wait_for(ws.recv(), STEP)
        assert len(frame) < 200_000 * 100
        replies = cbor2.loads(frame)
        assert len(replies) == 200_000
        assert replies[0] == replies[-1] == error_reply(
            None, TooLarge("a batch holds at most 10000 requests")
        )
    # 4 million tiny items: their reply would pass max_reply_bytes.
    async with websockets.connect(node.url, max_size=None, open_timeout=STEP) as ws:
        await ws.send(_cbor_zeros(4 * 1024 * 1024 - 16))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), STEP)
        assert ws.close_code == CLOSE_TOO_BIG
        assert "at most 10000" in ws.close_reason
    async with websockets.connect(node.url, open_timeout=STEP) as ws:
        assert (await call(ws, {"id": 1, "op": "ping"}))["ok"]


@pytest.mark.parametrize("cbor", [False, True], ids=["json", "cbor"])
def test_the_refused_batch_is_what_one_reply_per_item_would_encode(cbor):
    frames = FrameHandler(RequestParser(Limits(max_batch=3)), router=None)
    batch = [{"id": 1, "op": "ping"}, {"id": "é日\U0001f600", "op": "get"}, 42, [],
             {"id": 2.5}, {"id": "x" * 300}]
    error = TooLarge("a batch holds at most 3 requests")
    expected = encode_frame([error_reply(request_id(o), error) for o in batch], cbor)
    reply, count = frames.process(encode_frame(batch, cbor), cbor)
    assert reply == expected and count == len(batch)
    big = [{"id": i} for i in range(30)]
    assert frames.process(encode_frame(big, cbor), cbor)[0] == encode_frame(
        [error_reply(i, error) for i in range(30)], cbor)


class EchoRouter:
    """Answers a get with ``value`` (its key's length of 'v'), or an object no
    encoder takes for the key ``unencodable``."""

    def handle(self, request: dict) -> dict:
        key = request["key"]
        value: Any = object() if key == "unencodable" else "v" * 100
        return {"id": request["id"], "ok": True, "found": True, "value": value}

    def handle_all(self, requests: list[dict]) -> tuple[list, list]:
        return [self.handle(r) for r in requests], []


def _gets(keys: list[str]) -> bytes:
    return cbor2.dumps([{"id": i, "op": "get", "key": k} for i, k in enumerate(keys)])


def test_the_reply_budget_counts_encoded_bytes_exactly():
    one = len(cbor2.dumps(EchoRouter().handle({"id": 0, "key": "k"})))  # 117 bytes
    frames = FrameHandler(RequestParser(Limits(max_reply_bytes=3 * one)), EchoRouter())
    reply, _ = frames.process(_gets(["k"] * 6), True)
    replies = cbor2.loads(reply)
    assert [r["ok"] for r in replies] == [True] * 3 + [False] * 3
    assert replies[3]["error"]["code"] == "too_large" and replies[5]["id"] == 5
    frames = FrameHandler(RequestParser(Limits(max_reply_bytes=3 * one - 1)), EchoRouter())
    assert [r["ok"] for r in cbor2.loads(frames.process(_gets(["k"] * 6), True)[0])] == [
        True] * 2 + [False] * 4


@pytest.mark.parametrize("cbor", [True, False])
def test_a_reply_that_cannot_be_encoded_costs_only_itself(cbor):
    frames = FrameHandler(RequestParser(Limits()), EchoRouter())
    batch = [{"id": i, "op": "get", "key": k} for i, k in enumerate(["a", "unencodable", "b"])]
    reply, _ = frames.process(encode_frame(batch, cbor), cbor)
    replies = cbor2.loads(reply) if cbor else json.loads(reply)
    assert [r["ok"] for r in replies] == [True, False, True]
    assert replies[1] == {"id": 1, "ok": False, "error": {
        "code": "internal", "message": "reply could not be encoded"}}
    assert replies[2]["value"] == "v" * 100


def test_a_refused_batch_whose_reply_passes_the_reply_limit_closes_the_connection():
    frames = FrameHandler(RequestParser(Limits(max_batch=3, max_reply_bytes=2_000)),
                          router=None)
    with pytest.raises(CloseConnection) as e:
        frames.process(json.dumps([{"id": "x" * 500}] * 10).encode(), False)
    assert e.value.code == CLOSE_TOO_BIG and "holds 10" in e.value.reason


# -- idle connections ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_silent_client_is_closed_after_idle_timeout_and_a_talking_one_is_not():
    await on_node(_idle, node_id="bp-idle", idle_timeout=0.3)


async def _idle(node: Any) -> None:
    loop = asyncio.get_running_loop()
    silent = await websockets.connect(node.url, open_timeout=STEP)
    talking = await websockets.connect(node.url, open_timeout=STEP)
    start = loop.time()
    while loop.time() - start < 1.0:
        assert (await call(talking, {"id": 1, "op": "ping"}))["ok"]
        await asyncio.sleep(0.1)
    await asyncio.wait_for(silent.wait_closed(), STEP)
    assert (silent.close_code, silent.close_reason) == (CLOSE_IDLE, "idle")
    assert (await call(talking, {"id": 2, "op": "ping"}))["ok"]  # still open
    await asyncio.wait_for(talking.wait_closed(), STEP)  # once it falls silent
    assert talking.close_code == CLOSE_IDLE


# -- ClientSession alone, on a fake clock ------------------------------------------------------


class FakeConnection:
    peer = "tcp:127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.reading = True
        self.closed: tuple[int, str] | None = None

    def send_reply(self, payload: bytes, is_binary: bool) -> None:
        self.sent.append(payload)

    def stop_reading(self) -> None:
        self.reading = False

    def start_reading(self) -> None:
        self.reading = True

    def close_with(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class FakeFrames:
    """Frames b"wait" get a Deferred reply the test fires; others are answered at once."""

    def __init__(self) -> None:
        self.waiting: list[Deferred] = []

    def process(self, payload: bytes, is_binary: bool, admin: bool = True) -> tuple[Any, int]:
        if payload.startswith(b"wait"):
            d: Deferred = Deferred()
            self.waiting.append(d)
            return d, int(payload[4:] or 1)
        return succeed(payload) if payload == b"fired" else payload, 1


def make_session(**config: Any) -> tuple[ClientSession, FakeConnection, FakeFrames, task.Clock]:
    clock, conn, frames = task.Clock(), FakeConnection(), FakeFrames()
    return ClientSession(conn, frames, NodeConfig(**config), clock), conn, frames, clock


def test_idle_connection_is_closed_after_the_timeout_counted_from_its_last_frame():
    session, conn, _, clock = make_session(idle_timeout=10)
    clock.advance(6)
    session.received(b"ping", False)
    clock.advance(6)
    assert conn.closed is None  # 6 s since the last frame
    clock.advance(4)
    assert conn.closed == (CLOSE_IDLE, "idle")
    assert not clock.getDelayedCalls()


def test_a_connection_with_a_request_in_flight_is_not_idle():
    session, conn, frames, clock = make_session(idle_timeout=10)
    session.received(b"wait", False)
    clock.advance(25)
    assert conn.closed is None
    frames.waiting[0].callback(b"late")
    assert conn.sent == [b"late"]
    clock.advance(9.5)
    assert conn.closed is None  # the reply counts as activity
    clock.advance(1)
    assert conn.closed == (CLOSE_IDLE, "idle")


def test_idle_timeout_zero_never_closes():
    session, conn, _, clock = make_session(idle_timeout=0)
    assert not clock.getDelayedCalls()
    clock.advance(10**6)
    assert conn.closed is None


def test_a_connection_lost_cancels_its_idle_timer():
    session, _, _, clock = make_session(idle_timeout=10)
    session.connection_lost()
    assert not clock.getDelayedCalls()


def test_max_in_flight_counts_batch_items_and_stops_reading_while_frames_wait():
    session, conn, frames, _ = make_session(max_in_flight=3)
    session.received(b"wait2", False)
    session.received(b"wait2", False)  # admitted: 2 < 3; now 4 in flight
    session.received(b"ping", False)  # waits, though it needs no work
    assert session.in_flight == 4 and len(frames.waiting) == 2
    assert not conn.reading and list(session.queue) == [(b"ping", False)]
    frames.waiting[0].callback(b"r1")  # 2 in flight: the ping goes
    assert conn.sent == [b"r1", b"ping"] and conn.reading and session.handled == 5


def test_a_reply_that_fires_at_once_does_not_recurse():
    session, conn, _, _ = make_session(max_in_flight=1)
    for _ in range(3):
        session.received(b"fired", False)
    assert conn.sent == [b"fired"] * 3 and session.in_flight == 0 and conn.reading


def test_a_full_write_buffer_stops_work_until_it_drains():
    session, conn, frames, _ = make_session()
    session.pauseProducing()  # the transport's buffer is full
    session.received(b"a", False)
    session.received(b"b", False)
    assert conn.sent == [] and not conn.reading
    session.resumeProducing()
    assert conn.sent == [b"a", b"b"] and conn.reading


def test_replies_past_the_backlog_cap_close_with_1008():
    session, conn, frames, _ = make_session(limits=Limits(max_reply_bytes=100))
    for _ in range(3):
        session.received(b"wait", False)
    session.pauseProducing()
    frames.waiting[0].callback(b"x" * 60)
    frames.waiting[1].callback(b"x" * 30)
    assert conn.closed is None and session.backlog == 90
    frames.waiting[2].callback(b"x" * 30)
    assert conn.closed[0] == CLOSE_NOT_READING and "not reading" in conn.closed[1]
    session.received(b"late", False)  # after the close, frames are dropped
    assert conn.sent == [b"x" * 60, b"x" * 30, b"x" * 30]


def test_close_reopens_reading_so_the_close_handshake_completes():
    session, conn, _, _ = make_session()
    session.pauseProducing()
    session.received(b"a", False)
    assert not conn.reading
    session.close(1000, "bye")
    assert conn.reading and not session.queue


# -- draining at a stop ----------------------------------------------------------------


def test_drain_stops_reading_and_fires_once_every_frame_read_is_answered():
    session, conn, frames, _ = make_session(max_in_flight=1)
    session.received(b"wait", False)
    session.received(b"queued", False)  # read, waiting for the in-flight one
    drained = session.drain()
    assert not conn.reading and not drained.called and session.pending == 2
    session.received(b"late", False)  # already read by the socket: answered too
    frames.waiting[0].callback(b"r1")
    assert conn.sent == [b"r1", b"queued", b"late"]
    assert drained.called and session.pending == 0
    assert not conn.reading  # a drained session never reads again


def test_drain_of_a_quiet_session_fires_at_once():
    session, conn, _, _ = make_session()
    assert session.drain().called and not conn.reading


def test_drain_waits_for_a_full_write_buffer_and_fires_when_the_connection_goes():
    session, conn, _, _ = make_session()
    session.pauseProducing()
    session.received(b"a", False)
    drained = session.drain()
    assert not drained.called and conn.sent == []
    session.resumeProducing()
    assert conn.sent == [b"a"] and drained.called
    other, _, _, _ = make_session()
    other.pauseProducing()
    other.received(b"b", False)
    stuck = other.drain()
    other.connection_lost()  # the client went: nothing left to answer
    assert stuck.called


def test_closing_a_drained_session_reads_again_for_the_close_handshake():
    session, conn, _, _ = make_session()
    session.drain()
    session.close(1001, "node shutting down")
    assert conn.reading and conn.closed == (1001, "node shutting down")
