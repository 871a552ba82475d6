"""The swarm's map: who exists, who links to whom, and how to reach each node.

Link-state, as in OSPF. Every node announces itself and its live links in an
:class:`Announcement` versioned by ``(incarnation, seq)``: ``seq`` grows with every change
of links, and ``incarnation`` (the node's start time in milliseconds) makes a restarted
node outrank everything its previous life said. A node floods an announcement it has not
seen before to every link but the one it came from, and drops ones it has seen, so a ring
or a mesh carries each change over each link at most once in each direction: a change
costs O(links) messages.

A new link costs what the two databases differ by. Each side sends a :class:`Summary`:
a digest of its database (a sum of a hash of each ``(node, inc, seq)``, kept as the
database changes, so reading it costs nothing) and how many announcements it holds. A
side whose database differs asks for what it lacks by sending its versions
(:meth:`Membership.versions`, no link lists), and the other answers with exactly the
announcements those lack or hold older (:meth:`Membership.newer_than`). Equal databases
-- a link cut and healed inside one swarm, say -- cost a summary each
way. The exchange ends there: a summary is answered by versions at most, versions by
announcements, and announcements only ever by the flood. What either side learns after
sending its summary reaches the other by that flood, as it reaches every neighbour.

The view is computed, not gossiped: a breadth-first search from this node over
*bidirectional* edges (u lists v and v lists u) gives every reachable node, its hop count
and the neighbor to forward through. A node whose links all died drops out of the view as
soon as its neighbors' new announcements arrive, even though its own last announcement is
still in the database; a node that comes back is welcomed by its newer announcement.
Announcements of unreachable nodes are kept (one per node id, replaced by newer ones), so
updates arriving out of order never lose a node. A stopping node announces ``leaving``:
it still relays, but no longer owns keys (:attr:`Membership.owners`).

Every announcement that is news costs a view computation and a flood, so a peer that
sends them as fast as it can would burn the CPU of the whole swarm. Because the newest
version of each node wins, announcements over a link's budget lose nothing by waiting:
:class:`AnnouncementGate` keeps the newest pending one of each node and lets the overlay
apply them together, one computation and one flood for the lot.

Pure logic: no I/O, no clock (times are passed in); the overlay feeds it and floods what
it returns.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping


#: The largest incarnation or sequence number on the wire (CBOR's unsigned 64 bits).
MAX_COUNTER = 2**64 - 1
#: A node takes the version of an announcement about itself that it did not make only
#: below this (its incarnation is its start time in ms, about 2**41): one near
#: MAX_COUNTER would leave it no higher version to announce next, and a hello nobody
#: accepts.
MAX_ADOPTED = 2**62

#: The longest node id accepted from a peer (ids name nodes in logs and on the wire).
MAX_ID_BYTES = 256
#: The most links one announcement may list: far more than a node dials or accepts.
MAX_LINKS = 1024
#: The most nodes the database holds: a peer that invents nodes cannot grow it (and
#: the cost of each view computation) without bound. Announcements of further nodes
#: are dropped.
MAX_NODES = 10_000


@dataclass(frozen=True)
class Announcement:
    """One node's links as of one version."""

    node: str
    incarnation: int
    seq: int
    links: tuple[str, ...]
    #: The node is stopping: still a router, no longer an owner of keys.
    leaving: bool = False

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)

    def to_wire(self) -> dict:
        wire = {
            "node": self.node,
            "inc": self.incarnation,
            "seq": self.seq,
            "links": list(self.links),
        }
        if self.leaving:
            wire["leaving"] = True
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> "Announcement":
        """Validate an announcement from a peer; ValueError if malformed."""
        if not isinstance(obj, dict):
            raise ValueError("an announcement must be a map")
        node, inc, seq, links = (obj.get(k) for k in ("node", "inc", "seq", "links"))
        if not _is_id(node):
            raise ValueError(
                f"announcement node must be a string of 1 to {MAX_ID_BYTES} characters")
        for name, n in (("inc", inc), ("seq", seq)):
            if not _is_counter(n):
                raise ValueError(
                    f"announcement {name} must be an integer from 0 to {MAX_COUNTER}")
        if not isinstance(links, list) or not all(_is_id(x) for x in links):
            raise ValueError("announcement links must be a list of node ids")
        if len(links) > MAX_LINKS:
            raise ValueError(f"an announcement lists at most {MAX_LINKS} links")
        leaving = obj.get("leaving", False)
        if not isinstance(leaving, bool):
            raise ValueError("announcement leaving must be a boolean")
        return cls(node, inc, seq, tuple(sorted(set(links))), leaving)


def _is_id(x: Any) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_ID_BYTES


def _is_counter(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNTER


def _version(x: Any, what: str) -> tuple[int, int]:
    if not (isinstance(x, list) and len(x) == 2 and all(_is_counter(n) for n in x)):
        raise ValueError(f"{what} must be [inc, seq], integers from 0 to {MAX_COUNTER}")
    return (x[0], x[1])


#: A database digest's size in bytes: per-announcement hashes summed modulo 2**128.
DIGEST_BYTES = 16
_DIGEST_MOD = 1 << (8 * DIGEST_BYTES)


def _hash(ann: Announcement) -> int:
    """BLAKE2b-128 of the node id's UTF-8 (after its length, 4 bytes big-endian), then
    inc and seq (8 bytes big-endian each): what the database digest sums. Additive
    hashes can be made to collide by whoever chooses many of the entries, but a peer
    can already announce any node at any version, so a digest needs to resist only
    chance."""
    node = ann.node.encode("utf-8", "surrogatepass")
    data = b"".join((len(node).to_bytes(4, "big"), node, ann.incarnation.to_bytes(8, "big"),
                     ann.seq.to_bytes(8, "big")))
    return int.from_bytes(hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest(), "big")


@dataclass(frozen=True)
class Summary:
    """A database in a few bytes, for a newly linked peer to compare with its own.

    It leaves out the sender's announcement and the receiver's, which each side changes
    as the link comes up (and floods to the other anyway): ``digest`` covers every other
    announcement, ``count`` says how many there are, and ``yours`` is the version of the
    receiver's announcement the sender holds (None: none), so that a node hears of a
    copy of itself newer than its own (a previous life).
    """

    digest: bytes
    count: int
    yours: tuple[int, int] | None = None

    def to_wire(self) -> dict:
        wire: dict = {"digest": self.digest, "count": self.count}
        if self.yours is not None:
            wire["yours"] = list(self.yours)
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> "Summary":
        """Validate a summary from a peer; ValueError if malformed."""
        if not isinstance(obj, dict):
            raise ValueError("a summary must be a map")
        digest, count = obj.get("digest"), obj.get("count")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise ValueError(f"summary digest must be {DIGEST_BYTES} bytes")
        if not _is_counter(count) or count > MAX_NODES:
            raise ValueError(f"summary count must be an integer from 0 to {MAX_NODES}")
        yours = obj.get("yours")
        return cls(digest, count, None if yours is None else _version(yours, "summary yours"))


Versions = Mapping[str, tuple[int, int]]


def versions_to_wire(versions: Versions) -> dict:
    return {node: list(version) for node, version in versions.items()}


def versions_from_wire(obj: Any) -> dict[str, tuple[int, int]]:
    """Validate a peer's versions (node id -> [inc, seq], at most MAX_NODES of them,
    as many as a database holds); ValueError if malformed."""
    if not isinstance(obj, dict) or len(obj) > MAX_NODES:
        raise ValueError(f"versions must be a map of at most {MAX_NODES} node ids")
    if not all(_is_id(node) for node in obj):
        raise ValueError(f"versions must map node ids of 1 to {MAX_ID_BYTES} characters")
    return {node: _version(v, "a version") for node, v in obj.items()}


#: How often a node answers announcements about itself that it did not make. Once is
#: enough after a restart with a clock behind its previous life; more means another
#: node runs with the same id, and answering forever would be a flood without end.
MAX_SELF_CORRECTIONS = 3


class Membership:
    """The announcement database of one node, and the view derived from it."""

    def __init__(self, self_id: str, incarnation: int) -> None:
        self.self_id = self_id
        #: Announcements about this node that it did not make (see MAX_SELF_CORRECTIONS).
        self.self_conflicts = 0
        #: Announcements of new nodes dropped because the database was full.
        self.dropped = 0
        self._db: dict[str, Announcement] = {}
        #: The sum of every announcement's hash (:func:`_hash`), as the database changes.
        self._sum = 0
        self._store(Announcement(self_id, incarnation, 1, ()))
        self.hops: dict[str, int] = {}
        self._next_hop: dict[str, str] = {}
        #: View computations so far (each a breadth-first search over the map).
        self.computations = 0
        self._recompute()

    # -- inputs ---------------------------------------------------------------------

    @property
    def own(self) -> Announcement:
        return self._db[self.self_id]

    def set_links(self, neighbors: Iterable[str]) -> Announcement | None:
        """Our live links changed: the new announcement to flood, or None if same."""
        links = tuple(sorted(set(neighbors) - {self.self_id}))
        own = self.own
        if links == own.links:
            return None
        return self._replace_own(own.incarnation, own.seq + 1, links, own.leaving)

    def set_leaving(self, leaving: bool = True) -> Announcement | None:
        """This node is stopping (or starting again): the announcement that takes it
        out of placement (or back in), or None when nothing changes."""
        own = self.own
        if own.leaving == leaving:
            return None
        return self._replace_own(own.incarnation, own.seq + 1, own.links, leaving)

    def receive(self, announcements: Iterable[Announcement]) -> list[Announcement]:
        """Merge announcements from a peer; returns those to flood further.

        An announcement about this node that is newer than ours (our previous life,
        or a clock that went backwards) makes us re-announce with a higher version,
        at most MAX_SELF_CORRECTIONS times and only below MAX_ADOPTED.
        """
        fresh: list[Announcement] = []
        for ann in announcements:
            if not self.is_news(ann):
                continue
            if ann.node == self.self_id:
                self.self_conflicts += 1
                if (self.self_conflicts <= MAX_SELF_CORRECTIONS
                        and max(ann.version) < MAX_ADOPTED):
                    own = self.own
                    fresh.append(self._replace_own(
                        ann.incarnation, ann.seq + 1, own.links, own.leaving
                    ))
                continue
            if ann.node not in self._db and len(self._db) >= MAX_NODES:
                self.dropped += 1
                continue
            self._store(ann)
            fresh.append(ann)
        if fresh:
            self._recompute()
        return fresh

    def is_news(self, ann: Announcement) -> bool:
        """Whether :meth:`receive` would act on ``ann`` (the database's size aside)."""
        known = self._db.get(ann.node)
        if ann.node == self.self_id:
            # ours comes back to us on rings: only a newer one, or another at our
            # version saying something else, was not made by this node
            return ann != known and ann.version >= known.version
        return known is None or ann.version > known.version

    def _replace_own(
        self, incarnation: int, seq: int, links: tuple, leaving: bool
    ) -> Announcement:
        ann = Announcement(self.self_id, incarnation, seq, links, leaving)
        self._store(ann)
        self._recompute()
        return ann

    def _store(self, ann: Announcement) -> None:
        old = self._db.get(ann.node)
        self._sum = (self._sum + _hash(ann) - (_hash(old) if old else 0)) % _DIGEST_MOD
        self._db[ann.node] = ann

    # -- link-up: what two databases differ by -----------------------------------------

    def summary(self, peer: str) -> Summary:
        """This database for a newly linked ``peer`` (see :class:`Summary`)."""
        held = self._db.get(peer)
        return Summary(self._digest_without(peer), len(self._db) - 1 - (held is not None),
                       held.version if held else None)

    def lacks(self, peer: str, summary: Summary) -> bool:
        """Whether ``peer``'s database, as its ``summary`` gives it, may hold
        announcements that this one lacks or holds older: then send it
        :meth:`versions`. A peer that knows no other node has nothing to give."""
        if summary.yours is not None and summary.yours > self.own.version:
            return True
        return summary.count > 0 and summary.digest != self._digest_without(peer)

    def _digest_without(self, peer: str) -> bytes:
        """The digest of every announcement but this node's and ``peer``'s."""
        total = self._sum - _hash(self.own)
        if peer in self._db:
            total -= _hash(self._db[peer])
        return (total % _DIGEST_MOD).to_bytes(DIGEST_BYTES, "big")

    def versions(self) -> dict[str, tuple[int, int]]:
        """The version of every announcement held, for a peer to answer with
        :meth:`newer_than`."""
        return {node: ann.version for node, ann in self._db.items()}

    def newer_than(self, versions: Versions) -> list[Announcement]:
        """The announcements a peer holding ``versions`` lacks or holds older."""
        return [ann for node, ann in self._db.items()
                if node not in versions or ann.version > versions[node]]

    # -- the view -------------------------------------------------------------------

    def _recompute(self) -> None:
        self.computations += 1
        db = self._db
        hops = {self.self_id: 0}
        next_hop: dict[str, str] = {}
        queue = deque([self.self_id])
        while queue:
            u = queue.popleft()
            for v in db[u].links:  # sorted: ties go to the smallest id
                if v in hops or v not in db or u not in db[v].links:
                    continue
                hops[v] = hops[u] + 1
                next_hop[v] = v if u == self.self_id else next_hop[u]
                queue.append(v)
        self.hops = hops
        self._next_hop = next_hop
        self._reachable = frozenset(hops)
        self._owners: frozenset[str] | None = None

    @property
    def reachable(self) -> frozenset[str]:
        return self._reachable

    @property
    def owners(self) -> frozenset[str]:
        """Reachable nodes that may own keys: all but those announcing they leave."""
        if self._owners is None:
            db = self._db
            self._owners = frozenset(n for n in self.hops if not db[n].leaving)
        return self._owners

    def next_hop(self, node: str) -> str | None:
        """The neighbor to forward through toward ``node`` (None: unreachable/self)."""
        return self._next_hop.get(node)

    def announcements(self) -> list[Announcement]:
        """The whole database, for a newly linked peer that takes no :class:`Summary`."""
        return list(self._db.values())

    def report(self) -> list[dict]:
        """The ``nodes`` op's list: every reachable node, its links and hop count."""
        return [
            {
                "id": node,
                "neighbors": [
                    v for v in self._db[node].links
                    if v in self.hops and node in self._db[v].links
                ],
                "hops": hops,
            }
            for node, hops in sorted(self.hops.items(), key=lambda kv: (kv[1], kv[0]))
        ]


# -- the rate bound ---------------------------------------------------------------------

#: Applications of announcements (each a view computation and a flood) one peer's link
#: may cause at once: a join, a leave, a link flap or the database exchange of a new
#: link (one message, up to MAX_NODES announcements) take a handful, a swarm starting
#: all at once a few dozen.
BURST = 32
#: Applications per second one peer's link may cause once its burst is spent: a held
#: announcement waits at most 1 / RATE seconds (31 ms), which no one notices.
RATE = 32.0


#: The shortest wait :meth:`TokenBucket.wait` gives: far above any clock's resolution.
MIN_WAIT = 0.001


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; times are passed in."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: now), at least MIN_WAIT when not now:
        a token short by a rounding error would otherwise be due in less time than
        the clock can add to ``now``, and a timer for it would fire at ``now`` again
        and again (on a simulated clock, forever)."""
        self._refill(now)
        if self._tokens >= 1:
            return 0.0
        return max(MIN_WAIT, (1 - self._tokens) / self.rate)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


class AnnouncementGate:
    """The rate bound on the announcements of one peer's link, and what it holds back.

    Per link (per peer id, spare connections included), not per announced node: the
    link is what a flooding peer controls and pays for, while announced node ids cost
    it nothing to invent, so a bucket per node would bound nothing. A flood on one link
    delays only what arrives on that link, by at most 1 / rate, and every node applies
    at most ``rate`` batches a second per link however its neighbours relay.

    Each message whose announcements include news takes a token and is applied at once.
    Without a token its news is held, the newest per node id (that is all membership
    keeps anyway), until :meth:`release` hands the lot over as one batch. Messages with
    no news cost no token. At most MAX_NODES node ids are held: more than the database
    can hold at all; further new ids are dropped and counted.
    """

    def __init__(self, now: float, rate: float = RATE, burst: int = BURST) -> None:
        self.bucket = TokenBucket(rate, burst, now)
        self._held: dict[str, Announcement] = {}
        #: Whether this link is over its budget: set when news is first held, cleared
        #: when news is next applied without waiting (the flood is over).
        self.coalescing = False
        #: Over the current (or last) burst: messages held, batches released, and
        #: announcements replaced by a newer one or dropped.
        self.held_messages = self.released = self.replaced = self.dropped = 0
        self.since = now

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def offer(self, anns: Iterable[Announcement], now: float,
              is_news: Callable[[Announcement], bool]) -> list[Announcement] | None:
        """The news among ``anns`` to apply now, or None when it was held (or when
        there was none: then nothing waits either)."""
        news = [a for a in anns if is_news(a)]
        if not news:
            return None
        if not self._held and self.bucket.take(now):
            self.coalescing = False
            return news
        if not self.coalescing:
            self.coalescing, self.since = True, now
            self.held_messages = self.released = self.replaced = self.dropped = 0
        self.held_messages += 1
        held = self._held
        for ann in news:
            old = held.get(ann.node)
            if old is None and len(held) >= MAX_NODES:
                self.dropped += 1
            elif old is None:
                held[ann.node] = ann
            else:
                self.replaced += 1
                if ann.version > old.version:
                    held[ann.node] = ann
        return None

    def due(self, now: float) -> float:
        """Seconds until what is held may be released."""
        return self.bucket.wait(now)

    def release(self, now: float) -> list[Announcement]:
        """What is held, as one batch, if a token is there (else nothing yet)."""
        if not self._held or not self.bucket.take(now):
            return []
        self.released += 1
        return self.drain()

    def drain(self) -> list[Announcement]:
        """What is held, token or not (the link is gone: nothing more will come)."""
        held, self._held = list(self._held.values()), {}
        return held
