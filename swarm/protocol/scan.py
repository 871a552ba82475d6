"""The scan's order, cursors and merge: pure logic, no I/O.

A scan walks the swarm's keys in one fixed order, by *position* ``(partition, key)``:
partition number first, then the key's code points. Every node can list its own keys in
that order after any position (the store keeps its keys per partition), so a step asks
each reachable node for its next keys after the cursor and keeps the first ``count`` of
their union. A key that exists from the start to the end of a scan is held by some
reachable node when the cursor passes it, wherever the view moved it meanwhile, so it is
returned at least once; a key held by two nodes (replicas, a handoff) is returned once
per step, and may come back in another step only if it moved behind the cursor's back.

A node answers at most ``count`` keys and looks at a bounded number (a glob that
matches little costs a node a bounded step, not its whole store), saying how far it
looked (``upto``); the step keeps only keys up to the nearest such bound, so none that
a node has not looked at yet is skipped.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from collections.abc import Callable, Iterable
from functools import lru_cache

#: (partition, key); ``(0, "")`` lies before every key (keys are never empty).
Position = tuple[int, str]

START: Position = (0, "")
DEFAULT_COUNT = 100
MAX_COUNT = 10_000
#: How many keys a node looks at per step, at least: with a glob that matches few keys,
#: a step may return none and a cursor that has moved on.
LOOK_AT_LEAST = 10_000


def encode_cursor(position: Position) -> str:
    """An opaque, URL-safe cursor for ``position``."""
    raw = json.dumps(list(position), ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor stands for; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a cursor this swarm gave") from None
    return position_from_wire(obj)


def position_from_wire(obj: object) -> Position:
    if (not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], int)
            or isinstance(obj[0], bool) or not 0 <= obj[0] < 2**32
            or not isinstance(obj[1], str)):
        raise ValueError("a scan position is [partition, key]")
    return obj[0], obj[1]


@lru_cache(maxsize=256)
def matcher(pattern: str) -> Callable[[str], object]:
    """A predicate for the glob ``pattern`` (``*``, ``?``, ``[abc]``, ``[!abc]``),
    case-sensitive, matching the whole key."""
    return re.compile(fnmatch.translate(pattern), re.DOTALL).match


def keys_after(
    partitions: dict[int, Iterable[str]],
    after: Position,
    count: int,
    match: Callable[[str], object] | None = None,
    look_at: int | None = None,
) -> tuple[list[str], Position | None]:
    """A node's side of a step: its first ``count`` keys after ``after`` in scan order
    (matching ``match``), from ``partitions`` (partition -> its keys, any order), and
    the position it looked up to (None: to the end).

    It looks at most ``look_at`` keys (default: ``max(count, LOOK_AT_LEAST)``) past
    the cursor, whole partitions at a time, so the answer's cost is bounded."""
    budget = max(count, LOOK_AT_LEAST) if look_at is None else look_at
    start, after_key = after
    found: list[str] = []
    looked = 0
    for p in sorted(n for n in partitions if n >= start):
        keys = sorted(partitions[p])
        if p == start:
            keys = [k for k in keys if k > after_key]
        for key in keys:
            looked += 1
            if match is None or match(key):
                found.append(key)
                if len(found) == count:
                    return found, (p, key)
        if looked >= budget:
            return found, (p, keys[-1]) if keys else (p, after_key)
    return found, None


def merge_step(
    answers: Iterable[tuple[list[str], Position | None]],
    count: int,
    partition: Callable[[str], int],
) -> tuple[list[str], Position | None]:
    """The step's keys and the next cursor's position (None: the scan is complete),
    from every node's :func:`keys_after` answer."""
    bound: Position | None = None
    positions: set[Position] = set()
    for keys, upto in answers:
        if upto is not None and (bound is None or upto < bound):
            bound = upto
        positions.update((partition(k), k) for k in keys)
    ordered = sorted(p for p in positions if bound is None or p <= bound)
    if len(ordered) >= count:
        ordered = ordered[:count]
        return [k for _, k in ordered], ordered[-1]
    return [k for _, k in ordered], bound
