"""Anti-entropy: the owners of a partition compare digests and exchange what differs.

Replication copies each write to every reachable owner, and the rebalancer copies
entries to new owners when the view changes; what neither can see is two copies that
diverged while their owners were apart (a partition, a write acknowledged with
``--write-ack one`` whose copy was lost, a backup that missed a write while frozen).
So every ``interval`` seconds, and shortly after each change of view, each node sends
every other owner of the partitions it is primary for one ``compare`` request: a
64-bit digest per partition (the XOR of a hash of each entry's key and version,
tombstones included). The other owner answers with the partitions whose digests
differ and its entries in them; the primary keeps the newer of each and sends its own
entries of those partitions back (as ``restore``), so both end with the newer copies.

Cost per round on an idle swarm: one scan of the store on the primary, one on each
owner it asks, and per pair of owners one request carrying about 9 bytes per
partition they share (measured: 3 nodes with ``--replicas 2`` send six requests of
about 6 KB each, 37 KB per round for the whole swarm); entries move only where copies
differ. Nothing runs with ``--replicas 1``.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from swarm.cluster.placement import PARTITIONS, Placement, partition_of
from swarm.cluster.rebalance import chunks
from swarm.logs import logger
from swarm.protocol.entry import Entry
from swarm.store.interface import IStore

_log = logger(__name__)

#: Seconds between rounds. A round scans the store once on the primary and once per
#: compare on each other owner (about 3 µs per entry measured, so 1M entries cost ~3 s
#: of CPU per scan): every five minutes keeps that to about 1-3 % of a core.
INTERVAL = 300.0


def entry_hash(entry: Entry) -> int:
    """A 64-bit hash of what makes a copy this copy: key, version, deleted."""
    ms, counter, node = entry.version
    text = f"{entry.key}\0{ms}\0{counter}\0{node}\0{int(entry.deleted)}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def digests(entries: Iterable[Entry], partitions: Iterable[int]) -> dict[int, int]:
    """The digest of each of ``partitions`` (0 for one with no entries)."""
    result = dict.fromkeys(partitions, 0)
    for entry in entries:
        p = partition_of(entry.key)
        if p in result:
            result[p] ^= entry_hash(entry)
    return result


def entries_in(entries: Iterable[Entry], partitions: set[int]) -> list[Entry]:
    return [e for e in entries if partition_of(e.key) in partitions]


def compare(store: IStore, theirs: dict[int, int]) -> tuple[list[int], list[Entry]]:
    """The partitions of ``theirs`` whose digests differ from this store's, and this
    store's entries in them (the answer to a ``compare`` request)."""
    mine = digests(store.entries(), theirs)
    differ = sorted(p for p, d in theirs.items() if mine[p] != d)
    return differ, entries_in(store.entries(), set(differ)) if differ else []


class AntiEntropy:
    """Runs rounds for one node: it asks the other owners of its primary partitions."""

    def __init__(
        self,
        node_id: str,
        store: IStore,
        placement: Callable[[], Placement],
        send: Callable[[str, dict], Deferred],
        merge: Callable[[list], int],
    ) -> None:
        self.node_id = node_id
        self.store = store
        self._placement = placement
        self._send = send  # (node, request) -> Deferred[reply], never failing
        self._merge = merge  # entries in wire form -> how many were kept
        self.rounds = 0
        self.repairs = 0  # entries kept as newer, here or at the other owner
        self._running: Deferred | None = None

    def run(self) -> Deferred:
        """One round (skipped while the last one still runs); fires when it is over."""
        if self._running is not None:
            return self._running
        self._running = running = maybeDeferred(self._round)
        running.addBoth(self._over)
        return running

    def _over(self, result):
        self._running = None
        return result

    def _round(self) -> Deferred | None:
        placement = self._placement()
        if placement.replicas == 1:
            return None
        shared: dict[str, list[int]] = {}
        for p in range(PARTITIONS):
            owners = placement.owners_of_partition(p)
            if owners[0] == self.node_id:
                for other in owners[1:]:
                    shared.setdefault(other, []).append(p)
        if not shared:
            return None
        self.rounds += 1
        mine = digests(self.store.entries(), range(PARTITIONS))
        return gatherResults([
            self._compare_with(node, {p: mine[p] for p in partitions})
            for node, partitions in shared.items()
        ])

    def _compare_with(self, node: str, sums: dict[int, int]) -> Deferred:
        def answered(reply: dict) -> Deferred | None:
            differ = reply.get("differ") if reply.get("ok") else None
            if not isinstance(differ, list) or not differ:
                return None
            theirs = reply.get("entries")
            kept_here = self._merge(theirs if isinstance(theirs, list) else [])
            wanted = {p for p in differ if isinstance(p, int) and p in sums}
            ours = entries_in(self.store.entries(), wanted)
            _log.info("anti-entropy with {node}: {n} partitions differed, {kept} entries "
                      "kept here, {sent} sent", node=node, n=len(differ), kept=kept_here,
                      sent=len(ours))
            self.repairs += kept_here
            return gatherResults([
                self._send(node, {"id": 0, "op": "restore",
                                  "entries": [e.to_wire() for e in chunk]}).addCallback(
                    self._count_repairs)
                for chunk in chunks(ours)
            ])

        return self._send(node, {"id": 0, "op": "compare", "digests": sums}).addCallback(
            answered)

    def _count_repairs(self, reply: dict) -> None:
        if reply.get("ok") and isinstance(reply.get("stored"), int):
            self.repairs += reply["stored"]
