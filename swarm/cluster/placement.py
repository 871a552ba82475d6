"""Keys -> partitions -> owner nodes, computed from a membership view.

Pure logic, no I/O: every node that sees the same set of node ids computes the same
owners for every key, with no coordinator and no ring tokens to agree on.

A key belongs to one of ``PARTITIONS`` fixed partitions (:func:`partition_of`, CRC-32 of
its UTF-8 bytes). A partition is owned by the ``replicas`` nodes with the highest
rendezvous score (:func:`score`), the first of them being its primary. The owner table is
built once per membership view, so a lookup is a CRC and a list index; a join or leave
moves whole partitions, and only those the joining or leaving node wins or held.

The score of a node for partition ``p`` is the ``p``-th big-endian 64-bit word of
SHAKE-128 over the node id's UTF-8 bytes: one extendable-output hash call per node gives
its scores for all partitions at once, about ten times cheaper than one blake2b per
(node, partition) pair. See ``docs/placement.md`` for the measurements behind the choices.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from array import array
from collections import deque
from itertools import repeat
from operator import itemgetter
from typing import Iterable, Sequence

#: Number of fixed partitions. 4096 rather than Hazelcast's 271 or 1024: at 32 nodes the
#: busiest node's share of primaries is about 1.2x the mean (1.4x with 1024, 1.8x with 271).
PARTITIONS = 4096

# Score rows are assembled from 8-byte words; "Q" is 8 bytes on every CPython platform.
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


def _score_rows(nodes: Sequence[str]) -> list[tuple[int, ...]]:
    """``rows[p][i]`` is ``score(nodes[i], p)``.

    Each node's SHAKE-128 stream holds its scores for all partitions; the streams are
    interleaved word by word, so one ``iter_unpack`` makes every partition's row, its
    integers lying together in memory for the passes of :func:`_owner_table`.
    """
    n = len(nodes)
    words = array("Q", bytes(8 * n * PARTITIONS))
    for i, node in enumerate(nodes):
        words[i::n] = array("Q", hashlib.shake_128(_utf8(node)).digest(8 * PARTITIONS))
    return list(struct.Struct(f">{n}Q").iter_unpack(words))


class _Names(dict):
    """Index tuples -> node-id tuples, each built once and then shared."""

    __slots__ = ("nodes",)

    def __missing__(self, ids: tuple[int, ...]) -> tuple[str, ...]:
        names = self[ids] = tuple(self.nodes[i] for i in ids)
        return names


def _owner_table(
    nodes: Sequence[str], replicas: int, rows: list[tuple[int, ...]]
) -> list[tuple[str, ...]]:
    """For each partition, the top ``replicas`` nodes by score, highest first.

    ``nodes`` is sorted; ``rows[p][i]`` is the (non-negative) score of ``nodes[i]`` for
    partition ``p``. Each round takes every partition's highest score and, with
    ``index``, the first node that has it, so equal scores go to the smaller node id;
    then it masks that node out for the next round. The loops run inside C (``map``
    over ``max``, ``index`` and ``__setitem__``): no Python code runs per partition.
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


class Placement:
    """The owners of every partition for one membership view; immutable.

    Built from the node ids a node can currently reach and the replica count; the result
    does not depend on the order of ``nodes``. When the view changes, build a new one.
    """

    __slots__ = ("_nodes", "_replicas", "_table", "_primaries", "_held")

    def __init__(self, nodes: Iterable[str], replicas: int):
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
        ordered = sorted(members)
        self._nodes = members
        self._replicas = replicas
        self._table = _owner_table(ordered, replicas, _score_rows(ordered))
        self._primaries = list(map(itemgetter(0), self._table))
        self._held: dict[str, frozenset[int]] | None = None

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
