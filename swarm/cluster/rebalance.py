"""Rebalancing: entries follow their keys' ownership when the swarm changes.

After every change of view (a node joined, left or became unreachable) this node hands
each entry to the owners of its key (the top ``--replicas`` nodes of its partition)
that may not hold it, in chunks, as ``restore`` requests addressed to them: every owner
when this node is no longer one of them, else only the owners that were not owners at
its last complete run (the others have had every write since). An entry this node no
longer owns is dropped once all its owners have confirmed (unless it was written again
meanwhile), so ``--replicas 1`` still means one copy. Tombstones travel too. ``restore`` keeps an entry only where it
is newer than what the owner holds, so whichever copy arrives first, the last write
wins. A node stopping gracefully does the same with itself left out of the placement,
before it closes its links.

Runs never overlap: a view change during a run schedules one more run after it. A run
where some chunk was not confirmed (the owner was slow, busy or briefly unreachable) is
tried again RETRY seconds later, doubling, up to RETRIES times, without waiting for the
next view change. While a run is under way or due, :meth:`Rebalancer.handing` says which
partitions are still on their way (a refill leaves those to it).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.task import deferLater

from swarm.cluster.placement import PARTITIONS, Placement, partition_of
from swarm.logs import logger
from swarm.protocol.entry import Entry
from swarm.store.interface import IStore
from swarm.store.memory import measure

_log = logger(__name__)

#: A handoff request carries at most CHUNK entries and about CHUNK_BYTES of values, so
#: it travels in frames every peer accepts and takes turns with other traffic.
CHUNK = 256
CHUNK_BYTES = 4 * 1024 * 1024
#: Chunks in flight to one owner at a time (see _Outbox).
WINDOW = 2
#: The scan for entries to hand over yields to the reactor after this many entries.
SCAN_SLICE = 5000
#: Changes often come in bursts (a link-state flood): wait this long to act once.
SETTLE = 0.05
#: A run that did not hand over everything runs again after RETRY seconds, then after
#: twice as long, up to RETRIES times; then only the next change of view tries again.
RETRY = 1.0
RETRIES = 5


class Rebalancer:
    def __init__(
        self,
        node_id: str,
        store: IStore,
        placement: Callable[[], Placement],
        send: Callable[[str, dict], Deferred],
        clock,
        owners: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        """``owners()``: the nodes that own keys in the current view (what
        ``placement()`` places over), noted cheaply when there is nothing to hand."""
        self.node_id = node_id
        self.store = store
        self._placement = placement
        self._send = send  # (owner, restore request) -> Deferred[reply]
        self.clock = clock
        self._scheduled = None
        self._running: Deferred | None = None
        self._again = False
        self._retries = 0  # runs in a row that did not hand over everything
        self._incomplete = False  # the last run did not
        self._idle: list[Deferred] = []
        self.moved = 0
        #: The placement of the last run that handed everything it meant to.
        self._last: Placement | None = None
        #: Or the owners of its view, when it found nothing to hand over.
        self._last_owners: frozenset[str] | None = None
        self._owners = owners

    def schedule(self, delay: float = SETTLE) -> None:
        """Run after ``delay`` (a change of view), or after the run under way."""
        if self._running is not None:
            self._again = True
        elif self._scheduled is None:
            self._scheduled = self.clock.callLater(delay, self._start)
        elif self._scheduled.getTime() > self.clock.seconds() + delay:
            self._scheduled.reset(delay)  # a change of view before a retry comes first

    @property
    def busy(self) -> bool:
        """A run is under way or due (after a change of view, or again)."""
        return self._running is not None or self._scheduled is not None

    def idle(self) -> Deferred:
        """Fires once no run is under way or due."""
        if not self.busy:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d

    def handing(self, partition: int) -> bool:
        """Whether a run under way or due hands this node's copies in ``partition``
        to an owner."""
        return self.busy and bool(self._targets(self._placement(), partition)[0])

    def _start(self) -> None:
        self._scheduled = None
        if next(self.store.entries(), None) is None:
            # Nothing to hand over: no need for the new view's placement yet (a node
            # with an empty store, in a swarm forming, would derive it at every burst).
            # It was complete all the same: the next run compares with its owners
            # (else every owner would be sent every entry written from now on).
            if self._owners is not None:
                self._last, self._last_owners = None, self._owners()
            self._settled()
            return
        self._running = self.run(self._placement())
        self._running.addBoth(self._finished)

    def _finished(self, result) -> None:
        self._running = None
        if self._again:
            self._again, self._retries = False, 0
            self.schedule()
        elif self._incomplete and self._retries < RETRIES:
            delay = RETRY * 2 ** self._retries
            self._retries += 1
            _log.info("handoff incomplete: running it again in {s:.0f} s", s=delay)
            self.schedule(delay)
        else:
            self._settled()

    def _settled(self) -> None:
        self._retries = 0
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    def run(self, placement: Placement) -> Deferred:
        """Hand each entry to the owners under ``placement`` that may not hold it, and
        drop the ones this node no longer owns once all their owners have them; fires
        with the number of entries (copies) handed over."""
        return Deferred.fromCoroutine(self._run(placement))

    def _targets(self, placement: Placement, partition: int) -> tuple[list[str], bool]:
        """Who gets this node's copies in ``partition``, and whether this node drops
        them once they have: the owners that were not owners at the last complete run
        (the others had every write since, as this node did; with one replica that is
        no one). A node that is not an owner any more drops its copies, so it sends
        them to every owner where that would leave none to confirm them, or where it
        was no owner itself at the last run (a stray copy: no one else need have it)."""
        owners = placement.owners_of_partition(partition)
        before = self._last.owners_of_partition(partition) if self._last is not None \
            else (self.node_id,)
        new = [o for o in owners if o != self.node_id and o not in before]
        if self.node_id in owners:
            return new, False
        return (new if new and self.node_id in before else list(owners)), True

    async def _run(self, placement: Placement) -> int:
        # The owners are worked out once per partition, not once per entry: a scan
        # of a million entries then costs a CRC and a list index per entry.
        if self._last is None and self._last_owners is not None:
            self._last, self._last_owners = placement.with_nodes(self._last_owners), None
        table = [self._targets(placement, p) for p in range(PARTITIONS)]
        outboxes: dict[str, _Outbox] = {}
        waiting: dict[str, int] = {}  # key of an entry to drop -> owners yet to confirm
        for n, entry in enumerate(self.store.entries(), 1):
            targets, drop = table[partition_of(entry.key)]
            if targets:
                if drop:  # before any chunk with it can be confirmed
                    waiting[entry.key] = len(targets)
                for owner in targets:
                    outbox = outboxes.get(owner)
                    if outbox is None:
                        outbox = outboxes[owner] = _Outbox(
                            lambda chunk, owner=owner: self._hand_over(owner, chunk, waiting))
                    outbox.add(entry)
            if n % SCAN_SLICE == 0:  # a big store: let the reactor serve meanwhile
                await deferLater(self.clock, 0, lambda: None)
        sends = [d for outbox in outboxes.values() for d in outbox.close()]
        handed = await gatherResults(sends) if sends else []
        self._incomplete = not all(handed)
        if not self._incomplete:  # else the next run compares with the last complete one
            self._last = placement
        return sum(handed)

    def _hand_over(self, owner: str, entries: list[Entry], waiting: dict[str, int]) -> Deferred:
        request = {"id": 0, "op": "restore", "entries": [e.to_wire() for e in entries]}

        def done(reply: dict) -> int:
            if not reply.get("ok"):
                _log.warn("handing {n} entries to {owner} failed: {error}",
                          n=len(entries), owner=owner, error=reply.get("error"))
                for entry in entries:  # kept here; the next run tries again
                    waiting.pop(entry.key, None)
                return 0
            for entry in entries:
                left = waiting.get(entry.key)
                if left is None:
                    continue
                if left > 1:
                    waiting[entry.key] = left - 1
                else:  # every owner has it: drop it, unless rewritten meanwhile
                    del waiting[entry.key]
                    self.store.discard(entry.key, entry.version)
            self.moved += len(entries)
            _log.debug("handed {n} entries to {owner}", n=len(entries), owner=owner)
            return len(entries)

        def as_reply(failure) -> dict:
            return {"ok": False, "error": failure.getErrorMessage()}

        return maybeDeferred(self._send, owner, request).addErrback(as_reply).addCallback(done)

    def stop(self) -> None:
        """No more scheduled runs (a run under way finishes)."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        self._again = False
        self._retries = RETRIES  # a run under way is not tried again


class _Cutter:
    """Cuts a stream of entries into requests of at most CHUNK entries and about
    CHUNK_BYTES of values."""

    def __init__(self) -> None:
        self.chunk: list[Entry] = []
        self._size = 0

    def add(self, entry: Entry) -> list[Entry] | None:
        """Take ``entry``; the chunk it closed, if it did."""
        weight = measure(entry.value)
        full = None
        if self.chunk and (len(self.chunk) == CHUNK or self._size + weight > CHUNK_BYTES):
            full, self.chunk, self._size = self.chunk, [], 0
        self.chunk.append(entry)
        self._size += weight
        return full


class _Outbox:
    """The entries bound for one owner, sent in chunks as they fill while the scan
    goes on, at most WINDOW at a time: the owner starts storing them at once, and a
    request behind them on the link waits for a few chunks, not for the whole
    handoff (nor does a send time out for waiting behind the others).

    Once a chunk fails (``send`` gave 0: the owner is unreachable, busy or slow), the
    chunks still queued are not sent (each would fail the same way): they count 0,
    and the run that follows hands them over. Sends that fail at once are taken in a
    loop, not in nested callbacks, however many chunks are queued."""

    def __init__(self, send: Callable[[list[Entry]], Deferred]) -> None:
        self._send = send
        self._cutter = _Cutter()
        self._queue: deque[tuple[list[Entry], Deferred]] = deque()
        self._sent: list[Deferred] = []
        self._in_flight = 0
        self._pumping = False
        self._failed = False

    def add(self, entry: Entry) -> None:
        full = self._cutter.add(entry)
        if full is not None:
            self._push(full)

    def close(self) -> list[Deferred]:
        """The last chunk sent too; every send's Deferred, in order."""
        if self._cutter.chunk:
            self._push(self._cutter.chunk)
            self._cutter = _Cutter()
        return self._sent

    def _push(self, chunk: list[Entry]) -> None:
        d = Deferred()
        self._sent.append(d)
        self._queue.append((chunk, d))
        self._pump()

    def _pump(self) -> None:
        if self._pumping:  # a send that ended at once, inside the loop below
            return
        self._pumping = True
        try:
            while self._queue and (self._failed or self._in_flight < WINDOW):
                chunk, d = self._queue.popleft()
                if self._failed:
                    d.callback(0)
                    continue
                self._in_flight += 1
                self._send(chunk).addBoth(self._ended, d)
        finally:
            self._pumping = False

    def _ended(self, handed, d: Deferred) -> None:
        self._in_flight -= 1
        self._failed = self._failed or not handed
        d.callback(handed)
        self._pump()


def chunks(entries: list[Entry]) -> Iterator[list[Entry]]:
    """``entries`` cut into requests of at most CHUNK entries and about CHUNK_BYTES."""
    cutter = _Cutter()
    for entry in entries:
        full = cutter.add(entry)
        if full is not None:
            yield full
    if cutter.chunk:
        yield cutter.chunk
