"""Group replies passed on as they came (``brep.raw``): a relay neither decodes nor
encodes the values in them, the node that reads them checks them.

Unit tests of the wire pieces and of PeerLink with a list for frames and task.Clock
for time, then a line of three real nodes on 127.0.0.1, with and without a peer of
before ``raw``.
"""

from __future__ import annotations

import cbor2
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred

from conftest import start_node, stop_all, converged
from swarm.client import SwarmClient
from swarm.mesh.link import IN_RUN, Packed, PeerLink, unpacked
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import (
    MAX_GROUP_REQUESTS,
    PeerProtocolError,
    check_messages,
    decode_peer_frame,
    frames_of,
    packed_replies,
    reply_count,
    unpack_replies,
)
from test_link_batching import found, get, results


def no_refusal(msg, error):
    pytest.fail(error.message)


def sent_messages(messages):
    """``messages`` as the peer reads them: through frames and back."""
    return [m for f in frames_of(messages, no_refusal) for m in decode_peer_frame(f, True)]


# -- the wire -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 23, 24, 255, 256, MAX_GROUP_REQUESTS])
def test_reply_count_reads_the_arrays_head(count):
    assert reply_count(cbor2.dumps([{}] * count)) == count


@pytest.mark.parametrize("raw", [
    b"", cbor2.dumps([]), cbor2.dumps({"a": 1}), cbor2.dumps(b"xx"), b"\x9f\xa0\xff",  # indefinite
    b"\x99\x01", cbor2.dumps([{}] * (MAX_GROUP_REQUESTS + 1)),
])
def test_reply_count_refuses_what_is_not_a_definite_array_of_a_group(raw):
    assert reply_count(raw) is None


def test_packed_replies_go_as_one_encoded_item_and_come_back_as_they_were():
    reps = [found(i) for i in range(3)]
    (msg,) = sent_messages([packed_replies(7, 4, reps)])
    assert set(msg) == {"t", "rid", "at", "raw"} and (msg["rid"], msg["at"]) == (7, 4)
    assert reply_count(msg["raw"]) == 3 and unpack_replies(msg["raw"]) == reps


def test_packed_replies_too_large_for_a_frame_are_cut_before_they_are_packed():
    from swarm.mesh.peer_wire import FRAME_TARGET

    value = "x" * (FRAME_TARGET // 10)
    reps = [{"id": i, "ok": True, "found": True, "value": value} for i in range(40)]
    parts = sent_messages([packed_replies(3, 0, reps)])
    assert len(parts) > 1 and all("raw" in m and "reps" not in m for m in parts)
    assert [r for m in parts for r in unpack_replies(m["raw"])] == reps
    assert [m["at"] for m in parts] == [sum(reply_count(p["raw"]) for p in parts[:i])
                                       for i in range(len(parts))]


@pytest.mark.parametrize("msg", [
    {"t": "brep", "rid": 1, "at": 0, "raw": "not bytes"},
    {"t": "brep", "rid": 1, "at": 0, "raw": cbor2.dumps([{}]), "reps": [{}]},
    {"t": "brep", "rid": 1, "at": 0, "raw": cbor2.dumps({})},
    {"t": "brep", "rid": 1, "at": 0, "raw": cbor2.dumps([])},
])
def test_a_malformed_raw_head_is_a_protocol_error(msg):
    with pytest.raises(PeerProtocolError, match="brep.raw must be"):
        check_messages([msg])


def test_hello_raw_must_be_a_boolean():
    with pytest.raises(PeerProtocolError, match="hello.raw must be a boolean"):
        check_messages([{"t": "hello", "node": "n", "swarm": "s", "proto": 2, "inc": 1,
                         "raw": "yes"}])


@pytest.mark.parametrize("raw, problem", [
    (cbor2.dumps([1, 2]), "brep.raw must be an array"),
    (cbor2.dumps([{}]) + b"\x00", "after its CBOR item"),
    (b"\x82\xa0", "undecodable"),  # says two, holds one
    (b"\x81\xd8\x19\x00", "undecodable"),  # a string reference: no node sends one
])
def test_unpack_replies_checks_what_the_head_did_not(raw, problem):
    with pytest.raises(PeerProtocolError, match=problem):
        unpack_replies(raw)


# -- the link -----------------------------------------------------------------------------


def group_link():
    clock = task.Clock()
    frames: list[list[dict]] = []
    return PeerLink("n2", frames.append, clock, batches=True, raw=True), frames, clock


def test_a_relays_group_takes_a_run_whole_and_nothing_is_decoded():
    link, frames, clock = group_link()
    d = link.call_group([get(i) for i in range(4)], 1, 3, passthrough=True)
    ((breq,),) = frames
    raw = cbor2.dumps([found(i) for i in range(1, 4)])
    assert link.on_group_reply(breq["rid"], 1, raw)
    assert link.on_group_reply(breq["rid"], 0, [found(0)])
    (replies,) = results([d])
    assert replies == [found(0), Packed(raw, 3), IN_RUN, IN_RUN]
    assert unpacked(replies, [get(i) for i in range(4)], "n2") == [found(i) for i in range(4)]
    assert link.pending == 0 and clock.getDelayedCalls() == []


def test_a_run_is_decoded_where_the_caller_reads_it_or_part_of_it_was_answered():
    link, frames, clock = group_link()
    d = link.call_group([get(i) for i in range(3)], 1, 3)  # not a relay
    rid = frames[-1][0]["rid"]
    assert link.on_group_reply(rid, 0, cbor2.dumps([found(i) for i in range(3)]))
    assert results([d]) == [[found(i) for i in range(3)]]
    d = link.call_group([get(i) for i in range(3)], 1, 3, passthrough=True)
    rid = frames[-1][0]["rid"]
    link.on_group_reply(rid, 1, [found(1)])
    assert link.on_group_reply(rid, 0, cbor2.dumps([found(0), found(9), found(2)]))
    assert results([d]) == [[found(0), found(1), found(2)]]  # delivered once
    calls = [link.call(get(i), 1, 3) for i in range(2)]  # a client's callers, one by one
    clock.advance(0)
    assert link.on_group_reply(frames[-1][0]["rid"], 0, cbor2.dumps([found(0), found(1)]))
    assert results(calls) == [found(0), found(1)]


def test_replies_that_do_not_decode_are_errors_for_their_callers_and_the_link_stays():
    link, frames, clock = group_link()
    calls = [link.call(get(i), 1, 3) for i in range(3)]
    clock.advance(0)
    rid = frames[-1][0]["rid"]
    assert link.on_group_reply(rid, 0, cbor2.dumps([found(0), 5]))  # a broken node behind
    assert not link.on_group_reply(rid, 2, cbor2.dumps([found(2), found(3)]))  # out of range
    assert link.on_group_reply(rid, 2, [found(2)])
    out = results(calls)
    assert [(r["id"], r["ok"]) for r in out] == [(0, False), (1, False), (2, True)]
    assert out[0]["error"] == {"code": "internal",
                               "message": "malformed replies came through n2"}
    assert unpacked([Packed(b"\x82\xa0", 2), IN_RUN], [get(0), get(1)], "n2") == out[:2]


# -- the overlay --------------------------------------------------------------------------


def relay_overlay():
    o = Overlay("b", "s", 1, task.Clock())
    o.handle_request = lambda *args: pytest.fail("a group passed on is not served here")
    later = Deferred()
    o.relay_group = lambda *args: later
    return o, later


@pytest.mark.parametrize("raw", [True, False])
def test_a_relay_sends_packed_runs_on_as_they_came_and_packs_the_rest(raw):
    o, later = relay_overlay()
    sent = []
    reqs = [get(i) for i in range(5)]
    o.receive_group(PeerLink("a", sent.append, o.clock, batches=True, raw=raw),
                    {"t": "breq", "rid": 5, "at": 10, "ms": 800, "hops": 3, "reqs": reqs})
    run = cbor2.dumps([found(1), found(2)])
    later.callback([found(0), Packed(run, 2), IN_RUN, found(3), found(4)])
    ((*messages,),) = sent
    if raw:
        assert messages == [packed_replies(5, 10, [found(0)]),
                            {"t": "brep", "rid": 5, "at": 11, "raw": run},
                            packed_replies(5, 13, [found(3), found(4)])]
    else:  # a peer of before raw gets the replies decoded
        assert messages == [{"t": "brep", "rid": 5, "at": 10,
                             "reps": [found(i) for i in range(5)]}]


def test_an_owner_packs_its_replies_only_for_a_peer_that_takes_them():
    o = Overlay("c", "s", 1, task.Clock())
    o.handle_request = lambda req, *args: found(req["id"])
    for raw, expected in [(True, packed_replies(1, 0, [found(0), found(1)])),
                          (False, {"t": "brep", "rid": 1, "at": 0,
                                   "reps": [found(0), found(1)]})]:
        sent = []
        o.receive_group(PeerLink("b", sent.append, o.clock, batches=True, raw=raw),
                        {"t": "breq", "rid": 1, "ms": 800, "hops": 3, "reqs": [get(0), get(1)]})
        assert sent == [[expected]]


# -- a line of real nodes -----------------------------------------------------------------


async def line(without_raw: str | None = None):
    """n0 - n1 - n2; the node named ``without_raw`` says no ``raw`` in its hello."""
    nodes = [await start_node(node_id=f"n{i}") for i in range(3)]
    for n in nodes:
        if n.overlay.node_id == without_raw:
            hello = n.overlay.hello
            n.overlay.hello = lambda nonce, hello=hello: {
                k: v for k, v in hello(nonce).items() if k != "raw"}
    nodes[1].add_peer(nodes[0].url)
    nodes[2].add_peer(nodes[1].url)
    await converged(nodes)
    return nodes


def record_sent(node, peer: str) -> list[dict]:
    """The messages ``node`` sends on its link to ``peer`` from now on."""
    (link,) = node.overlay._links[peer]
    sent: list[dict] = []
    send = link._send

    def recording(messages):
        sent.extend(messages)
        send(messages)

    link._send = recording
    return sent


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("encoding", ["json", "cbor"])
@pytest.mark.parametrize("without_raw", [None, "n0"])
async def test_two_hops_away_the_relay_passes_replies_on_undecoded(encoding, without_raw):
    from twisted.internet import reactor

    nodes = await line(without_raw)
    client = None
    try:
        placement = nodes[0].router.placement
        keys = [k for k in (f"key{i}" for i in range(2000))
                if placement.owners(k)[0] == "n2"][:300]
        values = {k: {"n": i, "b": bytes([i % 256]) * 3} if encoding == "cbor" else f"v{i}"
                  for i, k in enumerate(keys)}
        client = await SwarmClient.connect(nodes[0].url, reactor=reactor, encoding=encoding,
                                           timeout=10)
        writes = await client.batch([{"op": "set", "key": k, "value": v}
                                     for k, v in values.items()])
        assert all(r["ok"] for r in writes) and len(nodes[2].store) == len(keys)
        relayed = record_sent(nodes[1], "n0")
        replies = await client.batch([{"op": "get", "key": k} for k in keys])
        assert [r["value"] for r in replies] == list(values.values())
        breps = [m for m in relayed if m["t"] == "brep"]
        assert breps, "the relay sent no group replies"
        if without_raw is None:
            assert all(set(m) == {"t", "rid", "at", "raw"} for m in breps)
        else:
            assert all("reps" in m and "raw" not in m and "pack" not in m for m in breps)
    finally:
        if client is not None:
            await client.close()
        await stop_all(nodes)
