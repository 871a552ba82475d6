"""Unit and property tests of swarm.mesh.membership: link-state announcements and the view.

No sockets: :class:`Swarm` below holds one :class:`Membership` per node and carries the
announcements between them the way :mod:`swarm.mesh.overlay` does. When a link comes up, each
side sends its whole database to the other (or, with ``sync``, a summary of it, answered by
versions where the databases differ, answered by what they lack), then announces its new
links to every neighbor; what ``set_links`` or ``receive`` returns is flooded to every neighbor except
the one it came from (this node's own announcements go to that one too). Messages travel in order on each directed link (a WebSocket is a
stream), in any order across links, and those in flight on a link that goes down are lost.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from twisted.internet.task import Clock
from hypothesis import strategies as st

from swarm.mesh.link import PeerLink
from swarm.mesh.membership import MAX_ADOPTED, MAX_COUNTER, Announcement, Membership
from swarm.mesh.overlay import Overlay

INC = 1_000_000


class Swarm:
    """Memberships linked in memory, flooding as the overlay floods."""

    def __init__(self, names, incarnation: int = INC, sync: bool = False) -> None:
        self.sync = sync
        self.members = {n: Membership(n, incarnation) for n in names}
        self.links: dict[str, set[str]] = {n: set() for n in names}
        self.queues: dict[tuple[str, str], deque] = {}
        self.messages = 0  # lsa messages delivered
        self.summaries = self.versions = 0  # of them, those with a sum or a have
        self.delivered = 0  # announcements delivered (a message may hold several)
        #: (announcement node, version, sender, receiver, link's life) -> times delivered
        self.crossings: Counter = Counter()
        self.lives: Counter = Counter()  # link (u, v) -> how many times it came up

    # -- the overlay's rules ------------------------------------------------------------

    def _send(self, src: str, dst: str, anns, part: tuple = ()) -> None:
        """An lsa of ``anns``, and maybe a ``("sum", Summary)`` or ``("have", versions)``."""
        self.queues.setdefault((src, dst), deque()).append((list(anns), part))

    def _flood(self, node: str, fresh, source) -> None:
        if fresh:
            own = [a for a in fresh if a.node == node]
            for peer in sorted(self.links[node]):
                if peer != source:
                    self._send(node, peer, fresh)
                elif own:  # a re-announcement also answers the stale copy's sender
                    self._send(node, peer, own)

    def _link_up_side(self, a: str, b: str) -> None:
        self.links[a].add(b)
        if self.sync:
            self._send(a, b, [], ("sum", self.members[a].summary(b)))
        else:
            self._send(a, b, self.members[a].announcements())
        ann = self.members[a].set_links(self.links[a])
        if ann is not None:
            self._flood(a, [ann], None)

    def _link_down_side(self, a: str, b: str) -> None:
        self.links[a].discard(b)
        self.queues.pop((b, a), None)  # in flight toward a on the dead link: lost
        ann = self.members[a].set_links(self.links[a])
        if ann is not None:
            self._flood(a, [ann], None)

    def link_up(self, u: str, v: str) -> None:
        assert v not in self.links[u]
        self.lives[frozenset((u, v))] += 1
        self._link_up_side(u, v)
        self._link_up_side(v, u)

    def link_down(self, u: str, v: str) -> None:
        assert v in self.links[u]
        self._link_down_side(u, v)
        self._link_down_side(v, u)

    def restart(self, node: str, incarnation: int) -> None:
        """The node's process starts again: a new life, no links, an empty database."""
        for peer in sorted(self.links[node]):
            self.link_down(node, peer)
        self.members[node] = Membership(node, incarnation)

    def deliver_one(self, key) -> None:
        src, dst = key
        anns, part = self.queues[key].popleft()
        if not self.queues[key]:
            del self.queues[key]
        self.messages += 1
        self.delivered += len(anns)
        life = self.lives[frozenset((src, dst))]
        for a in anns:
            self.crossings[(a.node, a.version, src, dst, life)] += 1
        member = self.members[dst]
        fresh = member.receive(anns)
        self._flood(dst, fresh, src)
        if part and part[0] == "sum":
            self.summaries += 1
            if member.lacks(src, part[1]):
                self._send(dst, src, [], ("have", member.versions()))
        elif part:
            self.versions += 1
            answer = member.newer_than(part[1])
            if answer:
                self._send(dst, src, answer)

    def settle(self, rng: random.Random | None = None, limit: int = 100_000) -> int:
        """Deliver until nothing is in flight; the number of messages delivered."""
        steps = 0
        while self.queues:
            steps += 1
            assert steps <= limit, "flooding does not terminate"
            keys = sorted(self.queues)
            self.deliver_one(rng.choice(keys) if rng else keys[0])
        return steps

    # -- the truth ----------------------------------------------------------------------

    @property
    def link_count(self) -> int:
        return sum(len(p) for p in self.links.values()) // 2

    def distances(self, source: str) -> dict[str, int]:
        dist = {source: 0}
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v in self.links[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    queue.append(v)
        return dist

    def assert_converged(self) -> None:
        """Every node's view is exactly the graph's truth from where it stands."""
        for node, m in self.members.items():
            dist = self.distances(node)
            assert m.reachable == frozenset(dist), node
            assert m.hops == dist, node
            assert m.next_hop(node) is None
            for target, d in dist.items():
                if target == node:
                    continue
                nh = m.next_hop(target)
                assert nh in self.links[node], (node, target, nh)
                assert self.distances(nh)[target] == d - 1, (node, target, nh)


def line(n: int) -> tuple[list[str], list[tuple[str, str]]]:
    names = [f"n{i}" for i in range(n)]
    return names, list(zip(names, names[1:]))


def ring(n: int):
    names, edges = line(n)
    return names, edges + [(names[-1], names[0])]


def mesh(n: int):
    names = [f"n{i}" for i in range(n)]
    return names, list(itertools.combinations(names, 2))


def build(names, edges) -> Swarm:
    swarm = Swarm(names)
    for u, v in edges:
        swarm.link_up(u, v)
    swarm.settle()
    return swarm


def assert_no_storm(swarm: Swarm, new_announcements: int) -> None:
    """Each announcement crosses each link at most once each way (in one life of the
    link: one that comes up again starts with an exchange of the whole databases), so
    one change that makes ``new_announcements`` announcements costs at most that many
    times 2 x links."""
    assert max(swarm.crossings.values(), default=0) <= 1
    assert swarm.delivered <= new_announcements * 2 * swarm.link_count


# -- shapes ---------------------------------------------------------------------------


def test_a_line_of_five_converges():
    swarm = build(*line(5))
    swarm.assert_converged()
    m0 = swarm.members["n0"]
    assert m0.hops == {"n0": 0, "n1": 1, "n2": 2, "n3": 3, "n4": 4}
    assert {t: m0.next_hop(t) for t in ("n1", "n2", "n3", "n4")} == dict.fromkeys(
        ("n1", "n2", "n3", "n4"), "n1"
    )
    m2 = swarm.members["n2"]
    assert [m2.next_hop(t) for t in ("n0", "n1", "n3", "n4")] == ["n1", "n1", "n3", "n3"]
    assert m2.hops == {"n0": 2, "n1": 1, "n2": 0, "n3": 1, "n4": 2}


def test_a_ring_of_six_converges_and_a_change_costs_o_links():
    swarm = build(*ring(6))
    swarm.assert_converged()
    assert swarm.members["n0"].hops["n3"] == 3

    # one link goes down: its two ends announce, the flood stops by itself
    swarm.delivered = 0
    swarm.crossings.clear()
    swarm.link_down("n0", "n5")
    assert swarm.settle() > 0
    swarm.assert_converged()
    assert swarm.members["n0"].hops["n5"] == 5
    assert_no_storm(swarm, new_announcements=2)
    # on a ring the flood of each end's announcement runs once along the line
    assert swarm.delivered <= 2 * swarm.link_count

    # and comes back: one exchange of the two databases plus two announcements
    swarm.delivered = 0
    swarm.crossings.clear()
    swarm.link_up("n0", "n5")
    swarm.settle()
    swarm.assert_converged()
    db_exchange = 2 * len(swarm.members)
    assert swarm.delivered <= db_exchange + 2 * 2 * swarm.link_count


def test_a_full_mesh_of_six_converges_and_a_change_costs_o_links():
    swarm = build(*mesh(6))
    swarm.assert_converged()
    assert all(h <= 1 for m in swarm.members.values() for h in m.hops.values())

    swarm.delivered = 0
    swarm.crossings.clear()
    swarm.link_down("n1", "n4")
    swarm.settle()
    swarm.assert_converged()
    assert swarm.members["n1"].hops["n4"] == 2
    assert_no_storm(swarm, new_announcements=2)


def test_a_ring_converges_whatever_the_delivery_order():
    for seed in range(20):
        names, edges = ring(6)
        swarm = Swarm(names)
        rng = random.Random(seed)
        for u, v in edges:
            swarm.link_up(u, v)
        swarm.settle(rng)
        swarm.assert_converged()
        swarm.crossings.clear()
        swarm.link_down("n2", "n3")
        swarm.settle(rng)
        swarm.assert_converged()
        assert max(swarm.crossings.values()) <= 1


# -- nodes leaving and coming back ------------------------------------------------------


def test_a_node_whose_links_all_go_down_leaves_every_view_but_stays_in_the_database():
    swarm = build(*ring(6))
    old = swarm.members["n0"].own
    swarm.link_down("n0", "n1")
    swarm.link_down("n0", "n5")
    swarm.settle()
    swarm.assert_converged()
    survivors = [n for n in swarm.members if n != "n0"]
    for n in survivors:
        m = swarm.members[n]
        assert "n0" not in m.reachable
        assert m.next_hop("n0") is None
        assert m.reachable == frozenset(survivors)
        stale = [a for a in m.announcements() if a.node == "n0"]
        assert stale == [old]  # its last word is kept, it just leads nowhere
        assert "n0" not in [row["id"] for row in m.report()]
    assert swarm.members["n0"].reachable == {"n0"}


def test_a_restarted_node_with_a_higher_incarnation_is_welcomed_back():
    swarm = build(*line(4))
    # the old life said many things: its seq is high
    for _ in range(5):
        swarm.link_down("n3", "n2")
        swarm.link_up("n3", "n2")
    swarm.settle()
    old = swarm.members["n0"].announcements()
    old_n3 = next(a for a in old if a.node == "n3")
    assert old_n3.seq > 5

    swarm.restart("n3", INC + 5000)
    swarm.settle()
    assert all("n3" not in swarm.members[n].reachable for n in ("n0", "n1", "n2"))
    new = swarm.members["n3"].own
    assert new.version == (INC + 5000, 1) and new.version > old_n3.version

    swarm.link_up("n3", "n1")  # back, somewhere else
    swarm.settle()
    swarm.assert_converged()
    for n in ("n0", "n1", "n2"):
        known = {a.node: a for a in swarm.members[n].announcements()}
        assert known["n3"].incarnation == INC + 5000
        assert known["n3"].links == ("n1",)
    # the restarted node did not take its old life's announcement for its own
    assert swarm.members["n3"].own.incarnation == INC + 5000


def test_a_new_life_outranks_any_seq_of_the_old_one():
    m = Membership("a", INC)
    m.set_links(["x"])
    assert m.receive([Announcement("x", INC, 99, ("a",))])
    assert "x" in m.reachable
    assert m.receive([Announcement("x", INC + 1, 1, ())]) == [Announcement("x", INC + 1, 1, ())]
    assert "x" not in m.reachable
    # and the old life's words arriving late change nothing
    assert m.receive([Announcement("x", INC, 100, ("a",))]) == []
    assert "x" not in m.reachable


def test_an_announcement_about_ourselves_from_a_previous_life_makes_us_reannounce():
    m = Membership("a", INC)
    m.set_links(["b"])
    assert m.own.version == (INC, 2)
    previous = Announcement("a", INC, 40, ("c", "d"))
    fresh = m.receive([previous])
    assert fresh == [Announcement("a", INC, 41, ("b",))]  # our links, a higher version
    assert m.own == fresh[0]
    # a clock that went backwards: the previous life had the higher incarnation
    fresh = m.receive([Announcement("a", INC + 7, 3, ("z",))])
    assert fresh == [Announcement("a", INC + 7, 4, ("b",))]
    # ours echoed back, or an older one: nothing to do
    assert m.receive([m.own]) == []
    assert m.receive([previous]) == []


def test_a_node_restarted_with_a_clock_behind_its_previous_life_is_seen_again():
    swarm = build(*line(3))
    swarm.members["x"] = Membership("x", INC + 10)  # first life, clock ahead
    swarm.links["x"] = set()
    swarm.link_up("x", "n2")
    swarm.settle()
    swarm.assert_converged()
    swarm.restart("x", INC + 5)  # second life, clock now behind the first
    swarm.settle()
    swarm.link_up("x", "n0")
    swarm.settle()
    assert swarm.members["x"].reachable == {"x", "n0", "n1", "n2"}
    swarm.assert_converged()


def test_the_overlay_sends_the_reannouncement_back_to_the_holder_of_the_stale_one():
    """The previous-life case with real Overlay objects and fake links."""
    sent: list = []

    def link(owner: str, peer: str) -> PeerLink:
        return PeerLink(peer, lambda msgs: sent.append((owner, peer, msgs)), None)

    n0 = Overlay("n0", "s", INC, Clock())
    n0.membership.receive([Announcement("x", INC + 10, 9, ("z",))])  # x's first life
    x = Overlay("x", "s", INC + 5, Clock())  # its second life, clock behind
    to_x, to_n0 = link("n0", "x"), link("x", "n0")
    n0.link_up(to_x)
    x.link_up(to_n0)
    database = next(
        m for owner, _, msgs in sent if owner == "n0" for m in msgs
        if any(a["node"] == "x" for a in m["anns"])
    )
    sent.clear()
    x.receive_announcements(to_n0, [Announcement.from_wire(a) for a in database["anns"]])
    assert x.membership.own.version == (INC + 10, 10)  # it did re-announce ...
    to_n0_anns = [a for owner, _, msgs in sent if owner == "x" for m in msgs
                  for a in m["anns"]]
    assert {"node": "x", "inc": INC + 10, "seq": 10, "links": ["n0"]} in to_n0_anns


def test_out_of_order_updates_never_lose_a_node():
    # a - b - c: c's announcement (listing b) arrives at a before b's update listing c
    b_old = Announcement("b", INC, 2, ("a",))
    b_new = Announcement("b", INC, 3, ("a", "c"))
    c = Announcement("c", INC, 2, ("b",))
    for order in itertools.permutations([b_old, b_new, c]):
        m = Membership("a", INC)
        m.set_links(["b"])
        for ann in order:
            m.receive([ann])
        assert m.hops == {"a": 0, "b": 1, "c": 2}, order
        assert m.next_hop("c") == "b"
    # and in one message, in either order
    for anns in ([c, b_new], [b_new, c]):
        m = Membership("a", INC)
        m.set_links(["b"])
        assert set(m.receive(anns)) == {c, b_new}
        assert m.reachable == {"a", "b", "c"}


def test_one_sided_links_do_not_make_a_node_reachable():
    m = Membership("a", INC)
    m.set_links(["b"])  # a lists b ...
    m.receive([Announcement("b", INC, 2, ())])  # ... b does not list a
    assert m.reachable == {"a"} and m.next_hop("b") is None
    m.receive([Announcement("b", INC, 3, ("a",))])
    assert m.reachable == {"a", "b"} and m.next_hop("b") == "b"
    # further away: b lists c, c does not list b
    m.receive([Announcement("b", INC, 4, ("a", "c")), Announcement("c", INC, 2, ("d",))])
    assert m.reachable == {"a", "b"}
    # the other side: c lists a, a does not list c
    m.receive([Announcement("c", INC, 3, ("a", "b"))])
    assert m.reachable == {"a", "b", "c"} and m.hops["c"] == 2
    assert m.next_hop("c") == "b"
    # a node listing us is no neighbor until we list it
    m2 = Membership("a", INC)
    m2.receive([Announcement("b", INC, 2, ("a",))])
    assert m2.reachable == {"a"}


def test_set_links_announces_only_changes_and_never_lists_itself():
    m = Membership("a", INC)
    assert m.own == Announcement("a", INC, 1, ())
    ann = m.set_links(["c", "b", "a", "b"])
    assert ann == Announcement("a", INC, 2, ("b", "c")) == m.own
    assert m.set_links({"b": 1, "c": 2}) is None  # the overlay passes its links dict
    assert m.set_links([]) == Announcement("a", INC, 3, ())


def test_the_view_is_computed_once_per_change_and_follows_every_kind_of_change():
    """reachable and owners are read per request (routing, migration): each is one
    object per view, and each kind of change gives the next view."""
    m = Membership("a", INC)
    m.set_links(["b"])
    m.receive([Announcement("b", INC, 2, ("a", "c")), Announcement("c", INC, 2, ("b",))])
    assert m.reachable is m.reachable and m.owners is m.owners
    assert m.reachable == m.owners == {"a", "b", "c"}
    m.receive([Announcement("c", INC, 3, ("b",), leaving=True)])
    assert m.reachable == {"a", "b", "c"} and m.owners == {"a", "b"}
    m.set_leaving()
    assert m.owners == {"b"}
    m.set_links([])
    assert m.reachable == {"a"} and m.owners == frozenset()


def test_report_lists_neighbors_and_hops_sorted_by_hops():
    m = Membership("n2", INC)
    m.set_links(["n1", "n3"])
    m.receive([
        Announcement("n0", INC, 2, ("n1",)),
        Announcement("n1", INC, 2, ("n0", "n2", "ghost")),
        Announcement("n3", INC, 2, ("n2", "n4")),
        Announcement("n4", INC, 2, ("n3", "n5")),
        Announcement("n5", INC, 2, ()),  # one-sided: n4 lists n5, n5 does not list n4
        Announcement("far", INC, 2, ("nobody",)),
    ])
    assert m.report() == [
        {"id": "n2", "neighbors": ["n1", "n3"], "hops": 0},
        {"id": "n1", "neighbors": ["n0", "n2"], "hops": 1},
        {"id": "n3", "neighbors": ["n2", "n4"], "hops": 1},
        {"id": "n0", "neighbors": ["n1"], "hops": 2},
        {"id": "n4", "neighbors": ["n3"], "hops": 2},
    ]


# -- the wire form ----------------------------------------------------------------------


GOOD = {"node": "n1", "inc": 5, "seq": 2, "links": ["b", "a"]}


@pytest.mark.parametrize(
    "obj",
    [
        None, [], "n1", 7, [GOOD],
        {k: v for k, v in GOOD.items() if k != "node"},
        {k: v for k, v in GOOD.items() if k != "inc"},
        {k: v for k, v in GOOD.items() if k != "seq"},
        {k: v for k, v in GOOD.items() if k != "links"},
        dict(GOOD, node=""), dict(GOOD, node=5), dict(GOOD, node=None), dict(GOOD, node=b"n1"),
        dict(GOOD, inc=-1), dict(GOOD, inc=True), dict(GOOD, inc=1.0), dict(GOOD, inc="5"),
        dict(GOOD, seq=-3), dict(GOOD, seq=False), dict(GOOD, seq=None), dict(GOOD, seq=2.5),
        dict(GOOD, links="ab"), dict(GOOD, links=None), dict(GOOD, links={"a": 1}),
        dict(GOOD, links=["a", 1]), dict(GOOD, links=["a", ""]), dict(GOOD, links=[None]),
        dict(GOOD, links=[["a"]]), dict(GOOD, links=[b"a"]),
    ],
)
def test_from_wire_rejects_malformed_announcements(obj):
    with pytest.raises(ValueError):
        Announcement.from_wire(obj)


def test_from_wire_reads_a_good_announcement_and_to_wire_round_trips():
    ann = Announcement.from_wire(dict(GOOD, links=["b", "a", "b"], extra="ignored"))
    assert ann == Announcement("n1", 5, 2, ("a", "b"))
    assert ann.version == (5, 2)
    assert ann.to_wire() == {"node": "n1", "inc": 5, "seq": 2, "links": ["a", "b"]}
    assert Announcement.from_wire(ann.to_wire()) == ann
    big = Announcement("é-node", 2**53, 0, ())
    assert Announcement.from_wire(big.to_wire()) == big


def test_the_leaving_flag_travels_and_is_checked():
    ann = Announcement("n1", 5, 2, ("a",), True)
    assert ann.to_wire()["leaving"] is True
    assert Announcement.from_wire(ann.to_wire()) == ann
    assert "leaving" not in Announcement("n1", 5, 2, ("a",)).to_wire()
    with pytest.raises(ValueError):
        Announcement.from_wire(dict(GOOD, leaving=1))


# -- property -------------------------------------------------------------------------


@st.composite
def histories(draw):
    """Nodes, then links added one at a time (a random spanning tree plus extras, in a
    random order), then maybe some removed, then maybe a node or two restarted (a new
    life, linked again to its old neighbors); and whether to settle after each step."""
    n = draw(st.integers(2, 12))
    names = [f"n{i}" for i in range(n)]
    edges = {(names[draw(st.integers(0, i - 1))], names[i]) for i in range(1, n)}
    pairs = list(itertools.combinations(names, 2))  # (earlier, later), like the tree
    edges |= set(draw(st.lists(st.sampled_from(pairs), max_size=2 * n)))
    adds = draw(st.permutations(sorted(edges)))
    removes = draw(st.lists(st.sampled_from(sorted(edges)), max_size=3, unique=True))
    restarts = draw(st.lists(st.sampled_from(names), max_size=2))
    steps = [("up", e) for e in adds] + [("down", e) for e in removes]
    steps += [("restart", (node, None)) for node in restarts]
    settle_each = draw(st.lists(st.booleans(), min_size=len(steps), max_size=len(steps)))
    return names, steps, settle_each


def run_history(swarm: Swarm, steps, settle_each, rng: random.Random) -> None:
    """Play a :func:`histories` example on ``swarm`` and let it settle."""
    for life, ((kind, (u, v)), settle) in enumerate(zip(steps, settle_each), 1):
        if kind == "restart":
            neighbors = sorted(swarm.links[u])
            swarm.restart(u, INC + life)
            for peer in neighbors:
                swarm.link_up(u, peer)
        else:
            (swarm.link_up if kind == "up" else swarm.link_down)(u, v)
        if settle:
            swarm.settle(rng)
    swarm.settle(rng)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.randoms(use_true_random=False))
def test_flooding_settles_on_the_true_components(history, rng):
    names, steps, settle_each = history
    swarm = Swarm(names)
    run_history(swarm, steps, settle_each, rng)
    swarm.assert_converged()
    assert max(swarm.crossings.values(), default=0) <= 1


def test_a_full_database_drops_announcements_of_new_nodes_only(monkeypatch):
    """A peer that invents nodes cannot grow the database (and each view's cost)
    without bound; known nodes still get their updates."""
    import swarm.mesh.membership as membership

    monkeypatch.setattr(membership, "MAX_NODES", 4)
    m = Membership("a", 1)
    assert len(m.receive([Announcement(f"n{i}", 1, 1, ("a",)) for i in range(5)])) == 3
    assert m.dropped == 2 and len(m.announcements()) == 4
    assert m.receive([Announcement("n0", 1, 2, ())]) == [Announcement("n0", 1, 2, ())]


@pytest.mark.parametrize("inc, seq", [(MAX_ADOPTED, 1), (1000, MAX_ADOPTED), (MAX_COUNTER, 0)])
def test_an_announcement_of_this_node_near_the_counters_end_is_not_adopted(inc, seq):
    # adopting it would leave no higher version to announce: every later announcement
    # (and, for the incarnation, the hello) would be refused by every peer
    m = Membership("a", 1000)
    assert m.receive([Announcement("a", inc, seq, ("x",))]) == []
    assert m.own.version == (1000, 1) and m.self_conflicts == 1
    # one just below is adopted as before: the node re-announces above it
    (again,) = m.receive([Announcement("a", MAX_ADOPTED - 1, 7, ())])
    assert again.version == (MAX_ADOPTED - 1, 8)


@pytest.mark.parametrize("field", ["inc", "seq"])
def test_announcement_counters_past_64_bits_are_malformed(field):
    wire = {"node": "b", "inc": 1, "seq": 1, "links": []}
    wire[field] = MAX_COUNTER + 1
    with pytest.raises(ValueError, match=field):
        Announcement.from_wire(wire)
    wire[field] = MAX_COUNTER
    assert Announcement.from_wire(wire).version[field == "seq"] == MAX_COUNTER
