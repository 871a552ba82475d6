"""Tests for swarm.client.connection: the request tracker on a fake clock, then against a real node."""

from __future__ import annotations

import json

import cbor2
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.defer import Deferred

from swarm import errors
from swarm.client.connection import (
    AUTOBATCH_BYTES,
    AUTOBATCH_COUNT,
    MAX_PAYLOAD,
    ConnectionClosed,
    RequestTracker,
    SwarmClient,
)
from swarm.protocol.urls import ws_client_endpoint
from swarm.protocol.wire import decode_frame, encode_frame

# -- the logic object, no sockets --------------------------------------------------------


class Sink:
    """Collects the frames a tracker sends; decodes them for the test."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool]] = []

    def __call__(self, payload: bytes, is_binary: bool) -> None:
        self.frames.append((payload, is_binary))

    def decoded(self, index: int = -1):
        payload, is_binary = self.frames[index]
        return decode_frame(payload, is_binary)


def make_tracker(encoding="cbor", timeout=10.0, autobatch=False):
    sink = Sink()
    clock = task.Clock()
    tracker = RequestTracker(sink, clock, encoding=encoding, timeout=timeout,
                             autobatch=autobatch)
    return tracker, sink, clock


def reply(tracker, obj, is_binary=True):
    tracker.frame_received(encode_frame(obj, is_binary), is_binary)


def results(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_ids_are_unique_and_frames_use_the_encoding():
    tracker, sink, _ = make_tracker()
    for _ in range(100):
        tracker.request("ping")
    ids = [sink.decoded(i)["id"] for i in range(100)]
    assert len(set(ids)) == 100
    assert all(is_binary for _, is_binary in sink.frames)
    assert tracker.pending == 100

    tracker, sink, _ = make_tracker("json")
    tracker.request("get", key="k")
    payload, is_binary = sink.frames[0]
    assert not is_binary
    assert json.loads(payload) == {"op": "get", "key": "k", "id": 1}


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError):
        make_tracker("xml")


def test_replies_out_of_order_are_matched_by_id():
    tracker, sink, _ = make_tracker()
    ds = [tracker.request("get", key=f"k{i}") for i in range(5)]
    outs = [results(d) for d in ds]
    for i in reversed(range(5)):
        req = sink.decoded(i)
        reply(tracker, {"id": req["id"], "ok": True, "found": True, "value": req["key"]})
    assert [out[0]["value"] for out in outs] == [f"k{i}" for i in range(5)]
    assert tracker.pending == 0


def test_replies_in_one_array_frame_are_delivered():
    tracker, sink, _ = make_tracker("json")
    outs = [results(tracker.request("ping")) for _ in range(3)]
    ids = [sink.decoded(i)["id"] for i in range(3)]
    reply(tracker, [{"id": i, "ok": True, "node": "n"} for i in ids], is_binary=False)
    assert all(out and out[0]["node"] == "n" for out in outs)


def test_timeout_raises_swarm_timeout_and_late_reply_is_dropped():
    tracker, sink, clock = make_tracker(timeout=2.0)
    out = results(tracker.request("get", key="k"))
    clock.advance(1.9)
    assert out == []
    clock.advance(0.2)
    assert out[0].check(errors.Timeout)
    assert "get" in out[0].value.message
    assert tracker.pending == 0
    # The late reply matches nobody: dropped, no error, nothing else disturbed.
    other = results(tracker.request("ping"))
    reply(tracker, {"id": sink.decoded(0)["id"], "ok": True, "found": False, "value": None})
    reply(tracker, {"id": sink.decoded(1)["id"], "ok": True, "node": "n"})
    assert other[0]["node"] == "n"


def test_no_timeout_when_none():
    tracker, _, clock = make_tracker(timeout=None)
    out = results(tracker.request("ping"))
    clock.advance(10_000)
    assert out == [] and tracker.pending == 1
    assert clock.getDelayedCalls() == []


def test_a_reply_cancels_the_timeout():
    tracker, sink, clock = make_tracker()
    out = results(tracker.request("ping"))
    reply(tracker, {"id": sink.decoded()["id"], "ok": True, "node": "n"})
    assert out[0]["node"] == "n"
    assert clock.getDelayedCalls() == []


def test_fail_all_fails_every_pending_and_later_requests():
    tracker, sink, clock = make_tracker()
    outs = [results(tracker.request("ping")) for _ in range(3)]
    batch = results(tracker.batch([{"op": "ping"}, {"op": "ping"}]))
    tracker.fail_all(ConnectionClosed("gone"))
    for out in outs + [batch]:
        assert out[0].check(ConnectionClosed)
    assert tracker.pending == 0
    assert clock.getDelayedCalls() == []
    later = results(tracker.request("ping"))
    assert later[0].check(ConnectionClosed)
    assert len(sink.frames) == 4  # nothing sent after the connection went away


@pytest.mark.parametrize("code, cls", sorted(errors.ERRORS_BY_CODE.items()))
def test_error_replies_raise_the_matching_class(code, cls):
    tracker, sink, _ = make_tracker()
    out = results(tracker.request("incr", key="k"))
    reply(tracker, {"id": sink.decoded()["id"], "ok": False,
                    "error": {"code": code, "message": "why"}})
    assert type(out[0].value) is cls
    assert out[0].value.message == "why"


def test_unknown_error_code_still_raises_a_swarm_error():
    tracker, sink, _ = make_tracker()
    out = results(tracker.request("ping"))
    reply(tracker, {"id": sink.decoded()["id"], "ok": False,
                    "error": {"code": "new_thing", "message": "later version"}})
    assert isinstance(out[0].value, errors.SwarmError)
    assert out[0].value.code == "new_thing"


def test_batch_sends_one_frame_and_returns_replies_in_order():
    tracker, sink, _ = make_tracker()
    out = results(tracker.batch([
        {"op": "set", "key": "a", "value": 1, "id": "mine"},
        {"op": "incr", "key": "s"},
        {"op": "get", "key": "a"},
    ]))
    assert len(sink.frames) == 1
    frame = sink.decoded()
    assert isinstance(frame, list) and len(frame) == 3
    ids = [r["id"] for r in frame]
    assert "mine" not in ids and len(set(ids)) == 3
    replies = [
        {"id": ids[0], "ok": True, "stored": True},
        {"id": ids[1], "ok": False, "error": {"code": "not_integer", "message": "no"}},
        {"id": ids[2], "ok": True, "found": True, "value": 1},
    ]
    reply(tracker, list(reversed(replies)))  # order on the wire does not matter
    assert out == [replies]
    assert tracker.pending == 0


def test_batch_times_out_as_a_whole():
    tracker, _, clock = make_tracker(timeout=1.0)
    out = results(tracker.batch([{"op": "ping"}] * 3))
    clock.advance(1.0)
    assert out[0].check(errors.Timeout)
    assert tracker.pending == 0


class SteppingClock(task.Clock):
    """A fake clock that moves ``step`` seconds whenever it is read, as a busy one does."""

    step = 0.0

    def seconds(self) -> float:
        self.rightNow += self.step
        return self.rightNow


def test_a_batch_that_times_out_stops_waiting_for_all_its_parts_at_once():
    """On a moving clock its parts' deadlines differ; the first to pass ends them all."""
    sink = Sink()
    clock = SteppingClock()
    tracker = RequestTracker(sink, clock, timeout=1.0)
    clock.step = 0.001
    out = results(tracker.batch([{"op": "ping"}] * 3))
    clock.step = 0.0
    for _ in range(2000):
        if out:
            break
        clock.advance(0.001)
    assert out[0].check(errors.Timeout)
    assert tracker.pending == 0
    for item in sink.decoded():
        reply(tracker, {"id": item["id"], "ok": True, "node": "n"})  # late: dropped
    assert len(out) == 1
    assert clock.getDelayedCalls() == []


def test_empty_batch_sends_nothing():
    tracker, sink, _ = make_tracker()
    assert results(tracker.batch([])) == [[]]
    assert sink.frames == []


def test_undecodable_and_stray_frames_are_dropped():
    tracker, sink, _ = make_tracker()
    out = results(tracker.request("ping"))
    tracker.frame_received(b"\xff\xfe not cbor", True)
    tracker.frame_received(b"{not json", False)
    reply(tracker, 42)
    reply(tracker, {"id": None, "ok": False, "error": {"code": "bad_request"}})
    reply(tracker, {"id": 999, "ok": True})
    assert out == [] and tracker.pending == 1
    reply(tracker, {"id": sink.decoded()["id"], "ok": True, "node": "n"})
    assert out[0]["node"] == "n"


def test_a_value_that_cannot_be_encoded_fails_only_that_request():
    tracker, sink, clock = make_tracker()
    out = results(tracker.request("set", key="k", value=object()))
    assert out[0].check(Exception)
    assert sink.frames == [] and tracker.pending == 0
    assert clock.getDelayedCalls() == []


def test_a_send_that_raises_fails_the_request_and_forgets_it():
    clock = task.Clock()

    def send(payload, is_binary):
        raise RuntimeError("socket gone")

    tracker = RequestTracker(send, clock)
    out = results(tracker.request("ping"))
    assert out[0].check(RuntimeError)
    batch = results(tracker.batch([{"op": "ping"}]))
    assert batch[0].check(RuntimeError)
    assert tracker.pending == 0
    assert clock.getDelayedCalls() == []


# -- autobatching: the requests of one turn leave as one frame ----------------------------


def answer_all(tracker, sink, index=-1, is_binary=True):
    """Answer every request of frame ``index`` with ok replies naming its id."""
    frame = sink.decoded(index)
    items = frame if isinstance(frame, list) else [frame]
    replies = [{"id": item["id"], "ok": True, "found": True, "value": item["id"]}
               for item in items]
    reply(tracker, replies if isinstance(frame, list) else replies[0], is_binary)


@pytest.mark.parametrize("encoding", ["cbor", "json"])
def test_requests_of_one_turn_leave_as_one_batch_frame_in_order(encoding):
    tracker, sink, clock = make_tracker(encoding, autobatch=True)
    outs = [results(tracker.request("get", key=f"k{i}")) for i in range(5)]
    assert sink.frames == [] and tracker.pending == 5
    clock.advance(0)
    assert len(sink.frames) == 1
    frame = sink.decoded()
    assert [item["key"] for item in frame] == [f"k{i}" for i in range(5)]
    answer_all(tracker, sink, is_binary=encoding == "cbor")
    assert [out[0]["value"] for out in outs] == [item["id"] for item in frame]
    assert tracker.pending == 0 and clock.getDelayedCalls() == []


def test_a_lone_request_leaves_as_a_plain_frame_and_turns_do_not_mix():
    tracker, sink, clock = make_tracker(autobatch=True)
    first = results(tracker.request("get", key="a"))
    clock.advance(0)
    second = [results(tracker.request("get", key=k)) for k in "bc"]
    clock.advance(0)
    assert sink.decoded(0) == {"op": "get", "key": "a", "id": 1}
    assert [item["key"] for item in sink.decoded(1)] == ["b", "c"]
    answer_all(tracker, sink, 0)
    assert first[0]["id"] == 1 and second == [[], []]


def test_each_request_of_a_batch_frame_keeps_its_own_error():
    tracker, sink, clock = make_tracker(autobatch=True)
    good = results(tracker.request("get", key="k"))
    bad = results(tracker.request("incr", key="s"))
    clock.advance(0)
    ids = [item["id"] for item in sink.decoded()]
    reply(tracker, [
        {"id": ids[0], "ok": True, "found": False, "value": None},
        {"id": ids[1], "ok": False, "error": {"code": "not_integer", "message": "no"}},
    ])
    assert good[0]["found"] is False
    assert bad[0].check(errors.NotInteger)


def test_an_unencodable_request_fails_at_once_and_the_rest_still_go():
    tracker, sink, clock = make_tracker(autobatch=True)
    before = results(tracker.request("get", key="a"))
    broken = results(tracker.request("set", key="k", value=object()))
    after = results(tracker.request("get", key="b"))
    assert broken[0].check(Exception)
    clock.advance(0)
    assert [item["key"] for item in sink.decoded()] == ["a", "b"]
    answer_all(tracker, sink)
    assert before and after and tracker.pending == 0


def test_queued_requests_time_out_on_their_own_and_cancelled_ones_are_not_sent():
    tracker, sink, clock = make_tracker(timeout=2.0, autobatch=True)
    kept = results(tracker.request("get", key="kept"))
    dropped = tracker.request("get", key="dropped")
    dropped.addErrback(lambda f: f.trap(defer.CancelledError))
    dropped.cancel()
    clock.advance(0)
    assert sink.decoded() == {"op": "get", "key": "kept", "id": 1}
    clock.advance(2.0)
    assert kept[0].check(errors.Timeout)
    assert tracker.pending == 0 and clock.getDelayedCalls() == []


def test_queued_frames_are_cut_by_count_and_by_size():
    tracker, sink, clock = make_tracker(autobatch=True)
    for i in range(AUTOBATCH_COUNT + 3):
        tracker.request("get", key=f"k{i}")
    big = "x" * (AUTOBATCH_BYTES // 3)
    for i in range(4):
        tracker.request("set", key=f"b{i}", value=big)
    huge = results(tracker.request("set", key="huge", value="y" * (2 * AUTOBATCH_BYTES)))
    clock.advance(0)
    sizes = [len(frame) if isinstance(frame, list) else 1
             for frame in (sink.decoded(i) for i in range(len(sink.frames)))]
    assert sizes[0] == AUTOBATCH_COUNT
    assert sum(sizes) == AUTOBATCH_COUNT + 3 + 4 + 1
    assert all(len(payload) <= AUTOBATCH_BYTES + 1024 for payload, _ in sink.frames[:-1])
    assert sink.decoded(-1)["key"] == "huge" and huge == []  # alone, as it would go anyway
    keys = [item["key"] for i in range(len(sink.frames))
            for item in (lambda f: f if isinstance(f, list) else [f])(sink.decoded(i))]
    assert keys == [f"k{i}" for i in range(AUTOBATCH_COUNT + 3)] + [
        f"b{i}" for i in range(4)] + ["huge"]


def test_an_explicit_batch_leaves_after_the_requests_queued_before_it():
    tracker, sink, clock = make_tracker(autobatch=True)
    tracker.request("set", key="k", value=1)
    tracker.batch([{"op": "get", "key": "k"}])
    assert sink.decoded(0)["op"] == "set" and sink.decoded(1)[0]["op"] == "get"
    clock.advance(0)
    assert len(sink.frames) == 2


def test_closing_with_requests_queued_fails_them_and_sends_nothing():
    tracker, sink, clock = make_tracker(autobatch=True)
    outs = [results(tracker.request("ping")) for _ in range(3)]
    tracker.fail_all(ConnectionClosed("gone"))
    assert all(out[0].check(ConnectionClosed) for out in outs)
    clock.advance(0)
    assert sink.frames == [] and clock.getDelayedCalls() == []


def test_a_send_that_raises_fails_every_request_of_its_frame():
    clock = task.Clock()

    def send(payload, is_binary):
        raise RuntimeError("socket gone")

    tracker = RequestTracker(send, clock, autobatch=True)
    outs = [results(tracker.request("ping")) for _ in range(3)]
    clock.advance(0)
    assert all(out[0].check(RuntimeError) for out in outs)
    assert tracker.pending == 0 and clock.getDelayedCalls() == []


# -- pipelines ----------------------------------------------------------------------------


def test_a_pipeline_sends_its_ops_in_one_frame_and_lists_their_results():
    tracker, sink, clock = make_tracker()
    client = SwarmClient(tracker, lambda: defer.succeed(None))
    pipe = client.pipeline()
    pipe.get("a", default="none")
    pipe.set("b", 2, ttl=5)
    pipe.incr("s")
    own = results(pipe.exists("c"))  # its own callback sees the result first
    assert len(pipe) == 4 and sink.frames == []
    done = results(pipe.execute())
    assert len(pipe) == 0 and len(sink.frames) == 1
    frame = sink.decoded()
    assert [item["op"] for item in frame] == ["get", "set", "incr", "exists"]
    assert frame[1]["ttl"] == 5
    ids = [item["id"] for item in frame]
    reply(tracker, [
        {"id": ids[0], "ok": True, "found": False, "value": None},
        {"id": ids[1], "ok": True, "stored": True},
        {"id": ids[2], "ok": False, "error": {"code": "not_integer", "message": "no"}},
        {"id": ids[3], "ok": True, "exists": True},
    ])
    assert own == [True]
    assert done[0][:2] == ["none", True]
    assert isinstance(done[0][2], errors.NotInteger)
    assert done[0][3] is None  # like DeferredList: what the op's chain ended with
    assert results(pipe.execute()) == [[]]


def test_a_pipeline_that_times_out_fails_each_op_and_the_execute():
    tracker, _, clock = make_tracker(timeout=1.0)
    pipe = SwarmClient(tracker, lambda: defer.succeed(None)).pipeline()
    one = results(pipe.ping())
    done = results(pipe.execute())
    clock.advance(1.0)
    assert one[0].check(errors.Timeout) and done[0].check(errors.Timeout)


class FakeNode:
    """Answers a tracker's frames with a canned reply; enough to test SwarmClient."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.requests: list[dict] = []
        self.tracker = RequestTracker(self.receive, self.clock)
        self.closed = False
        self.client = SwarmClient(self.tracker, self.close, "ws://fake")
        self.answer: dict = {}

    def close(self):
        self.closed = True
        return defer.succeed(None)

    def receive(self, payload: bytes, is_binary: bool) -> None:
        request = decode_frame(payload, is_binary)
        self.requests.append(request)
        answer = {"id": request["id"], "ok": True}
        answer.update(self.answer)
        self.clock.callLater(
            0, self.tracker.frame_received, encode_frame(answer, is_binary), is_binary
        )


def fake_call(fake: FakeNode, method: str, *args, answer=None, **kwargs):
    """Call ``method`` on the fake's client; the request it sent and what it fired with."""
    fake.answer = answer or {}
    out = results(getattr(fake.client, method)(*args, **kwargs))
    fake.clock.advance(0)
    return fake.requests[-1], out[0]


def test_client_methods_build_requests_and_read_replies():
    fake = FakeNode()
    req, value = fake_call(fake, "set", "k", "v", answer={"stored": True})
    assert req == {"id": req["id"], "op": "set", "key": "k", "value": "v"}
    assert value is True
    req, _ = fake_call(fake, "set", "k", "v", ttl=5, nx=True, answer={"stored": False})
    assert req["ttl"] == 5 and req["nx"] is True and "xx" not in req
    req, value = fake_call(fake, "get", "k", default="d", answer={"found": False, "value": None})
    assert value == "d"
    _, value = fake_call(fake, "get", "k", answer={"found": True, "value": None})
    assert value is None
    req, value = fake_call(fake, "expire", "k", None, answer={"updated": True})
    assert "ttl" in req and req["ttl"] is None and value is True
    _, value = fake_call(fake, "ttl", "k", answer={"found": True, "ttl": None})
    assert value == (True, None)
    req, value = fake_call(fake, "incr", "n", answer={"value": 1})
    assert req["delta"] == 1 and value == 1
    _, value = fake_call(fake, "nodes", answer={"self": "a", "nodes": []})
    assert value == {"self": "a", "nodes": []}
    req, _ = fake_call(fake, "mset", {"a": 1}, answer={"stored": 1})
    assert "ttl" not in req
    out = results(fake.client.close())
    assert out == [None] and fake.closed


def test_ws_client_endpoint():
    assert ws_client_endpoint("ws://127.0.0.1:8765", 3) == (
        "tcp:host=127.0.0.1:port=8765:timeout=3"
    )
    assert ws_client_endpoint("wss://cache.example:443/?token=x", 2.5) == (
        "tls:host=cache.example:port=443:timeout=3"
    )
    assert ws_client_endpoint("ws://[::1]:9/", 1).startswith("tcp:host=\\:\\:1:port=9")
    with pytest.raises(ValueError):
        ws_client_endpoint("http://127.0.0.1:1", 1)


# -- connecting, without a node ----------------------------------------------------------


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (briefly bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_connect_to_a_closed_port_fails_quickly_with_unavailable():
    url = f"ws://127.0.0.1:{_closed_port()}"
    started = reactor.seconds()
    with pytest.raises(errors.Unavailable) as info:
        await SwarmClient.connect(url, reactor=reactor, connect_timeout=5)
    assert url in str(info.value)
    assert reactor.seconds() - started < 2


@pytest_twisted.ensureDeferred
async def test_bad_url_fails_with_unavailable():
    with pytest.raises(errors.Unavailable):
        await SwarmClient.connect("http://127.0.0.1:1", reactor=reactor)


class _Silent(protocol.Protocol):
    def dataReceived(self, data):
        pass


class _NotWebSocket(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


async def _listen(proto):
    factory = protocol.Factory.forProtocol(proto)
    factory.protocols = []

    class Tracking(proto):
        def connectionMade(self):
            factory.protocols.append(self)

    factory.protocol = Tracking
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, factory


@pytest_twisted.ensureDeferred
async def test_failed_handshake_fails_with_unavailable():
    port, factory = await _listen(_NotWebSocket)
    url = f"ws://127.0.0.1:{port.getHost().port}"
    try:
        with pytest.raises(errors.Unavailable) as info:
            await SwarmClient.connect(url, reactor=reactor, connect_timeout=5)
        assert url in str(info.value)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_handshake_that_never_ends_times_out_with_unavailable():
    port, factory = await _listen(_Silent)
    url = f"ws://127.0.0.1:{port.getHost().port}"
    try:
        started = reactor.seconds()
        with pytest.raises(errors.Unavailable) as info:
            await SwarmClient.connect(url, reactor=reactor, connect_timeout=0.3)
        assert "handshake" in str(info.value)
        assert reactor.seconds() - started < 3
    finally:
        for p in factory.protocols:
            p.transport.abortConnection()
        await port.stopListening()


# -- against a real node -----------------------------------------------------------------

ENCODINGS = ["cbor", "json"]


@pytest.fixture(params=ENCODINGS)
def encoding(request):
    return request.param


@pytest_twisted.async_yield_fixture
async def client(node, encoding):
    c = await SwarmClient.connect(node.url, reactor=reactor, encoding=encoding, timeout=10)
    yield c
    await c.close()


@pytest_twisted.ensureDeferred
async def test_ping_names_the_node(client, node):
    assert await client.ping() == node.node_id


@pytest_twisted.ensureDeferred
async def test_every_method_round_trips(client, node):
    values = ["text", 0, -7, 2.5, True, None, [1, "two", [3]], {"a": {"b": [None]}}, "ünïcödé"]
    for i, value in enumerate(values):
        assert await client.set(f"v{i}", value) is True
        assert await client.get(f"v{i}") == value
    assert await client.get("missing") is None
    assert await client.get("missing", default="dflt") == "dflt"
    assert await client.exists("v0") is True
    assert await client.exists("missing") is False
    assert await client.delete("v0") is True
    assert await client.delete("v0") is False
    assert await client.exists("v0") is False

    assert await client.incr("n") == 1
    assert await client.incr("n", 41) == 42
    assert await client.incr("n", -2) == 40

    assert await client.mset({"m1": 1, "m2": "two"}) == 2
    assert await client.mget(["m1", "m2", "nope"]) == {"m1": 1, "m2": "two"}

    stats = await client.stats()
    for field in ("node", "keys", "memory_bytes", "hits", "misses", "uptime_s", "peers"):
        assert field in stats
    assert stats["node"] == node.node_id

    seen = await client.nodes()
    assert seen["self"] == node.node_id
    assert [n["id"] for n in seen["nodes"]] == [node.node_id]
    assert seen["nodes"][0]["hops"] == 0
    assert "id" not in seen and "ok" not in seen

    assert await client.owner("any") == [node.node_id]

    full = await client.request("get", key="m1")
    assert full["ok"] is True and full["found"] is True and full["value"] == 1


@pytest_twisted.ensureDeferred
async def test_bytes_values_round_trip_on_cbor(node):
    c = await SwarmClient.connect(node.url, reactor=reactor, encoding="cbor")
    try:
        blob = bytes(range(256)) * 4
        assert await c.set("blob", blob) is True
        assert await c.get("blob") == blob
        assert await c.get("blob") == blob
        nested = {"raw": b"\x00\x01", "list": [b"x"]}
        await c.set("nested", nested)
        assert await c.get("nested") == nested
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_ttl_and_expire(client):
    await client.set("forever", 1)
    assert await client.ttl("forever") == (True, None)
    await client.set("brief", 1, ttl=100)
    found, left = await client.ttl("brief")
    assert found and 0 < left <= 100
    assert await client.expire("forever", 50) is True
    found, left = await client.ttl("forever")
    assert found and 0 < left <= 50
    assert await client.expire("forever", None) is True
    assert await client.ttl("forever") == (True, None)
    assert await client.ttl("missing") == (False, None)
    assert await client.expire("missing", 10) is False
    with pytest.raises(errors.BadRequest):
        await client.set("bad", 1, ttl=0)


@pytest_twisted.ensureDeferred
async def test_entry_expires(client):
    await client.set("short", "x", ttl=0.2)
    assert await client.get("short") == "x"
    deadline = reactor.seconds() + 5
    while await client.exists("short"):
        assert reactor.seconds() < deadline, "entry with ttl=0.2 still there after 5s"
        d = Deferred()
        reactor.callLater(0.05, d.callback, None)
        await d


@pytest_twisted.ensureDeferred
async def test_nx_and_xx(client):
    assert await client.set("k", "first", xx=True) is False
    assert await client.get("k") is None
    assert await client.set("k", "first", nx=True) is True
    assert await client.set("k", "second", nx=True) is False
    assert await client.get("k") == "first"
    assert await client.set("k", "third", xx=True) is True
    assert await client.get("k") == "third"


@pytest_twisted.ensureDeferred
async def test_incr_on_a_string_raises_not_integer(client):
    await client.set("s", "hello")
    with pytest.raises(errors.NotInteger):
        await client.incr("s")
    assert await client.get("s") == "hello"


@pytest_twisted.ensureDeferred
async def test_unknown_op_raises(client):
    with pytest.raises(errors.UnknownOp):
        await client.request("frobnicate", key="k")


@pytest_twisted.ensureDeferred
async def test_pipelining_200_requests_in_flight(client):
    n = 200
    sets = [client.set(f"p{i}", i * 3) for i in range(n)]
    assert await defer.gatherResults(sets) == [True] * n
    gets = [client.get(f"p{i}") for i in range(n)]
    incrs = [client.incr(f"c{i % 7}") for i in range(n)]
    got = await defer.gatherResults(gets)
    assert got == [i * 3 for i in range(n)]
    counted = await defer.gatherResults(incrs)
    assert sorted(counted) == sorted(
        v for k in range(7) for v in range(1, len(range(k, n, 7)) + 1)
    )


@pytest_twisted.ensureDeferred
async def test_batch_returns_replies_in_order(client):
    await client.set("b1", "one")
    await client.set("str", "x")
    replies = await client.batch([
        {"op": "get", "key": "b1"},
        {"op": "set", "key": "b2", "value": [2]},
        {"op": "incr", "key": "str"},
        {"op": "get", "key": "b2"},
        {"op": "nope"},
        {"op": "get", "key": "missing"},
    ])
    assert len(replies) == 6
    assert replies[0]["ok"] and replies[0]["value"] == "one"
    assert replies[1]["ok"] and replies[1]["stored"] is True
    assert replies[2]["ok"] is False and replies[2]["error"]["code"] == "not_integer"
    assert replies[3]["ok"]  # in a batch, b2 may or may not be visible yet: order is not promised
    assert replies[4]["ok"] is False and replies[4]["error"]["code"] == "unknown_op"
    assert replies[5]["ok"] and replies[5]["found"] is False
    big = await client.batch([{"op": "set", "key": f"bb{i}", "value": i} for i in range(500)])
    assert [r["stored"] for r in big] == [True] * 500
    assert await client.mget([f"bb{i}" for i in range(0, 500, 50)]) == {
        f"bb{i}": i for i in range(0, 500, 50)
    }


@pytest_twisted.ensureDeferred
async def test_close_fails_pending_requests_and_fires(node, encoding):
    c = await SwarmClient.connect(node.url, reactor=reactor, encoding=encoding)
    pending = [c.get(f"k{i}") for i in range(20)]
    outcomes = [results(d) for d in pending]
    await c.close()
    for out in outcomes:
        assert out and out[0].check(ConnectionClosed)
    with pytest.raises(ConnectionClosed):
        await c.ping()
    await c.close()  # closing twice is harmless


@pytest_twisted.ensureDeferred
async def test_too_large_value_raises_and_the_connection_survives(client):
    with pytest.raises(errors.TooLarge):
        await client.set("huge", "x" * (2 * 1024 * 1024))
    assert await client.set("small", "x") is True


@pytest_twisted.ensureDeferred
async def test_the_client_accepts_large_replies():
    from swarm.node.node import SwarmNode

    mib = 1024 * 1024
    big_node = SwarmNode(
        "tcp:0:interface=127.0.0.1", reactor=reactor, node_id="big",
        max_value_size=16 * mib, max_message_size=32 * mib,
    )
    big_node.startService()
    try:
        await big_node.when_listening()
        c = await SwarmClient.connect(big_node.url, reactor=reactor)
        try:
            big = bytes(range(256)) * (10 * mib // 256)
            assert len(big) < MAX_PAYLOAD
            assert await c.set("big", big) is True
            assert await c.get("big") == big
        finally:
            await c.close()
    finally:
        await big_node.stopService()


@pytest_twisted.ensureDeferred
async def test_many_clients_on_one_node(node):
    clients = await defer.gatherResults(
        [SwarmClient.connect(node.url, reactor=reactor, encoding=e) for e in ENCODINGS * 3]
    )
    try:
        await defer.gatherResults([c.set(f"mc{i}", i) for i, c in enumerate(clients)])
        for c in clients:
            assert await c.get("mc0") == 0
    finally:
        await defer.gatherResults([c.close() for c in clients])


def test_cbor2_and_json_are_what_the_client_sends():
    tracker, sink, _ = make_tracker("cbor")
    tracker.request("set", key="k", value=b"\x00")
    assert cbor2.loads(sink.frames[0][0])["value"] == b"\x00"


@pytest_twisted.ensureDeferred
async def test_a_real_node_answers_an_autobatched_turn_and_pipelines(node, encoding):
    c = await SwarmClient.connect(node.url, reactor=reactor, encoding=encoding)
    sent = []
    send = c._requests._send
    c._requests._send = lambda payload, is_binary: (sent.append(payload), send(payload, is_binary))
    try:
        n = 300
        assert await defer.gatherResults([c.set(f"ab{i}", i) for i in range(n)]) == [True] * n
        assert len(sent) == 1
        got = await defer.gatherResults([c.get(f"ab{i}") for i in range(n)] + [c.incr("ab0")])
        assert got == list(range(n)) + [1]
        assert len(sent) == 2
        pipe = c.pipeline()
        pipe.set("pp", "v")
        pipe.incr("pp")
        stored, counted = await pipe.execute()
        assert stored is True and isinstance(counted, errors.NotInteger)
        assert len(sent) == 3
    finally:
        await c.close()
