"""Versions and entries: what lets every copy of a key agree on which write came last.

A :data:`Version` is a hybrid logical clock reading ``(wall ms, counter, node id)``
(Kulkarni et al., "Logical Physical Clocks", 2014). Tuples compare element by element,
so every node orders versions the same way: by wall-clock millisecond, then by the
counter that separates writes within one millisecond (or made while the wall clock
stood behind a version already seen), then by node id, which breaks the tie between
two nodes writing in the same millisecond. :class:`HybridClock` makes each new version
greater than every version its node has made or seen, so a write that follows another
(it read the earlier value, or reached the node after it) always wins over it, even
when the wall clocks of the two nodes disagree; writes with no such order between them
go to the later wall clock.

An :class:`Entry` is one key's state at one version: a value, or a tombstone saying
that the key was deleted, so that an older copy arriving later (a handoff, a node
thawing, a partition healing) cannot bring it back. It has one wire form, used by every
message that moves entries between nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

#: (wall-clock milliseconds, counter, node id): compare as tuples.
Version = tuple[int, int, str]


class HybridClock:
    """One node's source of versions: wall-clock time that never runs backwards."""

    __slots__ = ("node_id", "_wall", "_ms", "_counter")

    def __init__(self, node_id: str, wall: Callable[[], float] = time.time) -> None:
        self.node_id = node_id
        self._wall = wall
        self._ms = 0
        self._counter = 0

    def now(self) -> Version:
        """A version greater than any this clock has made or observed."""
        ms = int(self._wall() * 1000)
        if ms > self._ms:
            self._ms, self._counter = ms, 0
        else:  # the same millisecond, or the wall clock behind what was seen
            self._counter += 1
        return (self._ms, self._counter, self.node_id)

    def observe(self, version: Version) -> None:
        """Move past ``version`` (from another node), so the next write outranks it."""
        if (version[0], version[1]) > (self._ms, self._counter):
            self._ms, self._counter = version[0], version[1]


@dataclass(frozen=True, slots=True)
class Entry:
    """A key's value (or tombstone) at a version.

    ``ttl`` is the seconds left when the entry was read (None: it never expires). Time
    left, rather than a wall-clock deadline, is what travels between nodes: each node
    counts it down on its own monotonic clock, so neither a wall-clock step nor two
    nodes' clocks disagreeing changes how long an entry lives.
    """

    key: str
    value: Any
    ttl: float | None
    version: Version
    deleted: bool = False

    def to_wire(self) -> list:
        """``[key, value, ttl, [ms, counter, node], deleted]``."""
        return [self.key, self.value, self.ttl, list(self.version), self.deleted]

    @classmethod
    def from_wire(cls, obj: Any) -> "Entry":
        """The entry a peer sent; ValueError if it is malformed (values are checked
        by the request parser, not here)."""
        if not isinstance(obj, list) or len(obj) != 5:
            raise ValueError("an entry is [key, value, ttl, version, deleted]")
        key, value, ttl, version, deleted = obj
        if not isinstance(key, str) or not key:
            raise ValueError("an entry's key is a non-empty string")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
        ):
            raise ValueError("an entry's ttl is null or a number of seconds above 0")
        if not isinstance(deleted, bool):
            raise ValueError("an entry's deleted flag is a boolean")
        return cls(key, value, ttl, version_from_wire(version), deleted)


#: Versions travel as [ms, counter, node]; ms and counter are bounded so a peer cannot
#: push a node's clock to where no later write can ever outrank it.
MAX_VERSION_MS = 2**53
MAX_VERSION_COUNTER = 2**32


def version_from_wire(obj: Any) -> Version:
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in obj[:2])
        or not isinstance(obj[2], str)
    ):
        raise ValueError("a version is [ms, counter, node id]")
    ms, counter, node = obj
    if not (0 <= ms <= MAX_VERSION_MS and 0 <= counter <= MAX_VERSION_COUNTER):
        raise ValueError("a version's ms or counter is out of range")
    return (ms, counter, node)
