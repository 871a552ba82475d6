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

The node's store keeps each partition's digest up to date on every change
(:class:`~swarm.store.interface.IPartitionDigests`), so a round costs a lookup per
partition on the primary and on each owner it asks, plus the entries of the partitions
that differ; an answer carries at most COMPARE_ENTRIES entries and COMPARE_BYTES of
values and names the rest to ask for again, so serving one blocks a node's reactor for
milliseconds however large its store. (A store without digests is scanned, as before
issue 11: about 3 µs per entry.) On the wire, per pair of owners, one request of about
9 bytes per partition they share (3 nodes with ``--replicas 2``: six requests of about
6 KB, 37 KB per round for the whole swarm; ``python -m swarm.bench_failover``); entries
move only where copies differ. Nothing runs with ``--replicas 1``.

After a change of view, a refill waits for this node's handoffs, and an owner that is
asked about partitions its own handoff is still bringing answers them as ``pending``
(asked again every PENDING_PAUSE seconds) rather than with their entries: the handoff
moves each copy once. Peers from before issue 11 ignore ``pending`` and take those
partitions as equal, which the handoff makes them.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, NamedTuple

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater

from swarm.cluster.placement import PARTITIONS, Placement, partition_of
from swarm.cluster.rebalance import chunks
from swarm.logs import logger
from swarm.protocol.entry import Entry, Version
from swarm.store.interface import IPartitionDigests, IStore
from swarm.store.memory import measure

_log = logger(__name__)

#: A compare answer carries the entries of as many differing partitions as fit in
#: about this many entries and bytes of values (at least one partition's), and names
#: the rest to ask again: one answer is a bounded frame and a bounded reactor turn.
COMPARE_ENTRIES = 2048
COMPARE_BYTES = 1024 * 1024
#: Seconds between rounds. With digests kept by the store a round between equal
#: owners costs milliseconds; a store without them is scanned once on the primary and
#: once per compare on each other owner (~3 s of CPU per 1M entries), which every
#: five minutes keeps to about 1-3 % of a core.
INTERVAL = 300.0
#: How often partitions that the other owner is still handing over are asked about.
PENDING_PAUSE = 0.5


def fingerprint(key: str, version: Version, deleted: bool) -> int:
    """A 64-bit hash of what makes a copy this copy: key, version, deleted (what a
    store keeping digests per partition is given: see IPartitionDigests)."""
    ms, counter, node = version
    text = f"{key}\0{ms}\0{counter}\0{node}\0{int(deleted)}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def entry_hash(entry: Entry) -> int:
    return fingerprint(entry.key, entry.version, entry.deleted)


def digests(entries: Iterable[Entry], partitions: Iterable[int]) -> dict[int, int]:
    """The digest of each of ``partitions`` (0 for one with no entries)."""
    result = dict.fromkeys(partitions, 0)
    for entry in entries:
        p = partition_of(entry.key)
        if p in result:
            result[p] ^= entry_hash(entry)
    return result


def digests_of(store: IStore, partitions: Iterable[int]) -> dict[int, int]:
    """:func:`digests` of ``store``: kept up to date by a store that can, else
    worked out by a scan of every entry."""
    if IPartitionDigests.providedBy(store):
        return store.digests(partitions)
    return digests(store.entries(), partitions)


def entries_of(store: IStore, partitions: Iterable[int]) -> Callable[[int], list[Entry]]:
    """``partition -> its entries in store``, for each of ``partitions``: read on
    demand from a store that keeps them by partition, else gathered by one scan."""
    if IPartitionDigests.providedBy(store):
        return store.partition_entries
    by_partition: dict[int, list[Entry]] = {p: [] for p in partitions}
    for entry in store.entries():
        held = by_partition.get(partition_of(entry.key))
        if held is not None:
            held.append(entry)
    return by_partition.__getitem__


class Answer(NamedTuple):
    """A ``compare`` answer: the partitions that differ whose entries come with it,
    those that differ but must be asked for again, the entries, and the partitions
    that differ but are still being handed over by this node (ask again later)."""

    differ: list[int]
    more: list[int]
    entries: list[Entry]
    pending: list[int] = []


def compare(
    store: IStore, theirs: dict[int, int], max_entries: int = COMPARE_ENTRIES,
    max_bytes: int = COMPARE_BYTES, *, handing: Callable[[int], bool] = lambda p: False,
) -> Answer:
    """The answer to a ``compare`` request: the entries of the partitions of ``theirs``
    whose digests differ from this store's, at most about ``max_entries`` entries and
    ``max_bytes`` of values (and at least one partition's), except in those that this
    node is ``handing`` over: the handoff brings them, and a refill that took them now
    would move them twice.

    With a store that keeps its digests (IPartitionDigests) this costs a lookup per
    partition asked about and the entries answered, so a node serving it blocks
    its reactor for milliseconds, however large its store."""
    mine = digests_of(store, theirs)
    differ, pending = [], []
    for p in sorted(theirs):
        if mine[p] != theirs[p]:
            (pending if handing(p) else differ).append(p)
    answered: list[int] = []
    entries: list[Entry] = []
    size = 0
    entries_in = entries_of(store, differ)
    for p in differ:
        held = entries_in(p)
        weight = sum(measure(e.value) for e in held)
        if answered and (len(entries) + len(held) > max_entries
                         or size + weight > max_bytes):
            break
        answered.append(p)
        entries.extend(held)
        size += weight
    return Answer(answered, differ[len(answered):], entries, pending)


class AntiEntropy:
    """Runs rounds for one node: it asks the other owners of its partitions."""

    def __init__(
        self,
        node_id: str,
        store: IStore,
        placement: Callable[[], Placement],
        send: Callable[[str, dict], Deferred],
        merge: Callable[[list], int],
        clock,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.store = store
        self._placement = placement
        self._send = send  # (node, request) -> Deferred[reply], never failing
        self._merge = merge  # entries in wire form -> how many were kept
        self.rounds = 0
        self.repairs = 0  # entries kept as newer, here or at the other owner
        self._running: Deferred | None = None
        self._queued: Deferred | None = None

    def run(self, everything: bool = False) -> Deferred:
        """One round over the partitions this node is primary for, or with
        ``everything`` over all it owns (a refill after a change of view); fires when it
        is over. A periodic round is skipped while one runs; a refill runs after it."""
        if self._running is None:
            return self._start(everything)
        if not everything:
            return self._running
        if self._queued is None:
            self._queued = Deferred()
            self._running.addBoth(self._start_queued)
        return self._queued

    def _start(self, everything: bool) -> Deferred:
        self._running = running = maybeDeferred(self._round, everything)
        running.addBoth(self._over)
        return running

    def _start_queued(self, result):
        queued, self._queued = self._queued, None
        self._start(True).chainDeferred(queued)
        return result

    def _over(self, result):
        self._running = None
        return result

    def _round(self, everything: bool) -> Deferred | None:
        placement = self._placement()
        if placement.replicas == 1:
            return None
        shared: dict[str, list[int]] = {}
        for p in range(PARTITIONS):
            owners = placement.owners_of_partition(p)
            if owners[0] == self.node_id or (everything and self.node_id in owners):
                for other in owners:
                    if other != self.node_id:
                        shared.setdefault(other, []).append(p)
        if not shared:
            return None
        self.rounds += 1
        mine = digests_of(self.store, range(PARTITIONS))
        return gatherResults([
            Deferred.fromCoroutine(self._compare_with(node, {p: mine[p] for p in partitions}))
            for node, partitions in shared.items()
        ])

    async def _compare_with(self, node: str, sums: dict[int, int]) -> None:
        """Ask ``node`` about ``sums`` until it has answered for every partition that
        differs; keep the newer of each entry on both sides. Partitions that ``node``
        is still handing over are asked about again every PENDING_PAUSE seconds,
        until its handoff is over (then they are equal, unless a copy was missed)."""
        while sums:
            reply = await self._send(node, {"id": 0, "op": "compare", "digests": sums})
            if not reply.get("ok"):
                return
            differ, more, pending = (_partitions(reply.get(name), sums)
                                     for name in ("differ", "more", "pending"))
            if differ:
                await self._exchange(node, differ, reply.get("entries"))
            elif more or not pending:  # nothing answered: a bad answer, or all equal
                return
            else:
                await deferLater(self.clock, PENDING_PAUSE, lambda: None)
            left = (more | pending) - differ
            sums = digests_of(self.store, left) if left else {}

    async def _exchange(self, node: str, answered: set[int], theirs) -> None:
        """Keep the newer of ``node``'s entries (``theirs``, in wire form) and send it
        this node's entries of the partitions it ``answered``."""
        kept_here = self._merge(theirs if isinstance(theirs, list) else [])
        entries_in = entries_of(self.store, answered)
        ours = [e for p in sorted(answered) for e in entries_in(p)]
        _log.info("anti-entropy with {node}: {n} partitions differed, {kept} entries "
                  "kept here, {sent} sent", node=node, n=len(answered), kept=kept_here,
                  sent=len(ours))
        self.repairs += kept_here
        await gatherResults([
            self._send(node, {"id": 0, "op": "restore",
                              "entries": [e.to_wire() for e in chunk]}).addCallback(
                self._count_repairs)
            for chunk in chunks(ours)
        ])

    def _count_repairs(self, reply: dict) -> None:
        if reply.get("ok") and isinstance(reply.get("stored"), int):
            self.repairs += reply["stored"]


def _partitions(named, asked: dict[int, int]) -> set[int]:
    """The partitions of a reply's list ``named`` that were asked about."""
    return {p for p in named if isinstance(p, int) and p in asked} \
        if isinstance(named, list) else set()
