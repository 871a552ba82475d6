"""Unit tests of swarm.mesh.link.PeerLink: request tags, replies, timeouts, failing all.

No sockets: frames go to a list, time comes from task.Clock. Every path must end with
nothing pending and no timer left on the clock.
"""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.python.failure import Failure

from swarm.errors import BadRequest
from swarm.mesh.link import PeerLink


def make_link():
    clock = task.Clock()
    frames: list[list[dict]] = []
    return PeerLink("n2", frames.append, clock), frames, clock


def result_of(d):
    """The result a fired Deferred holds (a Failure if it failed); fails if unfired."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def assert_nothing_left(link: PeerLink, clock: task.Clock) -> None:
    assert link.pending == 0
    assert clock.getDelayedCalls() == []


def get(rid="r1", key="k"):
    return {"id": rid, "op": "get", "key": key}


def test_call_sends_one_req_message_with_its_fields():
    link, frames, clock = make_link()
    d = link.call(get(), timeout=2.5, hops=7)
    assert frames == [[{"t": "req", "rid": 1, "ms": 2500, "hops": 7, "req": get()}]]
    assert link.pending == 1
    assert not d.called
    d2 = link.call(get("r2"), timeout=0.0015, hops=0, to="n9")
    assert frames[1] == [
        {"t": "req", "rid": 2, "ms": 1, "hops": 0, "req": get("r2"), "to": "n9"}
    ]
    assert "to" not in frames[0][0]
    assert link.pending == 2
    link.fail_all("test over")
    result_of(d), result_of(d2)
    assert_nothing_left(link, clock)


def test_rids_are_unique_and_replies_are_matched_out_of_order():
    link, frames, clock = make_link()
    calls = [link.call(get(i, f"k{i}"), 5, 3) for i in range(5)]
    rids = [f[0]["rid"] for f in frames]
    assert len(set(rids)) == 5
    for i in (3, 0, 4, 1, 2):
        assert link.on_reply(rids[i], {"id": i, "ok": True, "found": True, "value": i})
    for i, d in enumerate(calls):
        assert result_of(d) == {"id": i, "ok": True, "found": True, "value": i}
    assert_nothing_left(link, clock)


def test_a_reply_arrives_unchanged_even_when_it_is_an_error_reply():
    link, frames, clock = make_link()
    d = link.call(get(), 5, 3)
    error = {"id": "r1", "ok": False, "error": {"code": "not_integer", "message": "x"}}
    assert link.on_reply(frames[0][0]["rid"], error) is True
    assert result_of(d) == error
    assert_nothing_left(link, clock)


def test_a_timeout_is_an_error_reply_and_a_late_reply_is_refused():
    link, frames, clock = make_link()
    d = link.call(get("slow"), timeout=1.0, hops=3)
    fast = link.call(get("fast"), timeout=10.0, hops=3)
    clock.advance(0.999)
    assert not d.called
    clock.advance(0.002)
    reply = result_of(d)
    assert not isinstance(reply, Failure)
    assert reply["id"] == "slow" and reply["ok"] is False
    assert reply["error"]["code"] == "timeout"
    assert "n2" in reply["error"]["message"]
    assert link.pending == 1  # only the other call still waits
    assert link.on_reply(frames[0][0]["rid"], {"id": "slow", "ok": True}) is False
    assert reply["error"]["code"] == "timeout"  # the late reply changed nothing
    assert link.on_reply(frames[1][0]["rid"], {"id": "fast", "ok": True}) is True
    assert result_of(fast) == {"id": "fast", "ok": True}
    assert_nothing_left(link, clock)


def test_an_unknown_rid_is_refused():
    link, frames, clock = make_link()
    assert link.on_reply(42, {"id": 1, "ok": True}) is False
    d = link.call(get(), 5, 3)
    rid = frames[0][0]["rid"]
    assert link.on_reply(rid + 1, {"id": 1, "ok": True}) is False
    assert not d.called
    assert link.on_reply(rid, {"id": 1, "ok": True}) is True
    assert link.on_reply(rid, {"id": 1, "ok": True}) is False  # a duplicate
    assert_nothing_left(link, clock)


def test_fail_all_turns_every_pending_call_into_an_unavailable_reply():
    link, frames, clock = make_link()
    calls = [link.call(get(i), 5, 3) for i in range(4)]
    link.on_reply(frames[2][0]["rid"], {"id": 2, "ok": True})
    link.fail_all("link to n2 lost: gone")
    for i, d in enumerate(calls):
        reply = result_of(d)
        if i == 2:
            assert reply == {"id": 2, "ok": True}
            continue
        assert not isinstance(reply, Failure)
        assert reply["id"] == i and reply["ok"] is False
        assert reply["error"]["code"] == "unavailable"
        assert "gone" in reply["error"]["message"]
    assert_nothing_left(link, clock)
    # a late reply after the link failed, and a second fail_all, change nothing
    assert link.on_reply(frames[0][0]["rid"], {"id": 0, "ok": True}) is False
    link.fail_all("again")
    assert_nothing_left(link, clock)


def test_the_link_keeps_working_after_fail_all_and_timeouts():
    link, frames, clock = make_link()
    link.call(get(1), 1, 3)
    link.fail_all("x")
    link.call(get(2), 1, 3)
    clock.advance(2)
    d = link.call(get(3), 1, 3)
    rid = frames[-1][0]["rid"]
    assert rid not in (frames[0][0]["rid"], frames[1][0]["rid"])
    assert link.on_reply(rid, {"id": 3, "ok": True}) is True
    assert result_of(d) == {"id": 3, "ok": True}
    assert_nothing_left(link, clock)


def test_a_cancelled_call_settles_as_an_error_reply_and_leaves_nothing():
    link, frames, clock = make_link()
    d = link.call(get(), 5, 3)
    d.cancel()
    reply = result_of(d)
    assert not isinstance(reply, Failure)
    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
    assert_nothing_left(link, clock)
    assert link.on_reply(frames[0][0]["rid"], {"id": "r1", "ok": True}) is False


def test_a_swarm_error_failure_keeps_its_code():
    """Whatever fails a pending call is settled as an error reply with its own code."""
    link, _, clock = make_link()
    d = link.call(get(), 5, 3)
    link._calls.fail_all(BadRequest("odd"))
    reply = result_of(d)
    assert reply["error"] == {"code": "bad_request", "message": "odd"}
    assert_nothing_left(link, clock)


@pytest.mark.parametrize("ending", ["reply", "timeout", "fail_all", "cancel"])
def test_nothing_leaks_over_many_calls(ending):
    link, frames, clock = make_link()
    calls = [link.call({"op": "ping"}, 1, 1) for _ in range(50)]
    assert link.pending == 50
    if ending == "reply":
        for f in reversed(frames):
            link.on_reply(f[0]["rid"], {"id": None, "ok": True})
    elif ending == "timeout":
        clock.advance(1)
    elif ending == "fail_all":
        link.fail_all("x")
    else:
        for d in calls:
            d.cancel()
    for d in calls:
        reply = result_of(d)
        assert isinstance(reply, dict) and reply["id"] is None
    assert_nothing_left(link, clock)
