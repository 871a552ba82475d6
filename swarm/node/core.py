"""NodeCore: everything a node is but its sockets.

The store, the overlay (peer links and membership), the query router and the rebalancer,
wired together on an injected clock. :class:`~swarm.node.node.SwarmNode` adds listeners,
dialers and timers around one; the in-memory simulator (:mod:`swarm.simulator`) joins
many with in-memory links on one ``task.Clock``. Time comes from three sources, each
injected: ``clock`` schedules timers, ``monotonic`` counts TTLs down (so a wall-clock
step changes no TTL) and ``wall`` feeds the hybrid logical clock that versions writes.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater

from swarm.cluster.antientropy import INTERVAL as ANTI_ENTROPY_INTERVAL
from swarm.cluster.antientropy import AntiEntropy, fingerprint
from swarm.cluster.commands import StoreCommands
from swarm.cluster.placement import partition_of
from swarm.cluster.rebalance import Rebalancer
from swarm.cluster.router import QueryRouter
from swarm.errors import SwarmError, error_from_wire
from swarm.logs import logger
from swarm.mesh.overlay import Overlay
from swarm.node.config import NodeConfig
from swarm.protocol.entry import HybridClock
from swarm.protocol.wire import RequestParser
from swarm.store.interface import IStore
from swarm.store.memory import MemoryStore

_log = logger(__name__)

#: How long a stopping node may spend handing its entries to their next owners, and
#: then waiting for its peers to answer its bye and for the requests it serves to finish.
HANDOFF_GRACE = 5.0
#: After a change of view, a refill (an anti-entropy round over every partition this
#: node owns) starts this much later, and not before this node's handoffs are over.
AFTER_CHANGE = 2.0


class MonotonicClock:
    """``seconds()`` that never jumps with the wall clock: what TTLs count down on."""

    seconds = staticmethod(time.monotonic)


class NodeCore:
    def __init__(
        self,
        config: NodeConfig,
        clock,
        wall: Callable[[], float] = time.time,
        monotonic=None,
        store: IStore | None = None,
        extra_stats: Callable[[], dict] = dict,
    ) -> None:
        """``extra_stats`` adds the embedder's figures (connections, uptime...) to
        ``stats``."""
        self.config = config
        self.node_id = config.node_id
        self.clock = clock
        self.store = store if store is not None else MemoryStore(
            monotonic if monotonic is not None else MonotonicClock(),
            max_memory=config.max_memory,
            max_value_bytes=config.max_value_size,
            hlc=HybridClock(config.node_id, wall),
            partition=partition_of, fingerprint=fingerprint,
        )
        self.parser = RequestParser(config.limits)
        self.overlay = Overlay(
            config.node_id, config.swarm, int(wall() * 1000), clock,
            on_view_change=self._view_changed,
            handle_request=lambda *request: self.router.route_forwarded(*request),
            relay_group=lambda *group: self.router.relay_group(*group),
            secret=config.peer_secret, handshake_timeout=config.handshake_timeout,
        )
        commands = StoreCommands(self.store, config.default_ttl,
                                 keeps=lambda key: self.router.holds_copy(key),
                                 handing=lambda p: self.rebalancer.handing(p))
        self.router = QueryRouter(
            config.node_id, commands, self.stats, self.overlay, replicas=config.replicas,
            request_timeout=config.request_timeout, write_ack=config.write_ack,
        )
        self.rebalancer = Rebalancer(
            config.node_id, self.store, lambda: self.router.placement,
            self.router.send_to, clock,
            owners=lambda: self.overlay.membership.owners or frozenset([self.node_id]),
        )
        self.anti_entropy = AntiEntropy(
            config.node_id, self.store, lambda: self.router.placement,
            self.router.send_to, commands.merge, clock,
        )
        self._rounds = LoopingCall(self._anti_entropy)
        self._rounds.clock = clock
        self._after_change = None
        self._changes = 0  # views seen: a refill is good only for the latest
        self._extra_stats = extra_stats

    def _view_changed(self) -> None:
        self.router.view_changed()
        membership = self.overlay.membership
        _log.info(
            "view of {node}: nodes reachable {count}, holding keys {owners}",
            node=self.node_id, count=len(membership.reachable),
            owners=len(membership.owners),
        )
        self.rebalancer.schedule()
        if self._rounds.running and self.config.replicas > 1:
            # Refill once the handoffs have settled; until then keys are looked for
            # where they were (the router's migration window stays open).
            self._changes += 1
            self.router.filling = True
            if self._after_change is not None and self._after_change.active():
                self._after_change.cancel()
            self._after_change = self.clock.callLater(AFTER_CHANGE, self._refill)

    def _anti_entropy(self) -> None:
        self.anti_entropy.run().addErrback(
            lambda f: _log.failure("anti-entropy round failed", f))

    def _refill(self) -> None:
        """Once this node's handoffs are over, compare every partition it owns with its
        other owners, which leave out what their own handoffs still bring (so nothing
        moves twice); filled once that is done, unless the view changed meanwhile
        (another refill follows)."""
        changes, started = self._changes, self.clock.seconds()

        def compare(_):
            if changes == self._changes:  # else a newer refill is due
                return self.anti_entropy.run(everything=True)

        def filled(result):
            if changes == self._changes:
                self.router.filling = False
                _log.info("{node} filled by its partners in {s:.2f} s",
                          node=self.node_id, s=self.clock.seconds() - started)
            return result

        self.rebalancer.idle().addCallback(compare).addBoth(filled).addErrback(
            lambda f: _log.failure("refill failed", f))

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Own keys (again, after a stop) and compare copies every INTERVAL seconds."""
        self.overlay.leave(False)
        if not self._rounds.running:
            self._rounds.start(ANTI_ENTROPY_INTERVAL, now=False)

    def stop(self) -> None:
        """No more anti-entropy rounds (after :meth:`leave`, or at a crash)."""
        if self._rounds.running:
            self._rounds.stop()
        if self._after_change is not None and self._after_change.active():
            self._after_change.cancel()

    def leave(self) -> Deferred:
        """Leave placement everywhere, hand every entry to its next owner, then close
        the links in two phases: say bye on each, and wait until every peer has
        answered (no request can arrive after that) and every request this node
        serves is answered (all within HANDOFF_GRACE). The links stay open: the caller
        closes them afterwards."""
        # The announcement travels ahead of the handoff on every path, so new writes
        # already go to the next owners while the entries are on their way.
        self.overlay.leave()
        self.rebalancer.stop()
        others = self.overlay.membership.owners - {self.node_id}
        if others:
            handoff = self.rebalancer.run(self.router.placement.with_nodes(others))
            handoff.addTimeout(HANDOFF_GRACE, self.clock)
            handoff.addErrback(
                lambda f: _log.warn("handoff incomplete: {e}", e=f.getErrorMessage())
            )
        else:
            handoff = succeed(None)
        return handoff.addCallback(
            lambda _: Deferred.fromCoroutine(self._drain(self.clock.seconds() + HANDOFF_GRACE))
        )

    async def _drain(self, deadline: float) -> None:
        """Part from every peer, then wait for quiet: the peers' byes answered, and
        nothing in flight through this node."""
        overlay = self.overlay
        overlay.part()
        while not overlay.parted or overlay.busy:
            if self.clock.seconds() >= deadline:
                _log.warn(
                    "closing {node}'s links before they were quiet: {unanswered} peers "
                    "did not answer bye; requests in flight: {busy}",
                    node=self.node_id, unanswered=len(overlay.neighbors), busy=overlay.busy,
                )
                return
            await deferLater(self.clock, 0.01, lambda: None)

    # -- requests ---------------------------------------------------------------------

    def request(self, op: str, **args: Any) -> Deferred:
        """Run one op in-process, validated and routed as if it came from a client;
        fires with the success reply or fails with the SwarmError."""
        try:
            req = self.parser.parse({"id": 0, "op": op, **args})
        except SwarmError as e:
            return fail(e)
        return maybeDeferred(self.router.handle, req).addCallback(_results)

    def stats(self) -> dict:
        stats: dict[str, Any] = {"node": self.node_id}
        stats.update(self.store.stats())
        stats["peers"] = len(self.overlay.neighbors)
        stats["peer_links"] = self.overlay.link_count()  # spares included
        stats["swarm_nodes"] = len(self.overlay.membership.reachable)
        stats.update(self._copies(stats["keys"]))
        stats["retried"] = self.router.retried
        stats["hedged"] = self.router.hedged
        stats["anti_entropy_rounds"] = self.anti_entropy.rounds
        stats["repairs"] = self.anti_entropy.repairs
        stats["requests"] = self.router.meter.total  # client requests answered
        stats.update(self._extra_stats())
        return stats


    def _copies(self, keys: int) -> dict[str, int]:
        """The live entries held as the primary of their partition, as one of its
        other owners, and as neither (on their way to their owners after a change)."""
        placement, me = self.router.placement, self.node_id
        primary = replica = 0
        for p, count in self.store.partition_counts().items():
            owners = placement.owners_of_partition(p)
            if owners[0] == me:
                primary += count
            elif me in owners:
                replica += count
        return {"primary_copies": primary, "replica_copies": replica,
                "other_copies": keys - primary - replica}


def _results(reply: dict) -> dict:
    if reply["ok"]:
        return reply
    raise error_from_wire(reply["error"])
