"""The in-memory store: TTL, LRU eviction within a memory budget, statistics.

Pure logic: time comes from an injected clock (``seconds()``), and nothing here does I/O,
so it is tested directly with ``task.Clock``.

Expiry is lazy (an expired entry found on access is removed then) plus active: the node
calls :meth:`MemoryStore.sweep` a few times a second. Rather than Redis's random
sampling, expiring entries sit in a heap ordered by deadline, so a sweep touches only
entries that are really due, and at most ``limit`` of them per call: the work per tick
stays bounded however many keys the store holds. A heap item whose entry was replaced,
deleted or given a new ttl is stale and skipped; the heap is rebuilt when stale items
outnumber live ones, so it cannot grow without bound under rewrites.

Memory accounting (what ``--max-memory`` limits): each entry costs
``ENTRY_OVERHEAD + bytes of the key in UTF-8 + measure(value)``; see :func:`measure`.
When a write would take the total over the budget, least recently used entries are
evicted (reads and writes both count as use) until it fits.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any, Iterator

from zope.interface import Interface, implementer

from swarm.errors import NotInteger, TooLarge
from swarm.protocol.wire import INT64_MAX, INT64_MIN, utf8_size

#: Fixed cost charged per entry for the bookkeeping around key and value.
ENTRY_OVERHEAD = 64
#: Cost of a number, boolean or null, and of each element slot of an array or map.
SCALAR_SIZE = 8


def measure(value: Any) -> int:
    """The accounted size of a value in bytes.

    Strings count their UTF-8 bytes, byte strings their length, integers 8 bytes (more
    for big ones), floats, booleans and null 8; arrays and maps add 8 per element, and
    map keys count as strings.
    """
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += utf8_size(item)
        elif isinstance(item, bytes):
            size += len(item)
        elif isinstance(item, list):
            size += SCALAR_SIZE * (len(item) + 1)
            stack.extend(item)
        elif isinstance(item, dict):
            size += SCALAR_SIZE * (len(item) + 1)
            for k, v in item.items():
                size += utf8_size(k)
                stack.append(v)
        elif isinstance(item, int) and not isinstance(item, bool):
            # two's complement bytes: -2**63 fits in 8 like 2**63 - 1
            size += max(SCALAR_SIZE, ((~item if item < 0 else item).bit_length() + 8) // 8)
        else:
            size += SCALAR_SIZE
    return size


class IStore(Interface):
    """A node's local key=>value storage. Keys are validated strings, values plain data."""

    def get(key: str) -> tuple[bool, Any]:
        """(found, value); counts a hit or a miss."""

    def set(
        key: str, value: Any, ttl: float | None, nx: bool = False, xx: bool = False
    ) -> bool:
        """Store ``value`` (expiring after ``ttl`` seconds, or never when None)."""

    def delete(key: str) -> bool:
        """Remove ``key``; whether it was there."""

    def exists(key: str) -> bool:
        """Whether ``key`` holds a live entry."""

    def expire(key: str, ttl: float | None) -> bool:
        """Give a live entry a new ttl (None: never expires); whether it existed."""

    def ttl(key: str) -> tuple[bool, float | None]:
        """(found, seconds left or None when the entry does not expire)."""

    def set_many(items: dict[str, Any], ttl: float | None) -> int:
        """Store every item, or none when one of them is too large."""

    def incr(key: str, delta: int, ttl: float | None) -> int:
        """Add ``delta`` to an integer entry (``ttl`` applies only if it is created)."""

    def entries() -> Iterator[tuple[str, Any, float | None]]:
        """Every live entry as (key, value, seconds left or None), for handoffs.

        Lazy, and safe to pause between items while the store changes: entries
        removed meanwhile are skipped, entries added meanwhile may not appear."""

    def discard(key: str, value: Any) -> bool:
        """Delete ``key`` only if it still holds this very ``value`` (after a handoff)."""

    def take(keys: list[str]) -> list[list]:
        """Remove and return the live entries among ``keys`` as [key, value, ttl]."""

    def sweep(limit: int) -> int:
        """Remove at most ``limit`` expired entries; how many were removed."""

    def stats() -> dict:
        """Counters: keys, memory_bytes, max_memory_bytes, hits, misses, ..."""


class _Entry:
    __slots__ = ("value", "expires_at", "size")

    def __init__(self, value: Any, expires_at: float | None, size: int) -> None:
        self.value = value
        self.expires_at = expires_at
        self.size = size


@implementer(IStore)
class MemoryStore:
    """The default :class:`IStore`: a dict in LRU order under a memory budget."""

    def __init__(
        self,
        clock,
        max_memory: int = 128 * 1024 * 1024,
        max_value_bytes: int = 1024 * 1024,
    ) -> None:
        self._clock = clock
        self.max_memory = max_memory
        self.max_value_bytes = max_value_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._deadlines: list[tuple[float, str]] = []
        self._expiring = 0  # live entries that have a deadline
        self.memory_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- lookups --------------------------------------------------------------------

    def _live(self, key: str) -> _Entry | None:
        """The entry for ``key`` unless absent or expired (then removed)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._clock.seconds():
            self._remove(key, entry)
            self.expirations += 1
            return None
        return entry

    def get(self, key: str) -> tuple[bool, Any]:
        entry = self._live(key)
        if entry is None:
            self.misses += 1
            return False, None
        self.hits += 1
        self._entries.move_to_end(key)
        return True, entry.value

    def exists(self, key: str) -> bool:
        return self._live(key) is not None

    def ttl(self, key: str) -> tuple[bool, float | None]:
        entry = self._live(key)
        if entry is None:
            return False, None
        return True, self._left(entry, self._clock.seconds())

    # -- writes ---------------------------------------------------------------------

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        if nx or xx:
            present = self._live(key) is not None
            if (nx and present) or (xx and not present):
                return False
        self._put(key, value, self._deadline(ttl))
        return True

    def set_many(self, items: dict[str, Any], ttl: float | None) -> int:
        sized = [(key, value, self._entry_size(key, value)) for key, value in items.items()]
        deadline = self._deadline(ttl)
        for key, value, size in sized:
            self._put(key, value, deadline, size)
        return len(sized)

    def incr(self, key: str, delta: int, ttl: float | None) -> int:
        entry = self._live(key)
        if entry is None:
            current, deadline = 0, self._deadline(ttl)
        else:
            current, deadline = entry.value, entry.expires_at
            if not isinstance(current, int) or isinstance(current, bool):
                raise NotInteger(f"the value of {key!r} is not an integer")
        result = current + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise NotInteger(f"incrementing {key!r} would overflow a 64-bit integer")
        self._put(key, result, deadline)
        return result

    def delete(self, key: str) -> bool:
        entry = self._live(key)
        if entry is None:
            return False
        self._remove(key, entry)
        return True

    def expire(self, key: str, ttl: float | None) -> bool:
        entry = self._live(key)
        if entry is None:
            return False
        self._set_deadline(key, entry, self._deadline(ttl))
        return True

    # -- bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _left(entry: _Entry, now: float) -> float | None:
        """Seconds until ``entry`` expires, or None when it does not."""
        return None if entry.expires_at is None else entry.expires_at - now

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
        self, key: str, value: Any, expires_at: float | None, size: int | None = None
    ) -> None:
        if size is None:
            size = self._entry_size(key, value)
        old = self._entries.get(key)
        if old is not None:
            self._remove(key, old)
        entry = _Entry(value, None, size)
        self._entries[key] = entry
        self.memory_bytes += size
        self._set_deadline(key, entry, expires_at)
        self._evict_over_budget()

    def _set_deadline(self, key: str, entry: _Entry, expires_at: float | None) -> None:
        if entry.expires_at is not None:
            self._expiring -= 1
        entry.expires_at = expires_at
        if expires_at is not None:
            self._expiring += 1
            heapq.heappush(self._deadlines, (expires_at, key))
            if len(self._deadlines) > 2 * self._expiring + 1024:
                self._rebuild_deadlines()

    def _rebuild_deadlines(self) -> None:
        """Drop stale and duplicate heap items (from the heap: permanent keys cost nothing)."""
        entries = self._entries
        self._deadlines = [
            (d, k) for d, k in set(self._deadlines)
            if k in entries and entries[k].expires_at == d
        ]
        heapq.heapify(self._deadlines)

    def _remove(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self.memory_bytes -= entry.size
        if entry.expires_at is not None:
            self._expiring -= 1

    def _evict_over_budget(self) -> None:
        while self.memory_bytes > self.max_memory:
            key = next(iter(self._entries))
            self._remove(key, self._entries[key])
            self.evictions += 1

    def entries(self) -> Iterator[tuple[str, Any, float | None]]:
        for key in list(self._entries):  # a snapshot of the keys, not of the entries
            entry = self._entries.get(key)
            if entry is None:
                continue
            left = self._left(entry, self._clock.seconds())
            if left is None or left > 0:
                yield key, entry.value, left

    def discard(self, key: str, value: Any) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.value is not value:
            return False
        self._remove(key, entry)
        return True

    def take(self, keys: list[str]) -> list[list]:
        now = self._clock.seconds()
        taken = []
        for key in keys:
            entry = self._live(key)
            if entry is not None:
                taken.append([key, entry.value, self._left(entry, now)])
                self._remove(key, entry)
        return taken

    def sweep(self, limit: int | None = 200) -> int:
        """Remove expired entries in deadline order, looking at most at ``limit`` heap
        items, stale ones included (None: everything due)."""
        now = self._clock.seconds()
        heap = self._deadlines
        removed = looked = 0
        while heap and heap[0][0] <= now and (limit is None or looked < limit):
            looked += 1
            deadline, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at == deadline:
                self._remove(key, entry)
                self.expirations += 1
                removed += 1
        return removed

    def stats(self) -> dict:
        # Everything due goes now so ``keys`` counts live entries only; amortized, as
        # each expired entry is removed once, here or by a later sweep.
        self.sweep(limit=None)
        return {
            "keys": len(self._entries),
            "memory_bytes": self.memory_bytes,
            "max_memory_bytes": self.max_memory,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
        }
