"""The in-memory store: versions, tombstones, TTL, LRU eviction within a budget, stats.

Pure logic: time comes from an injected clock (``seconds()``), which a node makes
monotonic, so a wall-clock step neither expires entries early nor keeps them late;
versions come from the store's :class:`~swarm.protocol.entry.HybridClock`. Nothing here does
I/O, so it is tested directly with ``task.Clock``.

Every write is stamped with a new version; :meth:`MemoryStore.put` merges an entry from
another node only when its version is newer. A delete leaves a *tombstone* (the key, its
version, no value) for ``tombstone_ttl`` seconds, so an older copy that turns up later
(a handoff, a node thawing, a partition healing) cannot bring the key back. Tombstones
are invisible to reads and to ``keys``, cost memory like a small entry and expire like one.

Expiry is lazy (an expired entry found on access is removed then) plus active: the node
calls :meth:`MemoryStore.sweep` a few times a second. Rather than Redis's random
sampling, expiring entries sit in a heap ordered by deadline, so a sweep touches only
entries that are really due, and at most ``limit`` of them per call: the work per tick
stays bounded however many keys the store holds. A heap item whose entry was replaced,
deleted or given a new ttl is stale and skipped; the heap is rebuilt when stale items
outnumber live ones, so it cannot grow without bound under rewrites.

Memory accounting (what ``--max-memory`` limits): each entry costs
``ENTRY_OVERHEAD + bytes of the key in UTF-8 + measure(value)`` (a tombstone: no value);
see :func:`measure`. When a write would take the total over the budget, least recently
used entries and tombstones are evicted (reads and writes both count as use) until it fits.
"""

from __future__ import annotations

import heapq
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

from zope.interface import alsoProvides, implementer

from swarm.errors import NotInteger, TooLarge
from swarm.protocol import scan
from swarm.protocol.entry import Entry, HybridClock, Version
from swarm.protocol.scan import Position
from swarm.protocol.wire import INT64_MAX, INT64_MIN, utf8_size
from swarm.store.interface import IPartitionDigests, IStore

#: How long a deleted key's tombstone outlives the delete. It must outlast every way an
#: older copy can arrive late: a handoff in flight (seconds), the router's migration
#: window (10 s), a peer frozen or cut off until the swarm drops it and it comes back
#: (the tests freeze nodes for 10 s). Five minutes covers those with a wide margin, at
#: the cost of ENTRY_OVERHEAD + key bytes per deleted key for that long. A copy older
#: than a delete that arrives after five minutes (a partition longer than that) can
#: bring the key back, as in any last-writer-wins store that forgets its deletes.
TOMBSTONE_TTL = 300.0

#: Fixed cost charged per entry for the bookkeeping around key and value, as CPython
#: 3.11 spends it (``python -m swarm.bench_memory``): the key's str header (49), the
#: slot tuple with its version inline (88, plus ~32 for a version's own millisecond
#: int), the LRU map's entry (~90), and for an entry with a ttl its deadline heap item
#: (~90): measured 230-260 B per entry of RSS growth without ttl.
ENTRY_OVERHEAD = 256
#: The cost of each element slot of an array (a pointer) and of a boolean or null
#: (shared singletons, so nothing beyond the slot).
SCALAR_SIZE = 8
#: Object costs (CPython 3.11, 64-bit, measured by tracemalloc; allocator rounding
#: to 16 bytes averages in as +8): an int beyond the shared -5..256, by magnitude; a
#: float; a str by width of its widest character; bytes; an empty list or dict.
INT_SIZE = 32  # 28 requested
BIG_INT_SIZE = 40  # |n| >= 2**60: 36 requested
FLOAT_SIZE = 28  # 24 requested, 32 allocated
STR_ASCII_SIZE = 49 + 8
STR_LATIN1_SIZE = 73 + 8
STR_UCS2_SIZE = 74 + 8
STR_UCS4_SIZE = 76 + 8
BYTES_SIZE = 33 + 8
LIST_SIZE = 56
DICT_EMPTY_SIZE = 64
#: A dict with entries: its object and key table header, then per slot of its hash
#: index 1 byte (2 from 256 slots), and 16 per entry of the table (2/3 of the slots).
DICT_SIZE = 96


def _str_size(s: str) -> int:
    if s.isascii():
        return STR_ASCII_SIZE + len(s) if len(s) > 1 else 0  # "" and "a" are shared
    utf8_size(s)  # refuses lone surrogates, as values may not hold them
    widest = ord(max(s))
    if widest < 256:
        return (STR_LATIN1_SIZE + len(s)) if len(s) > 1 else 0
    return (STR_UCS2_SIZE + 2 * len(s)) if widest < 65536 else (STR_UCS4_SIZE + 4 * len(s))


def _dict_size(n: int) -> int:
    if not n:
        return DICT_EMPTY_SIZE
    slots = 8
    while slots * 2 // 3 < n:  # how CPython grows a dict filled one key at a time
        slots *= 2
    return DICT_SIZE + slots * (1 if slots <= 128 else 2 if slots <= 32768 else 4) + (
        slots * 2 // 3
    ) * 16


def measure(value: Any) -> int:
    """The accounted size of a value in bytes: what CPython holds for it, within
    about 25 % (``python -m swarm.bench_memory`` prints the comparison per shape).

    Strings and byte strings count their object header and characters, numbers their
    object (none for shared small ints, booleans and null), arrays 56 plus a slot per
    element (with CPython's over-allocation), maps their hash table; then the elements.
    Iterative, one step per element (about 0.1-0.3 us each).
    """
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += _str_size(item)
        elif isinstance(item, bytes):
            size += BYTES_SIZE + len(item) if len(item) > 1 else 0  # b"", b"x" shared
        elif isinstance(item, list):
            n = len(item)
            size += LIST_SIZE + SCALAR_SIZE * (n + (n >> 3) + (3 if n else 0))
            stack.extend(item)
        elif isinstance(item, dict):
            size += _dict_size(len(item))
            for k, v in item.items():
                size += _str_size(k)
                stack.append(v)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -5 <= item <= 256:
                size += INT_SIZE if -(2**60) < item < 2**60 else BIG_INT_SIZE
        else:
            size += FLOAT_SIZE
    return size


#: Stands in for the value of a tombstone: no value, and never equal to one.
_DELETED = object()


#: What the store keeps per key is a plain tuple, a slot:
#: ``(value or _DELETED, deadline on the store's clock or None, accounted size,
#: version ms, version counter, version origin)``. A tuple of strings and numbers is
#: left out of the garbage collector's walks (CPython stops tracking such a tuple, but
#: not an instance of a class or a named tuple), so a full collection does not visit a
#: million entries; and the version inline, with its origin interned, saves its own
#: tuple and string: 88 bytes a slot instead of 64 for an object plus 100 for a version.
_Slot = tuple
_VALUE, _EXPIRES, _SIZE = 0, 1, 2


def _slot(value: Any, expires_at: float | None, size: int, version: Version) -> _Slot:
    ms, counter, origin = version
    return (value, expires_at, size, ms, counter, sys.intern(origin))


def _version(slot: _Slot) -> Version:
    return slot[3:]


@implementer(IStore)
class MemoryStore:
    """The default :class:`IStore`: a dict in LRU order under a memory budget."""

    def __init__(
        self,
        clock,
        max_memory: int = 128 * 1024 * 1024,
        max_value_bytes: int = 1024 * 1024,
        hlc: HybridClock | None = None,
        tombstone_ttl: float = TOMBSTONE_TTL,
        partition: Callable[[str], int] | None = None,
        fingerprint: Callable[[str, Version, bool], int] | None = None,
    ) -> None:
        """``partition(key)``, when given, keeps a count of live entries per partition
        (what a node reports as copies held by role). With ``fingerprint(key, version,
        deleted)`` (a 64-bit hash) too, the store keeps each partition's digest up to
        date on every change (:class:`IPartitionDigests`): comparing copies with
        another node then costs a lookup per partition, not a scan of the store."""
        self._clock = clock
        self._partition = partition
        #: partition -> the keys of its live entries (what a scan lists).
        self._per_partition: dict[int, set[str]] = {}
        #: partition -> the keys of its tombstones (kept only with a fingerprint).
        self._graves: dict[int, set[str]] = {}
        #: partition -> the XOR of the fingerprints of its entries and tombstones.
        self._digests: dict[int, int] = {}
        self._fingerprint = fingerprint if partition is not None else None
        if self._fingerprint is not None:
            alsoProvides(self, IPartitionDigests)
        #: Entries older than this were flushed: none comes back (see clear).
        self._floor: Version = (0, 0, "")
        self.hlc = hlc if hlc is not None else HybridClock("local")
        self.max_memory = max_memory
        self.max_value_bytes = max_value_bytes
        self.tombstone_ttl = tombstone_ttl
        self._entries: OrderedDict[str, _Slot] = OrderedDict()
        self._deadlines: list[tuple[float, str]] = []
        self._expiring = 0  # slots (entries and tombstones) that have a deadline
        self._tombstones = 0
        self.memory_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.merged = 0  # entries kept by put()
        self.outdated = 0  # entries put() refused as older than what was held

    def __len__(self) -> int:
        """Live entries (and expired ones not removed yet), tombstones excluded."""
        return len(self._entries) - self._tombstones

    # -- lookups --------------------------------------------------------------------

    def _current(self, key: str) -> _Slot | None:
        """The slot for ``key`` (entry or tombstone) unless absent or expired (then
        removed)."""
        slot = self._entries.get(key)
        if slot is None:
            return None
        if slot[_EXPIRES] is not None and slot[_EXPIRES] <= self._clock.seconds():
            self._expired(key, slot)
            return None
        return slot

    def _live(self, key: str) -> _Slot | None:
        """The live entry for ``key``: not absent, expired or deleted."""
        slot = self._current(key)
        return None if slot is None or slot[_VALUE] is _DELETED else slot

    def get(self, key: str) -> tuple[bool, Any]:
        slot = self._live(key)
        if slot is None:
            self.misses += 1
            return False, None
        self.hits += 1
        self._entries.move_to_end(key)
        return True, slot[_VALUE]

    def exists(self, key: str) -> bool:
        return self._live(key) is not None

    def ttl(self, key: str) -> tuple[bool, float | None]:
        slot = self._live(key)
        if slot is None:
            return False, None
        return True, self._left(slot, self._clock.seconds())

    # -- writes ---------------------------------------------------------------------

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None,
        nx: bool = False,
        xx: bool = False,
        at: Version | None = None,
    ) -> bool:
        if nx or xx:
            present = self._live(key) is not None
            if (nx and present) or (xx and not present):
                return False
        version = self._stamp(key, at, overwrites=not (nx or xx))
        if version is not None:
            self._put(key, value, self._deadline(ttl), version)
        return True

    def set_many(self, items: dict[str, Any], ttl: float | None,
                 at: Version | None = None) -> int:
        sized = [(key, value, self._entry_size(key, value)) for key, value in items.items()]
        deadline = self._deadline(ttl)
        version = self.hlc.now() if at is None else None  # one write, one version
        for key, value, size in sized:
            stamp = version or self._stamp(key, at, overwrites=True)
            if stamp is not None:
                self._put(key, value, deadline, stamp, size)
        return len(sized)

    def incr(self, key: str, delta: int, ttl: float | None, at: Version | None = None) -> int:
        slot = self._live(key)
        if slot is None:
            current, deadline = 0, self._deadline(ttl)
        else:
            current, deadline = slot[_VALUE], slot[_EXPIRES]
            if not isinstance(current, int) or isinstance(current, bool):
                raise NotInteger(f"the value of {key!r} is not an integer")
        result = current + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise NotInteger(f"incrementing {key!r} would overflow a 64-bit integer")
        version = self._stamp(key, at)
        if version is None:  # this very increment ran already
            return current
        self._put(key, result, deadline, version)
        return result

    def delete(self, key: str, at: Version | None = None) -> bool:
        """A tombstone whether or not the key is here: a copy may live elsewhere (a
        frozen node, the other side of a partition) and must not come back."""
        existed = self._live(key) is not None
        version = self._stamp(key, at, overwrites=True)
        if version is not None:
            self._bury(key, version, self.tombstone_ttl)
        return existed

    def expire(self, key: str, ttl: float | None, at: Version | None = None) -> bool:
        slot = self._live(key)
        if slot is None:
            return False
        version = self._stamp(key, at)
        if version is not None:  # a new expiry is a write like any other
            self._store(key, _slot(slot[_VALUE], self._deadline(ttl), slot[_SIZE], version))
        return True

    def _stamp(self, key: str, at: Version | None, overwrites: bool = False
               ) -> Version | None:
        """The version of a write: this clock's next, or for a write stamped where it
        entered the swarm (``at``), that stamp, unless the copy held is as new: then
        just above it (writes to one key are ordered as they arrive here, whatever the
        skew between the clocks of the nodes they entered by), or None when the copy
        held is this very write (the request was sent again). A write run late (by a
        node that was frozen with it) keeps the age it had when it was made, so it
        cannot overtake writes made after it.

        A write that ``overwrites`` whatever is held (a plain set, a delete) and is
        older than the copy held *by the clock of the same node* was made before that
        copy's write entered by that node: it arrives late (it waited in a frozen or
        busy node, or took a detour while the view changed, after its client was
        answered or it was sent again), and it is not applied (None), so the
        later write stays. Writes that read what is held (incr, conditional sets,
        expire) still run just above it, in the order they arrive."""
        if at is None:
            return self.hlc.now()
        self.hlc.observe(at)
        if at < self._floor:  # made before a flush that has run here: flushed with it
            return None
        held = self._current(key)
        if held is None:
            return at
        version = _version(held)
        if version < at:
            return at
        if version == at or (overwrites and version[2] == at[2]):
            return None
        above = (version[0], version[1] + 1, self.hlc.node_id)
        self.hlc.observe(above)
        return above

    # -- merging and moving entries -------------------------------------------------

    def put(self, entry: Entry) -> bool:
        self.hlc.observe(entry.version)
        held = self._current(entry.key)
        if entry.version < self._floor or (held is not None and _version(held) >= entry.version):
            self.outdated += 1
            return False
        if entry.deleted:
            self._bury(entry.key, entry.version, entry.ttl)
        else:
            self._put(entry.key, entry.value, self._deadline(entry.ttl), entry.version)
        self.merged += 1
        return True

    def _entry_of(self, key: str, slot: _Slot, now: float) -> Entry:
        deleted = slot[_VALUE] is _DELETED
        return Entry(key, None if deleted else slot[_VALUE], self._left(slot, now),
                     _version(slot), deleted)

    def entries(self) -> Iterator[Entry]:
        for key in list(self._entries):  # a snapshot of the keys, not of the entries
            slot = self._entries.get(key)
            if slot is None:
                continue
            now = self._clock.seconds()
            if slot[_EXPIRES] is None or slot[_EXPIRES] > now:
                yield self._entry_of(key, slot, now)

    def discard(self, key: str, version: Version) -> bool:
        slot = self._entries.get(key)
        if slot is None or _version(slot) != version:
            return False
        self._remove(key, slot)
        return True

    def read(self, keys: list[str]) -> list[Entry]:
        now = self._clock.seconds()
        return [self._entry_of(key, slot, now) for key in keys
                if (slot := self._current(key)) is not None]

    def take(self, keys: list[str]) -> list[Entry]:
        taken = self.read(keys)
        for entry in taken:
            self._remove(entry.key, self._entries[entry.key])
        return taken

    # -- bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _left(slot: _Slot, now: float) -> float | None:
        """Seconds until ``slot`` expires, or None when it does not."""
        return None if slot[_EXPIRES] is None else slot[_EXPIRES] - now

    def _deadline(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._clock.seconds() + ttl

    def _entry_size(self, key: str, value: Any) -> int:
        """What the entry costs against the budget; TooLarge if it can never fit."""
        value_size = measure(value)
        if value_size > self.max_value_bytes:
            raise TooLarge(
                f"value is {value_size} bytes; the limit is {self.max_value_bytes}"
            )
        size = ENTRY_OVERHEAD + utf8_size(key) + value_size
        if size > self.max_memory:
            raise TooLarge(
                f"entry of {size} bytes exceeds the memory budget of {self.max_memory}"
            )
        return size

    def _put(
        self,
        key: str,
        value: Any,
        expires_at: float | None,
        version: Version,
        size: int | None = None,
    ) -> None:
        if size is None:
            size = self._entry_size(key, value)
        self._store(key, _slot(value, expires_at, size, version))

    def _bury(self, key: str, version: Version, ttl: float | None) -> None:
        """Replace whatever ``key`` holds with a tombstone living ``ttl`` seconds."""
        life = self.tombstone_ttl if ttl is None else min(ttl, self.tombstone_ttl)
        slot = _slot(_DELETED, self._deadline(life), ENTRY_OVERHEAD + utf8_size(key), version)
        self._tombstones += 1
        self._store(key, slot)

    def _store(self, key: str, slot: _Slot) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._remove(key, old)
        self._entries[key] = slot
        self.memory_bytes += slot[_SIZE]
        if self._partition is not None:
            self._index(key, slot, self._partition(key), True)
        if slot[_EXPIRES] is not None:
            self._deadline_set(key, slot[_EXPIRES])
        self._evict_over_budget()

    def _deadline_set(self, key: str, expires_at: float) -> None:
        """Count a slot just held for ``key`` with this deadline, and queue it."""
        self._expiring += 1
        heapq.heappush(self._deadlines, (expires_at, key))
        if len(self._deadlines) > 2 * self._expiring + 1024:
            self._rebuild_deadlines()

    def _rebuild_deadlines(self) -> None:
        """Drop stale and duplicate heap items (from the heap: permanent keys cost nothing)."""
        entries = self._entries
        self._deadlines = [
            (d, k) for d, k in set(self._deadlines)
            if k in entries and entries[k][_EXPIRES] == d
        ]
        heapq.heapify(self._deadlines)

    def _remove(self, key: str, slot: _Slot) -> None:
        del self._entries[key]
        self.memory_bytes -= slot[_SIZE]
        if slot[_EXPIRES] is not None:
            self._expiring -= 1
        if slot[_VALUE] is _DELETED:
            self._tombstones -= 1
        if self._partition is not None:
            self._index(key, slot, self._partition(key), False)

    def _index(self, key: str, slot: _Slot, p: int, added: bool) -> None:
        """Note ``key``'s slot added to or removed from partition ``p``: its key set
        (live keys; tombstones when digests are kept) and its digest."""
        deleted = slot[_VALUE] is _DELETED
        if deleted and self._fingerprint is None:
            return
        index = self._graves if deleted else self._per_partition
        keys = index.get(p)
        if added:
            if keys is None:
                index[p] = {key}
            else:
                keys.add(key)
        else:
            keys.discard(key)
            if not keys:
                del index[p]
        if self._fingerprint is not None:
            self._digests[p] = self._digests.get(p, 0) ^ self._fingerprint(
                key, _version(slot), deleted)

    def _expired(self, key: str, slot: _Slot) -> None:
        self._remove(key, slot)
        if slot[_VALUE] is not _DELETED:
            self.expirations += 1

    def _evict_over_budget(self) -> None:
        while self.memory_bytes > self.max_memory:
            key = next(iter(self._entries))
            self._remove(key, self._entries[key])
            self.evictions += 1

    def sweep(self, limit: int | None = 200) -> int:
        """Remove expired entries and tombstones in deadline order, looking at most at
        ``limit`` heap items, stale ones included (None: everything due)."""
        now = self._clock.seconds()
        heap = self._deadlines
        removed = looked = 0
        while heap and heap[0][0] <= now and (limit is None or looked < limit):
            looked += 1
            deadline, key = heapq.heappop(heap)
            slot = self._entries.get(key)
            if slot is not None and slot[_EXPIRES] == deadline:
                self._expired(key, slot)
                removed += 1
        return removed

    def digests(self, partitions: Iterable[int]) -> dict[int, int]:
        self.sweep(limit=None)  # what is due goes, as on the node that asks
        held = self._digests
        return {p: held.get(p, 0) for p in partitions}

    def partition_entries(self, partition: int) -> list[Entry]:
        self.sweep(limit=None)
        now, entries = self._clock.seconds(), self._entries
        return [self._entry_of(key, entries[key], now)
                for index in (self._per_partition, self._graves)
                for key in index.get(partition, ())]

    def partition_counts(self) -> dict[int, int]:
        self.sweep(limit=None)
        return {p: len(keys) for p, keys in self._per_partition.items()}

    def keys_after(self, after: Position, count: int,
                   match: Callable[[str], object] | None = None) -> tuple[list[str], Position | None]:
        """This store's side of a scan step (:func:`swarm.protocol.scan.keys_after`);
        needs the ``partition`` function."""
        if self._partition is None:
            raise TypeError("a store without a partition function cannot be scanned")
        self.sweep(limit=None)
        return scan.keys_after(self._per_partition, after, count, match)

    def clear(self, before: Version) -> int:
        """Remove every entry and tombstone older than ``before`` (a flush stamped
        where it entered the swarm), and from now on refuse entries older than it, so
        a replica or a handoff cannot bring flushed entries back. How many live
        entries went."""
        self.hlc.observe(before)
        self.sweep(limit=None)
        self._floor = max(self._floor, before)
        removed = 0
        for key, slot in list(self._entries.items()):
            if _version(slot) < before:
                removed += slot[_VALUE] is not _DELETED
                self._remove(key, slot)
        return removed

    def stats(self) -> dict:
        # Everything due goes now so ``keys`` counts live entries only; amortized, as
        # each expired entry is removed once, here or by a later sweep.
        self.sweep(limit=None)
        return {
            "keys": len(self),
            "tombstones": self._tombstones,
            "memory_bytes": self.memory_bytes,
            "max_memory_bytes": self.max_memory,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "merged": self.merged,
            "outdated": self.outdated,
        }
