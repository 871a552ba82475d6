"""Unit tests of swarm.mesh.peer_wire: peer frames, their bounds and the hello check;
and, through a real node, that a peer's hostile numbers close only its own link."""

from __future__ import annotations

import re

import cbor2
import pytest
import pytest_twisted

from swarm.errors import InternalError, TooLarge
from swarm.mesh.membership import Announcement
from swarm.protocol.wire import Unsupported
from swarm.mesh.peer_wire import (
    CLOSE_PROTOCOL_ERROR,
    FRAME_TARGET,
    MAX_COUNTER,
    MAX_HOPS,
    MAX_PEER_MESSAGE,
    MAX_REQUEST_MS,
    PROTOCOL_VERSION,
    PeerProtocolError,
    check_hello,
    check_messages,
    decode_peer_frame,
    encode_peer_frame,
    frames_of,
    hello,
)

HELLO = {"t": "hello", "node": "n1", "proto": PROTOCOL_VERSION, "swarm": "s", "inc": 12}
ANN = {"node": "n1", "inc": 12, "seq": 3, "links": ["n2"]}
LSA = {"t": "lsa", "anns": [ANN]}
REQ = {"t": "req", "rid": 1, "ms": 500, "hops": 4, "req": {"id": 1, "op": "ping"}}
REP = {"t": "rep", "rid": 1, "rep": {"id": 1, "ok": True, "node": "n2"}}


def decode(*messages):
    return decode_peer_frame(cbor2.dumps(list(messages)), True)


def without(msg: dict, field: str) -> dict:
    return {k: v for k, v in msg.items() if k != field}


def test_frames_round_trip():
    messages = [dict(HELLO), dict(REQ), dict(REQ, to="n7"), dict(REP), {"t": "bye"}]
    payload = encode_peer_frame(messages)
    assert isinstance(payload, bytes)
    assert decode_peer_frame(payload, True) == messages
    assert decode_peer_frame(encode_peer_frame([]), True) == []


def test_an_lsa_arrives_as_announcements():
    (msg,) = decode_peer_frame(encode_peer_frame([LSA]), True)
    assert msg["anns"] == [Announcement("n1", 12, 3, ("n2",))]
    (empty,) = decode({"t": "lsa", "anns": []})
    assert empty["anns"] == []


def test_text_frames_are_refused():
    with pytest.raises(PeerProtocolError):
        decode_peer_frame(encode_peer_frame([HELLO]), False)
    with pytest.raises(PeerProtocolError):
        decode_peer_frame(b"[]", False)


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\x82\x01", b"\x9f\x01", b"\x7f"])
def test_undecodable_cbor_is_refused(payload):
    with pytest.raises(PeerProtocolError, match="undecodable"):
        decode_peer_frame(payload, True)


@pytest.mark.parametrize("value", [HELLO, 1, "hello", None, b"x", {"0": HELLO}])
def test_a_frame_must_be_an_array(value):
    with pytest.raises(PeerProtocolError, match="array"):
        decode_peer_frame(cbor2.dumps(value), True)


@pytest.mark.parametrize("item", [None, 1, "hello", [HELLO], b"x"])
def test_each_message_must_be_a_map(item):
    with pytest.raises(PeerProtocolError):
        decode(HELLO, item)


@pytest.mark.parametrize(
    "msg",
    [
        {"node": "n1"}, dict(HELLO, t="goodbye"), dict(HELLO, t=None), dict(HELLO, t=1),
        dict(HELLO, t="HELLO"),
    ],
)
def test_unknown_message_types_are_refused(msg):
    with pytest.raises(PeerProtocolError, match="type"):
        decode(msg)


BAD_INTS = [-1, True, False, 1.5, 1.0, "1", None, [1], MAX_COUNTER + 1, 10**400]


def _bad(base: dict, required: dict[str, list], optional: dict[str, list] = {}):
    cases = []
    for field, bad_values in {**required, **optional}.items():
        if field in required:
            cases.append(pytest.param(without(base, field), id=f"{base['t']}-no-{field}"))
        for i, v in enumerate(bad_values):
            cases.append(pytest.param(dict(base, **{field: v}), id=f"{base['t']}-{field}-{i}"))
    return cases


BAD_MESSAGES = (
    _bad(HELLO, {
        "node": ["", 1, None, b"n1", ["n1"]],
        "swarm": ["", 1, None, b"s"],
        "proto": BAD_INTS,
        "inc": BAD_INTS,
    })
    + _bad(LSA, {
        "anns": [None, ANN, "x", {"0": ANN}, [ANN, 1], [without(ANN, "seq")],
                 [dict(ANN, inc=-1)], [dict(ANN, links=[1])], [dict(ANN, node="")]],
    })
    + _bad(REQ, {
        "rid": BAD_INTS,
        "ms": BAD_INTS + [MAX_REQUEST_MS + 1],
        "hops": BAD_INTS + [MAX_HOPS + 1],
        "req": [None, [], "ping", 1],
    }, {"to": ["", 1, None, ["n1"], b"n1"]})
    + _bad(REP, {"rid": BAD_INTS, "rep": [None, [], "ok", True]})
)


@pytest.mark.parametrize("msg", BAD_MESSAGES)
def test_malformed_messages_are_refused(msg):
    with pytest.raises(PeerProtocolError):
        decode(msg)
    # a bad message spoils its whole frame, wherever it sits
    with pytest.raises(PeerProtocolError):
        decode(HELLO, REP, msg)


def test_good_messages_with_extra_fields_and_large_numbers_pass():
    big = 2**40
    msgs = decode(
        dict(HELLO, inc=big, extra=1),
        dict(REQ, rid=big, ms=0, hops=0, to="n3"),
        dict(REP, rid=0, rep={}),
    )
    assert [m["t"] for m in msgs] == ["hello", "req", "rep"]
    assert msgs[1]["to"] == "n3" and msgs[1]["ms"] == 0


def test_numbers_at_their_bounds_pass():
    (req, rep, hi) = decode(dict(REQ, rid=MAX_COUNTER, ms=MAX_REQUEST_MS, hops=MAX_HOPS),
                            dict(REP, rid=MAX_COUNTER), dict(HELLO, inc=MAX_COUNTER))
    assert (req["ms"], req["hops"], rep["rid"], hi["inc"]) == (
        MAX_REQUEST_MS, MAX_HOPS, MAX_COUNTER, MAX_COUNTER)


@pytest.mark.parametrize("field,bound", [("ms", MAX_REQUEST_MS), ("hops", MAX_HOPS),
                                         ("rid", MAX_COUNTER)])
def test_a_number_past_its_bound_is_refused_with_the_bound_named(field, bound):
    with pytest.raises(PeerProtocolError, match=f"req.{field} must be an integer from 0 to {bound}"):
        decode(dict(REQ, **{field: bound + 1}))


def test_check_messages_validates_without_cbor_and_leaves_its_input_alone():
    lsa = {"t": "lsa", "anns": [dict(ANN)]}
    checked = check_messages([dict(REQ), lsa])
    assert checked == [REQ, {"t": "lsa", "anns": [Announcement("n1", 12, 3, ("n2",))]}]
    assert lsa == LSA  # a sender's messages are not rewritten under it
    with pytest.raises(PeerProtocolError):
        check_messages([dict(REQ, ms=-1)])


def test_hello_builds_a_hello_that_passes_its_own_checks():
    nonce = bytes(32)
    msg = hello("n1", "prod", 99, nonce, True)
    assert msg == {"t": "hello", "node": "n1", "proto": PROTOCOL_VERSION, "swarm": "prod",
                   "inc": 99, "nonce": nonce, "auth": True, "batch": True, "raw": True,
                   "sync": True}
    (decoded,) = decode_peer_frame(encode_peer_frame([msg]), True)
    assert check_hello(decoded, "n2", "prod") is None


@pytest.mark.parametrize("msg, error", [
    ({"t": "hello", "node": "n", "swarm": "s", "proto": 2, "inc": 1, "nonce": b"short"},
     "hello.nonce must be 32 bytes"),
    ({"t": "hello", "node": "n", "swarm": "s", "proto": 2, "inc": 1, "auth": "yes"},
     "hello.auth must be a boolean"),
    ({"t": "hello", "node": "n" * 257, "swarm": "s", "proto": 2, "inc": 1},
     "hello.node must be a string of 1 to 256 characters"),
    ({"t": "auth", "mac": "not bytes"}, "auth.mac must be 32 bytes"),
    ({"t": "lsa", "anns": [{"node": "n", "inc": 1, "seq": 1,
                            "links": [f"l{i}" for i in range(1025)]}]},
     "an announcement lists at most 1024 links"),
    ({"t": "lsa", "anns": [{"node": "x" * 257, "inc": 1, "seq": 1, "links": []}]},
     "announcement node must be a string of 1 to 256 characters"),
])
def test_handshake_fields_and_announcements_are_bounded(msg, error):
    with pytest.raises(PeerProtocolError, match=re.escape(error)):
        check_messages([msg])


@pytest.mark.parametrize(
    "msg,expected",
    [
        (dict(HELLO, proto=PROTOCOL_VERSION + 1), "protocol"),
        (dict(HELLO, proto=0), "protocol"),
        (dict(HELLO, swarm="other"), "swarm"),
        (dict(HELLO, node="self"), "own id"),
        (LSA, "first message"),
        (REQ, "first message"),
        (REP, "first message"),
    ],
)
def test_check_hello_refusals_give_a_reason(msg, expected):
    (decoded,) = decode(msg)
    reason = check_hello(decoded, "self", "s")
    assert isinstance(reason, str) and reason
    assert expected in reason


def test_check_hello_accepts_a_good_hello():
    (decoded,) = decode(HELLO)
    assert check_hello(decoded, "self", "s") is None
    # names differing only in case are different names
    assert check_hello(dict(decoded, node="N1"), "n1", "s") is None
    assert check_hello(decoded, "n2", "S") is not None


def test_bytes_after_the_frame_are_refused():
    with pytest.raises(PeerProtocolError):
        decode_peer_frame(encode_peer_frame([HELLO]) + b"\x01", True)


@pytest.mark.parametrize("encode", [
    lambda v: cbor2.dumps(v, string_referencing=True),
    lambda v: cbor2.dumps(v, value_sharing=True),
])
@pytest.mark.parametrize("size", [100, FRAME_TARGET + 1])  # decoded as they come / scanned
def test_references_are_refused_in_peer_frames(encode, size):
    """No node encodes string references or shared values, so a peer frame holding
    one is malformed: refused where it is met, with no search of the frame's bytes for
    them first and no walk of what it decodes to after (what client frames pay)."""
    value = ["x" * size, "x" * size]
    payload = encode([dict(REP, rep={"id": 1, "ok": True, "value": value})])
    assert re.search(rb"\xd8[\x19\x1c\x1d]|\xd9\x01\x00", payload)
    with pytest.raises(PeerProtocolError, match="undecodable"):
        decode_peer_frame(payload, True)
    (msg,) = decode_peer_frame(encode_peer_frame([dict(REP, rep={"id": 1, "value": value})]), True)
    assert msg["rep"]["value"] == value


# -- frames_of: cutting outgoing messages into frames a peer accepts --------------------

def _rep(rid: int, size: int) -> dict:
    return {"t": "rep", "rid": rid, "rep": {"id": rid, "ok": True, "value": "v" * size}}


def test_frames_of_keeps_order_and_cuts_near_the_target():
    messages = [_rep(i, 300_000) for i in range(10)]  # 3 MB in all
    frames = list(frames_of(messages, lambda m, n: pytest.fail("nothing is too large")))
    assert len(frames) >= 3
    assert all(len(f) <= FRAME_TARGET + 400_000 for f in frames)
    decoded = [m for f in frames for m in decode_peer_frame(f, True)]
    assert [m["rid"] for m in decoded] == list(range(10))


def test_frames_of_puts_small_messages_in_one_frame():
    messages = [{"t": "rep", "rid": i, "rep": {"id": i, "ok": True}} for i in range(500)]
    (frame,) = frames_of(messages, lambda m, n: None)
    assert len(decode_peer_frame(frame, True)) == 500


def test_frames_of_replaces_a_message_too_large_for_any_peer():
    huge = _rep(7, MAX_PEER_MESSAGE)
    seen = []

    def too_large(msg, error):
        seen.append((msg["rid"], error))
        return cbor2.dumps({"t": "rep", "rid": 7, "rep": {"id": 7, "ok": False}})

    frames = list(frames_of([_rep(6, 10), huge, _rep(8, 10)], too_large))
    decoded = [m for f in frames for m in decode_peer_frame(f, True)]
    assert [m["rid"] for m in decoded] == [6, 7, 8]
    assert decoded[1]["rep"]["ok"] is False
    assert seen and seen[0][0] == 7 and isinstance(seen[0][1], TooLarge)
    assert str(MAX_PEER_MESSAGE) in seen[0][1].message
    # or dropped altogether when the replacement is None
    frames = list(frames_of([_rep(6, 10), huge], lambda m, n: None))
    assert [m["rid"] for f in frames for m in decode_peer_frame(f, True)] == [6]


def test_frames_of_replaces_an_unencodable_message_and_keeps_the_others():
    # an id that is a decoded CBOR tag (Unsupported) must never reach a reply, but if a
    # bug lets one through, it costs that message only, not the frame around it
    bad = {"t": "rep", "rid": 7, "rep": {"id": Unsupported(1), "ok": True}}
    seen = []

    def refuse(msg, error):
        seen.append(error)
        return cbor2.dumps({"t": "rep", "rid": msg["rid"], "rep": {"id": None, "ok": False}})

    frames = list(frames_of([_rep(6, 10), bad, _rep(8, 10)], refuse))
    decoded = [m for f in frames for m in decode_peer_frame(f, True)]
    assert [m["rid"] for m in decoded] == [6, 7, 8]
    assert isinstance(seen[0], InternalError)


# -- through a real node: a hostile peer closes only its own link -------------------------


@pytest_twisted.ensureDeferred
async def test_a_peer_request_with_a_huge_deadline_closes_its_link_and_the_node_serves_on():
    """A req with ``ms`` past a float once raised OverflowError out of Autobahn's
    onMessage; now the frame is a protocol error, the link closes with 4001, and the
    node goes on serving."""
    import websockets
    from conftest import on_asyncio, start_node

    node = await start_node(node_id="target")
    try:
        async def hostile_peer() -> tuple[int, str]:
            async with websockets.connect(node.url + "/peer", open_timeout=5) as ws:
                await ws.send(encode_peer_frame([hello("hostile", "swarmcache", 1)]))
                await ws.send(encode_peer_frame([dict(REQ, ms=10**400)]))
                with pytest.raises(websockets.ConnectionClosedError):
                    async for _ in ws:  # the node's hello and lsa, then the close
                        pass
                return ws.close_code, ws.close_reason

        code, reason = await on_asyncio(hostile_peer())
        assert code == CLOSE_PROTOCOL_ERROR and "req.ms" in reason
        assert node.overlay.neighbors == []
        assert await node.set("k", 1) is True and await node.get("k") == 1
    finally:
        await node.stopService()
