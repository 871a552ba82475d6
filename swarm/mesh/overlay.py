"""The overlay: this node's peer links, the membership they carry, and forwarding.

Protocol adapters report links opening and closing and hand over decoded messages; the
overlay keeps :class:`~swarm.membership.Membership` up to date, floods announcements,
answers forwarded requests through the router's ``handle_forwarded`` and forwards this
node's own requests to the neighbor on the shortest path toward a node.

Two nodes that dial each other end up with two connections but one link: messages to a
neighbor always go over its oldest live connection, the other stays idle as a spare, so
nothing is closed and nothing flaps. Each connection has its own request tags, and a
reply goes back on the connection its request came in on.

Identity: a node id is one live node. A hello naming a node that is reachable in this
node's view, or linked directly, with another incarnation than the hello says is
refused (:meth:`Overlay.identity_conflict`); a restarted node whose old links have died
is no longer live, so it is accepted when its dialler tries again. A node whose own id
is refused so records it in :attr:`Overlay.conflict` until a peer accepts it again.

Stopping closes each connection in two phases, so no request is caught on the wire by
the close. The stopping node says ``bye`` on every connection (:meth:`Overlay.part`);
a connection whose peer said ``bye`` is *parted* (:meth:`Overlay.link_parted`): it
leaves routing and the view at once, as a lost link would, but the requests pending on
it still get their replies, and requests arriving on it are still served. A peer
answers ``bye`` with ``bye``, after anything it sent before, so once every connection
is parted (:attr:`Overlay.parted`) nothing new can arrive, and the stopping node closes
as soon as it is not :attr:`~Overlay.busy`.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from swarm.errors import InternalError, Timeout
from swarm.logs import logger
from swarm.mesh.link import Packed, PeerLink, unpacked
from swarm.mesh.membership import (
    Announcement,
    AnnouncementGate,
    Membership,
    Summary,
    Versions,
    versions_to_wire,
)
from swarm.mesh.peer_wire import bye, hello, packed_replies
from swarm.protocol.wire import error_reply, request_id

#: Seconds a peer has, from the WebSocket opening, to say hello and give its proof
#: (a connection that says nothing would otherwise stay open: Autobahn answers pings).
HANDSHAKE_TIMEOUT = 10.0

_log = logger(__name__)

#: (request, seconds left, hops left, node it is addressed to or None) -> reply dict
#: or Deferred of one
RequestHandler = Callable[[dict, float, int, "str | None"], "dict | Deferred"]
GroupRelay = Callable[[list, float, int, "str | None"], "Deferred | None"]


class Overlay:
    def __init__(
        self,
        node_id: str,
        swarm_name: str,
        incarnation: int,
        clock,
        on_view_change: Callable[[], None] = lambda: None,
        handle_request: RequestHandler | None = None,
        relay_group: GroupRelay | None = None,
        secret: bytes | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        """``handle_request`` answers the requests neighbors forward (the router's
        ``route_forwarded``); ``relay_group`` may pass a forwarded group on whole
        (the router's ``relay_group``: a Deferred of the replies, or None to serve
        the requests one by one); ``on_view_change`` hears of every change of the view;
        with a ``secret``, only peers that prove they hold it link
        (:mod:`swarm.mesh.auth`); a peer that has not said hello (and given its
        proof) within ``handshake_timeout`` seconds of the connection opening is
        closed."""
        self.node_id = node_id
        self.swarm_name = swarm_name
        self.secret = secret
        self.handshake_timeout = handshake_timeout
        self.clock = clock
        self.membership = Membership(node_id, incarnation)
        self.on_view_change = on_view_change
        self.handle_request = handle_request
        self.relay_group = relay_group
        self._links: dict[str, list[PeerLink]] = {}
        #: Connections whose peer said bye: open, routing nothing, finishing their calls.
        self._parted: list[PeerLink] = []
        #: Whether this node said bye on every connection (it is stopping).
        self.parting = False
        #: The incarnation each directly linked neighbor gave in its hello.
        self._incarnations: dict[str, int] = {}
        #: Why the swarm refused this node's id (another live node has it), or None.
        self.conflict: str | None = None
        self._serving = 0  # forwarded requests received and not yet answered
        #: Peer traffic (WebSocket payload bytes and frames, both ways), and peer
        #: connections this node refused, by close code: what /metrics reports.
        self.traffic = {"bytes_sent": 0, "bytes_received": 0,
                        "frames_sent": 0, "frames_received": 0}
        self.refused_peers: dict[int, int] = {}
        #: The announcement rate bound of each linked peer, and the timer that releases
        #: what it holds back.
        self._gates: dict[str, AnnouncementGate] = {}
        self._releases: dict[str, object] = {}

    # -- links ------------------------------------------------------------------------

    def hello(self, nonce: bytes) -> dict:
        # the incarnation this node announces: after answering a stale announcement of
        # its previous life (a clock that went back) that is the one peers hold
        return hello(self.node_id, self.swarm_name, self.membership.own.incarnation,
                     nonce, self.secret is not None)

    @property
    def neighbors(self) -> list[str]:
        return sorted(self._links)

    def link_count(self) -> int:
        return sum(len(v) for v in self._links.values())

    def _add(self, link: PeerLink, incarnation: int | None, sync: bool) -> None:
        links = self._links.setdefault(link.peer, [])
        links.append(link)
        if len(links) > 1:
            _log.info("spare link to {peer} (it is already linked)", peer=link.peer)
            # every accepted hello is answered, so the peer knows it was accepted
            link.send([{"t": "lsa", "anns": []}])
            return
        if incarnation is not None:
            self._incarnations[link.peer] = incarnation
        _log.info("link to {peer} up", peer=link.peer)
        if sync:  # what the databases differ by follows (receive_summary)
            link.send([{"t": "lsa", "anns": [],
                        "sum": self.membership.summary(link.peer).to_wire()}])
        else:
            link.send([{"t": "lsa", "anns": self._wire(self.membership.announcements())}])
        self._links_changed()

    def link_up(self, link: PeerLink, incarnation: int | None = None,
                sync: bool = False) -> None:
        """A connection's hello was accepted; ``incarnation`` is the one it gave, and
        ``sync`` whether it takes a summary of the database instead of the database
        (:class:`~swarm.mesh.membership.Summary`)."""
        self._add(link, incarnation, sync)
        if self.parting:  # a link that came up while this node stops is told at once
            link.send([bye()])

    def link_down(self, link: PeerLink, reason: str) -> None:
        link.fail_all(f"link to {link.peer} lost: {reason}")
        if link in self._parted:
            self._parted.remove(link)
            if link.peer not in self._links:  # its lsa after the bye made a gate
                self._forget_gate(link.peer)
        elif self._remove(link):
            _log.info("link to {peer} down: {reason}", peer=link.peer, reason=reason)
            self._links_changed()

    def link_parted(self, link: PeerLink) -> None:
        """``link``'s peer said bye: route nothing more over it, as if it were down,
        but leave its pending calls to their replies (they still arrive on it)."""
        self._parted.append(link)
        if self._remove(link):
            _log.info("link to {peer} parted: it said bye", peer=link.peer)
            self._links_changed()

    def _remove(self, link: PeerLink) -> bool:
        """Take ``link`` out of routing; True when it was the peer's last one."""
        links = self._links.get(link.peer, [])
        if link not in links:
            return False
        links.remove(link)
        if links:
            return False
        del self._links[link.peer]
        self._incarnations.pop(link.peer, None)
        self._forget_gate(link.peer)
        return True

    def part(self) -> None:
        """Say bye on every connection: this node is stopping (see the module
        docstring). :attr:`parted` says when every peer has answered."""
        self.parting = True
        _log.info("saying bye to {peers}", peers=", ".join(self.neighbors) or "no peer")
        for links in self._links.values():
            for link in links:
                link.send([bye()])

    @property
    def parted(self) -> bool:
        """Whether this node said bye and every connection it said it on is parted
        (answered, or gone): no request can arrive any more."""
        return self.parting and not self._links

    def identity_conflict(self, node: str, incarnation: int) -> str | None:
        """Why a hello from ``node`` with ``incarnation`` names a node already live
        elsewhere, or None to accept it.

        Live means reachable in this node's view (its announcement's incarnation
        counts), or linked directly on another connection whose announcement has not
        arrived yet (its hello's incarnation counts). The same incarnation is the same
        node: a spare connection, or a second link of the same process.
        """
        if node in self.membership.reachable:
            live = next(a.incarnation for a in self.membership.announcements()
                        if a.node == node)
        else:
            live = self._incarnations.get(node)
        if live is None or live == incarnation:
            return None
        return (f"node id {node!r} is already live in the swarm (incarnation {live}, "
                f"the hello says {incarnation})")

    def refused_as_duplicate(self, peer: str, reason: str) -> None:
        """``peer`` refused this node's id: another live node has it."""
        self.conflict = reason
        _log.error(
            "{peer} refused this node's id {node}: {reason}. Another live node runs "
            "with the same --node-id; give one of them another id",
            peer=peer, node=self.node_id, reason=reason,
        )

    def link_accepted(self, link: PeerLink) -> None:
        """``link``'s peer showed that it accepted this node's hello."""
        if self.conflict is not None:
            _log.info("{peer} accepts this node's id {node}: the conflict is over",
                      peer=link.peer, node=self.node_id)
            self.conflict = None

    def _links_changed(self) -> None:
        before = self._view()
        ann = self.membership.set_links(self._links)
        if ann is not None:
            self._spread([ann], None, before)

    def leave(self, leaving: bool = True) -> None:
        """Tell the swarm this node is stopping, so no key is placed on it any more
        (or, with ``leaving=False``, that it serves again)."""
        before = self._view()
        ann = self.membership.set_leaving(leaving)
        if not leaving:
            self.parting = False  # started again: links that come up are kept
        self._spread([ann] if ann else [], None, before)

    def receive_announcements(self, link: PeerLink, anns: list[Announcement]) -> None:
        """Apply what is news in ``anns`` now, or, past the link's rate bound, soon
        (:class:`~swarm.mesh.membership.AnnouncementGate`)."""
        peer, now = link.peer, self.clock.seconds()
        gate = self._gates.get(peer)
        if gate is None:
            gate = self._gates[peer] = AnnouncementGate(now)
        news = gate.offer(anns, now, self.membership.is_news)
        if news is not None:
            self._apply(peer, news)
        elif gate.holding and peer not in self._releases:
            if gate.held_messages == 1:
                _log.info("announcements from {peer} come faster than {rate}/s: "
                          "coalescing them", peer=peer, rate=gate.bucket.rate)
            self._releases[peer] = self.clock.callLater(gate.due(now), self._release, peer)

    def receive_summary(self, link: PeerLink, summary: Summary) -> None:
        """A newly linked peer's summary of its database: when it may hold what this
        node lacks, send this node's versions, for the peer to answer with that."""
        if self.membership.lacks(link.peer, summary):
            _log.debug("{peer}'s database differs: sending versions", peer=link.peer)
            link.send([{"t": "lsa", "anns": [],
                        "have": versions_to_wire(self.membership.versions())}])

    def receive_versions(self, link: PeerLink, versions: Versions) -> None:
        """A peer's versions: answer with the announcements it lacks or holds older."""
        anns = self.membership.newer_than(versions)
        if anns:
            link.send([{"t": "lsa", "anns": self._wire(anns)}])

    def _release(self, peer: str) -> None:
        del self._releases[peer]
        gate = self._gates.get(peer)
        if gate is None:
            return
        now = self.clock.seconds()
        held = gate.release(now)
        if held:
            self._apply(peer, held)
        if gate.holding:
            self._releases[peer] = self.clock.callLater(gate.due(now), self._release, peer)
        elif gate.released == 1 or gate.bucket.full(now):
            _log.info("announcements from {peer}: {messages} messages held back over "
                      "{seconds:.1f} s, applied in {batches} batches", peer=peer,
                      messages=gate.held_messages, batches=gate.released,
                      seconds=now - gate.since)

    def _forget_gate(self, peer: str) -> None:
        """``peer``'s last link went: apply what it held back (it was news when it
        came, and relayed news arrives only once), then drop its bound."""
        gate = self._gates.pop(peer, None)
        timer = self._releases.pop(peer, None)
        if timer is not None:
            timer.cancel()
        if gate is not None and gate.holding:
            self._apply(peer, gate.drain())

    def _apply(self, peer: str, anns: list[Announcement]) -> None:
        before = self._view()
        conflicts, dropped = self.membership.self_conflicts, self.membership.dropped
        self._spread(self.membership.receive(anns), peer, before)
        if self.membership.dropped > dropped:
            _log.warn("dropped announcements of {count} new nodes from {peer}: the swarm "
                      "map holds {most} nodes at most", count=self.membership.dropped - dropped,
                      peer=peer, most=len(self.membership.announcements()))
        if self.membership.self_conflicts > conflicts:
            _log.warn(
                "an announcement about {node} that this node did not make came via "
                "{peer} ({count} so far): a restart with the clock behind, or another "
                "node running with the same --node-id",
                node=self.node_id, peer=peer, count=self.membership.self_conflicts,
            )

    def _view(self) -> tuple[frozenset, frozenset]:
        """What placement depends on: who is reachable, and who may own keys."""
        return self.membership.reachable, self.membership.owners

    def _spread(self, fresh: list[Announcement], source: str | None, before) -> None:
        """Flood what was new to every neighbor but its source; report view changes."""
        if fresh:
            # Our own announcements go everywhere, the source included: a re-announcement
            # answers a stale one of ours, and the source is the node sure to hold it.
            own = [a for a in fresh if a.node == self.node_id]
            relayed = self._wire(fresh)
            back = [{"t": "lsa", "anns": self._wire(own)}] if own else None
            for peer, links in self._links.items():
                if peer != source:
                    links[0].send([{"t": "lsa", "anns": relayed}])
                elif back:
                    links[0].send(back)
        if self._view() != before:
            self.on_view_change()

    @staticmethod
    def _wire(anns: list[Announcement]) -> list[dict]:
        return [a.to_wire() for a in anns]

    # -- requests ---------------------------------------------------------------------

    def forward(
        self, node: str, request: dict, timeout: float, hops: int, addressed: bool = False
    ) -> Deferred:
        """Send ``request`` one hop toward ``node``; fires with the reply dict.

        An ``addressed`` request runs on ``node`` itself; any other is routed again by
        each hop's own view of the key's owner.
        """
        neighbor = self.membership.next_hop(node)
        links = self._links.get(neighbor) if neighbor else None
        if not links:
            raise LookupError(node)
        return links[0].call(request, timeout, hops, to=node if addressed else None)

    def forward_group(self, node: str, requests: list[dict], timeout: float,
                      hops: int, passthrough: bool = False) -> Deferred | None:
        """Send ``requests`` one hop toward ``node`` as one group, each routed again
        by the next hop; a Deferred of their replies in order (with ``passthrough``,
        as :meth:`~swarm.mesh.link.PeerLink.call_group` gives them), or None when
        the link that way does not take groups. LookupError when there is no way."""
        neighbor = self.membership.next_hop(node)
        links = self._links.get(neighbor) if neighbor else None
        if not links:
            raise LookupError(node)
        if not links[0].batches:
            return None
        return links[0].call_group(requests, timeout, hops, passthrough=passthrough)

    def receive_request(self, link: PeerLink, msg: dict) -> None:
        rid = msg["rid"]

        def answer(rep: dict) -> None:
            link.send([{"t": "rep", "rid": rid, "rep": rep}])

        self._serve(msg, [msg["req"]], lambda reps: answer(reps[0]))

    def receive_group(self, link: PeerLink, msg: dict) -> None:
        """A ``breq``: its requests run side by side, answered by one ``brep`` (more
        where a relay passes on runs of replies as they came)."""
        rid, at = msg["rid"], msg.get("at", 0)

        def answer(reps: list[dict]) -> None:
            link.send([packed_replies(rid, at, reps) if link.raw
                       else {"t": "brep", "rid": rid, "at": at, "reps": reps}])

        relayed = self._relayed(msg)
        if relayed is None:
            self._serve(msg, msg["reqs"], answer)
            return
        self._serving += 1

        def done(reps: list) -> None:
            self._serving -= 1
            if link.raw:
                link.send(_group_replies(rid, at, reps))
            else:
                answer(unpacked(reps, msg["reqs"], link.peer))

        relayed.addErrback(_internal_errors, msg["reqs"]).addCallback(done)

    def _relayed(self, msg: dict) -> Deferred | None:
        """The replies of a group passed on whole, or None to serve it here."""
        timeout = msg["ms"] / 1000.0
        if self.relay_group is None or timeout <= 0:
            return None
        try:
            return self.relay_group(msg["reqs"], timeout, msg["hops"], msg.get("to"))
        except Exception:
            _log.failure("relaying a group failed; serving it request by request")
            return None

    def _serve(self, msg: dict, requests: list, answer: Callable[[list[dict]], None]) -> None:
        """Run forwarded ``requests`` (with ``msg``'s deadline, hops and address), then
        ``answer`` their replies in order, once all are in."""
        timeout, hops, to = msg["ms"] / 1000.0, msg["hops"], msg.get("to")
        replies: list = [None] * len(requests)
        left = len(requests)
        self._serving += 1

        def settle(rep: dict, i: int) -> None:
            nonlocal left
            replies[i] = rep
            left -= 1
            if not left:
                self._serving -= 1
                answer(replies)

        def failed(failure, request) -> dict:
            _log.failure("forwarded request failed", failure)
            return _internal_error(request)

        for i, request in enumerate(requests):
            if timeout <= 0:
                rep = error_reply(request_id(request),
                                  Timeout("the request's deadline passed on the way"))
            else:
                try:
                    rep = self.handle_request(request, timeout, hops, to)
                except Exception:
                    rep = failed(Failure(), request)
            if isinstance(rep, Deferred):
                rep.addErrback(failed, request).addCallback(settle, i)
            else:
                settle(rep, i)

    @property
    def busy(self) -> bool:
        """Whether requests are in flight through this node (in or out)."""
        return self._serving > 0 or any(
            link.pending for links in [*self._links.values(), self._parted] for link in links
        )

    def receive_reply(self, link: PeerLink, msg: dict) -> None:
        if not link.on_reply(msg["rid"], msg["rep"]):
            _log.debug("late reply {rid} from {peer}", rid=msg["rid"], peer=link.peer)

    def receive_group_reply(self, link: PeerLink, msg: dict) -> None:
        replies = msg["raw"] if "raw" in msg else msg["reps"]
        if not link.on_group_reply(msg["rid"], msg["at"], replies):
            _log.debug("late or stray group reply {rid} from {peer}", rid=msg["rid"],
                       peer=link.peer)


def _group_replies(rid: int, at: int, reps: list) -> list[dict]:
    """``brep`` messages for a peer that takes ``raw``: each
    :class:`~swarm.mesh.link.Packed` run as it came, the replies between them packed."""
    messages = []
    i = start = 0
    while i < len(reps):
        rep = reps[i]
        if isinstance(rep, Packed):
            if start < i:
                messages.append(packed_replies(rid, at + start, reps[start:i]))
            messages.append({"t": "brep", "rid": rid, "at": at + i, "raw": rep.raw})
            i = start = i + rep.count
        else:
            i += 1
    if start < len(reps):
        messages.append(packed_replies(rid, at + start, reps[start:]))
    return messages


def _internal_errors(failure: Failure, requests: list) -> list[dict]:
    _log.failure("a relayed group failed", failure)
    return [_internal_error(r) for r in requests]


def _internal_error(request: object) -> dict:
    """The reply to a forwarded request that failed here (details stay in the log)."""
    return error_reply(request_id(request), InternalError("internal error"))
