"""QueryRouter: where each validated request runs, and its reply.

Every request, from a client connection, the embedding API or a peer link, goes through
:meth:`QueryRouter.route`. Node ops (ping, stats, nodes, owner) are answered here; scan
and flush ask every node (:mod:`swarm.cluster.swarmwide`). A key
op runs on this node's store when this node is the key's primary owner in its current
view; otherwise it is forwarded one hop toward the owner, and that hop decides again
with its own view. Every forwarded request carries the time it has left and the hops
it may still take, so when two nodes briefly disagree about an owner (one has seen a
join the other has not), the request ends in ``timeout`` or ``unavailable`` instead of
bouncing forever. ``mget`` and ``mset`` are split by owner, sent in parallel, and merged.

The answer is a reply dict, or a Deferred of one when it must come from elsewhere.
Errors never escape: a :class:`SwarmError` becomes its error reply, anything else is
logged and answered as ``internal``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from swarm.cluster.commands import StoreCommands
from swarm.cluster.placement import Placement
from swarm.cluster.rebalance import chunks
from swarm.cluster.swarmwide import SwarmWide
from swarm.correlate import Correlator
from swarm.errors import (
    BadRequest,
    InternalError,
    SwarmError,
    Unavailable,
    error_from_wire,
)
from swarm.logs import logger
from swarm.mesh.link import Packed
from swarm.node.metrics import RequestMeter
from swarm.protocol.ops import OPS, Kind, Op, ops_of
from swarm.protocol.wire import RequestParser, error_reply, ok_reply, request_id, valid_id

_log = logger(__name__)

#: How long a request may take end to end, and how many hops it may travel.
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_MAX_HOPS = 32
#: For this long after a change of view, a key missing at its new owner is first
#: taken from its previous owner, in case the handoff has not brought it yet.
MIGRATION_WINDOW = 10.0
#: Earlier placements kept to derive the next one from the nearest (see placement).
RECENT_PLACEMENTS = 4
#: At most this many earlier placements are searched for a missing key.
MAX_ORIGINS = 8
#: When a write is acknowledged with --replicas above 1: once every reachable owner has
#: applied it ("all"), or once the primary has ("one").
WRITE_ACKS = ("all", "one")
#: With --replicas above 1, a read its owner has not answered for SUSPECT_AFTER seconds
#: goes to the key's next owner as well, and the first good answer wins: a frozen node
#: keeps its links until the ping timeout, seconds later. For SUSPECT_FOR seconds after
#: that, reads pass the suspect over; then one is tried again.
SUSPECT_AFTER = 0.5
SUSPECT_FOR = 2.0


class Network(Protocol):
    """What the router needs of the mesh; :class:`swarm.mesh.overlay.Overlay` is one.

    ``membership`` gives ``reachable`` and ``owners`` (sets of node ids) and
    ``report()`` (the ``nodes`` op's list); ``conflict`` is why the swarm refuses this
    node's id, or None."""

    clock: Any
    membership: Any
    conflict: str | None

    def forward(self, node: str, request: dict, timeout: float, hops: int,
                addressed: bool = False) -> Deferred:
        """Send ``request`` one hop toward ``node``; LookupError when unreachable."""


class QueryRouter:
    def __init__(
        self,
        node_id: str,
        commands: StoreCommands,
        node_stats: Callable[[], dict],
        overlay: Network,
        replicas: int = 1,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_hops: int = DEFAULT_MAX_HOPS,
        write_ack: str = "all",
    ) -> None:
        if write_ack not in WRITE_ACKS:
            raise ValueError(f"write_ack is one of {', '.join(WRITE_ACKS)}, not {write_ack!r}")
        self.write_ack = write_ack
        #: Requests routed again after the way to their owner was lost on them.
        self.retried = 0
        #: Reads also sent to a next owner because their owner was slow to answer.
        self.hedged = 0
        #: Set by the node from a change of view until its copies have been compared
        #: with the other owners' (a refill): meanwhile this node looks for the keys it
        #: owns where they were before (see _still_elsewhere) and serves no reads as a
        #: backup.
        self.filling = False
        self._suspects: dict[str, float] = {}  # node -> until when reads pass it over
        self._hedge_timers = Correlator(overlay.clock)
        self.node_id = node_id
        self.commands = commands
        self.overlay = overlay
        #: Client requests by op and outcome, and their latency (GET /metrics).
        self.meter = RequestMeter(self)
        self.replicas = replicas
        self.request_timeout = request_timeout
        self.max_hops = max_hops
        self._node_stats = node_stats
        self._peer_parser = RequestParser(internal=True)
        self._placement = Placement([node_id], replicas)
        #: The owners of a view the placement does not show yet (see view_changed).
        self._owners: frozenset[str] | None = None
        #: The placements before it: a link that heals, a node that comes back, a
        #: partition that merges bring a view back that one of them places already.
        self._recent: deque[Placement] = deque(maxlen=RECENT_PLACEMENTS)
        # Where keys may still be for a while after a change of view (see view_changed):
        # the placement of each such view, once it was needed.
        self._origins: dict[frozenset[str], Placement | None] = {}
        self._last_view: frozenset[str] = frozenset([node_id])
        self._migrating_until = 0.0
        self.swarm_wide = SwarmWide(node_id, commands,
                                    lambda: self.overlay.membership.reachable, self.send_to)
        self._node_ops: dict[str, Callable[[dict], dict | Deferred]] = {
            op.name: getattr(self, "handle_" + op.name) for op in ops_of(Kind.NODE)
        }

    def view_changed(self) -> None:
        """Note the nodes this node can reach now; key placement follows on first use.

        A flood of announcements changes the view many times within a few
        milliseconds, and only the last view matters: the placement (and those of the
        origins below) is derived when something first asks for it, from the last one
        derived, so a burst costs one derivation, not one each.

        Until the handoffs have run, a key this node now owns may still sit where it
        was written: with its owner in a view this node had a moment ago (a join
        elsewhere, a node leaving), or with its owner among nodes that have just become
        reachable (this node joined them, or a partition healed: they placed keys among
        themselves). For MIGRATION_WINDOW after the last change, :meth:`_still_elsewhere`
        looks for missing keys with their owners in each of those placements.
        """
        membership = self.overlay.membership
        reachable = membership.reachable
        self._owners = membership.owners or frozenset([self.node_id])
        now = self.overlay.clock.seconds()
        if now > self._migrating_until and not self.filling:
            self._origins = {}
        for nodes in (self._last_view, reachable - self._last_view):
            if nodes - {self.node_id} and nodes not in self._origins:
                self._origins[nodes] = None
        while len(self._origins) > MAX_ORIGINS:  # oldest first
            del self._origins[next(iter(self._origins))]
        self._last_view = reachable
        self._migrating_until = now + MIGRATION_WINDOW
        self._suspects = {n: t for n, t in self._suspects.items() if n in reachable}

    @property
    def placement(self) -> Placement:
        """Key placement over the owners of the latest view."""
        if self._owners is not None:
            before = self._placement
            self._placement = self._placement_of(self._owners, [before, *self._recent])
            self._owners = None
            if self._placement is not before:
                self._recent.append(before)
        return self._placement

    @placement.setter
    def placement(self, placement: Placement) -> None:
        self._placement, self._owners = placement, None

    def _origin_placements(self) -> list[Placement]:
        """The placement of each view in :attr:`_origins`, derived where still missing."""
        origins = self._origins
        for nodes, placement in origins.items():
            if placement is None:
                known = [self.placement, *self._recent, *filter(None, origins.values())]
                origins[nodes] = self._placement_of(nodes, known)
        return list(origins.values())

    def _placement_of(self, nodes: frozenset[str], known: list[Placement]) -> Placement:
        """``Placement(nodes, self.replicas)``, derived from the nearest ``known`` one: a
        view change then costs about what changed, not a whole table."""
        bases = [p for p in known if p.replicas == self.replicas]
        if not bases:
            return Placement(nodes, self.replicas)
        return min(bases, key=lambda p: len(p.nodes ^ nodes)).with_nodes(nodes)

    # -- entry points -----------------------------------------------------------------

    def handle(self, request: dict) -> dict | Deferred:
        """A request that starts here (a client or the embedding API).

        While the swarm refuses this node's id (another live node has it), key ops are
        answered ``unavailable``: acknowledging writes that no other node will ever
        see would be worse than saying no."""
        started = self.meter.clock.seconds()
        conflict = self.overlay.conflict
        kind = OPS[request["op"]].kind
        if conflict is not None and kind is not Kind.NODE:
            reply = error_reply(request["id"], Unavailable(
                f"this node does not serve keys while its id is refused: {conflict}"))
        else:
            if kind is Kind.WRITE:  # its age, whenever and wherever it runs
                request["at"] = self.commands.store.hlc.now()
            reply = self.route(request, self.request_timeout, self.max_hops)
        return self.meter.record(request["op"], reply, started, request.get("key"))

    def route_forwarded(
        self, raw: Any, timeout: float, hops: int, to: str | None = None
    ) -> dict | Deferred:
        """A request a neighbor forwarded: validated again, then routed on; or, when
        this node is a relay on the way to the key's primary, sent on as it came (the
        primary validates it: checking it at every hop would cost each relay as much
        as running it)."""
        relay = self._relayed_key_op(raw, to)
        if relay is not None:
            op, owner = relay
            return _answering(raw, self._forward_key_op, op, owner, raw, timeout, hops,
                              self.route_forwarded)
        try:
            request = self._peer_parser.parse(raw)
        except SwarmError as e:
            return error_reply(request_id(raw), e)
        return self.route(request, timeout, hops, to)

    def handle_all(self, requests: list[dict]) -> tuple[list, list[Deferred]]:
        """:meth:`handle` for each request of a client's batch, in order, with the
        single-key reads and writes bound for primaries behind one neighbor sent on
        as one group (one Deferred and one deadline for the group, as
        :meth:`relay_group` passes it on). Returns the replies, where those still
        to come are None, and the Deferreds that fill them in as they fire.

        Reads that may be hedged (``replicas`` > 1) go one by one, as do requests
        while this node's id is refused: :meth:`handle` answers those."""
        replies: list = [None] * len(requests)
        waiting: list[Deferred] = []

        def fill(indexes: list[int], results: list[dict]) -> None:
            for i, reply in zip(indexes, results):
                replies[i] = reply

        def settle(i: int, reply: dict | Deferred) -> None:
            if isinstance(reply, Deferred):
                waiting.append(reply.addCallback(lambda r: fill([i], [r])))
            else:
                replies[i] = reply

        #: next hop -> [(index, op, primary)] of the requests that go there as a group
        groups: dict[str, list[tuple[int, Op, str]]] = {}
        timeout, hops = self.request_timeout, self.max_hops
        meter, started = self.meter, self.meter.clock.seconds()
        membership = self.overlay.membership
        grouping = self.overlay.conflict is None and hops > 0
        for i, request in enumerate(requests):
            via = None
            op = _RELAYED.get(request["op"]) if grouping else None
            if op is not None and not (op.kind is Kind.READ and self.replicas > 1):
                owners = self.placement.owners(request["key"])
                if owners[0] != self.node_id and self._runner(op, owners) == owners[0]:
                    via = membership.next_hop(owners[0])
            if via is None:
                settle(i, self.handle(request))
                continue
            if op.kind is Kind.WRITE:
                request["at"] = self.commands.store.hlc.now()
            groups.setdefault(via, []).append((i, op, owners[0]))
        for via, members in groups.items():
            indexes = [i for i, _, _ in members]
            group = [requests[i] for i in indexes]
            sent = self._send_group([(op, owner) for _, op, owner in members], group, via,
                                    timeout, hops, self.route)
            if sent is not None:
                sent.addCallback(meter.record_group, [r["op"] for r in group], started,
                                 [owner for _, _, owner in members])
                waiting.append(sent.addCallback(lambda results, ix=indexes: fill(ix, results)))
            else:  # that neighbor takes no groups
                for i in indexes:
                    op_name, key = requests[i]["op"], requests[i]["key"]
                    settle(i, meter.record(op_name, self.route(requests[i], timeout, hops),
                                           started, key))
        return replies, waiting

    def relay_group(self, raws: list, timeout: float, hops: int,
                    to: str | None = None) -> Deferred | None:
        """A forwarded group passed on whole, as one group with one Deferred, when
        every request in it is one :meth:`route_forwarded` would send on as it came
        and all go the same way; None otherwise (it is served request by request).

        A relay so costs a group a decode, a routing check per request and an
        encode, instead of a Deferred, a reroute and a reply per request. Reads are
        not hedged here: the node where the request entered hedges them."""
        if to is not None or hops <= 0 or not raws:
            return None
        membership = self.overlay.membership
        relays = []
        via = None
        for raw in raws:
            relay = self._relayed_key_op(raw, None)
            if relay is None:
                return None
            hop = membership.next_hop(relay[1])
            if hop is None or (via is not None and hop != via):
                return None
            via = hop
            relays.append(relay)
        return self._send_group(relays, raws, via, timeout, hops, self.route_forwarded,
                                passthrough=True)

    def _send_group(self, relays: list[tuple[Op, str]], requests: list, via: str,
                    timeout: float, hops: int, again: Callable[..., dict | Deferred],
                    passthrough: bool = False) -> Deferred | None:
        """Send ``requests`` (with their ops and primaries) toward ``via`` as one
        group; a Deferred of their replies, or None when ``via`` takes no groups.
        Requests that come back ``unavailable`` after the view changed are routed
        anew by ``again``, as :meth:`_rerouted_when_lost` does for one. With
        ``passthrough`` (a relay), replies may come packed as the next hop sent
        them (:meth:`~swarm.mesh.link.PeerLink.call_group`): those are from the
        nodes that ran the requests, and so not lost on this node's way."""
        try:
            d = self.overlay.forward_group(relays[0][1], requests, timeout, hops - 1,
                                           passthrough)
        except LookupError:
            return None
        if d is None:
            return None
        membership = self.overlay.membership
        clock, placement, sent = self.overlay.clock, self.placement, self.overlay.clock.seconds()

        def rerouted(replies: list[dict]) -> list[dict] | Deferred:
            left = timeout - (clock.seconds() - sent)
            if left <= 0 or (self.placement is placement and all(
                    membership.next_hop(owner) == via for _, owner in relays)):
                return replies
            redo = [i for i, reply in enumerate(replies)
                    if _lost(reply) and relays[i][0].resend(requests[i])]
            self.retried += len(redo)
            retried = [_deferred(again(requests[i], left, hops)) for i in redo]

            def merged(results: list[dict]) -> list[dict]:
                for i, reply in zip(redo, results):
                    replies[i] = reply
                return replies

            return gatherResults(retried).addCallback(merged)

        def lost(replies: list[dict]) -> list[dict] | Deferred:
            if not any(_lost(reply) for reply in replies):
                return replies
            # the view changes in the turn that fails the link's requests: look after it
            return deferLater(clock, 0, lambda: None).addCallback(lambda _: rerouted(replies))

        return d.addCallback(lost)

    def _relayed_key_op(self, raw: Any, to: str | None) -> tuple[Op, str] | None:
        """The op and the primary of a forwarded single-key read or write that runs
        elsewhere, checked only as far as routing needs; None for anything else."""
        if to is not None or not isinstance(raw, dict) or not valid_id(raw.get("id", _NO_ID)):
            return None
        name, key = raw.get("op"), raw.get("key")
        op = _RELAYED.get(name) if isinstance(name, str) else None
        if op is None or not isinstance(key, str) or not key:
            return None
        owners = self.placement.owners(key)
        owner = self._runner(op, owners)
        if owner == self.node_id or owner != owners[0]:
            return None
        return op, owner

    def route(
        self, request: dict, timeout: float, hops: int, to: str | None = None
    ) -> dict | Deferred:
        """Run ``request`` here or send it on; ``to`` names the node that must run it."""
        return _answering(request, self._route, request, timeout, hops, to)

    def _route(self, request: dict, timeout: float, hops: int, to: str | None) -> dict | Deferred:
        op = OPS[request["op"]]
        if to is not None and to != self.node_id:  # addressed: run there
            return self._forward(to, request, timeout, hops, addressed=True)
        if op.kind is Kind.NODE:
            return self._node_op(op, request)
        if to is not None:  # addressed here, whoever owns the key
            if op.kind is Kind.READ and self.filling:  # a read sent here as a backup
                raise Unavailable(f"{self.node_id} is still being filled by its partners")
            return self._run_local(request)
        if op.kind is Kind.INTERNAL:
            raise BadRequest(f"{op.name} must be addressed to a node")
        if op.multi_key:
            return self._fan_out(op, request, timeout, hops)
        owners = self.placement.owners(request["key"])
        return self._run_part(op, self._runner(op, owners), owners[0], request, timeout, hops)

    def _runner(self, op: Op, owners: tuple[str, ...]) -> str:
        """Where an op on a key with these ``owners`` runs: its primary, or for a read
        while the primary is suspect, the first other owner that is not (and not
        filling, if it is this node)."""
        if op.kind is not Kind.READ or not self._suspects or owners[0] not in self._suspects:
            return owners[0]
        now = self.overlay.clock.seconds()
        for node in owners:
            until = self._suspects.get(node)
            if until is not None and until <= now:
                del self._suspects[node]  # tried again from now on
                until = None
            if until is None and not (node == self.node_id and self.filling):
                return node
        return owners[0]

    def _run_part(self, op: Op, node: str, primary: str, request: dict, timeout: float,
                  hops: int) -> dict | Deferred:
        """Run a request on keys that ``node`` answers for (see _runner) and whose
        primary is ``primary``."""
        if node != primary:  # a backup standing in for a suspect primary
            if node == self.node_id:
                return self._run_local(request)
            return self._forward(node, request, timeout, hops, addressed=True)
        if node == self.node_id:
            return self._execute_owned(op, request)
        return self._forward_key_op(op, node, request, timeout, hops)

    def _forward_key_op(
        self, op: Op, owner: str, request: dict, timeout: float, hops: int,
        again: Callable[..., dict | Deferred] | None = None,
    ) -> Deferred:
        """Forward a key op toward ``owner``; when the way there is lost while the
        request is on it (the owner or a relay died, and the view changed since), a
        read, or a write whose outcome does not depend on what is stored, is routed
        again in the time it has left: to the next owner, which holds a copy with
        replicas, or around the dead relay. The write keeps the version it was stamped
        with where it entered, so if the first attempt runs too (the node was frozen,
        not dead), both are the same write, and neither overtakes a later one. Other
        writes (``incr``, ``set`` with ``nx``/``xx``) are not sent again: run twice,
        they could count twice or answer wrong. ``again`` routes it anew
        (:meth:`route`, or :meth:`route_forwarded` for a request not validated here)."""
        again = again or self.route
        d = self._forward(owner, request, timeout, hops)
        if not op.resend(request):
            return d
        d = self._rerouted_when_lost(owner, request, timeout, hops, d, again)
        if op.kind is Kind.READ and self.replicas > 1 and timeout > SUSPECT_AFTER:
            d = self._hedged(owner, request, timeout, hops, d, again)
        return d

    def _rerouted_when_lost(self, owner: str, request: dict, timeout: float, hops: int,
                            d: Deferred, route: Callable[..., dict | Deferred]) -> Deferred:
        clock, membership = self.overlay.clock, self.overlay.membership
        sent, placement, via = clock.seconds(), self.placement, membership.next_hop(owner)

        def again(reply: dict) -> dict | Deferred:
            left = timeout - (clock.seconds() - sent)
            if left <= 0 or (self.placement is placement and membership.next_hop(owner) == via):
                return reply  # the same way again would meet the same end
            self.retried += 1
            return route(request, left, hops)

        def lost(reply: dict) -> dict | Deferred:
            if not _lost(reply):
                return reply
            # the view changes in the turn that fails the link's requests: look after it
            return deferLater(clock, 0, lambda: None).addCallback(lambda _: again(reply))

        return d.addCallback(lost)

    def _hedged(self, owner: str, request: dict, timeout: float, hops: int,
                d: Deferred, route: Callable[..., dict | Deferred]) -> Deferred:
        """``d``'s reply, unless ``owner`` gives none in SUSPECT_AFTER: then the read
        goes to the next owner too (``owner`` is suspect), and the first good reply
        wins (an error only once neither can give a good one)."""
        clock = self.overlay.clock
        tag, timer = self._hedge_timers.expect(SUSPECT_AFTER)
        result: Deferred = Deferred()
        pending = [d]

        def settle(reply: dict, attempt: Deferred) -> None:
            pending.remove(attempt)
            if result.called:
                return
            if reply.get("ok") or not pending:
                result.callback(reply)

        def answered(reply: dict) -> None:
            self._hedge_timers.resolve(tag, None)
            self._suspects.pop(owner, None)
            settle(reply, d)

        def slow(failure) -> None:
            failure.trap(DeferredTimeout)
            if result.called:
                return
            self._suspects[owner] = clock.seconds() + SUSPECT_FOR
            self.hedged += 1
            _log.info("no answer from {node} in {after} s: it is suspect, reads go to "
                      "the next owner", node=owner, after=SUSPECT_AFTER)
            other = _deferred(route(request, timeout - SUSPECT_AFTER, hops))
            pending.append(other)
            other.addCallback(settle, other)

        d.addCallback(answered)
        timer.addErrback(slow)
        return result

    def _forward(
        self, node: str, request: dict, timeout: float, hops: int, addressed: bool = False
    ) -> Deferred:
        if hops <= 0:
            raise Unavailable(f"hop limit reached on the way to {node}")
        try:
            return self.overlay.forward(node, request, timeout, hops - 1, addressed)
        except LookupError:
            raise Unavailable(f"no route to node {node}") from None

    def send_to(self, node: str, request: dict) -> Deferred:
        """Run ``request`` on ``node`` itself, whatever the key's owner (handoffs)."""
        try:
            return self._forward(node, request, self.request_timeout, self.max_hops,
                                 addressed=True)
        except SwarmError as e:
            return succeed(error_reply(request["id"], e))

    # -- multi-key ops ----------------------------------------------------------------

    def _fan_out(self, op: Op, request: dict, timeout: float, hops: int) -> dict | Deferred:
        """Split by owner, run the parts (here or forwarded), merge their results."""
        rid = request["id"]
        owners_of = self.placement.owners
        groups: dict[tuple[str, str], list[str]] = {}  # (runner, primary) -> keys
        for key in op.keys(request):
            owners = owners_of(key)
            groups.setdefault((self._runner(op, owners), owners[0]), []).append(key)
        replies = [self._run_part(op, node, primary, op.part(request, keys), timeout, hops)
                   for (node, primary), keys in groups.items()]

        def merge(replies: list[dict]) -> dict:
            for reply in replies:
                if not reply.get("ok"):
                    return error_reply(rid, error_from_wire(reply.get("error")))
            return ok_reply(rid, op.merge(replies))

        if any(isinstance(r, Deferred) for r in replies):
            return gatherResults(list(map(_deferred, replies))).addCallback(merge)
        return merge(replies)

    # -- migration --------------------------------------------------------------------

    def _execute_owned(self, op: Op, request: dict) -> dict | Deferred:
        """Run a request on keys this node owns, first taking any of them that a
        previous owner may still hold (a blind write, such as a plain ``set``, needs
        nothing old: its new version outranks any copy)."""
        by_owner = {} if op.blind(request) else self._still_elsewhere(op.keys(request))
        if not by_owner:
            return self._replicated(op, request, self._run_local(request))
        takes = [
            self.send_to(prev, {"id": 0, "op": "take", "keys": ks})
            for prev, ks in by_owner.items()
        ]

        def store_then_run(replies: list[dict]) -> dict | Deferred:
            for reply in replies:
                if reply.get("ok") and isinstance(reply.get("entries"), list):
                    self.commands.merge(reply["entries"])
            return self._replicated(op, request, self._run_local(request))

        return gatherResults(takes).addCallback(store_then_run)

    # -- replication ------------------------------------------------------------------

    def holds_copy(self, key: str) -> bool:
        """Whether this node is one of several owners of ``key`` (a take then copies)."""
        return self.replicas > 1 and self.node_id in self.placement.owners(key)

    def _replicated(self, op: Op, request: dict, reply: dict) -> dict | Deferred:
        """After a write ran here, as the primary: its entries go to the other owners
        (as ``restore``, so each keeps the newer version). With ``write_ack`` "all" the
        reply waits until every reachable owner has applied them; with "one" it goes at
        once. An owner that cannot be reached is left to the rebalancer."""
        if op.kind is not Kind.WRITE or self.replicas == 1 or not reply.get("ok"):
            return reply
        by_backup: dict[str, list] = {}
        for entry in self.commands.store.read(op.keys(request)):
            for node in self.placement.owners(entry.key)[1:]:
                by_backup.setdefault(node, []).append(entry)
        copies = [
            self.send_to(node, {"id": 0, "op": "restore", "entries": [e.to_wire() for e in chunk]})
            for node, entries in by_backup.items()
            for chunk in chunks(entries)
        ]
        if not copies or self.write_ack == "one":
            return reply
        return gatherResults(copies).addCallback(lambda _: reply)

    def _run_local(self, request: dict) -> dict:
        """Run ``request`` on this node's store: its ok or error reply."""
        return _answering(request, lambda: ok_reply(request["id"], self.commands.execute(request)))

    def _still_elsewhere(self, keys) -> dict[str, list[str]]:
        """The keys by the reachable nodes that may still hold a copy of them.

        Present keys too: the copy here may be older than one written elsewhere while
        this node was cut off or frozen; the newer of the two is kept."""
        if not self._origins or (
            self.overlay.clock.seconds() > self._migrating_until and not self.filling
        ):
            return {}
        reachable = self.overlay.membership.reachable
        origins = self._origin_placements()
        found: dict[str, list[str]] = {}
        for key in keys:
            for holder in {origin.primary(key) for origin in origins}:
                if holder != self.node_id and holder in reachable:
                    found.setdefault(holder, []).append(key)
        return found

    # -- node ops ---------------------------------------------------------------------

    def _node_op(self, op: Op, request: dict) -> dict | Deferred:
        result = self._node_ops[op.name](request)
        if not isinstance(result, Deferred):
            return ok_reply(request["id"], result)
        return result.addCallbacks(lambda r: ok_reply(request["id"], r),
                                   lambda f: _failed(request, f))

    def handle_ping(self, request: dict) -> dict:
        return {"node": self.node_id}

    def handle_stats(self, request: dict) -> dict | Deferred:
        node = request.get("node", self.node_id)
        if node == self.node_id:
            return {"stats": self._node_stats()}
        return self.send_to(node, {"id": request["id"], "op": "stats"}).addCallback(
            lambda reply: {"stats": _results_of(reply)["stats"]})

    def handle_scan(self, request: dict) -> Deferred:
        return self.swarm_wide.scan(request)

    def handle_flush(self, request: dict) -> Deferred:
        return self.swarm_wide.flush()

    def handle_nodes(self, request: dict) -> dict:
        return {"self": self.node_id, "nodes": self.overlay.membership.report()}

    def handle_owner(self, request: dict) -> dict:
        return {"nodes": list(self.placement.owners(request["key"]))}


#: Ops a relay sends on without validating them (see route_forwarded).
_RELAYED = {op.name: op for op in OPS.values()
            if op.kind in (Kind.READ, Kind.WRITE) and not op.multi_key}
_NO_ID = object()


def _lost(reply: dict | Packed) -> bool:
    """Whether a reply says its request met no node (it may be worth another way);
    never for replies passed on packed (:class:`~swarm.mesh.link.Packed`)."""
    return (isinstance(reply, dict) and not reply.get("ok")
            and (reply.get("error") or {}).get("code") == "unavailable")


def _deferred(result: dict | Deferred) -> Deferred:
    return result if isinstance(result, Deferred) else succeed(result)


def _results_of(reply: dict) -> dict:
    """A reply's results; its error raised."""
    if reply.get("ok"):
        return reply
    raise error_from_wire(reply.get("error"))


def _failed(request: dict, failure: Failure) -> dict:
    """:func:`_answering` for an op whose answer failed later (a Deferred)."""
    if failure.check(SwarmError):
        return error_reply(request["id"], failure.value)
    _log.failure("internal error handling {op}", failure, op=request["op"])
    return error_reply(request["id"], InternalError("internal error"))


def _answering(request: dict, run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)``, with what it raises turned into ``request``'s error reply: the
    one place where the router's errors become wire replies. An error that is not a
    SwarmError is logged with its traceback and answered ``internal`` (the details
    stay in the log)."""
    try:
        return run(*args)
    except SwarmError as e:
        return error_reply(request["id"], e)
    except Exception:
        _log.failure("internal error handling {op}", op=request["op"])
        return error_reply(request["id"], InternalError("internal error"))
