"""``IStore``: what a node needs from its local storage.

Every write is stamped with a version from the store's :class:`~swarm.protocol.entry.
HybridClock` (``hlc``), and every merge (:meth:`IStore.put`) keeps the newer version,
so copies of a key moved between nodes in any order settle on the last write. A delete
leaves a tombstone for a while, so an older copy that arrives later cannot revive it.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from zope.interface import Attribute, Interface

from swarm.protocol.entry import Entry, Version


class IStore(Interface):
    """A node's local key=>value storage. Keys are validated strings, values plain data.

    ``ttl`` arguments are seconds (None: never expires). Tombstones are invisible to
    reads, never count as keys, and are returned by :meth:`entries` and :meth:`take`
    so that deletes travel with handoffs.
    """

    hlc = Attribute("The HybridClock that stamps this store's writes and observes merges.")

    def get(key: str) -> tuple[bool, Any]:
        """(found, value); counts a hit or a miss."""

    def set(
        key: str, value: Any, ttl: float | None, nx: bool = False, xx: bool = False,
        at: Version | None = None,
    ) -> bool:
        """Store ``value`` (expiring after ``ttl`` seconds, or never when None).

        Every write takes ``at``: the version the write was stamped with where it
        entered the swarm. It becomes the entry's version unless the copy held is as
        new (then the version is just above the held one); a write already held at
        ``at`` is not applied again, nor is a plain set older than the held copy by
        the clock of the node that stamped both (it arrived late: see
        ``MemoryStore._stamp``). Without ``at``, the store's clock stamps it."""

    def delete(key: str, at: Version | None = None) -> bool:
        """Leave a tombstone for ``key``; whether a live entry was there."""

    def exists(key: str) -> bool:
        """Whether ``key`` holds a live entry."""

    def expire(key: str, ttl: float | None, at: Version | None = None) -> bool:
        """Give a live entry a new ttl (None: never expires); whether it existed."""

    def ttl(key: str) -> tuple[bool, float | None]:
        """(found, seconds left or None when the entry does not expire)."""

    def set_many(items: dict[str, Any], ttl: float | None, at: Version | None = None) -> int:
        """Store every item, or none when one of them is too large."""

    def incr(key: str, delta: int, ttl: float | None, at: Version | None = None) -> int:
        """Add ``delta`` to an integer entry (``ttl`` applies only if it is created)."""

    def put(entry: Entry) -> bool:
        """Merge an entry from elsewhere: kept only if its version is newer than the
        one held for its key (live, expired or tombstone); whether it was kept. The
        store's clock observes the version either way."""

    def entries() -> Iterator[Entry]:
        """Every live entry and tombstone, for handoffs.

        Lazy, and safe to pause between items while the store changes: entries
        removed meanwhile are skipped, entries added meanwhile may not appear."""

    def discard(key: str, version: Version) -> bool:
        """Drop ``key`` only if it is still at ``version`` (after a handoff: a key
        written again meanwhile stays)."""

    def read(keys: list[str]) -> list[Entry]:
        """The live entries and tombstones among ``keys``, left in place (to copy
        them to the other replicas); counts no hit or miss."""

    def take(keys: list[str]) -> list[Entry]:
        """Remove and return the live entries and tombstones among ``keys``."""

    def sweep(limit: int) -> int:
        """Remove at most ``limit`` expired entries; how many were removed."""

    def partition_counts() -> dict[int, int]:
        """Live entries (not tombstones) per partition, for the copies a node reports
        by role; empty when the store does not count them."""

    def keys_after(after: tuple[int, str], count: int, match: Any = None) -> tuple:
        """A scan step on this store: up to ``count`` keys of live entries after the
        position ``after`` in scan order (``match``: a predicate), and how far it
        looked (see :func:`swarm.protocol.scan.keys_after`)."""

    def clear(before: Version) -> int:
        """Remove every entry and tombstone older than ``before`` and refuse older
        ones from now on (a flush); how many live entries went."""

    def stats() -> dict:
        """Counters: keys, memory_bytes, max_memory_bytes, hits, misses, ..."""


class IPartitionDigests(Interface):
    """What a store may add so that comparing copies with another node (anti-entropy,
    :mod:`swarm.cluster.antientropy`) costs what the partitions asked about hold, not
    a scan of the store: a digest per partition kept up to date on every change.
    A store without it is compared by scanning :meth:`IStore.entries`."""

    def digests(partitions: Iterable[int]) -> dict[int, int]:
        """The digest of each of ``partitions``: the XOR of the fingerprints of its
        live entries and tombstones (0 for one with none)."""

    def partition_entries(partition: int) -> list[Entry]:
        """The live entries and tombstones of ``partition``."""
