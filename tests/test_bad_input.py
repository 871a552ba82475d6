"""Hostile and malformed input over a real loopback listener, from a third-party client.

Every test talks to a real node through the ``websockets`` package (asyncio), not through
the project's own client, to show that any WebSocket library can use the protocol. After
each abuse the test checks what docs/protocol.md promises: the documented error reply,
that the abusing connection still works where the contract says it stays open (a ``ping``
on it is answered), and that a second client, connected before the abuse, is not
disturbed.

The suite runs under Twisted's asyncio reactor, so the node and the asyncio client share
one event loop: :func:`on_asyncio` runs a coroutine as an asyncio task and hands pytest-
twisted a Deferred of its result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import decimal
import functools
import json
import uuid
from types import SimpleNamespace
from typing import Any, AsyncIterator, Awaitable, Callable

import cbor2
import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio, start_node

#: Upper bound for any single wait on the network (a reply, a handshake, a close).
STEP_TIMEOUT = 10.0
#: Upper bound for a whole test body.
TEST_TIMEOUT = 60.0


# -- running asyncio code from pytest-twisted ------------------------------------------


def asyncio_test(fn: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Make an asyncio test body a pytest-twisted test (fixtures are passed through)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await on_asyncio(fn(*args, **kwargs))

    return pytest_twisted.ensureDeferred(wrapper)


async def wait_until(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = STEP_TIMEOUT
) -> Any:
    """Poll ``check`` every 50 ms until it returns something true, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last = await check()
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- a thin layer over websockets ------------------------------------------------------


def encode(obj: Any, cbor: bool) -> bytes:
    return cbor2.dumps(obj) if cbor else json.dumps(obj).encode("utf-8")


class Conn:
    """One ``websockets`` connection; sends raw frames and decodes the replies."""

    def __init__(self, ws: websockets.ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self._ids = iter(range(10**6, 10**7))

    @classmethod
    async def open(cls, url: str, name: str = "client", **kw: Any) -> "Conn":
        ws = await websockets.connect(url, open_timeout=STEP_TIMEOUT, **kw)
        return cls(ws, name)

    async def send(self, payload: bytes, text: bool) -> None:
        await self.ws.send(payload, text=text)

    async def recv_frame(self) -> tuple[Any, bool]:
        """The next reply decoded, and whether it came as a text frame."""
        frame = await asyncio.wait_for(self.ws.recv(), STEP_TIMEOUT)
        if isinstance(frame, str):
            return json.loads(frame), True
        return cbor2.loads(frame), False

    async def raw(self, payload: bytes, text: bool) -> Any:
        """Send one frame, read one reply, check the reply uses the frame's encoding."""
        await self.send(payload, text)
        reply, reply_text = await self.recv_frame()
        assert reply_text == text, (
            f"{'text' if text else 'binary'} frame answered with a "
            f"{'text' if reply_text else 'binary'} frame"
        )
        return reply

    async def call(self, obj: Any, cbor: bool = False) -> Any:
        return await self.raw(encode(obj, cbor), text=not cbor)

    async def op(self, op: str, cbor: bool = False, **args: Any) -> dict:
        rid = next(self._ids)
        reply = await self.call({"id": rid, "op": op, **args}, cbor)
        assert reply["id"] == rid and reply["ok"] is True, reply
        return reply

    async def ping(self, node_id: str | None = None) -> None:
        for cbor in (False, True):
            reply = await self.op("ping", cbor=cbor)
            if node_id is not None:
                assert reply["node"] == node_id

    async def close(self) -> None:
        await asyncio.wait_for(self.ws.close(), STEP_TIMEOUT)


def short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 400 else text[:400] + f"... ({len(text)} chars)"


def assert_error(reply: Any, code: str, rid: Any = None, mentions: str | None = None):
    assert isinstance(reply, dict), f"expected one reply object, got {short(reply)}"
    assert reply["ok"] is False, reply
    assert reply["id"] == rid and type(reply["id"]) is type(rid), reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    if mentions is not None:
        assert mentions in reply["error"]["message"], reply


async def survives(c: SimpleNamespace, abuser_open: bool = True) -> None:
    """The abusing connection (when it should stay open) and the bystander both work."""
    if abuser_open:
        await c.abuser.ping(c.node.node_id)
    await c.bystander.ping(c.node.node_id)


async def refused_without_effect(c: SimpleNamespace, reply: Any, code: str, rid: Any,
                                 mentions: str | None = None) -> None:
    """``reply`` is the documented error, nothing was stored under the key "k" that the
    request named, and both connections still work."""
    assert_error(reply, code, rid, mentions)
    assert (await c.bystander.op("get", key="k"))["found"] is False
    await survives(c)


# -- fixtures ----------------------------------------------------------------------------


async def _clients(node) -> SimpleNamespace:
    abuser = await on_asyncio(Conn.open(node.url, "abuser"))
    bystander = await on_asyncio(Conn.open(node.url, "bystander"))
    await on_asyncio(bystander.ping(node.node_id))  # connected and serving before abuse
    return SimpleNamespace(node=node, abuser=abuser, bystander=bystander)


async def _close_clients(c: SimpleNamespace) -> None:
    for conn in (c.abuser, c.bystander):
        await on_asyncio(conn.close())


@contextlib.asynccontextmanager
async def _own_node(node_id: str, **options: Any) -> AsyncIterator[SimpleNamespace]:
    """Like the ``c`` fixture, on a node of its own started with ``options``."""
    n = await start_node(node_id=node_id, **options)
    clients = await _clients(n)
    yield clients
    await _close_clients(clients)
    await n.stopService()


@pytest_twisted.async_yield_fixture
async def c(node):
    """The default node, an abusing client and a bystander client (connected first)."""
    clients = await _clients(node)
    yield clients
    await _close_clients(clients)


@pytest_twisted.async_yield_fixture
async def small_values():
    async with _own_node("small-values", max_value_size=1000) as clients:
        yield clients


@pytest_twisted.async_yield_fixture
async def small_frames():
    async with _own_node("small-frames", max_message_size=10_000) as clients:
        yield clients


ENCODINGS = [pytest.param(False, id="json"), pytest.param(True, id="cbor")]


def nested(depth: int, kind: str = "list") -> Any:
    """``depth`` levels of arrays (or maps): ``[]`` is one level, ``[[1]]`` two."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# -- encodings ---------------------------------------------------------------------------


@asyncio_test
async def test_reply_uses_the_encoding_of_the_request(c):
    # Conn.raw asserts the frame type of every reply; here both kinds of frame, the
    # success and the error path, a single request and a batch, on one connection.
    ok = await c.abuser.call({"id": 1, "op": "set", "key": "k", "value": "v"}, cbor=False)
    assert ok == {"id": 1, "ok": True, "stored": True}
    ok = await c.abuser.call({"id": 2, "op": "get", "key": "k"}, cbor=True)
    assert ok == {"id": 2, "ok": True, "found": True, "value": "v"}
    for cbor in (False, True):
        batch = await c.abuser.call([{"id": 3, "op": "ping"}], cbor=cbor)
        assert isinstance(batch, list) and batch[0]["node"] == c.node.node_id
        bad = await c.abuser.call({"id": 4, "op": "get", "key": 5}, cbor=cbor)
        assert_error(bad, "bad_request", 4)
    assert_error(await c.abuser.raw(b"{", text=True), "bad_request", None)
    assert_error(await c.abuser.raw(b"\xff", text=False), "bad_request", None)
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@pytest.mark.parametrize("rid", [0, -1, 2**53 + 1, 2**70, "", "req-7", "zé-ü-日本"])
@asyncio_test
async def test_ids_are_echoed_unchanged(c, rid, cbor):
    reply = await c.abuser.call({"id": rid, "op": "ping"}, cbor)
    assert reply["id"] == rid and type(reply["id"]) is type(rid)
    err = await c.abuser.call({"id": rid, "op": "nope"}, cbor)
    assert_error(err, "unknown_op", rid)


# -- undecodable frames ----------------------------------------------------------------

UNDECODABLE = [
    ("json-malformed", b'{"id": 1, "op": "ping"', True),
    ("json-trailing-garbage", b'{"id": 1, "op": "ping"} x', True),
    ("json-two-documents", b'{"id": 1, "op": "ping"}{"id": 2, "op": "ping"}', True),
    ("json-empty-frame", b"", True),
    ("json-nan", b'{"id": 1, "op": "set", "key": "k", "value": NaN}', True),
    ("json-infinity", b'{"id": 1, "op": "set", "key": "k", "value": Infinity}', True),
    ("json-minus-infinity", b'{"id": 1, "op": "set", "key": "k", "value": -Infinity}', True),
    ("json-nan-ttl", b'{"id": 1, "op": "set", "key": "k", "value": 1, "ttl": NaN}', True),
    ("json-nan-id", b'{"id": NaN, "op": "ping"}', True),
    ("json-deep-arrays", b"[" * 100_000 + b"]" * 100_000, True),
    ("json-deep-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, True),
    ("json-deep-in-value",
     b'{"id": 1, "op": "set", "key": "k", "value": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}", True),
    ("text-not-utf8", b"\xff\xfe", True),
    ("text-not-utf8-inside-string", b'{"id": 1, "op": "get", "key": "\xc3("}', True),
    ("text-overlong-utf8", b'{"id": 1, "op": "get", "key": "\xc0\xaf"}', True),
    ("text-encoded-surrogate", b'{"id": 1, "op": "get", "key": "\xed\xa0\x80"}', True),
    ("cbor-malformed-break", b"\xff", False),
    ("cbor-truncated", cbor2.dumps({"id": 1, "op": "ping"})[:-2], False),
    ("cbor-empty-frame", b"", False),
    ("cbor-trailing-bytes", cbor2.dumps({"id": 1, "op": "ping"}) + b"\x00", False),
    ("cbor-two-items", cbor2.dumps({"id": 1, "op": "ping"}) * 2, False),
    ("cbor-deep-arrays", b"\x81" * 100_000 + b"\x00", False),
    ("cbor-invalid-utf8-text", b"\xa2\x62id\x01\x62op\x63\xed\xa0\x80", False),
    ("cbor-huge-declared-length", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", False),
]


@pytest.mark.parametrize(
    "payload, text", [pytest.param(p, t, id=name) for name, p, t in UNDECODABLE]
)
@asyncio_test
async def test_undecodable_frame_is_bad_request_with_null_id(c, payload, text):
    reply = await c.abuser.raw(payload, text)
    assert_error(reply, "bad_request", None)
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_frame_with_trailing_bytes_is_not_executed(c, cbor):
    request = encode({"id": 1, "op": "set", "key": "trail", "value": 1}, cbor)
    reply = await c.abuser.raw(request + (b"\x00" if cbor else b" 0"), text=not cbor)
    assert_error(reply, "bad_request", None)
    assert (await c.bystander.op("exists", key="trail"))["exists"] is False
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_fragmented_message_is_reassembled(c, cbor):
    # The first cut falls inside the two-byte UTF-8 sequence of "é": the fragments are
    # not valid UTF-8 one by one, only the reassembled message is.
    request = {"id": 1, "op": "set", "key": "frag", "value": "é" * 50}
    payload = (cbor2.dumps(request) if cbor
               else json.dumps(request, ensure_ascii=False).encode("utf-8"))
    cut = payload.index("é".encode()) + 1
    await c.abuser.ws.send([payload[:cut], payload[cut:cut + 7], payload[cut + 7:]],
                           text=not cbor)
    reply, text = await c.abuser.recv_frame()
    assert text == (not cbor)
    assert reply == {"id": 1, "ok": True, "stored": True}
    assert (await c.bystander.op("get", key="frag"))["value"] == "é" * 50
    await survives(c)


@asyncio_test
async def test_fragmented_text_that_is_not_utf8_is_bad_request(c):
    await c.abuser.ws.send([b'{"id": 1, "op": "get", "key": "\xc3', b'("}'], text=True)
    reply, text = await c.abuser.recv_frame()
    assert text is True
    assert_error(reply, "bad_request", None)
    await survives(c)


# -- requests that are not requests ----------------------------------------------------

ENVELOPE = [
    ("number", 42, "bad_request", None),
    ("float", 1.5, "bad_request", None),
    ("string", "ping", "bad_request", None),
    ("null", None, "bad_request", None),
    ("boolean", True, "bad_request", None),
    ("missing-id", {"op": "ping"}, "bad_request", None),
    ("id-float", {"id": 1.5, "op": "ping"}, "bad_request", None),
    ("id-integral-float", {"id": 1.0, "op": "ping"}, "bad_request", None),
    ("id-true", {"id": True, "op": "ping"}, "bad_request", None),
    ("id-false", {"id": False, "op": "ping"}, "bad_request", None),
    ("id-null", {"id": None, "op": "ping"}, "bad_request", None),
    ("id-object", {"id": {"n": 1}, "op": "ping"}, "bad_request", None),
    ("id-array", {"id": [1], "op": "ping"}, "bad_request", None),
    ("missing-op", {"id": 9}, "bad_request", 9),
    ("op-number", {"id": 10, "op": 1}, "bad_request", 10),
    ("op-null", {"id": 11, "op": None}, "bad_request", 11),
    ("op-array", {"id": "x", "op": ["ping"]}, "bad_request", "x"),
    ("unknown-op", {"id": 12, "op": "flushall"}, "unknown_op", 12),
    ("unknown-op-wrong-case", {"id": "s-1", "op": "PING"}, "unknown_op", "s-1"),
    ("unknown-op-empty", {"id": 13, "op": ""}, "unknown_op", 13),
    ("unknown-op-dunder", {"id": 14, "op": "__class__"}, "unknown_op", 14),
]


@pytest.mark.parametrize("cbor", ENCODINGS)
@pytest.mark.parametrize(
    "request_, code, rid", [pytest.param(r, code, i, id=n) for n, r, code, i in ENVELOPE]
)
@asyncio_test
async def test_malformed_request_object(c, request_, code, rid, cbor):
    assert_error(await c.abuser.call(request_, cbor), code, rid)
    await survives(c)


# -- missing and ill-typed arguments --------------------------------------------------
# Every case names the key "k"; none of them may store anything under it.

ARGUMENTS = [
    ("get-key-missing", {"op": "get"}, "bad_request", "key"),
    ("get-key-number", {"op": "get", "key": 5}, "bad_request", "key"),
    ("get-key-empty", {"op": "get", "key": ""}, "bad_request", "key"),
    ("get-key-null", {"op": "get", "key": None}, "bad_request", "key"),
    ("get-key-array", {"op": "get", "key": ["k"]}, "bad_request", "key"),
    ("exists-key-bool", {"op": "exists", "key": True}, "bad_request", "key"),
    ("delete-key-missing", {"op": "delete"}, "bad_request", "key"),
    ("ttl-key-map", {"op": "ttl", "key": {"k": 1}}, "bad_request", "key"),
    ("owner-key-empty", {"op": "owner", "key": ""}, "bad_request", "key"),
    ("set-key-number", {"op": "set", "key": 1, "value": 1}, "bad_request", "key"),
    ("set-key-empty", {"op": "set", "key": "", "value": 1}, "bad_request", "key"),
    ("set-value-missing", {"op": "set", "key": "k"}, "bad_request", "value"),
    ("set-ttl-negative", {"op": "set", "key": "k", "value": 1, "ttl": -1},
     "bad_request", "ttl"),
    ("set-ttl-zero", {"op": "set", "key": "k", "value": 1, "ttl": 0}, "bad_request", "ttl"),
    ("set-ttl-string", {"op": "set", "key": "k", "value": 1, "ttl": "10"},
     "bad_request", "ttl"),
    ("set-ttl-bool", {"op": "set", "key": "k", "value": 1, "ttl": True},
     "bad_request", "ttl"),
    ("set-ttl-too-long", {"op": "set", "key": "k", "value": 1, "ttl": 1e10},
     "bad_request", "ttl"),
    ("set-nx-and-xx", {"op": "set", "key": "k", "value": 1, "nx": True, "xx": True},
     "bad_request", "nx"),
    ("set-nx-not-bool", {"op": "set", "key": "k", "value": 1, "nx": 1},
     "bad_request", "nx"),
    ("set-xx-string", {"op": "set", "key": "k", "value": 1, "xx": "true"},
     "bad_request", "xx"),
    ("expire-ttl-missing", {"op": "expire", "key": "k"}, "bad_request", "ttl"),
    ("expire-ttl-zero", {"op": "expire", "key": "k", "ttl": 0}, "bad_request", "ttl"),
    ("incr-key-missing", {"op": "incr"}, "bad_request", "key"),
    ("incr-delta-float", {"op": "incr", "key": "k", "delta": 1.5}, "bad_request", "delta"),
    ("incr-delta-integral-float", {"op": "incr", "key": "k", "delta": 1.0},
     "bad_request", "delta"),
    ("incr-delta-bool", {"op": "incr", "key": "k", "delta": True}, "bad_request", "delta"),
    ("incr-delta-string", {"op": "incr", "key": "k", "delta": "2"},
     "bad_request", "delta"),
    ("incr-delta-null", {"op": "incr", "key": "k", "delta": None}, "bad_request", "delta"),
    ("incr-delta-over-int64", {"op": "incr", "key": "k", "delta": 2**63},
     "bad_request", "delta"),
    ("mget-keys-missing", {"op": "mget"}, "bad_request", "keys"),
    ("mget-keys-string", {"op": "mget", "keys": "k"}, "bad_request", "keys"),
    ("mget-keys-map", {"op": "mget", "keys": {"k": 1}}, "bad_request", "keys"),
    ("mget-keys-numbers", {"op": "mget", "keys": [1, 2]}, "bad_request", "key"),
    ("mget-keys-empty-key", {"op": "mget", "keys": ["k", ""]}, "bad_request", "key"),
    ("mset-items-missing", {"op": "mset"}, "bad_request", "items"),
    ("mset-items-array", {"op": "mset", "items": [["k", 1]]}, "bad_request", "items"),
    ("mset-items-string", {"op": "mset", "items": "k=1"}, "bad_request", "items"),
    ("mset-items-empty-key", {"op": "mset", "items": {"k": 1, "": 2}}, "bad_request", "key"),
    ("mset-ttl-zero", {"op": "mset", "items": {"k": 1}, "ttl": 0}, "bad_request", "ttl"),
    ("mset-value-too-deep", {"op": "mset", "items": {"k": nested(33)}},
     "bad_request", None),
]


@pytest.mark.parametrize("cbor", ENCODINGS)
@pytest.mark.parametrize(
    "args, code, mentions", [pytest.param(a, code, m, id=n) for n, a, code, m in ARGUMENTS]
)
@asyncio_test
async def test_missing_or_ill_typed_argument(c, args, code, mentions, cbor):
    reply = await c.abuser.call({"id": 77, **args}, cbor)
    await refused_without_effect(c, reply, code, 77, mentions)


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "map"])
@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_value_nesting_32_is_stored_33_is_bad_request(c, cbor, kind):
    deep_ok = nested(32, kind)
    stored = await c.abuser.op("set", cbor=cbor, key="deep", value=deep_ok)
    assert stored["stored"] is True
    got = await c.abuser.op("get", cbor=cbor, key="deep")
    assert got["value"] == deep_ok
    reply = await c.abuser.call(
        {"id": 5, "op": "set", "key": "deep", "value": nested(33, kind)}, cbor
    )
    assert_error(reply, "bad_request", 5)
    assert (await c.bystander.op("get", key="deep"))["value"] == deep_ok
    await survives(c)


# JSON text, escaped by hand so the frame itself is valid UTF-8 (RFC 8259 allows the
# escape; Python decodes it to a lone surrogate that no reply could hold).
SURROGATES = [
    ("in-key", rb'{"id": 1, "op": "set", "key": "a\ud800", "value": 1}', 1),
    ("in-value", rb'{"id": 1, "op": "set", "key": "k", "value": "\udfff"}', 1),
    ("in-nested-value", rb'{"id": 1, "op": "set", "key": "k", "value": [{"x": "\ud800"}]}',
     1),
    ("in-map-key-inside-value", rb'{"id": 1, "op": "set", "key": "k", "value": {"\ud800": 1}}',
     1),
    ("in-mget-keys", rb'{"id": 1, "op": "mget", "keys": ["\ud800"]}', 1),
    ("in-mset-items", rb'{"id": 1, "op": "mset", "items": {"\udbff": 1}}', 1),
    ("in-id", rb'{"id": "\ud800", "op": "ping"}', None),
    ("in-id-with-bad-op", rb'{"id": "x\udc00", "op": 5}', None),
]


@pytest.mark.parametrize(
    "payload, rid", [pytest.param(p, i, id=n) for n, p, i in SURROGATES]
)
@asyncio_test
async def test_lone_surrogate_is_bad_request(c, payload, rid):
    await refused_without_effect(c, await c.abuser.raw(payload, text=True), "bad_request", rid)


@asyncio_test
async def test_lone_surrogate_in_unknown_op_gets_an_encodable_reply(c):
    reply = await c.abuser.raw(rb'{"id": 3, "op": "x\ud800"}', text=True)
    assert_error(reply, "unknown_op", 3)
    await survives(c)


def _cyclic_list() -> bytes:
    # tag 28 (shareable) [ tag 29 (shared ref 0) ]: an array that contains itself.
    return b"\xd8\x1c\x81\xd8\x1d\x00"


def _shared_twice() -> bytes:
    inner = [1, 2]
    return cbor2.dumps([inner, inner], value_sharing=True)


CBOR_ONLY = [
    ("datetime", cbor2.dumps(datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc))),
    ("epoch-datetime", bytes([0xC1, 0x1A]) + (1_700_000_000).to_bytes(4, "big")),
    ("decimal", cbor2.dumps(decimal.Decimal("1.5"))),
    ("uuid", cbor2.dumps(uuid.UUID(int=7))),
    ("set", cbor2.dumps(frozenset([1, 2]))),
    ("unknown-tag", cbor2.dumps(cbor2.CBORTag(4000, 1))),
    ("uri-tag", cbor2.dumps(cbor2.CBORTag(32, "http://x"))),
    ("undefined", cbor2.dumps(cbor2.undefined)),
    ("simple-value", cbor2.dumps(cbor2.CBORSimpleValue(100))),
    ("nan", cbor2.dumps(float("nan"))),
    ("infinity", cbor2.dumps(float("-inf"))),
    ("int-over-64-bits", cbor2.dumps(2**64)),
    ("int-map-key", cbor2.dumps({1: "a"})),
    ("bool-map-key", cbor2.dumps({True: "a"})),
    ("tag-deep-inside", cbor2.dumps(
        {"a": [1, {"when": datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc)}]}
    )),
]
SHARING = [
    ("shared-container", _shared_twice()),
    ("cyclic-container", _cyclic_list()),
]


def _cbor_request(value_item: bytes, rid: int = 8, key: str = "k") -> bytes:
    """A CBOR ``set`` whose value is the raw CBOR item ``value_item``."""
    head = cbor2.dumps({"id": rid, "op": "set", "key": key})
    assert head[0] == 0xA3  # map of 3 pairs -> make it a map of 4
    return b"\xa4" + head[1:] + cbor2.dumps("value") + value_item


@pytest.mark.parametrize("item", [pytest.param(v, id=n) for n, v in CBOR_ONLY])
@asyncio_test
async def test_cbor_only_types_in_a_value_are_bad_request(c, item):
    reply = await c.abuser.raw(_cbor_request(item), text=False)
    await refused_without_effect(c, reply, "bad_request", 8)


@pytest.mark.parametrize("item", [pytest.param(v, id=n) for n, v in SHARING])
@asyncio_test
async def test_cbor_shared_or_cyclic_values_refuse_the_whole_frame(c, item):
    reply = await c.abuser.raw(_cbor_request(item), text=False)
    await refused_without_effect(c, reply, "bad_request", None)


CBOR_ARGUMENTS = [
    ("ttl-decimal", {"op": "set", "key": "k", "value": 1, "ttl": decimal.Decimal("10")}),
    ("ttl-datetime", {"op": "expire", "key": "k",
                      "ttl": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)}),
    ("key-bytes", {"op": "set", "key": b"k", "value": 1}),
    ("key-uri-tag", {"op": "get", "key": cbor2.CBORTag(32, "k")}),
    ("delta-decimal", {"op": "incr", "key": "k", "delta": decimal.Decimal(1)}),
    ("keys-set", {"op": "mget", "keys": frozenset(["k"])}),
    ("keys-bytes", {"op": "mget", "keys": [b"k"]}),
    ("items-bytes-key", {"op": "mset", "items": {b"k": 1}}),
    ("nx-undefined", {"op": "set", "key": "k", "value": 1, "nx": cbor2.undefined}),
]


@pytest.mark.parametrize("args", [pytest.param(a, id=n) for n, a in CBOR_ARGUMENTS])
@asyncio_test
async def test_cbor_only_types_in_arguments_are_bad_request(c, args):
    reply = await c.abuser.call({"id": 9, **args}, cbor=True)
    await refused_without_effect(c, reply, "bad_request", 9)


def _batch_sharing_an_id(count: int = 2000, size: int = 50_000) -> bytes:
    """Pings whose ids are one CBOR string: tag 28 on the first, tag 29 (ref 0) after.

    80 KB on the wire, a 100 MB reply if the node accepted it."""
    ping = cbor2.dumps("op") + cbor2.dumps("ping")
    first = b"\xa2" + cbor2.dumps("id") + b"\xd8\x1c" + cbor2.dumps("i" * size) + ping
    rest = (b"\xa2" + cbor2.dumps("id") + b"\xd8\x1d\x00" + ping) * (count - 1)
    return b"\x99" + count.to_bytes(2, "big") + first + rest


_KEYS = ["a", "b", "c"]
_LIST = [1, [2, 3]]
SHARED_ACROSS_REQUESTS = [
    ("id", _batch_sharing_an_id(), None),
    ("mget-keys", cbor2.dumps([{"id": 1, "op": "mget", "keys": _KEYS},
                               {"id": 2, "op": "mget", "keys": _KEYS}],
                              value_sharing=True), 1),
    ("set-value", cbor2.dumps([{"id": 1, "op": "set", "key": "k", "value": _LIST},
                               {"id": 2, "op": "set", "key": "k2", "value": _LIST}],
                              value_sharing=True), 1),
    ("mset-items", cbor2.dumps([{"id": 1, "op": "mset", "items": {"k": _LIST,
                                                                  "k2": _LIST}}],
                               value_sharing=True), 0),
]
@pytest.mark.parametrize(
    "frame, index", [pytest.param(f, i, id=n) for n, f, i in SHARED_ACROSS_REQUESTS]
)
@asyncio_test
async def test_cbor_shared_references_between_requests_are_bad_request(c, frame, index):
    reply = await c.abuser.raw(frame, text=False)
    await survives(c)
    # the whole frame is refused: shared containers are bad_request, and a shared
    # string that would blow the frame up (the 100 MB id case) too_large
    assert_error(reply, "bad_request" if index is not None else "too_large", None)


@asyncio_test
async def test_cbor_bytes_round_trip_and_reach_json_clients_as_base64(c):
    blob = bytes(range(256)) + b"\x00\xff"
    value = {"raw": blob, "list": [b"", b"\x01"]}
    assert (await c.abuser.op("set", cbor=True, key="blob", value=value))["stored"]
    got = await c.abuser.op("get", cbor=True, key="blob")
    assert got["value"] == value and isinstance(got["value"]["raw"], bytes)
    as_json = await c.bystander.op("get", cbor=False, key="blob")
    assert as_json["value"] == {
        "raw": {"$base64": base64.b64encode(blob).decode("ascii")},
        "list": [{"$base64": ""}, {"$base64": "AQ=="}],
    }
    # The rendering is only a rendering: a JSON client storing it stores a map.
    rendered = {"$base64": "AQ=="}
    await c.bystander.op("set", cbor=False, key="map", value=rendered)
    assert (await c.abuser.op("get", cbor=True, key="map"))["value"] == rendered
    assert (await c.abuser.op("mget", cbor=True, keys=["blob"]))["values"] == {
        "blob": value
    }
    await survives(c)


# -- batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_batch_mixing_valid_and_invalid_requests(c, cbor):
    batch = [
        {"id": 1, "op": "set", "key": "b", "value": [1, 2]},
        42,
        {"op": "ping"},
        {"id": "u", "op": "nope"},
        {"id": 3, "op": "get", "key": ""},
        {"id": 4, "op": "get", "key": "b"},
        None,
        {"id": 1.5, "op": "ping"},
        [{"id": 5, "op": "ping"}],
        {"id": 6, "op": "incr", "key": "n", "delta": 1.0},
        {"id": 7, "op": "incr", "key": "n", "delta": 2},
        "ping",
        {"id": 8, "op": "ping"},
    ]
    replies = await c.abuser.call(batch, cbor)
    assert isinstance(replies, list) and len(replies) == len(batch)
    assert replies[0] == {"id": 1, "ok": True, "stored": True}
    assert_error(replies[1], "bad_request", None)
    assert_error(replies[2], "bad_request", None)
    assert_error(replies[3], "unknown_op", "u")
    assert_error(replies[4], "bad_request", 3)
    assert replies[5] == {"id": 4, "ok": True, "found": True, "value": [1, 2]}
    assert_error(replies[6], "bad_request", None)
    assert_error(replies[7], "bad_request", None)
    assert_error(replies[8], "bad_request", None)  # batches do not nest
    assert_error(replies[9], "bad_request", 6)
    assert replies[10] == {"id": 7, "ok": True, "value": 2}
    assert_error(replies[11], "bad_request", None)
    assert replies[12] == {"id": 8, "ok": True, "node": c.node.node_id}
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_empty_batch_gets_empty_array(c, cbor):
    assert await c.abuser.call([], cbor) == []
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_batch_over_10000_requests_is_too_large(c, cbor):
    at_limit = await c.abuser.call([{"id": i, "op": "ping"} for i in range(10_000)], cbor)
    assert [r["id"] for r in at_limit] == list(range(10_000))
    assert all(r["ok"] for r in at_limit)
    over = [{"id": i, "op": "set", "key": f"o{i}", "value": i} for i in range(10_000)]
    over.append(42)
    replies = await c.abuser.call(over, cbor)
    # The contract: the reply to a batch is an array of the same length, in order.
    assert isinstance(replies, list), f"not an array: {short(replies)}"
    assert len(replies) == len(over)
    for i, reply in enumerate(replies[:-1]):
        assert_error(reply, "too_large", i)
    assert_error(replies[-1], "too_large", None)
    # Nothing in the refused batch ran.
    assert (await c.bystander.op("mget", keys=["o0", "o9999"]))["values"] == {}
    await survives(c)


# -- sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_key_over_1024_utf8_bytes_is_too_large(c, cbor):
    for key in ("k" * 1024, "é" * 512):  # 1024 bytes in UTF-8: the limit itself
        assert (await c.abuser.op("set", cbor=cbor, key=key, value=1))["stored"]
    for i, key in enumerate(("k" * 1025, "é" * 513, "日" * 342)):  # 1025, 1026, 1026
        for op, args in (("set", {"value": 1}), ("get", {}), ("delete", {})):
            reply = await c.abuser.call({"id": i, "op": op, "key": key, **args}, cbor)
            assert_error(reply, "too_large", i)
    reply = await c.abuser.call({"id": 9, "op": "mget", "keys": ["a", "k" * 2000]}, cbor)
    assert_error(reply, "too_large", 9)
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_value_over_max_value_size_is_too_large(small_values, cbor):
    c = small_values
    assert (await c.abuser.op("set", cbor=cbor, key="small", value="x" * 500))["stored"]
    reply = await c.abuser.call({"id": 1, "op": "set", "key": "big", "value": "x" * 2000},
                                cbor)
    assert_error(reply, "too_large", 1)
    reply = await c.abuser.call(
        {"id": 2, "op": "set", "key": "big", "value": ["x" * 100] * 20}, cbor
    )
    assert_error(reply, "too_large", 2)
    reply = await c.abuser.call(
        {"id": 3, "op": "mset", "items": {"ok": 1, "big": "y" * 5000}}, cbor
    )
    assert_error(reply, "too_large", 3)
    assert (await c.bystander.op("get", key="big"))["found"] is False
    assert (await c.bystander.op("get", key="small"))["value"] == "x" * 500
    await survives(c)


@pytest.mark.parametrize("cbor", ENCODINGS)
@asyncio_test
async def test_frame_at_max_message_size_is_served(small_frames, cbor):
    c = small_frames
    head = encode({"id": 1, "op": "ping", "pad": ""}, cbor)
    if cbor:
        # A 2-byte-length text string header (0x79) holds the padding.
        pad = 10_000 - (len(head) - 1) - 3
        frame = head[:-1] + b"\x79" + pad.to_bytes(2, "big") + b"p" * pad
    else:
        frame = head[:-2] + b"p" * (10_000 - len(head)) + head[-2:]
    assert len(frame) == 10_000
    reply = await c.abuser.raw(frame, text=not cbor)
    assert reply == {"id": 1, "ok": True, "node": c.node.node_id}
    await survives(c)


@pytest.mark.parametrize(
    "size, text, fragmented",
    [
        pytest.param(10_001, True, False, id="text-just-over"),
        pytest.param(20_000, False, False, id="binary"),
        pytest.param(1_000_000, True, False, id="text-1mb"),
        pytest.param(12_000, True, True, id="fragmented-text"),
        pytest.param(12_000, False, True, id="fragmented-binary"),
    ],
)
@asyncio_test
async def test_frame_over_max_message_size_closes_with_1009(
    small_frames, size, text, fragmented
):
    c = small_frames
    payload = b"[" + b" " * (size - 2) + b"]"
    # The node may close the connection before the whole message is written.
    with contextlib.suppress(websockets.ConnectionClosed):
        if fragmented:  # each fragment under the limit, the message over it
            parts = [payload[i:i + 4000] for i in range(0, size, 4000)]
            message: Any = [p.decode() for p in parts] if text else parts
            await c.abuser.ws.send(message)
        else:
            await c.abuser.send(payload, text)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await c.abuser.recv_frame()
    assert closed.value.rcvd is not None, "the node dropped the link without a close frame"
    assert closed.value.rcvd.code == 1009
    await survives(c, abuser_open=False)
    # The node still accepts new clients, and counts the closed one out.
    late = await Conn.open(c.node.url, "late")
    try:
        await late.ping(c.node.node_id)
        # two: the bystander and late
        await until_connections(late, 2, "the node to count the closed client out")
    finally:
        await late.close()


# -- misbehaving clients ---------------------------------------------------------------


async def _connections(conn: Conn) -> int:
    return (await conn.op("stats"))["stats"]["connections"]


async def until_connections(conn: Conn, count: int, what: str) -> None:
    """Wait until the node, asked over ``conn``, counts ``count`` connections."""

    async def counted() -> bool:
        return await _connections(conn) == count

    await wait_until(counted, what)


async def _hits(conn: Conn) -> int:
    return (await conn.op("stats"))["stats"]["hits"]


@pytest.mark.parametrize("when", ["at-once", "after-node-answered"])
@asyncio_test
async def test_client_that_sends_a_big_batch_and_vanishes(c, when):
    await c.bystander.op("set", key="big", value="v" * 10_000)
    base_hits = await _hits(c.bystander)
    assert await _connections(c.bystander) == 2
    rude = await Conn.open(c.node.url, "rude")
    assert await _connections(c.bystander) == 3
    batch = [{"id": i, "op": "get", "key": "big"} for i in range(1000)]  # ~10 MB reply
    if when == "after-node-answered":
        rude.ws.transport.pause_reading()  # never read a byte of the reply
    await rude.send(encode(batch, False), text=True)
    if when == "after-node-answered":

        async def answered() -> bool:
            return await _hits(c.bystander) >= base_hits + 1000

        await wait_until(answered, "the node to run the whole batch")
    rude.ws.transport.abort()  # no close handshake, unread data discarded
    await until_connections(c.bystander, 2, "the node to count the vanished client out")
    await survives(c)


@asyncio_test
async def test_client_that_closes_right_after_a_batch(c):
    rude = await Conn.open(c.node.url, "rude")
    batch = [{"id": i, "op": "set", "key": f"r{i}", "value": i} for i in range(1000)]
    await rude.send(encode(batch, True), text=False)
    await rude.close()  # a clean close, but without reading the reply
    await until_connections(c.bystander, 2, "the node to count the closed client out")
    await survives(c)


@asyncio_test
async def test_pipelining_500_frames_before_reading_any_reply(c):
    await c.abuser.op("set", key="pre", value={"x": 1})
    expected = {}
    for i in range(500):
        cbor = i % 2 == 1
        kind = i % 4
        if kind == 0:
            request = {"id": i, "op": "ping"}
        elif kind == 1:
            request = {"id": i, "op": "set", "key": f"p{i}", "value": i}
        elif kind == 2:
            request = {"id": i, "op": "get", "key": "pre"}
        else:
            request = {"id": i, "op": "get", "key": ""}  # an error, pipelined too
        expected[i] = (kind, not cbor)
        await c.abuser.send(encode(request, cbor), text=not cbor)
    seen = set()
    for _ in range(500):
        reply, text = await c.abuser.recv_frame()
        rid = reply["id"]
        assert rid in expected and rid not in seen, reply
        seen.add(rid)
        kind, sent_text = expected[rid]
        assert text == sent_text, f"reply {rid} came in the other encoding"
        if kind == 0:
            assert reply == {"id": rid, "ok": True, "node": c.node.node_id}
        elif kind == 1:
            assert reply == {"id": rid, "ok": True, "stored": True}
        elif kind == 2:
            assert reply == {"id": rid, "ok": True, "found": True, "value": {"x": 1}}
        else:
            assert_error(reply, "bad_request", rid)
    assert seen == set(range(500))
    values = (await c.bystander.op("mget", keys=[f"p{i}" for i in range(1, 500, 4)]))
    assert values["values"] == {f"p{i}": i for i in range(1, 500, 4)}
    await survives(c)
