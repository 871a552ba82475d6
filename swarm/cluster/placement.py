"""Keys -> partitions -> owner nodes, computed from a membership view.

Pure logic, no I/O: every node that sees the same set of node ids computes the same
owners for every key, with no coordinator and no ring tokens to agree on.

A key belongs to one of ``PARTITIONS`` fixed partitions (:func:`partition_of`, CRC-32 of
its UTF-8 bytes). A partition is owned by the ``replicas`` nodes with the highest
rendezvous score (:func:`score`), the first of them being its primary. The owner table is
built once per membership view, so a lookup is a CRC and a list index; a join or leave
moves whole partitions, and only those the joining or leaving node wins or held. The
next view's table is derived from the last one (:meth:`Placement.with_nodes`): a change
of one node among N costs about 1/N of a full build.

The score of a node for partition ``p`` is the ``p``-th big-endian 64-bit word of
SHAKE-128 over the node id's UTF-8 bytes: one extendable-output hash call per node gives
its scores for all partitions at once, about ten times cheaper than one blake2b per
(node, partition) pair. Those scores are kept per node id in one bounded cache for the
whole process. See ``docs/placement.md`` for the measurements behind the choices.
"""

from __future__ import annotations

import hashlib
import sys
import zlib
from array import array
from collections import deque
from itertools import compress, repeat
from operator import ge, getitem, itemgetter, ne, not_
from typing import Callable, Iterable, Sequence

#: Number of fixed partitions. 4096 rather than Hazelcast's 271 or 1024: at 32 nodes the
#: busiest node's share of primaries is about 1.2x the mean (1.4x with 1024, 1.8x with 271).
PARTITIONS = 4096

# Scores are kept as 8-byte words; "Q" is 8 bytes on every CPython platform.
if array("Q").itemsize != 8:  # pragma: no cover
    raise ImportError("swarm.cluster.placement needs 8-byte array('Q') items")


def _utf8(s: str) -> bytes:
    # surrogatepass makes this total; for valid strings it is plain UTF-8.
    return s.encode("utf-8", "surrogatepass")


def partition_of(key: str) -> int:
    """The partition of a key: CRC-32 of its UTF-8 bytes, modulo :data:`PARTITIONS`.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    return zlib.crc32(_utf8(key)) % PARTITIONS


def score(node: str, partition: int) -> int:
    """The rendezvous score of ``node`` for ``partition``: a 64-bit unsigned integer.

    Defined as bytes ``8*partition`` to ``8*partition + 8`` of SHAKE-128(node id), read
    big-endian. This computes one score on its own; :class:`Placement` takes all of a
    node's scores from a single call.
    """
    if not 0 <= partition < PARTITIONS:
        raise IndexError(f"partition {partition} is not in 0..{PARTITIONS - 1}")
    return int.from_bytes(hashlib.shake_128(_utf8(node)).digest(8 * partition + 8)[-8:], "big")


class _ScoreCache:
    """Node id -> its scores for every partition (:func:`_node_scores`), the ``size`` most
    recently used kept.

    Scores depend on the node id alone, so one cache serves every :class:`Placement` in
    the process (the in-memory simulator's nodes share it). An id past the bound is
    hashed again when next asked for: SHAKE-128 takes about 50 µs a node.
    """

    __slots__ = ("size", "_compute", "_arrays")

    def __init__(self, compute: Callable[[str], array], size: int) -> None:
        self.size = size
        self._compute = compute
        self._arrays: dict[str, array] = {}  # least recently used first

    def __len__(self) -> int:
        return len(self._arrays)

    def __call__(self, node: str) -> array:
        """``node``'s score array (index ``p`` is ``score(node, p)``); do not change it."""
        arrays = self._arrays
        try:
            found = arrays.pop(node)
        except KeyError:
            found = self._compute(node)
            if len(arrays) >= self.size:
                del arrays[next(iter(arrays))]
        arrays[node] = found
        return found


def _node_scores(node: str) -> array:
    """All of ``node``'s scores as native 64-bit words, from a single SHAKE-128 call."""
    words = array("Q", hashlib.shake_128(_utf8(node)).digest(8 * PARTITIONS))
    if sys.byteorder == "little":
        words.byteswap()
    return words


#: At most this many nodes' score arrays (32 KiB each: 64 MiB in all) are kept.
SCORE_CACHE_SIZE = 2048
_scores = _ScoreCache(_node_scores, SCORE_CACHE_SIZE)

#: :meth:`Placement.with_nodes` builds the table afresh when more than this share of the
#: new view's nodes joined or left: past it, most partitions change anyway.
REBUILD_SHARE = 0.25


def _score_rows(
    arrays: Sequence[array], partitions: Sequence[int] | None = None
) -> list[tuple[int, ...]]:
    """``rows[k][i]`` is the score of the node of ``arrays[i]`` for ``partitions[k]``
    (every partition when None), each partition's scores together for :func:`_owner_table`."""
    if partitions is None:
        return list(zip(*arrays))
    return [tuple(map(getitem, arrays, repeat(p))) for p in partitions]


class _Names(dict):
    """Index tuples -> node-id tuples, each built once and then shared."""

    __slots__ = ("nodes",)

    def __missing__(self, ids: tuple[int, ...]) -> tuple[str, ...]:
        names = self[ids] = tuple(self.nodes[i] for i in ids)
        return names


def _owner_table(
    nodes: Sequence[str], replicas: int, rows: list[tuple[int, ...]]
) -> list[tuple[str, ...]]:
    """For each row, the top ``replicas`` nodes by score, highest first.

    ``nodes`` is sorted; ``rows[k][i]`` is the (non-negative) score of ``nodes[i]`` for
    the ``k``-th partition asked for. Each round takes every partition's highest score
    and, with ``index``, the first node that has it, so equal scores go to the smaller
    node id; then it masks that node out for the next round. The loops run inside C
    (``map`` over ``max``, ``index`` and ``__setitem__``): no Python code runs per
    partition.
    """
    rounds = min(replicas, len(nodes))
    chosen = list(map(tuple.index, rows, map(max, rows)))
    ranks = [chosen]
    if rounds > 1:
        rows = list(map(list, rows))
        for _ in range(rounds - 1):
            deque(map(list.__setitem__, rows, chosen, repeat(-1)), maxlen=0)
            chosen = list(map(list.index, rows, map(max, rows)))
            ranks.append(chosen)
    names = _Names()
    names.nodes = nodes
    return list(map(names.__getitem__, zip(*ranks)))


def _members(nodes: Iterable[str], replicas: int) -> frozenset[str]:
    """``nodes`` as a set, once checked with ``replicas``: the arguments of a placement."""
    members = frozenset(nodes)
    if not members:
        raise ValueError("a placement needs at least one node")
    for node in members:
        if not isinstance(node, str):
            raise TypeError(f"node ids are strings, not {type(node).__name__}")
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError("replicas must be an integer")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    return members


class Placement:
    """The owners of every partition for one membership view; immutable.

    Built from the node ids a node can currently reach and the replica count; the result
    does not depend on the order of ``nodes``. When the view changes, derive the next
    one with :meth:`with_nodes`: it recomputes only the partitions that can change.
    """

    __slots__ = ("_nodes", "_replicas", "_table", "_primaries", "_held")

    def __init__(self, nodes: Iterable[str], replicas: int):
        members = _members(nodes, replicas)
        ordered = sorted(members)
        rows = _score_rows(list(map(_scores, ordered)))
        self._adopt(members, replicas, _owner_table(ordered, replicas, rows))

    def _adopt(
        self, members: frozenset[str], replicas: int, table: list[tuple[str, ...]]
    ) -> Placement:
        self._nodes = members
        self._replicas = replicas
        self._table = table
        self._primaries = list(map(itemgetter(0), table))
        self._held: dict[str, frozenset[int]] | None = None
        return self

    def with_nodes(self, nodes: Iterable[str]) -> Placement:
        """The placement of ``nodes`` with this replica count: equal, owner for owner, to
        ``Placement(nodes, self.replicas)``, but computed from this one.

        A partition keeps its owners unless one of them left or a joining node's score
        reaches its last owner's (every other node already scores below that owner).
        Only those partitions are ranked again, over all of ``nodes``; the others share
        their owner tuples with this placement. A large change is built afresh.
        """
        members = _members(nodes, self._replicas)
        gone, joined = self._nodes - members, members - self._nodes
        if not gone and not joined:
            return self
        if (len(gone) + len(joined) > REBUILD_SHARE * len(members)
                or (joined and len(self._nodes) < self._replicas)):
            return Placement(members, self._replicas)
        table = self._table
        changed = set(compress(range(PARTITIONS), map(not_, map(gone.isdisjoint, table))))
        if joined:
            lasts = list(map(itemgetter(-1), table))
            arrays = {node: _scores(node) for node in set(lasts)}
            floor = list(map(getitem, map(arrays.__getitem__, lasts), range(PARTITIONS)))
            for node in joined:
                changed.update(compress(range(PARTITIONS), map(ge, _scores(node), floor)))
        partitions = sorted(changed)
        ordered = sorted(members)
        rows = _score_rows(list(map(_scores, ordered)), partitions)
        table = list(table)
        for p, owners in zip(partitions, _owner_table(ordered, self._replicas, rows)):
            table[p] = owners
        return Placement.__new__(Placement)._adopt(members, self._replicas, table)

    def moved_partitions(self, other: Placement) -> frozenset[int]:
        """The partitions whose owners, or their order, differ in ``other``."""
        return frozenset(compress(range(PARTITIONS), map(ne, self._table, other._table)))

    @property
    def nodes(self) -> frozenset[str]:
        return self._nodes

    @property
    def replicas(self) -> int:
        """The replica count asked for; a partition has ``min(replicas, len(nodes))``."""
        return self._replicas

    def owners(self, key: str) -> tuple[str, ...]:
        """The nodes that hold ``key``, primary first."""
        return self._table[partition_of(key)]

    def primary(self, key: str) -> str:
        """The node that answers for ``key``."""
        return self._primaries[partition_of(key)]

    def owners_of_partition(self, partition: int) -> tuple[str, ...]:
        if not 0 <= partition < PARTITIONS:
            raise IndexError(f"partition {partition} is not in 0..{PARTITIONS - 1}")
        return self._table[partition]

    def partitions_of(self, node: str) -> frozenset[int]:
        """The partitions ``node`` holds (as primary or backup); empty for a non-member."""
        if self._held is None:
            held: dict[str, list[int]] = {n: [] for n in self._nodes}
            for p, owners in enumerate(self._table):
                for owner in owners:
                    held[owner].append(p)
            self._held = {n: frozenset(ps) for n, ps in held.items()}
        return self._held.get(node, frozenset())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self._nodes == other._nodes and self._replicas == other._replicas

    def __hash__(self) -> int:
        return hash((self._nodes, self._replicas))

    def __repr__(self) -> str:
        return f"Placement({sorted(self._nodes)!r}, replicas={self._replicas})"
