"""Unit tests of swarm.mesh.session.PeerSession: handshake, refusals, dispatch, close.

No sockets: each session sends into a list, closes into a list, and runs on a real
Overlay on ``task.Clock``. Messages between two sessions go through the peer wire's
encoding and validation, as they would on a WebSocket.
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from swarm.mesh.auth import new_nonce
from swarm.mesh.membership import Announcement
from swarm.mesh.overlay import Overlay
from swarm.mesh.peer_wire import (
    CLOSE_DUPLICATE_ID,
    CLOSE_INTERNAL_ERROR,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REFUSED,
    CLOSE_UNAUTHORIZED,
    MAX_HOPS,
    MAX_REQUEST_MS,
    PROTOCOL_VERSION,
    PeerProtocolError,
    decode_peer_frame,
    encode_peer_frame,
    hello,
)
from swarm.mesh.session import PeerSession, State

NONCE = bytes(range(32))


class End:
    """One end of a connection: an overlay, its session, and what the session did."""

    def __init__(self, overlay: Overlay, address: str = "tcp:peer",
                 nonce: bytes | None = None) -> None:
        self.overlay = overlay
        self.nonce = nonce or new_nonce()
        self.sent: list[dict] = []
        self.closed: list[tuple[int, str]] = []
        self.linked: list = []
        self.failed: list[str] = []
        self.trusted: list[State] = []
        self.session = PeerSession(
            overlay, self.sent.extend, lambda code, reason: self.closed.append((code, reason)),
            address=address, on_linked=self.linked.append, on_failed=self.failed.append,
            on_trusted=lambda: self.trusted.append(self.session.state),
            nonce=lambda: self.nonce,
        )

    def take(self) -> list[dict]:
        """What the session sent since the last take, as the peer would decode it."""
        sent, self.sent[:] = list(self.sent), []
        return decode_peer_frame(encode_peer_frame(sent), True) if sent else []

    def feed(self, *messages: dict) -> None:
        """Messages from the peer, through the wire's validation."""
        self.session.received(decode_peer_frame(encode_peer_frame(list(messages)), True))


def overlay(node_id: str, clock, incarnation: int = 1, swarm: str = "s",
            secret: bytes | None = None) -> Overlay:
    o = Overlay(node_id, swarm, incarnation, clock, secret=secret)
    o.handle_request = lambda req, timeout, hops, to: {
        "id": req["id"], "ok": True, "ran": [node_id, timeout, hops, to]}
    return o


def pump(a: End, b: End) -> None:
    """Deliver everything both ends send until they fall silent, as a network would
    (each round a reactor turn: calls queued for a group go out)."""
    for _ in range(100):
        a.overlay.clock.advance(0)
        to_b, to_a = a.take(), b.take()
        if not (to_a or to_b):
            return
        if to_b:
            b.session.received(to_b)
        if to_a:
            a.session.received(to_a)
    raise AssertionError("the sessions never fell silent")


def connect(a: Overlay, b: Overlay) -> tuple[End, End]:
    """Both ends of a new connection between a and b, started and pumped."""
    ea, eb = End(a, f"tcp:{b.node_id}"), End(b, f"tcp:{a.node_id}")
    ea.session.start()
    eb.session.start()
    pump(ea, eb)
    return ea, eb


def lose(*ends: End, code: int | None = None, reason: str = "gone") -> None:
    """The connection of each end is lost; ``code`` is the close code its peer sent."""
    for end in ends:
        end.session.connection_lost(reason, code)


@pytest.fixture
def clock():
    return task.Clock()


# -- the handshake ----------------------------------------------------------------------


def test_a_session_says_hello_first_and_waits_for_the_peers(clock):
    end = End(overlay("a", clock, incarnation=7), nonce=NONCE)
    assert end.session.state is State.AWAIT_HELLO and end.sent == []
    end.session.start()
    assert end.take() == [hello("a", "s", 7, NONCE)]
    assert end.session.state is State.AWAIT_HELLO and end.session.link is None


def test_an_accepted_handshake_links_both_ends_and_exchanges_the_maps(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ea, eb = connect(a, b)
    for end, peer in ((ea, "b"), (eb, "a")):
        assert end.session.state is State.LINKED
        assert end.session.link.peer == peer
        assert end.session.accepted and [link.peer for link in end.linked] == [peer]
        assert end.closed == [] and end.failed == []
    assert a.neighbors == ["b"] and b.neighbors == ["a"]
    assert a.membership.reachable == b.membership.reachable == {"a", "b"}


def test_a_hello_accepted_here_is_not_yet_a_link_the_peer_accepted(clock):
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1))
    assert end.session.state is State.LINKED and end.overlay.neighbors == ["b"]
    # the peer has said nothing since its hello: it may still refuse this node
    assert not end.session.accepted and end.linked == []
    end.feed({"t": "lsa", "anns": []})
    assert end.session.accepted and len(end.linked) == 1
    end.feed({"t": "lsa", "anns": []})
    assert len(end.linked) == 1  # reported once


@pytest.mark.parametrize(
    "peer_hello,mentions",
    [
        (hello("b", "other", 1), "swarm"),
        (dict(hello("b", "s", 1), proto=PROTOCOL_VERSION + 1), "protocol"),
        (hello("a", "s", 1), "own id"),
    ],
    ids=["other-swarm", "other-version", "own-id"],
)
def test_a_hello_that_does_not_fit_is_refused_with_4000_and_a_reason(clock, peer_hello, mentions):
    end = End(overlay("a", clock))
    end.session.start()
    end.take()
    end.feed(peer_hello)
    ((code, reason),) = end.closed
    assert code == CLOSE_REFUSED and mentions in reason
    assert end.session.state is State.CLOSING and end.overlay.neighbors == []
    lose(end)
    assert end.session.state is State.CLOSED
    assert end.failed == [reason]  # the dialler counts it as a failed handshake
    assert end.overlay.conflict is None


@pytest.mark.parametrize(
    "first", [{"t": "lsa", "anns": []},
              {"t": "req", "rid": 1, "ms": 100, "hops": 3, "req": {"id": 1, "op": "ping"}},
              {"t": "rep", "rid": 1, "rep": {"id": 1, "ok": True}}],
    ids=["lsa", "req", "rep"],
)
def test_messages_before_hello_are_refused_and_nothing_after_them_runs(clock, first):
    o = overlay("a", clock)
    o.handle_request = lambda *args: pytest.fail("no request may run before hello")
    end = End(o)
    end.feed(first, hello("b", "s", 1), dict(first))
    ((code, reason),) = end.closed
    assert code == CLOSE_REFUSED and "first message" in reason
    assert o.neighbors == [] and end.sent == []


def test_a_second_hello_on_a_linked_connection_is_a_protocol_error(clock):
    ea, _ = connect(overlay("a", clock), overlay("b", clock))
    ea.feed(hello("b", "s", 1))
    ((code, reason),) = ea.closed
    assert code == CLOSE_PROTOCOL_ERROR and "hello" in reason
    # the link leaves the overlay at once, before the close handshake ends
    assert ea.session.state is State.CLOSING and ea.overlay.neighbors == []


def test_an_undecodable_frame_closes_with_4001_once(clock):
    end = End(overlay("a", clock))
    end.session.protocol_error("undecodable peer frame: boom")
    end.session.protocol_error("again")
    assert end.closed == [(CLOSE_PROTOCOL_ERROR, "undecodable peer frame: boom")]


# -- authentication (a shared secret) ------------------------------------------------------

def test_a_peer_that_never_says_hello_is_refused_at_the_handshake_deadline(clock):
    end = End(overlay("a", clock))
    end.session.start()
    clock.advance(end.overlay.handshake_timeout - 0.1)
    assert end.closed == []
    clock.advance(0.1)
    assert end.closed == [(CLOSE_REFUSED, "no hello within 10 s")]
    assert end.failed == [] and end.session.state is State.CLOSING
    end.session.connection_lost("closed")
    assert end.failed == ["no hello within 10 s"]  # a dialler backs off
    assert clock.getDelayedCalls() == []


def test_a_linked_session_has_no_handshake_deadline_left(clock):
    ea, eb = connect(overlay("a", clock), overlay("b", clock))
    assert ea.session._deadline is None and eb.session._deadline is None
    clock.advance(60)
    assert ea.closed == eb.closed == [] and ea.session.state is State.LINKED



SECRET, OTHER = b"s" * 32, b"o" * 32


def test_with_one_secret_both_ends_prove_it_and_link(clock):
    a, b = overlay("a", clock, secret=SECRET), overlay("b", clock, secret=SECRET)
    ea, eb = connect(a, b)
    for end, peer in ((ea, "b"), (eb, "a")):
        assert end.session.state is State.LINKED and end.closed == []
        assert end.trusted == [State.LINKED]  # large frames allowed only now
    assert a.membership.reachable == b.membership.reachable == {"a", "b"}


def test_a_peer_that_says_hello_but_never_proves_is_refused_with_4004(clock):
    a = End(overlay("a", clock, secret=SECRET))
    a.session.start()
    a.feed(hello("b", "s", 1, new_nonce(), True))
    assert a.session.state is State.AWAIT_AUTH
    clock.advance(a.overlay.handshake_timeout)
    assert a.closed == [(CLOSE_UNAUTHORIZED, "no proof (auth) within 10 s")]
    assert a.overlay.neighbors == []


def test_the_link_waits_for_the_proof_and_reads_nothing_before_it(clock):
    a = End(overlay("a", clock, secret=SECRET))
    a.session.start()
    a.take()
    a.feed(hello("b", "s", 1, new_nonce(), True))
    assert a.session.state is State.AWAIT_AUTH and a.trusted == []
    assert [m["t"] for m in a.take()] == ["auth"]  # its own proof, at once
    a.feed({"t": "lsa", "anns": [Announcement("x", 1, 1, ("b",)).to_wire()]})
    assert a.closed == [(CLOSE_PROTOCOL_ERROR, "a lsa before the peer's proof (auth)")]
    assert a.overlay.membership.reachable == {"a"} and a.overlay.neighbors == []
    assert "x" not in {ann.node for ann in a.overlay.membership.announcements()}


@pytest.mark.parametrize("secrets, refusal", [
    ((SECRET, OTHER), "did not prove it holds the swarm's secret"),
    ((SECRET, None), "this node has a secret (--secret-file) and the peer none"),
    ((None, SECRET), "the peer has a secret (--secret-file) and this node none"),
])
def test_a_peer_without_the_secret_is_refused_with_4004(clock, secrets, refusal):
    a, b = (overlay(n, clock, secret=k) for n, k in zip("ab", secrets))
    ea, eb = connect(a, b)
    code, reason = ea.closed[0]
    assert code == CLOSE_UNAUTHORIZED and refusal in reason
    assert a.neighbors == [] and ea.trusted == []
    assert ea.session.state is State.CLOSING


def test_a_replayed_handshake_is_refused(clock):
    """An eavesdropper that recorded b's hello and proof to a cannot use them later:
    a's next connection has a new nonce, so the old proof does not answer it."""
    a, b = overlay("a", clock, secret=SECRET), overlay("b", clock, secret=SECRET)
    ea, eb = End(a), End(b)
    ea.session.start(), eb.session.start()
    recorded = []
    for _ in range(10):  # pump, recording what b says
        to_a, to_b = eb.take(), ea.take()
        recorded += to_a
        if to_b:
            eb.session.received(to_b)
        if to_a:
            ea.session.received(to_a)
    assert ea.session.state is State.LINKED
    lose(ea, eb)
    replay = End(a)
    replay.session.start()
    replay.feed(*[m for m in recorded if m["t"] in ("hello", "auth")])
    assert replay.closed and replay.closed[0][0] == CLOSE_UNAUTHORIZED
    assert a.neighbors == []


def test_a_proof_sent_back_to_its_maker_is_refused(clock):
    """Reflection: the proof a made for "b" does not pass as b's proof to a."""
    a = End(overlay("a", clock, secret=SECRET))
    a.session.start()
    a.take()
    a.feed(hello("b", "s", 1, a.nonce, True))  # a's own nonce, so a's proof is...
    [proof] = a.take()
    a.feed(proof)  # ...sent straight back
    assert a.closed[0][0] == CLOSE_UNAUTHORIZED and a.overlay.neighbors == []


def test_an_outsider_naming_a_live_node_learns_nothing_of_it(clock):
    """The duplicate-id check runs after the proof: without the secret a hello naming
    a linked node is refused as unauthenticated, not as a duplicate."""
    a, b = overlay("a", clock, secret=SECRET), overlay("b", clock, secret=SECRET)
    connect(a, b)
    outsider = overlay("b", clock, incarnation=99)
    ea, _ = connect(a, outsider)
    assert [code for code, _ in ea.closed] == [CLOSE_UNAUTHORIZED]
    assert a.neighbors == ["b"] and a.conflict is None


# -- after the close ----------------------------------------------------------------------


def test_messages_after_a_refusal_are_dropped(clock):
    o = overlay("a", clock)
    end = End(o)
    end.feed(hello("b", "other", 1))
    o.handle_request = lambda *args: pytest.fail("nothing runs after the close")
    end.feed(hello("b", "s", 1), {"t": "req", "rid": 1, "ms": 100, "hops": 3,
                                  "req": {"id": 1, "op": "ping"}})
    end.session.protocol_error("late garbage")
    assert len(end.closed) == 1 and o.neighbors == [] and end.sent == []


def test_a_lost_connection_takes_the_link_down_and_settles_its_calls(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ea, eb = connect(a, b)
    pending = a.forward("b", {"id": 5, "op": "get", "key": "k"}, 5.0, 3)
    replies = []
    pending.addCallback(replies.append)
    assert ea.take() == []  # queued for the turn's group
    clock.advance(0)
    assert [m["t"] for m in ea.take()] == ["req"]  # alone in it: a plain req
    lose(ea, eb)
    assert ea.session.state is State.CLOSED and a.neighbors == []
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "unavailable"
    assert clock.getDelayedCalls() == []
    assert ea.failed == []  # it was a link, not a failed handshake
    ea.feed({"t": "lsa", "anns": []})  # nothing more happens
    lose(ea)
    assert a.neighbors == [] and ea.sent == []


def test_a_reply_that_finishes_after_the_close_goes_nowhere(clock):
    from twisted.internet.defer import Deferred

    a = overlay("a", clock)
    waiting: list[Deferred] = []

    def handle(*args) -> Deferred:
        waiting.append(Deferred())
        return waiting[-1]

    a.handle_request = handle
    end = End(a)
    end.feed(hello("b", "s", 1))
    end.take()
    end.feed({"t": "req", "rid": 3, "ms": 1000, "hops": 3, "req": {"id": 9, "op": "ping"}})
    lose(end)
    waiting[0].callback({"id": 9, "ok": True})
    assert end.sent == [] and not a.busy


# -- dispatch -----------------------------------------------------------------------------


def test_a_request_runs_with_its_deadline_and_hops_and_is_answered_on_its_connection(clock):
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1))
    end.take()
    end.feed({"t": "req", "rid": 41, "ms": 2500, "hops": 7, "req": {"id": "x", "op": "ping"}},
             {"t": "req", "rid": 42, "ms": 10, "hops": 0, "to": "a",
              "req": {"id": "y", "op": "ping"}})
    assert end.take() == [
        {"t": "rep", "rid": 41, "rep": {"id": "x", "ok": True, "ran": ["a", 2.5, 7, None]}},
        {"t": "rep", "rid": 42, "rep": {"id": "y", "ok": True, "ran": ["a", 0.01, 0, "a"]}},
    ]


def test_a_reply_settles_the_call_it_answers(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ea, eb = connect(a, b)
    replies = []
    a.forward("b", {"id": 1, "op": "ping"}, 5.0, 3).addCallback(replies.append)
    pump(ea, eb)
    assert replies == [{"id": 1, "ok": True, "ran": ["b", 5.0, 3, None]}]
    assert clock.getDelayedCalls() == []


def test_announcements_reach_the_membership_and_spread(clock):
    a, b, c = overlay("a", clock), overlay("b", clock), overlay("c", clock)
    ab, ba = connect(a, b)
    connect(b, c)
    pump(ab, ba)  # b floods what it learned from c
    assert a.membership.reachable == {"a", "b", "c"}
    assert a.membership.report()[-1] == {"id": "c", "neighbors": ["b"], "hops": 2}
    end = End(overlay("z", clock))
    end.feed(hello("b", "s", 1),
             {"t": "lsa", "anns": [Announcement("b", 1, 9, ("z",)).to_wire()]})
    assert end.overlay.membership.reachable == {"z", "b"}


def test_a_failure_inside_this_node_closes_with_4003_and_raises_nothing(clock):
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1))

    def broken(link, anns):
        raise RuntimeError("a bug")

    end.overlay.receive_announcements = broken
    end.feed({"t": "lsa", "anns": []}, {"t": "lsa", "anns": []})
    assert end.closed == [(CLOSE_INTERNAL_ERROR, "the node failed on a message")]
    assert end.overlay.neighbors == []


# -- identity -----------------------------------------------------------------------------


def test_a_second_connection_of_the_same_node_is_a_spare_and_is_answered(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    connect(a, b)
    spare_a, spare_b = connect(a, b)
    assert spare_a.closed == spare_b.closed == []
    # each side answered the other's hello, so both know they were accepted
    assert spare_a.session.accepted and spare_b.session.accepted
    assert a.link_count() == b.link_count() == 2 and a.neighbors == ["b"]


def test_an_id_linked_directly_with_another_incarnation_is_refused_with_4002(clock):
    hub = overlay("hub", clock)
    original = End(hub)
    original.feed(hello("dup", "s", 100))  # linked; its announcement not arrived yet
    twin = End(hub)
    twin.feed(hello("dup", "s", 200))
    ((code, reason),) = twin.closed
    assert code == CLOSE_DUPLICATE_ID
    assert "'dup'" in reason and "already live" in reason and "100" in reason
    assert original.session.state is State.LINKED and hub.link_count() == 1


def test_an_id_reachable_through_another_link_with_another_incarnation_is_refused(clock):
    hub, mid, dup = overlay("hub", clock), overlay("mid", clock), overlay("dup", clock, 100)
    hub_mid, mid_hub = connect(hub, mid)
    connect(mid, dup)
    pump(hub_mid, mid_hub)  # mid floods what it learned from dup
    assert "dup" in hub.membership.reachable and "dup" not in hub.neighbors
    twin = End(hub)
    twin.feed(hello("dup", "s", 200))
    assert [code for code, _ in twin.closed] == [CLOSE_DUPLICATE_ID]
    # the node itself, dialling a second link, is welcome
    itself = End(hub)
    itself.feed(hello("dup", "s", 100))
    assert itself.closed == [] and hub.neighbors == ["dup", "mid"]


def test_the_refused_node_records_the_conflict_until_a_peer_accepts_it(clock):
    hub, original = overlay("hub", clock), overlay("dup", clock, 100)
    connect(hub, original)
    twin = overlay("dup", clock, 200)
    at_twin, at_hub = End(twin, "tcp:hub"), End(hub, "tcp:twin")
    at_twin.session.start()
    at_hub.session.start()
    pump(at_twin, at_hub)
    ((code, reason),) = at_hub.closed
    assert code == CLOSE_DUPLICATE_ID and twin.conflict is None
    lose(at_hub, code=1000)  # the twin's reply to the close
    lose(at_twin, code=code, reason=reason)
    assert twin.conflict == reason and hub.conflict is None
    assert at_twin.failed == [reason]  # it counts toward the dialler's backoff
    assert twin.neighbors == [] and hub.neighbors == ["dup"]
    # a link that the peer accepts ends the conflict
    connect(twin, overlay("elsewhere", clock))
    assert twin.conflict is None


def test_a_node_that_refused_an_id_records_no_conflict_of_its_own(clock):
    hub = overlay("hub", clock)
    End(hub).feed(hello("dup", "s", 100))
    refusing = End(hub)
    refusing.feed(hello("dup", "s", 200))
    lose(refusing, code=CLOSE_DUPLICATE_ID)  # a peer that echoes the close code
    assert hub.conflict is None


def test_a_restart_with_a_new_incarnation_is_accepted_once_the_old_links_are_gone(clock):
    hub, old = overlay("hub", clock), overlay("n", clock, 100)
    hub_end, old_end = connect(hub, old)
    new = overlay("n", clock, 200)
    early_hub, early_new = connect(hub, new)
    ((code, reason),) = early_hub.closed
    assert code == CLOSE_DUPLICATE_ID
    lose(early_hub)
    lose(early_new, code=code, reason=reason)
    assert new.conflict == reason
    lose(hub_end, old_end)  # the old life's socket closes (SIGKILL, or the ping timeout)
    again, _ = connect(hub, new)
    assert again.closed == [] and new.conflict is None
    assert hub.membership.reachable == new.membership.reachable == {"hub", "n"}


def test_the_hello_carries_the_incarnation_this_node_announces(clock):
    """A restart with the clock behind its previous life takes over the old, higher
    incarnation; its later hellos must say so, or its own second link would look like
    a duplicate."""
    n = overlay("n", clock, 100)
    n.membership.receive([Announcement("n", 500, 4, ())])  # its previous life's
    assert n.hello(NONCE)["inc"] == 500


# -- the two-phase close: bye ------------------------------------------------------------

BYE = {"t": "bye"}


def test_a_bye_takes_the_link_out_of_routing_at_once_and_is_answered(clock):
    a, b, c = overlay("a", clock), overlay("b", clock), overlay("c", clock)
    ab, ba = connect(a, b)
    bc, _ = connect(b, c)
    pump(ab, ba)
    assert b.membership.reachable == {"a", "b", "c"}
    a.part()
    assert ab.take() == [BYE] and not a.parted  # said, not yet answered
    ba.session.received([BYE])
    assert ba.session.state is State.PARTED
    assert b.neighbors == ["c"] and b.membership.reachable == {"b", "c"}
    with pytest.raises(LookupError):
        b.forward("a", {"id": 1, "op": "ping"}, 5.0, 3)
    assert ba.take() == [BYE]  # the answer; and the change is flooded, as for a lost link
    assert [m["t"] for m in bc.take()] == ["lsa"]
    ab.session.received([BYE])
    assert ab.session.state is State.PARTED and a.parted and not a.busy
    assert ab.take() == []  # an answer is not answered
    assert ab.closed == ba.closed == []  # the stopping side closes, when it is quiet


def test_calls_pending_on_a_parted_link_still_get_their_replies(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ab, ba = connect(a, b)
    replies = []
    b.forward("a", {"id": 7, "op": "ping"}, 5.0, 3).addCallback(replies.append)
    request = ba.take()
    a.part()
    ba.session.received(ab.take())  # the bye crossed the request on the wire
    assert b.busy and replies == []  # parted, and still waiting: not failed
    ab.session.received(request)  # served, though a has said bye
    pump(ab, ba)
    assert replies == [{"id": 7, "ok": True, "ran": ["a", 5.0, 3, None]}]
    assert a.parted and not a.busy and not b.busy
    assert clock.getDelayedCalls() == []


def test_a_request_sent_before_the_answer_is_served_before_the_node_is_parted(clock):
    """Why the stopping node waits for the answer: it follows every request the peer
    sent before it, so none is still on the wire when the node closes."""
    from twisted.internet.defer import Deferred

    a, b = overlay("a", clock), overlay("b", clock)
    waiting: list[Deferred] = []
    a.handle_request = lambda *args: waiting.append(Deferred()) or waiting[-1]
    ab, ba = connect(a, b)
    b.forward("a", {"id": 8, "op": "ping"}, 5.0, 3)
    a.part()
    ba.session.received(ab.take())
    ab.session.received(ba.take())  # b's request, then its bye, in order
    assert len(waiting) == 1 and a.parted and a.busy  # parted, serving: not yet quiet
    waiting[0].callback({"id": 8, "ok": True})
    assert not a.busy and [m["t"] for m in ab.take()] == ["rep"]


def test_two_nodes_that_say_bye_at_once_take_each_others_bye_as_the_answer(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ab, ba = connect(a, b)
    a.part()
    b.part()
    pump(ab, ba)
    assert ab.session.state is ba.session.state is State.PARTED
    assert a.parted and b.parted
    assert ab.sent == ba.sent == [] and ab.closed == ba.closed == []


def test_a_link_that_comes_up_while_parting_is_told_bye_after_the_announcements(clock):
    a = overlay("a", clock)
    a.part()
    assert a.parted  # no link to wait for
    late = End(a)
    late.feed(hello("b", "s", 1))
    sent = [m["t"] for m in late.take()]
    assert sent[-1] == "bye" and set(sent[:-1]) == {"lsa"}
    assert not a.parted
    late.feed({"t": "lsa", "anns": []}, BYE)
    assert a.parted and late.session.state is State.PARTED


def test_a_node_started_again_after_parting_keeps_its_new_links(clock):
    a = overlay("a", clock)
    a.leave()
    a.part()
    a.leave(False)
    assert not a.parting and not a.parted
    end = End(a)
    end.feed(hello("b", "s", 1))
    assert {m["t"] for m in end.take()} == {"lsa"}


def test_every_connection_of_a_peer_is_told_bye_spares_too(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    first = connect(a, b)
    spare = connect(a, b)
    a.part()
    for ab, ba in (first, spare):
        pump(ab, ba)
        assert ab.session.state is ba.session.state is State.PARTED
    assert a.parted and a.link_count() == b.link_count() == 0 and b.neighbors == []


def test_a_second_bye_is_a_protocol_error(clock):
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1), BYE)
    assert end.session.state is State.PARTED and end.closed == []
    end.feed(BYE)
    ((code, reason),) = end.closed
    assert code == CLOSE_PROTOCOL_ERROR and "second bye" in reason
    assert end.session.state is State.CLOSING


def test_a_parted_connection_lost_fails_what_is_still_pending_on_it(clock):
    a, b = overlay("a", clock), overlay("b", clock)
    ab, ba = connect(a, b)
    replies = []
    b.forward("a", {"id": 2, "op": "ping"}, 5.0, 3).addCallback(replies.append)
    a.part()
    ba.session.received(ab.take())
    lose(ab, ba)  # the connection died before the reply came
    assert ba.session.state is State.CLOSED
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "unavailable"
    assert not b.busy and clock.getDelayedCalls() == []
    assert a.parted  # a link that is gone cannot bring a request either


# -- link-up: a summary instead of the database ------------------------------------------

SUM = {"digest": bytes(16), "count": 5}


def test_the_link_up_lsa_carries_a_summary_to_a_peer_that_takes_it_else_the_database(clock):
    for sync, expected in ((True, "sum"), (False, "anns")):
        o = overlay("a", clock)
        o.membership.receive([Announcement(f"n{i}", 1, 1, ()) for i in range(20)])
        end = End(o)
        peer_hello = hello("b", "s", 1)
        if not sync:
            del peer_hello["sync"]  # a node from before summaries
        end.feed(peer_hello)
        first, flood = end.take()
        assert first["t"] == "lsa" and ("sum" in first) is sync
        assert len(first["anns"]) == (0 if sync else 21)
        if sync:
            assert first["sum"].count == 20 and first["sum"].yours is None
        assert flood["anns"] == [o.membership.own]  # its new link, as before


def test_a_summary_that_differs_is_answered_with_versions_and_those_with_what_lacks(clock):
    o = overlay("a", clock)
    known = [Announcement(f"n{i}", 1, 2, ()) for i in range(5)]
    o.membership.receive(known)
    end = End(o)
    end.feed(hello("b", "s", 1))
    end.take()
    end.feed({"t": "lsa", "anns": [], "sum": SUM})  # b knows 5 others, not these
    (ask,) = end.take()
    assert ask["anns"] == [] and ask["have"] == o.membership.versions()
    end.feed({"t": "lsa", "anns": [], "have": {"n0": [1, 2], "n1": [1, 1], "a": [9, 9]}})
    (answer,) = end.take()
    assert {a.node for a in answer["anns"]} == {"n1", "n2", "n3", "n4"}  # not a: newer
    # a summary equal to this node's own asks for nothing
    end2 = End(o)
    end2.feed(hello("c", "s", 1))
    end2.take()
    same = o.membership.summary("c")
    end2.feed({"t": "lsa", "anns": [], "sum": {"digest": same.digest, "count": same.count}})
    assert end2.take() == [] and end2.closed == []


@pytest.mark.parametrize("part", [{"sum": SUM}, {"have": {"x": [1, 1]}}],
                         ids=["sum", "have"])
def test_a_second_sum_or_have_on_a_connection_is_a_protocol_error(clock, part):
    """Each asks this node for up to its whole database: once per handshake."""
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1), {"t": "lsa", "anns": [], **part})
    assert end.closed == []
    end.feed({"t": "lsa", "anns": [], **part})
    ((code, reason),) = end.closed
    assert code == CLOSE_PROTOCOL_ERROR and f"second lsa.{next(iter(part))}" in reason


@pytest.mark.parametrize("part", [
    {"sum": dict(SUM, digest=b"short")}, {"sum": dict(SUM, count=10**6)}, {"sum": [1]},
    {"sum": dict(SUM, yours=[1, 2**64])}, {"have": {"x": [1]}}, {"have": {"": [1, 1]}},
    {"have": [["x", 1, 1]]},
])
def test_a_malformed_sum_or_have_closes_the_link_as_a_protocol_error(clock, part):
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1))
    feed_frame(end, [{"t": "lsa", "anns": [], **part}])
    ((code, _),) = end.closed
    assert code == CLOSE_PROTOCOL_ERROR and end.overlay.neighbors == []


def test_announcements_held_on_a_parted_connection_are_applied_when_it_goes(clock):
    """A peer's lsa after its bye passes the rate bound too; once the connection is
    gone, what was held is applied and nothing of the peer's bound is left."""
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1), BYE)
    for i in range(40):  # over the bound's burst: the last ones are held
        end.feed({"t": "lsa", "anns": [Announcement(f"x{i}", 1, 1, ()).to_wire()]})
    assert clock.getDelayedCalls()  # the release of what is held
    lose(end)
    assert clock.getDelayedCalls() == []
    assert {f"x{i}" for i in range(40)} <= set(end.overlay.membership.versions())


# -- nothing a peer sends raises ----------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("ms", MAX_REQUEST_MS + 1), ("ms", 2**64), ("ms", 10**400), ("hops", MAX_HOPS + 1),
     ("rid", 2**64), ("rid", 10**400)],
)
def test_a_request_with_numbers_past_their_bounds_closes_the_link_as_a_protocol_error(
        clock, field, value):
    o = overlay("a", clock)
    o.handle_request = lambda *args: pytest.fail("it must not run")
    end = End(o)
    end.feed(hello("b", "s", 1))
    req = {"t": "req", "rid": 1, "ms": 100, "hops": 3, "req": {"id": 1, "op": "ping"}}
    try:
        end.feed(dict(req, **{field: value}))
    except PeerProtocolError as e:
        end.session.protocol_error(str(e))  # what the protocol does with it
    ((code, reason),) = end.closed
    assert code == CLOSE_PROTOCOL_ERROR and f"req.{field}" in reason
    # at the bound itself it runs
    end = End(overlay("a", clock))
    end.feed(hello("b", "s", 1), dict(req, ms=MAX_REQUEST_MS, hops=MAX_HOPS))
    assert end.closed == [] and end.take()[-1]["rep"]["ran"][1:3] == [MAX_REQUEST_MS / 1000,
                                                                      MAX_HOPS]

#: Numbers at and past every bound a peer message has.
EDGES = [-1, 0, MAX_REQUEST_MS, MAX_REQUEST_MS + 1, MAX_HOPS + 1, 2**64 - 1, 2**64, 10**400]
values = st.sampled_from(EDGES) | st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.binary(max_size=3) | st.integers(min_value=-(2**70), max_value=2**70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8,
)
ANN = Announcement("b", 1, 2, ("a",)).to_wire()
TEMPLATES = [
    hello("b", "s", 1),
    {"t": "lsa", "anns": [ANN]},
    {"t": "lsa", "anns": [], "sum": {"digest": bytes(16), "count": 3, "yours": [1, 2]}},
    {"t": "lsa", "anns": [], "have": {"b": [1, 2]}},
    {"t": "req", "rid": 1, "ms": 100, "hops": 3, "to": "a", "req": {"id": 1, "op": "ping"}},
    {"t": "rep", "rid": 1, "rep": {"id": 1, "ok": True}},
    {"t": "bye"},
]
#: A good message of each type with up to three of its fields (or its announcement's)
#: replaced by anything at all.
messages = st.sampled_from(TEMPLATES).flatmap(lambda base: st.tuples(
    st.dictionaries(st.sampled_from([*base, "extra"]), values, max_size=3),
    st.dictionaries(st.sampled_from([*ANN, "leaving"]), values, max_size=2),
).map(lambda changes: {**base, **changes[0],
                       **({"anns": [{**ANN, **changes[1]}]} if "anns" in base else {})}))


ODD = [*EDGES, None, True, 1.5, "", "a", b"a", [], {}, [1], {"a": 1}]


def feed_frame(end: End, frame: list) -> None:
    """What the protocol does with a frame: decode it, then feed or refuse."""
    try:
        decoded = decode_peer_frame(cbor2.dumps(frame), True)
    except PeerProtocolError as e:
        end.session.protocol_error(str(e))
    else:
        end.session.received(decoded)


def assert_ended_cleanly(end: End, clock: task.Clock) -> None:
    """No failure inside the node closed it, and closing it leaves nothing behind."""
    clock.advance(MAX_REQUEST_MS / 1000)
    lose(end, code=CLOSE_DUPLICATE_ID)
    assert end.session.state is State.CLOSED
    assert all(code in (CLOSE_REFUSED, CLOSE_PROTOCOL_ERROR, CLOSE_UNAUTHORIZED)
               for code, _ in end.closed)
    assert not end.overlay.busy and end.overlay.neighbors == []


@pytest.mark.parametrize("template", TEMPLATES, ids=[t["t"] for t in TEMPLATES])
def test_any_odd_value_in_any_field_raises_nothing(template):
    for field in [*template, "extra"]:
        for value in ODD:
            clock = task.Clock()
            end = End(overlay("a", clock))
            if template["t"] != "hello":
                end.feed(hello("b", "s", 1))
            feed_frame(end, [dict(template, **{field: value})])
            assert_ended_cleanly(end, clock)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.lists(messages, max_size=5), min_size=1, max_size=4),
       linked_first=st.booleans())
def test_nothing_a_peer_sends_raises_out_of_the_session(frames, linked_first):
    clock = task.Clock()
    end = End(overlay("a", clock))
    end.session.start()
    if linked_first:
        end.feed(hello("b", "s", 1))
    for frame in frames:
        feed_frame(end, frame)
    assert_ended_cleanly(end, clock)
