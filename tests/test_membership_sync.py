"""Link-up costs what the two databases differ by (issue 11): summaries, versions, answers.

Pure tests of :class:`~swarm.mesh.membership.Membership`'s side of it (two databases
brought together; the in-memory :class:`~test_membership.Swarm` with ``sync``, where
link-ups run alongside every other change), then two real overlays linked through
their sessions, counting what the link-up sends.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_membership import INC, Swarm, histories, ring, run_history
from test_session import End, overlay, pump
from twisted.internet import task

from swarm.mesh.membership import (
    DIGEST_BYTES,
    MAX_COUNTER,
    MAX_NODES,
    Announcement,
    Membership,
    Summary,
    versions_from_wire,
    versions_to_wire,
)
from swarm.mesh.peer_wire import PeerProtocolError, decode_peer_frame, encode_peer_frame


def link_up(a: Membership, b: Membership) -> dict[str, int]:
    """The exchange between two databases as the overlay runs it (each side's own new
    announcement flooded, summaries, versions where they differ, answers), delivered
    in order both ways; what went each way."""
    sent = {"versions": 0, "announcements": 0}
    summaries = {a: b.summary(a.self_id), b: a.summary(b.self_id)}
    for m, peer in ((a, b), (b, a)):
        m.receive([peer.own])
    for m, peer in ((a, b), (b, a)):
        if m.lacks(peer.self_id, summaries[m]):
            sent["versions"] += 1
            answer = peer.newer_than(m.versions())
            sent["announcements"] += len(answer)
            m.receive(answer)
    return sent


def database(rng: random.Random, names: list[str], links: int = 3) -> list[Announcement]:
    return [Announcement(n, INC + rng.randrange(3), rng.randrange(1, 5),
                         tuple(sorted(rng.sample(names, min(links, len(names))))))
            for n in names]


def test_equal_databases_are_told_apart_from_different_ones_by_their_summaries():
    rng = random.Random(1)
    names = [f"n{i}" for i in range(200)]
    anns = database(rng, names)
    a, b = Membership("a", INC), Membership("b", INC + 1)
    a.receive(anns)
    b.receive(list(reversed(anns)))  # another order: the same database
    a.set_links(["b"])  # each end's own changes at link-up, which the summary leaves out
    b.set_links(["b", "x"])
    b.receive([a.own])
    assert a.summary("b").digest == b.summary("a").digest
    assert a.summary("b").count == b.summary("a").count == 200
    assert link_up(a, b) == {"versions": 0, "announcements": 0}
    # one newer announcement on one side: both ask, and only it goes
    changed = Announcement("n7", INC + 5, 1, ("n8",))
    b.receive([changed])
    assert a.lacks("b", b.summary("a")) and b.lacks("a", a.summary("b"))
    assert b.newer_than(a.versions()) == [changed] and a.newer_than(b.versions()) == []


def test_a_node_that_knows_nobody_is_not_asked_for_versions():
    """A node starting next to a neighbour that knows the swarm: the neighbour sends
    it the database, and does not ask for the nothing it holds."""
    old = Membership("old", INC)
    old.receive(database(random.Random(2), [f"n{i}" for i in range(50)]))
    new = Membership("new", INC + 9)
    assert not old.lacks("new", new.summary("old"))
    assert link_up(old, new) == {"versions": 1, "announcements": 50}  # and old's own
    assert old.versions() == new.versions()


def test_a_node_hears_of_a_newer_copy_of_itself_and_outranks_it():
    """A restart with the clock behind its previous life: the neighbour's summary says
    it holds a newer copy of the node, which asks for it and re-announces above it."""
    neighbour = Membership("n", INC)
    neighbour.receive([Announcement("x", INC + 10, 9, ("n",))])  # the previous life
    x = Membership("x", INC + 5)
    summary = neighbour.summary("x")
    assert summary.count == 0 and summary.yours == (INC + 10, 9)
    assert x.lacks("n", summary)
    link_up(neighbour, x)
    assert x.own.version == (INC + 10, 10)


versions_st = st.tuples(st.integers(INC, INC + 2), st.integers(1, 4))


@st.composite
def two_databases(draw):
    """For each of up to 40 nodes, the version each side holds (or none)."""
    nodes = draw(st.lists(st.sampled_from([f"n{i}" for i in range(40)]), unique=True))
    held = st.one_of(st.none(), versions_st)
    return {n: (draw(held), draw(held)) for n in nodes}


def _fill(m: Membership, versions: dict) -> None:
    m.receive([Announcement(n, inc, seq, (m.self_id,)) for n, (inc, seq) in versions.items()])


@settings(max_examples=200, deadline=None)
@given(two_databases())
def test_one_exchange_brings_both_databases_to_the_newest_of_each(held):
    a, b = Membership("a", INC), Membership("b", INC)
    _fill(a, {n: v[0] for n, v in held.items() if v[0]})
    _fill(b, {n: v[1] for n, v in held.items() if v[1]})
    before_a, before_b = a.versions(), b.versions()
    sent = link_up(a, b)
    assert a.versions() == b.versions()
    for n, (va, vb) in held.items():
        assert a.versions().get(n) == max(filter(None, (va, vb)), default=None)
    # equal databases (but for the two ends) cost no versions; otherwise only what lacks
    others = lambda v: {n: x for n, x in v.items() if n not in ("a", "b")}  # noqa: E731
    if others(before_a) == others(before_b):
        assert sent["versions"] == 0
    newer = sum(before_a.get(n) != a.versions()[n] for n in a.versions())
    newer += sum(before_b.get(n) != b.versions()[n] for n in b.versions())
    assert sent["announcements"] <= newer + 2  # the two ends' own may go again


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p", "q", "r", "s"]), versions_st), max_size=30),
       st.randoms(use_true_random=False))
def test_the_digest_is_of_what_is_held_not_of_how_it_came(anns, rng):
    anns = [Announcement(n, inc, seq, ()) for n, (inc, seq) in anns]
    a, b = Membership("a", INC), Membership("b", INC)
    a.receive(anns)
    for ann in rng.sample(anns, len(anns)):
        b.receive([ann])
    assert a.summary("b") == b.summary("a")
    fresh = Announcement("p", INC + 3, 1, ())
    b.receive([fresh])
    assert a.summary("b").digest != b.summary("a").digest
    a.receive([fresh])
    assert a.summary("b") == b.summary("a")


# -- link-ups alongside every other change ----------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.randoms(use_true_random=False))
def test_flooding_with_summaries_settles_on_the_true_components(history, rng):
    """As test_membership's property, link-ups exchanging summaries: whatever else
    changes while an exchange runs (links, restarts, any delivery order), every view
    ends true, and an announcement crosses a link at most twice in one life of it
    (flooded, and in the answer to versions)."""
    names, steps, settle_each = history
    swarm = Swarm(names, sync=True)
    run_history(swarm, steps, settle_each, rng)
    swarm.assert_converged()
    assert max(swarm.crossings.values(), default=0) <= 2


def test_a_link_cut_and_healed_inside_one_swarm_costs_its_two_announcements():
    names, edges = ring(8)
    swarm = Swarm(names, sync=True)
    for u, v in edges:
        swarm.link_up(u, v)
    swarm.settle()
    swarm.link_down("n0", "n7")
    swarm.settle()
    swarm.delivered = swarm.versions = swarm.summaries = 0
    swarm.link_up("n0", "n7")
    swarm.settle()
    swarm.assert_converged()
    assert (swarm.summaries, swarm.versions) == (2, 0)
    assert swarm.delivered <= 2 * 2 * swarm.link_count  # each end's new links, flooded


# -- the wire form ----------------------------------------------------------------------

SUM = {"digest": bytes(DIGEST_BYTES), "count": 3, "yours": [INC, 2]}


@pytest.mark.parametrize("obj", [
    None, [], {}, dict(SUM, digest=b"short"), dict(SUM, digest="x" * DIGEST_BYTES),
    dict(SUM, count=-1), dict(SUM, count=MAX_NODES + 1), dict(SUM, count=True),
    {k: v for k, v in SUM.items() if k != "count"}, dict(SUM, yours=[1]),
    dict(SUM, yours=[1, -1]), dict(SUM, yours=[1, MAX_COUNTER + 1]), dict(SUM, yours="1,2"),
])
def test_malformed_summaries_are_refused(obj):
    with pytest.raises(ValueError):
        Summary.from_wire(obj)


@pytest.mark.parametrize("obj", [
    None, [], {"": [1, 1]}, {"x" * 257: [1, 1]}, {1: [1, 1]}, {"n": [1]}, {"n": [1, 2, 3]},
    {"n": [1, -2]}, {"n": [True, 1]}, {"n": (1, 1)}, {"n": [1.0, 1]}, {"n": None},
    {f"n{i}": [1, 1] for i in range(MAX_NODES + 1)},
])
def test_malformed_versions_are_refused(obj):
    with pytest.raises(ValueError):
        versions_from_wire(obj)


def test_summaries_and_versions_round_trip_through_the_wire():
    summary = Summary(bytes(range(DIGEST_BYTES)), 7, (INC, 3))
    assert Summary.from_wire(summary.to_wire()) == summary
    assert Summary.from_wire(Summary(bytes(DIGEST_BYTES), 0).to_wire()).yours is None
    versions = {"a": (1, 2), "é": (MAX_COUNTER, 0)}
    (msg,) = decode_peer_frame(encode_peer_frame(
        [{"t": "lsa", "anns": [], "have": versions_to_wire(versions),
          "sum": summary.to_wire()}]), True)
    assert msg["have"] == versions and msg["sum"] == summary


@pytest.mark.parametrize("msg", [
    {"t": "lsa", "anns": [], "sum": dict(SUM, count="3")},
    {"t": "lsa", "anns": [], "have": {"n": [1]}},
    {"t": "lsa", "anns": [], "have": []},
])
def test_a_malformed_sum_or_have_is_a_protocol_error(msg):
    with pytest.raises(PeerProtocolError):
        decode_peer_frame(encode_peer_frame([msg]), True)


# -- two real overlays ------------------------------------------------------------------


def swarm_of(n: int, *overlays) -> None:
    """Give each overlay the same database: ``n`` other nodes in a random tree, and
    each other's own announcement (they know each other, but are not linked)."""
    rng = random.Random(n)
    names = [f"node-{i:08x}" for i in range(n)]
    links: dict[str, set] = {x: set() for x in names}
    for i in range(1, n):
        parent = names[rng.randrange(i)]
        links[parent].add(names[i])
        links[names[i]].add(parent)
    anns = [Announcement(x, INC + i, 3, tuple(sorted(links[x]))) for i, x in enumerate(names)]
    for o in overlays:
        o.membership.receive(anns + [p.membership.own for p in overlays if p is not o])


def linked(a, b, a_sync: bool = True) -> tuple[list[dict], list[dict]]:
    """Link ``a`` and ``b`` through their sessions (``a``'s hello saying ``sync`` or
    not, as an older node's would not); the lsa messages each sent."""
    ea, eb = End(a), End(b)
    sent = {ea: [], eb: []}
    for end in (ea, eb):
        def take(end=end):
            out, end.sent[:] = list(end.sent), []
            for m in out:
                if m["t"] == "hello" and end is ea and not a_sync:
                    del m["sync"]
            sent[end] += [m for m in out if m["t"] == "lsa"]
            return decode_peer_frame(encode_peer_frame(out), True) if out else []
        end.take = take
    ea.session.start()
    eb.session.start()
    pump(ea, eb)
    assert a.membership.versions() == b.membership.versions()
    return sent[ea], sent[eb]


def announcements(messages: list[dict]) -> int:
    return sum(len(m["anns"]) for m in messages)


def test_a_link_up_between_nodes_that_hold_the_same_200_nodes_sends_their_two_announcements():
    clock = task.Clock()
    a, b = overlay("a", clock, INC), overlay("b", clock, INC + 1)
    swarm_of(200, a, b)
    to_b, to_a = linked(a, b)
    # each side: a summary, then its own announcement (its new link), and nothing more
    for sent in (to_b, to_a):
        assert ["sum" in m for m in sent] == [True, False]
        assert announcements(sent) == 1 and not any("have" in m for m in sent)
    assert a.membership.reachable == {"a", "b"}


def test_a_peer_whose_hello_does_not_say_sync_gets_the_whole_database():
    clock = task.Clock()
    a, b = overlay("a", clock, INC), overlay("b", clock, INC + 1)
    swarm_of(200, a, b)
    to_b, to_a = linked(a, b, a_sync=False)
    assert not any("sum" in m or "have" in m for m in to_a)
    assert announcements(to_a) == 203  # the old way: the whole database, then its own
    assert "sum" in to_b[0]  # b's hello said sync
    assert a.membership.reachable == b.membership.reachable == {"a", "b"}


def test_databases_that_differ_exchange_versions_and_exactly_what_lacks():
    clock = task.Clock()
    a, b = overlay("a", clock, INC), overlay("b", clock, INC + 1)
    swarm_of(200, a, b)
    newer = [Announcement(f"node-{i:08x}", INC + i, 4, ()) for i in range(5)]
    a.membership.receive(newer)
    to_b, to_a = linked(a, b)
    assert [m for m in to_a if "have" in m]  # b saw the difference and asked
    answer = [m for m in to_b if "have" not in m and "sum" not in m]
    assert {x["node"] for m in answer for x in m["anns"]} == {x.node for x in newer} | {"a"}
    assert announcements(to_a) <= 2  # b's own, and a's version of it
