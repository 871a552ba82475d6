"""Partitions and double failures of replicated swarms (issue 7), with real ``twistd``
processes on 127.0.0.1 and fast peer pings:

1. a line a - b - c - d with ``--replicas 2`` whose middle link b - c runs through a
   :class:`~twistd_support.TcpForwarder`: the link is cut, both halves go on writing
   and deleting (each side alone, both sides, a delete after the other side's write, a
   write after the other side's delete), the link is restored, and every node then
   reads the later write of every key (a deleted key stays deleted), with every live
   key held on exactly two nodes;
2. a ring n0 - n1 - n2 - n3 - n4 - n0 with ``--replicas 3`` under a stream of writes
   (:class:`~twistd_support.Writer`) loses two adjacent nodes to SIGKILL at once (the
   ring becomes the line n3 - n4 - n0): every acknowledged write is read back through
   every survivor, and each survivor ends up holding every key.

"Later" is by wall clock: each write's version is a hybrid logical clock stamp of the
node the client talks to, in milliseconds, so the test lets a few milliseconds pass
between a first write and the later one on the other side. Figures (times to drop, heal
and converge, writes acknowledged and failed) are printed (``pytest -s``) and named in
assertion messages.
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from twistd_support import Swarm, Writer, eventually, ping_options
from twisted.internet.task import deferLater

PINGS, NOTICE = ping_options()
VIEW_DEADLINE = 30.0  # a fresh swarm agrees on its view
DROP_DEADLINE = NOTICE + 10  # a cut-off or killed node is out of the views
#: --peer redials with backoff capped at 30 s (the cut is short, so it stays small).
REJOIN_DEADLINE = 40.0
CONVERGE = 20.0  # once the views are whole (or shrunk), every read is right within this
#: Between a write and the later one on the other side of the cut: versions are wall
#: clock milliseconds, so this orders them (nothing is timed by it).
LATER = 0.02


async def later() -> None:
    """Let the wall clock move on by a few milliseconds, so the next write is later."""
    from twisted.internet import reactor

    start = time.time()
    await deferLater(reactor, LATER, lambda: None)
    assert time.time() - start >= 0.005, "the wall clock did not move on"


async def live_counts(swarm: Swarm, names: list[str]) -> dict[str, int]:
    """Each node's ``keys`` (live entries, tombstones excluded) from its ``stats``."""
    return {n: (await swarm.clients[n].stats())["keys"] for n in names}


# -- 1. a line cut in the middle ---------------------------------------------------------


LEFT, RIGHT = ("a", "b"), ("c", "d")
#: Keys of each kind: enough that their owners differ (either side, or both).
EACH = 5


@pytest_twisted.async_yield_fixture
async def line_swarm(tmp_path):
    async with Swarm(tmp_path, "--replicas", "2", *PINGS) as s:
        yield s


class Split:
    """The writes of both sides of the cut, and what each key must read afterwards."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.expected: dict[str, Any] = {}  # None: deleted
        self._turn = 0

    def _through(self, side: tuple[str, ...]) -> Any:
        """The next client of ``side``: the writes alternate between its two nodes."""
        self._turn += 1
        return self.swarm.clients[side[self._turn % len(side)]]

    async def set(self, side: tuple[str, ...], keys: list[str], value: str) -> None:
        items = {k: f"{value}-{k}" for k in keys}
        assert await self._through(side).mset(items) == len(items)
        self.expected.update(items)

    async def delete(self, side: tuple[str, ...], keys: list[str]) -> None:
        for k in keys:
            # a side that never had the key finds nothing, yet leaves a tombstone
            assert await self._through(side).delete(k) in (True, False)
            self.expected[k] = None

    def live(self) -> dict[str, Any]:
        return {k: v for k, v in self.expected.items() if v is not None}


@pytest_twisted.ensureDeferred
async def test_line_cut_in_the_middle_converges_to_the_later_write(line_swarm):
    swarm = line_swarm
    report: dict[str, Any] = {}
    await swarm.start("a")
    await swarm.start("b", swarm.url("a"))
    forwarder = await swarm.forwarder("b")  # c dials b through it: the middle link
    await swarm.start("c", forwarder.url)
    await swarm.start("d", swarm.url("c"))
    await swarm.until_whole("the line a-b-c-d", VIEW_DEADLINE)

    kinds = ["untouched", "left", "right", "left-later", "right-later", "gone-left",
             "gone-right", "write-then-gone-left", "write-then-gone-right",
             "gone-then-write-right", "new-left", "new-right"]
    keys = {kind: [f"{kind}-{i}" for i in range(EACH)] for kind in kinds}
    split = Split(swarm)
    await split.set(LEFT + RIGHT, [k for kind, ks in keys.items()
                                   if not kind.startswith("new") for k in ks], "v0")

    forwarder.cut()
    cut_at = time.monotonic()
    await swarm.until_views({n: set(side) for side in (LEFT, RIGHT) for n in side},
                            "the cut to split the line", DROP_DEADLINE)
    report["split after s"] = round(time.monotonic() - cut_at, 2)

    # each side alone
    await split.set(LEFT, keys["left"], "left")
    await split.set(RIGHT, keys["right"], "right")
    await split.set(LEFT, keys["new-left"], "left")
    await split.set(RIGHT, keys["new-right"], "right")
    await split.delete(LEFT, keys["gone-left"])
    await split.delete(RIGHT, keys["gone-right"])
    # the split is real: a key new on one side is not on the other
    for side, other in ((LEFT, "new-right"), (RIGHT, "new-left")):
        for n in side:
            assert await swarm.clients[n].mget(keys[other]) == {}, f"{n} sees {other}"
    # first writes ...
    await split.set(RIGHT, keys["left-later"], "right-first")
    await split.set(LEFT, keys["right-later"], "left-first")
    await split.set(RIGHT, keys["write-then-gone-left"], "right-first")
    await split.set(LEFT, keys["write-then-gone-right"], "left-first")
    await split.delete(LEFT, keys["gone-then-write-right"])
    await later()
    # ... and the later ones, on the other side
    await split.set(LEFT, keys["left-later"], "left-later")
    await split.set(RIGHT, keys["right-later"], "right-later")
    await split.delete(LEFT, keys["write-then-gone-left"])
    await split.delete(RIGHT, keys["write-then-gone-right"])
    await split.set(RIGHT, keys["gone-then-write-right"], "right-later")

    forwarder.restore()
    healed_at = time.monotonic()
    report["cut for s"] = round(healed_at - cut_at, 2)
    await swarm.until_whole("the line to heal", REJOIN_DEADLINE)
    report["whole after s"] = round(time.monotonic() - healed_at, 2)

    everyone = sorted(swarm.nodes)
    all_keys = sorted(split.expected)
    live = split.live()
    wrong: dict[str, dict[str, Any]] = {}

    async def everyone_reads_the_later_write() -> bool:
        for n in everyone:
            values = await swarm.clients[n].mget(all_keys)
            wrong[n] = {k: (values.get(k), split.expected[k]) for k in all_keys
                        if values.get(k) != split.expected[k]}
        return not any(wrong.values())

    def logs() -> str:
        shown = {n: dict(list(w.items())[:10]) for n, w in wrong.items() if w}
        return f"(read, expected): {shown}\nreport: {report}\n{swarm.logs()}"

    await eventually(everyone_reads_the_later_write,
                     "every node to read the later write of every key", CONVERGE, logs)
    report["read right after s"] = round(time.monotonic() - healed_at, 2)

    counts: dict[str, int] = {}

    async def two_copies() -> bool:
        counts.update(await live_counts(swarm, everyone))
        return sum(counts.values()) == 2 * len(live)

    await eventually(two_copies, f"{len(live)} live keys on 2 nodes each", CONVERGE,
                     lambda: f"keys by node: {counts}; report: {report}\n{swarm.logs()}")
    report["two copies after s"] = round(time.monotonic() - healed_at, 2)
    report["keys by node"] = counts
    # and they stay right
    assert await everyone_reads_the_later_write(), logs()
    report["keys"], report["live"] = len(all_keys), len(live)
    print(f"\nline cut in the middle: {report}")


# -- 2. a ring of five loses two adjacent nodes --------------------------------------------


RING = [f"n{i}" for i in range(5)]
VICTIMS = ("n1", "n2")  # adjacent: the ring becomes the line n3 - n4 - n0
MSET_KEYS = {f"m{i}": f"v{i}" for i in range(300)}
WRITER_KEYS = 100
AFTER_KILLS = 50  # writes acknowledged once the survivors dropped the victims


@pytest_twisted.async_yield_fixture
async def ring_swarm(tmp_path):
    async with Swarm(tmp_path, "--replicas", "3", *PINGS) as s:
        yield s


@pytest_twisted.ensureDeferred
async def test_ring_of_five_with_three_replicas_survives_two_kills(ring_swarm):
    swarm = ring_swarm
    report: dict[str, Any] = {}
    await swarm.start("n0")
    for prev, name in zip(RING, RING[1:-1]):
        await swarm.start(name, swarm.url(prev))
    await swarm.start("n4", swarm.url("n3"), swarm.url("n0"))  # closes the ring
    await swarm.until_whole("the ring of five", VIEW_DEADLINE)
    neighbors = {n["id"]: set(n["neighbors"])
                 for n in (await swarm.clients["n0"].nodes())["nodes"]}
    assert neighbors == {n: {RING[i - 1], RING[(i + 1) % 5]} for i, n in enumerate(RING)}

    assert await swarm.clients["n3"].mset(MSET_KEYS) == len(MSET_KEYS)
    client = swarm.clients["n0"]
    owners = {k: await client.owner(k) for k in MSET_KEYS}
    assert all(len(o) == 3 for o in owners.values())
    # keys the kills leave with one copy: the hard ones
    report["mset keys owned by both victims"] = one_left = sum(
        set(VICTIMS) <= set(o) for o in owners.values())
    assert one_left > 0
    writer = Writer(lambda: swarm.clients, keys=WRITER_KEYS).start()
    survivors = sorted(set(RING) - set(VICTIMS))
    try:
        await writer.until(WRITER_KEYS)
        acked_before = writer.acknowledged
        for victim in VICTIMS:  # SIGKILL both before either is dropped
            swarm.nodes[victim].proc.kill()
        for victim in VICTIMS:
            swarm.nodes[victim].proc.wait(10)
            swarm.clients.pop(victim)
        killed_at = time.monotonic()
        await swarm.until_views({n: set(survivors) for n in survivors},
                                f"the survivors to drop {VICTIMS}", DROP_DEADLINE)
        report["dropped after s"] = round(time.monotonic() - killed_at, 2)
        await writer.until(AFTER_KILLS)
        report["acknowledged around the kills"] = writer.acknowledged - acked_before
        last: dict[str, Any] = {}

        async def every_survivor_reads_every_write() -> bool:
            for n in survivors:
                values = await swarm.clients[n].mget(list(MSET_KEYS))
                last[n] = {"mset missing or wrong":
                           sorted(k for k in MSET_KEYS if values.get(k) != MSET_KEYS[k]),
                           "writer": await writer.problems(swarm.clients[n])}
            return not any(p for n in survivors for p in last[n].values())

        def logs() -> str:
            shown = {n: {what: p[:10] for what, p in ps.items() if p}
                     for n, ps in last.items()}
            return f"problems: {shown}\nreport: {report}\n{swarm.logs()}"

        await eventually(every_survivor_reads_every_write,
                         "every acknowledged write through every survivor", CONVERGE, logs)
        report["read right after s"] = round(time.monotonic() - killed_at, 2)
        await writer.stop()
        await eventually(every_survivor_reads_every_write,
                         "every acknowledged write, writes stopped", CONVERGE, logs)

        # three replicas over three survivors: every node holds every key
        assert len(writer.acked) == WRITER_KEYS  # every writer key was acknowledged
        total = len(MSET_KEYS) + WRITER_KEYS
        counts: dict[str, int] = {}

        async def full() -> bool:
            counts.update(await live_counts(swarm, survivors))
            return all(c == total for c in counts.values())

        await eventually(full, f"{survivors} to hold all {total} keys", CONVERGE,
                         lambda: f"keys: {counts}; report: {report}\n{swarm.logs()}")
        report["full after s"] = round(time.monotonic() - killed_at, 2)
    finally:
        await writer.stop()
        report["acknowledged"] = writer.acknowledged
        report["failures"] = writer.failures
        print(f"\nring of five, {VICTIMS} killed: {report}")
