"""Unit tests of PeerLink's groups (``breq``/``brep``) and of their framing.

No sockets: frames go to a list, time comes from task.Clock. Calls made in one turn
with the same deadline, hops and address leave as one message; every caller still gets
its own reply, in every ending (answered, answered in parts, timed out, link lost).
"""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from swarm.mesh.link import MAX_GROUP, PeerLink
from swarm.mesh.peer_wire import (
    FRAME_TARGET,
    PeerProtocolError,
    check_messages,
    decode_peer_frame,
    frames_of,
)
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import bye
from test_session import End, overlay, pump


def make_link(batches: bool = True):
    clock = task.Clock()
    frames: list[list[dict]] = []
    return PeerLink("n2", frames.append, clock, batches=batches), frames, clock


def get(i, key=None):
    return {"id": i, "op": "get", "key": key or f"k{i}"}


def found(i):
    return {"id": i, "ok": True, "found": True, "value": i}


def results(calls):
    out = []
    for d in calls:
        d.addBoth(out.append)
    assert len(out) == len(calls), "some caller has no reply yet"
    return out


def nothing_left(link, clock):
    return link.pending == 0 and clock.getDelayedCalls() == []


def test_calls_of_one_turn_leave_as_one_breq_and_each_caller_gets_its_reply():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 2.5, 7) for i in range(5)]
    assert frames == [] and link.pending == 5  # queued until the turn ends
    clock.advance(0)
    assert frames == [[{"t": "breq", "rid": 1, "ms": 2500, "hops": 7,
                        "reqs": [get(i) for i in range(5)]}]]
    assert not any(d.called for d in calls)
    assert link.on_group_reply(1, 0, [found(i) for i in range(5)])
    assert results(calls) == [found(i) for i in range(5)]
    assert nothing_left(link, clock)


def test_a_call_alone_in_its_turn_goes_as_a_plain_req():
    link, frames, clock = make_link()
    d = link.call(get(1), 1, 3, to="n9")
    clock.advance(0)
    assert frames == [[{"t": "req", "rid": 1, "ms": 1000, "hops": 3, "req": get(1), "to": "n9"}]]
    assert link.on_reply(1, found(1)) and results([d]) == [found(1)]
    assert nothing_left(link, clock)


def test_groups_are_by_deadline_hops_and_address_and_at_most_max_group():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 1, 3) for i in range(MAX_GROUP + 2)]
    calls += [link.call(get("x"), 1, 2), link.call(get("y"), 1, 3, to="n9"),
              link.call(get("z"), 1, 3, to="n9")]
    clock.advance(0)
    (messages,) = frames
    assert [(m["t"], len(m.get("reqs", [1]))) for m in messages] == [
        ("breq", MAX_GROUP), ("breq", 2), ("req", 1), ("breq", 2)]
    assert messages[3]["to"] == "n9" and "to" not in messages[0]
    link.fail_all("test over")
    assert len(results(calls)) == MAX_GROUP + 5 and nothing_left(link, clock)


def test_replies_in_parts_settle_their_runs_and_a_stray_part_is_refused():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 1, 3) for i in range(4)]
    clock.advance(0)
    assert not link.on_group_reply(1, 3, [found(3), found(4)])  # past the group's end
    assert not link.on_group_reply(9, 0, [found(0)])  # no such group
    assert link.on_group_reply(1, 2, [found(2), found(3)])
    assert [d.called for d in calls] == [False, False, True, True]
    assert link.pending == 1  # the group still waits for its first half
    assert link.on_group_reply(1, 0, [found(0), found(1)])
    assert results(calls) == [found(i) for i in range(4)]
    assert not link.on_group_reply(1, 0, [found(0)])  # late: all were answered
    assert nothing_left(link, clock)


@pytest.mark.parametrize("ending, code", [("timeout", "timeout"), ("lost", "unavailable")])
def test_a_group_that_times_out_or_whose_link_goes_answers_every_caller_left(ending, code):
    link, frames, clock = make_link()
    calls = [link.call(get(i), 1, 3) for i in range(3)]
    clock.advance(0)
    link.on_group_reply(1, 1, [found(1)])
    if ending == "timeout":
        clock.advance(1.1)
    else:
        link.fail_all("link lost")
    replies = results(calls)
    assert replies[1] == found(1)
    assert [r["id"] for r in replies] == [0, 1, 2]
    assert [r["error"]["code"] for r in (replies[0], replies[2])] == [code, code]
    assert nothing_left(link, clock)


def test_calls_still_queued_when_the_link_goes_are_answered_unavailable():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 1, 3) for i in range(3)]
    link.fail_all("link lost")
    assert [r["error"]["code"] for r in results(calls)] == ["unavailable"] * 3
    clock.advance(0)
    assert frames == [] and nothing_left(link, clock)


def test_a_message_sent_on_the_link_follows_the_calls_queued_before_it():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 1, 3) for i in range(2)]
    link.send([bye()])
    assert [[m["t"] for m in f] for f in frames] == [["breq"], ["bye"]]
    link.fail_all("test over")
    results(calls)
    assert nothing_left(link, clock)


def test_a_peer_that_does_not_take_groups_gets_a_req_per_call_at_once():
    link, frames, clock = make_link(batches=False)
    calls = [link.call(get(i), 1, 3) for i in range(3)]
    assert [[m["t"] for m in f] for f in frames] == [["req"]] * 3
    assert clock.getDelayedCalls() != []  # the deadline sweep, no flush
    link.fail_all("test over")
    results(calls)
    assert nothing_left(link, clock)


def test_overlay_links_take_groups_only_from_peers_whose_hello_says_batch():
    clock = task.Clock()
    old, new = overlay("old", clock), overlay("new", clock)
    e_old, e_new = End(old), End(new)
    e_old.session.start()
    e_new.session.start()
    hello_of_old = e_old.take()
    del hello_of_old[0]["batch"]  # a node of before groups
    e_new.session.received(hello_of_old)
    e_old.session.received(e_new.take())
    pump(e_old, e_new)
    assert e_new.session.link.batches is False and e_old.session.link.batches is True


def test_a_breq_is_served_side_by_side_and_answered_in_order_by_one_brep():
    later = Deferred()
    o = Overlay("b", "s", 1, task.Clock())
    o.handle_request = lambda req, timeout, hops, to: (
        later if req["id"] == 0 else {"id": req["id"], "ok": True, "ran": [timeout, hops, to]})
    sent = []
    link = PeerLink("a", sent.append, o.clock)
    o.receive_group(link, {"t": "breq", "rid": 4, "at": 8, "ms": 500, "hops": 2, "to": "b",
                           "reqs": [get(0), get(1), get(2)]})
    assert sent == [] and o.busy
    later.callback({"id": 0, "ok": True})
    assert sent == [[{"t": "brep", "rid": 4, "at": 8, "reps": [
        {"id": 0, "ok": True}] + [{"id": i, "ok": True, "ran": [0.5, 2, "b"]} for i in (1, 2)]}]]
    assert not o.busy


def test_a_breq_whose_deadline_passed_is_answered_timeout_for_each_request():
    o = Overlay("b", "s", 1, task.Clock())
    o.handle_request = lambda *args: pytest.fail("nothing runs past its deadline")
    sent = []
    o.receive_group(PeerLink("a", sent.append, o.clock),
                    {"t": "breq", "rid": 1, "ms": 0, "hops": 2, "reqs": [get(0), get(1)]})
    ((brep,),) = sent
    assert [r["error"]["code"] for r in brep["reps"]] == ["timeout", "timeout"]


# -- groups passed on whole by a relay ----------------------------------------------------


def test_call_group_sends_its_own_groups_after_queued_calls_and_fires_once_in_order():
    link, frames, clock = make_link()
    before = link.call(get(100), 1, 3)
    n = MAX_GROUP + 2
    d = link.call_group([get(i) for i in range(n)], 2.0, 4)
    assert [[m["t"] for m in f] for f in frames] == [["req"], ["breq", "breq"]]
    first, second = frames[1]
    assert (first["ms"], first["hops"], len(first["reqs"]), len(second["reqs"])) == (
        2000, 4, MAX_GROUP, 2)
    assert frames[1][0]["reqs"][0] == get(0) and second["reqs"] == [get(MAX_GROUP), get(n - 1)]
    link.on_group_reply(second["rid"], 0, [found(MAX_GROUP), found(n - 1)])
    link.on_group_reply(first["rid"], 1, [found(i) for i in range(1, MAX_GROUP)])
    assert not d.called
    link.on_group_reply(first["rid"], 0, [found(0)])
    assert results([d]) == [[found(i) for i in range(n)]]
    link.on_reply(frames[0][0]["rid"], found(100))
    assert results([before]) == [found(100)] and nothing_left(link, clock)


def test_call_group_answers_what_is_left_when_the_link_goes_and_needs_a_batching_peer():
    link, frames, clock = make_link()
    d = link.call_group([get(0), get(1)], 1, 3)
    link.on_group_reply(frames[0][0]["rid"], 1, [found(1)])
    link.fail_all("link lost")
    ((replies,),) = [results([d])]
    assert replies[1] == found(1) and replies[0]["error"]["code"] == "unavailable"
    assert nothing_left(link, clock)
    with pytest.raises(ValueError):
        make_link(batches=False)[0].call_group([get(0)], 1, 3)


def test_a_breq_the_relay_passes_on_whole_is_answered_by_one_brep_when_its_replies_come():
    o = Overlay("b", "s", 1, task.Clock())
    o.handle_request = lambda *args: pytest.fail("a group passed on is not served here")
    relayed: list = []

    def relay(reqs, timeout, hops, to):
        relayed.append((reqs, timeout, hops, to))
        relayed.append(Deferred())
        return relayed[-1]

    o.relay_group = relay
    sent = []
    o.receive_group(PeerLink("a", sent.append, o.clock),
                    {"t": "breq", "rid": 5, "at": 2, "ms": 800, "hops": 3,
                     "reqs": [get(0), get(1)]})
    assert relayed[0] == ([get(0), get(1)], 0.8, 3, None) and sent == [] and o.busy
    relayed[1].callback([found(0), found(1)])
    assert sent == [[{"t": "brep", "rid": 5, "at": 2, "reps": [found(0), found(1)]}]]
    assert not o.busy


def test_a_breq_the_relay_declines_is_served_request_by_request():
    o = Overlay("b", "s", 1, task.Clock())
    o.relay_group = lambda *args: None
    o.handle_request = lambda req, *args: found(req["id"])
    sent = []
    o.receive_group(PeerLink("a", sent.append, o.clock),
                    {"t": "breq", "rid": 1, "ms": 800, "hops": 3, "reqs": [get(0), get(1)]})
    assert sent == [[{"t": "brep", "rid": 1, "at": 0, "reps": [found(0), found(1)]}]]


def test_a_relay_that_breaks_costs_nothing_but_its_group_is_served_or_answered_internal():
    o = Overlay("b", "s", 1, task.Clock())
    o.handle_request = lambda req, *args: found(req["id"])
    sent = []
    link = PeerLink("a", sent.append, o.clock)
    msg = {"t": "breq", "rid": 1, "ms": 800, "hops": 3, "reqs": [get(0), get(1)]}

    def raises(*args):
        raise RuntimeError("a bug in the relay")

    o.relay_group = raises  # before it sent anything: served here, one by one
    o.receive_group(link, msg)
    assert sent.pop() == [{"t": "brep", "rid": 1, "at": 0, "reps": [found(0), found(1)]}]
    later = Deferred()
    o.relay_group = lambda *args: later  # after: its requests are answered internal
    o.receive_group(link, msg)
    later.errback(RuntimeError("a bug after the group left"))
    ((brep,),) = sent
    assert [(r["id"], r["error"]["code"]) for r in brep["reps"]] == [
        (0, "internal"), (1, "internal")]
    assert not o.busy


# -- framing ------------------------------------------------------------------------------


def test_a_group_larger_than_a_frame_is_cut_in_parts_that_say_where_they_start():
    value = "x" * (FRAME_TARGET // 10)
    reps = [{"id": i, "ok": True, "found": True, "value": value} for i in range(40)]
    frames = list(frames_of([{"t": "brep", "rid": 3, "at": 0, "reps": reps}],
                            lambda msg, error: pytest.fail(error.message)))
    assert len(frames) > 1 and all(len(f) <= 2 * FRAME_TARGET for f in frames)
    parts = [m for f in frames for m in decode_peer_frame(f, True)]
    check_messages(parts)
    assert [r for m in parts for r in m["reps"]] == reps
    assert [m["at"] for m in parts] == [sum(len(p["reps"]) for p in parts[:i])
                                       for i in range(len(parts))]


def test_a_request_that_cannot_be_encoded_costs_only_itself_not_its_group():
    refused = []
    reqs = [get(i) for i in range(8)]
    reqs[5]["value"] = object()  # a bug's or an odd peer's value
    frames = list(frames_of([{"t": "breq", "rid": 1, "ms": 9, "hops": 1, "reqs": reqs}],
                            lambda msg, error: refused.append(msg)))
    assert [(m["at"], m["reqs"]) for m in refused] == [(5, [reqs[5]])]
    sent = [r for f in frames for m in decode_peer_frame(f, True) for r in m["reqs"]]
    assert sent == reqs[:5] + reqs[6:]


@pytest.mark.parametrize("msg, error", [
    ({"t": "breq", "rid": 1, "ms": 5, "hops": 1, "reqs": []}, "breq.reqs must be an array"),
    ({"t": "breq", "rid": 1, "ms": 5, "hops": 1, "reqs": [1]}, "breq.reqs must be an array"),
    ({"t": "breq", "rid": 1, "ms": 5, "hops": 1, "reqs": [{}], "at": -1}, "breq.at"),
    ({"t": "brep", "rid": 1, "reps": [{}]}, "brep.at"),
    ({"t": "brep", "rid": 1, "at": 0, "reps": {}}, "brep.reps must be an array"),
    ({"t": "hello", "node": "n", "swarm": "s", "proto": 2, "inc": 1, "batch": 1},
     "hello.batch must be a boolean"),
])
def test_malformed_groups_are_protocol_errors(msg, error):
    with pytest.raises(PeerProtocolError, match=error):
        check_messages([msg])
