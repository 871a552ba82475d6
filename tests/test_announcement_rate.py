"""The rate bound on announcements (issue 8): a trusted peer that floods announcements
costs each node at most BURST + RATE view computations a second, loses no news, and
delays no other link."""

from __future__ import annotations

from twisted.internet.task import Clock

from swarm.mesh.link import PeerLink
from swarm.mesh.membership import (
    BURST, MAX_NODES, RATE, Announcement, AnnouncementGate, TokenBucket,
)
from swarm.mesh.overlay import Overlay

INC = 1_700_000_000_000


def test_a_bucket_gives_its_burst_then_its_rate():
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert abs(bucket.wait(0.0) - 0.1) < 1e-9
    assert not bucket.take(0.05) and bucket.take(0.1)
    assert not bucket.full(0.2) and bucket.full(10.0)
    assert bucket.take(10.0) and bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(10.0)  # refilled to its burst, not beyond


def test_a_token_short_by_a_rounding_error_is_due_at_a_time_the_clock_can_reach():
    """Seen in a 1,000-node simulation: 1e-15 short of a token at t = 0.52, the wait was
    4e-17 s, t + 4e-17 == t, and the release timer fired at 0.52 forever."""
    now = 0.5199999999999999
    bucket = TokenBucket(rate=RATE, burst=BURST, now=now)
    bucket._tokens = 0.9999999999999987
    wait = bucket.wait(now)
    assert now + wait > now and bucket.take(now + wait)
    assert bucket.wait(now + wait) > 0  # spent: the next one is a whole 1 / rate away


def _news(known: dict):
    return lambda a: a.node not in known or a.version > known[a.node]


def test_a_gate_holds_the_newest_news_per_node_past_its_burst():
    gate = AnnouncementGate(0.0, rate=1.0, burst=2)
    known: dict = {}
    assert gate.offer([Announcement("b", INC, 1, ())], 0.0, _news(known))
    assert gate.offer([Announcement("c", INC, 1, ())], 0.0, _news(known))
    # out of tokens: held, the newest version of each node kept, whatever the order
    for seq in (5, 3, 9, 2):
        assert gate.offer([Announcement("d", INC, seq, ())], 0.0, _news(known)) is None
    assert gate.offer([Announcement("e", INC, 1, ())], 0.0, _news(known)) is None
    assert gate.holding and gate.held_messages == 5 and gate.replaced == 3
    assert gate.release(0.5) == []  # no token yet
    assert abs(gate.due(0.5) - 0.5) < 1e-9
    released = gate.release(1.0)
    assert {(a.node, a.seq) for a in released} == {("d", 9), ("e", 1)}
    assert not gate.holding and gate.released == 1


def test_a_gate_charges_nothing_for_what_is_not_news():
    gate = AnnouncementGate(0.0, rate=1.0, burst=1)
    old = Announcement("b", INC, 1, ())
    for _ in range(100):  # a ring echoing what every node already holds
        assert gate.offer([old], 0.0, lambda a: False) is None
    assert not gate.holding and gate.bucket.take(0.0)


def test_a_gate_holds_at_most_max_nodes_ids():
    gate = AnnouncementGate(0.0, rate=1.0, burst=0)
    anns = [Announcement(f"n{i}", INC, 1, ()) for i in range(MAX_NODES + 10)]
    assert gate.offer(anns, 0.0, lambda a: True) is None
    assert gate.dropped == 10 and len(gate.drain()) == MAX_NODES


class Wired:
    """One overlay with fake links that record what it sends."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[str, list]] = []
        self.views = 0
        self.overlay = Overlay("a", "s", INC, self.clock, on_view_change=self._changed)
        self.links = {}

    def _changed(self) -> None:
        self.views += 1

    def link(self, peer: str) -> PeerLink:
        link = PeerLink(peer, lambda msgs: self.sent.append((peer, msgs)), self.clock)
        self.overlay.link_up(link)
        self.links[peer] = link
        return link

    def announce(self, peer: str, node: str, seq: int, links: tuple = ()) -> None:
        self.overlay.receive_announcements(
            self.links[peer], [Announcement(node, INC, seq, links)])


def test_a_flood_on_one_link_costs_its_bound_and_loses_no_news():
    w = Wired()
    w.link("evil")
    w.link("good")
    start = w.overlay.membership.computations
    # 3,000 messages in one instant, each news: fake nodes linked to the flooder
    for i in range(3000):
        w.announce("evil", f"fake{i % 300}", 1 + i // 300, ("evil",))
    assert w.overlay.membership.computations - start <= BURST
    # a neighbor's news is not held up by the flood on the other link
    w.overlay.receive_announcements(w.links["good"], [
        Announcement("good", INC, 2, ("a", "c")), Announcement("c", INC, 1, ("good",))])
    assert w.overlay.membership.hops.get("c") == 2
    # within 1 / RATE everything held is applied, in one batch, at its newest
    w.clock.advance(1 / RATE)
    assert w.overlay.membership.computations - start <= BURST + 2
    db = {a.node: a for a in w.overlay.membership.announcements()}
    assert all(db[f"fake{n}"].seq == 10 for n in range(300))
    assert not w.clock.getDelayedCalls()


def test_a_flood_lasting_seconds_is_applied_at_the_rate():
    w = Wired()
    w.link("evil")
    start = w.overlay.membership.computations
    for step in range(200):  # 10 s, 20 messages every 50 ms: 400/s against 32/s
        for i in range(20):
            w.announce("evil", f"fake{i}", 1 + step * 20 + i, ("evil",))
        w.clock.advance(0.05)
    w.clock.advance(1)
    spent = w.overlay.membership.computations - start
    assert spent <= BURST + RATE * 11 + 1
    db = {a.node: a for a in w.overlay.membership.announcements()}
    assert [db[f"fake{i}"].seq for i in range(20)] == [1 + 199 * 20 + i for i in range(20)]


def test_what_a_gone_link_held_back_is_applied_and_its_timer_cancelled():
    w = Wired()
    evil = w.link("evil")
    w.link("good")
    for i in range(BURST + 5):
        w.announce("evil", f"fake{i}", 1, ("evil", "good"))
    assert w.clock.getDelayedCalls()
    w.overlay.link_down(evil, "closed")
    assert not w.clock.getDelayedCalls()
    db = {a.node for a in w.overlay.membership.announcements()}
    assert {f"fake{i}" for i in range(BURST + 5)} <= db
    # a link to the same peer later starts with a full budget
    w.link("evil")
    before = w.overlay.membership.computations
    for i in range(BURST):
        w.announce("evil", f"more{i}", 1, ("evil",))
    assert w.overlay.membership.computations - before == BURST
