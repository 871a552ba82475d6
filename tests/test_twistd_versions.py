"""Stale reads through real ``twistd`` processes (issue 6): once a write is acknowledged,
no node may go on handing back an older value after the swarm has healed.

Three nodes in a line p1 <- p2 <- p3 (p2 dials p1, p3 dials p2, ``--replicas 1``) on
127.0.0.1, disturbed as an operator or a network would:

1. the owner of a key frozen (SIGSTOP) past the peer pings, the key written elsewhere;
2. five short freezes of the owner in a row, a write during each (flaps);
3. a graceful restart of the middle node, writes through an end meanwhile;
4. a restart of the node the client uses, which writes again at once;
5. a node restarted with its id that acknowledges writes before it has linked;
6. the p2 - p3 link cut (a :class:`~twistd_support.TcpForwarder` in the test process),
   keys written on the far side, the link restored;
7. both sides of that cut writing the same keys, or deleting a key the other side wrote.

Each test then waits for every node to reach every node, requires every node to read
the latest acknowledged write of every key within ``CONVERGE`` seconds and to keep
doing so. Reader loops on the nodes count the stale reads (an answer older than the
last write acknowledged before the read was sent) in each phase of the test; the counts
are in every failure message. Values are unique per key and, unless the case is about
one node writing again, no node writes a key twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest_twisted
from twistd_support import POLL, Swarm, TcpForwarder, eventually, ping_options
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from swarm.errors import SwarmError

PINGS, NOTICE = ping_options()  # a silent peer is dropped about NOTICE seconds on
#: How long case 1 keeps the owner frozen: well past the pings (10 s with the defaults).
FREEZE = 3 * NOTICE + 1
#: How long each flap of case 2 lasts (longer only when the drop itself takes longer).
FLAP = 3.0
VIEW_DEADLINE = 15.0  # a fresh swarm agrees on its view
DROP_DEADLINE = NOTICE + 5  # a frozen, stopped or cut-off peer is out of the views
#: --peer redials with backoff capped at 30 s.
REJOIN_DEADLINE = 40.0
#: Once every node reaches every node, handoffs have this long to settle every key.
CONVERGE = 5.0
#: Sweeps of every key through every node that must all read the latest, after that.
STEADY_SWEEPS = 5
#: No reader loop outlives this, whatever the test does.
READ_LIMIT = 120.0

LINE = {"p1", "p2", "p3"}


# -- the history of writes and reads -----------------------------------------------------


@dataclass
class Tally:
    reads: int = 0
    stale: int = 0
    failed: int = 0  # errors (unavailable, timeout): not answers, so never stale


class History:
    """Every write of the test in the order sent, and every read judged against them.

    A read is stale when it returns a value written before the latest write of its key
    that was acknowledged before the read was sent (nothing counts as the value before
    the first write, and after a delete). Reads are tallied per phase and answering node.
    """

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self._writes: dict[str, list[Any]] = {}  # key -> values sent, None for a delete
        self._acked: dict[str, int] = {}  # key -> index of its latest acknowledged write
        self.phase = "before"
        self.tallies: dict[str, dict[str, Tally]] = {}
        self._loops: list[Any] = []
        self._stopped = False

    # writes

    async def set(self, name: str, key: str, value: Any) -> None:
        i = self._sent(key, value)
        stored = await self.swarm.clients[name].set(key, value)
        assert stored is True, f"set {key}={value!r} through {name}: {stored!r}"
        self._acked[key] = max(self._acked.get(key, -1), i)

    async def delete(self, name: str, key: str) -> None:
        i = self._sent(key, None)
        deleted = await self.swarm.clients[name].delete(key)
        assert deleted is True, f"delete {key} through {name} found nothing to delete"
        self._acked[key] = max(self._acked.get(key, -1), i)

    def _sent(self, key: str, value: Any) -> int:
        writes = self._writes.setdefault(key, [])
        assert value is None or value not in writes, f"{key}={value!r} written twice"
        writes.append(value)
        return len(writes) - 1

    def latest(self, key: str) -> Any:
        return self._writes[key][self._acked[key]]

    # reads

    async def read(self, name: str, key: str) -> tuple[bool, Any]:
        """Read ``key`` through ``name`` and tally it: (whether it was the latest
        acknowledged write, the value or the error)."""
        tally = self.tallies.setdefault(self.phase, {}).setdefault(name, Tally())
        acked = self._acked.get(key, -1)
        tally.reads += 1
        try:
            value = await self.swarm.clients[name].get(key)
        except (SwarmError, KeyError) as e:  # KeyError: that node is stopped right now
            tally.failed += 1
            return False, e
        writes = self._writes[key]
        found = [i for i, v in enumerate(writes) if v == value]
        assert found or value is None, f"{name} read {key}={value!r}, never written"
        if (found[-1] if found else -1) < acked:
            tally.stale += 1
        return value == self.latest(key), value

    def watch(self, *names: str) -> None:
        """Read every key through each of ``names`` in a loop until :meth:`stop`."""
        for name in names:
            self._loops.append(Deferred.fromCoroutine(self._reader(name)))

    async def _reader(self, name: str) -> None:
        from twisted.internet import reactor

        end = time.monotonic() + READ_LIMIT
        while not self._stopped and time.monotonic() < end:
            for key in list(self._writes):
                if not self._stopped:
                    await self.read(name, key)
            await deferLater(reactor, POLL, lambda: None)

    async def stop(self) -> None:
        self._stopped = True
        for loop in self._loops:
            await loop

    def stale(self, phase: str) -> int:
        return sum(t.stale for t in self.tallies.get(phase, {}).values())

    def report(self) -> str:
        """Stale reads by phase and node, e.g. ``heal: p1 12/40 p2 0/38 (failed p1 3)``."""
        lines = []
        for phase, by_node in self.tallies.items():
            counts = " ".join(f"{n} {t.stale}/{t.reads}" for n, t in sorted(by_node.items()))
            failed = " ".join(f"{n} {t.failed}" for n, t in sorted(by_node.items())
                              if t.failed)
            lines.append(f"{phase}: {self.stale(phase)} stale; {counts}"
                         + (f" (failed {failed})" if failed else ""))
        return "stale reads / reads by phase: " + "; ".join(lines)

    # convergence

    async def sweep(self) -> dict[tuple[str, str], Any]:
        """Read every key through every running node: (node, key) -> what it read, for
        the answers that are not the latest write."""
        wrong = {}
        for name in sorted(self.swarm.clients):
            for key in sorted(self._writes):
                latest, value = await self.read(name, key)
                if not latest:
                    wrong[name, key] = value
        return wrong

    async def converged(self) -> None:
        """Every node reads the latest write of every key within CONVERGE seconds (the
        swarm is whole), and goes on doing so for STEADY_SWEEPS sweeps."""
        self.phase = "heal"  # from the end of the disturbance on, at the latest
        await self.swarm.until_whole("the swarm to heal", REJOIN_DEADLINE)
        last: dict = {}

        async def everyone_reads_the_latest() -> bool:
            nonlocal last
            last = await self.sweep()
            return not last

        try:
            await eventually(everyone_reads_the_latest, "every node to read the latest",
                             CONVERGE)
        except AssertionError:
            latest = {k: self.latest(k) for k in sorted(self._writes)}
            raise AssertionError(f"not every node reads the latest write {CONVERGE}s "
                                 f"after the swarm healed; {self.report()}. Latest: "
                                 f"{latest}; read instead: {last}\n"
                                 f"{self.swarm.logs()}") from None
        self.phase = "after"
        for _ in range(STEADY_SWEEPS):
            wrong = await self.sweep()
            assert not wrong, f"older values came back: {wrong}; {self.report()}"
        await self.stop()
        assert self.stale("after") == 0, f"stale after converging; {self.report()}"
        print(self.report())  # shown with -rP: the counts of a passing run


@pytest_twisted.async_yield_fixture
async def swarm(tmp_path):
    async with Swarm(tmp_path, "--replicas", "1", *PINGS) as s:
        yield s


@pytest_twisted.async_yield_fixture
async def history(swarm):
    h = History(swarm)
    try:
        yield h
    finally:
        await h.stop()


# -- shapes and keys ---------------------------------------------------------------------


async def line(swarm: Swarm, forwarded: bool = False) -> TcpForwarder | None:
    """p1 <- p2 <- p3, whole; with ``forwarded`` p3 dials p2 through a forwarder, which
    is returned so the test can cut that link."""
    await swarm.start("p1")
    await swarm.start("p2", swarm.url("p1"))
    forwarder = await swarm.forwarder("p2") if forwarded else None
    await swarm.start("p3", forwarder.url if forwarder else swarm.url("p2"))
    await swarm.until_whole("the line", VIEW_DEADLINE)
    return forwarder


async def owned(swarm: Swarm, prefix: str, owners: set[str], count: int) -> list[str]:
    """The first ``count`` keys ``{prefix}0``, ``{prefix}1``... that one of ``owners``
    owns in the whole swarm (the ``owner`` op)."""
    keys: list[str] = []
    client = next(iter(swarm.clients.values()))
    for i in range(1000):
        if (await client.owner(f"{prefix}{i}"))[0] in owners:
            keys.append(f"{prefix}{i}")
            if len(keys) == count:
                return keys
    raise AssertionError(f"{owners} own fewer than {count} of 1000 keys")


async def written(history: History, prefix: str, through: str) -> list[str]:
    """Two keys owned by each node of the line, each set to ``v1`` through ``through``."""
    swarm = history.swarm
    keys = [k for n in sorted(LINE) for k in await owned(swarm, f"{prefix}{n}-", {n}, 2)]
    for k in keys:
        await history.set(through, k, "v1")
    return keys


async def dropped(swarm: Swarm, name: str, survivors: set[str]) -> None:
    """Wait until ``survivors`` reach only each other: the pings gave up on ``name``."""
    await swarm.until_views({n: survivors for n in survivors}, f"{name} to be dropped",
                            DROP_DEADLINE)


async def hold(until: float) -> None:
    """The freeze itself: the one fixed wait, up to the monotonic time ``until``."""
    from twisted.internet import reactor

    await deferLater(reactor, max(0.0, until - time.monotonic()), lambda: None)


# -- 1. a frozen owner -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_write_made_while_its_owner_was_frozen_is_read_everywhere_after_the_thaw(
        swarm, history):
    await line(swarm)
    (k,) = await owned(swarm, "frozen-", {"p3"}, 1)
    await history.set("p2", k, "v1")
    history.watch("p1", "p2")
    history.phase = "frozen"
    frozen_at = time.monotonic()
    swarm.freeze("p3")
    try:
        await dropped(swarm, "p3", {"p1", "p2"})
        await history.set("p1", k, "v2")
        await hold(frozen_at + FREEZE)
    finally:
        swarm.thaw("p3")
    history.phase = "heal"
    history.watch("p3")
    await history.converged()


# -- 2. flaps ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_during_five_short_freezes_of_the_owner_leave_the_last_one_everywhere(
        swarm, history):
    """p1 and p2 take turns writing the key, one new value per freeze: the case is
    about one key written again and again."""
    await line(swarm)
    (k,) = await owned(swarm, "flap-", {"p3"}, 1)
    await history.set("p3", k, "v0")
    history.watch("p1", "p2")
    for i in range(1, 6):
        history.phase = "frozen"
        frozen_at = time.monotonic()
        swarm.freeze("p3")
        try:
            await dropped(swarm, "p3", {"p1", "p2"})
            await history.set(("p1", "p2")[i % 2], k, f"v{i}")
            await hold(frozen_at + FLAP)
        finally:
            swarm.thaw("p3")
        history.phase = "heal"
        await swarm.until_whole(f"the swarm to heal after freeze {i}", REJOIN_DEADLINE)
    history.watch("p3")
    await history.converged()


# -- 3. a graceful restart of the middle ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_through_an_end_while_the_middle_restarts_are_read_everywhere(
        swarm, history):
    await line(swarm)
    keys = await written(history, "mid-", "p2")
    history.watch("p1", "p3")
    history.phase = "split"
    await swarm.stop("p2")  # it hands its entries to p1 and p3 first
    await swarm.until_views({"p1": {"p1"}, "p3": {"p3"}}, "the ends alone", DROP_DEADLINE)
    for k in keys:
        await history.set("p3", k, "v2")
    history.phase = "heal"
    await swarm.start("p2")
    history.watch("p2")
    await history.converged()


# -- 4. a restart of the node the client uses ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_writing_again_through_its_restarted_node_is_read_everywhere(
        swarm, history):
    """p1 is dialled by p2, so once restarted it serves its client before p2 has
    redialled it; the client reconnects and writes each key again at once, as before."""
    await line(swarm)
    keys = await written(history, "client-", "p1")
    history.watch("p2", "p3")
    await swarm.stop("p1")
    history.phase = "heal"
    await swarm.start("p1")
    for k in keys:
        await history.set("p1", k, "v2")
    history.watch("p1")
    await history.converged()


# -- 5. acknowledged before linking ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_a_restarted_node_acknowledged_before_linking_survive_its_linking(
        swarm, history):
    forwarder = await line(swarm, forwarded=True)
    keys = await written(history, "early-", "p1")
    history.watch("p1", "p2")
    await swarm.stop("p3")
    forwarder.cut()  # p3's only way to the swarm
    await swarm.start("p3")
    history.phase = "alone"
    for k in keys:
        await history.set("p3", k, "v2")
    assert await swarm.view("p3") == {"p3"}, "p3 linked before its writes were acknowledged"
    forwarder.restore()
    history.phase = "heal"
    history.watch("p3")
    await history.converged()


# -- 6. a cut link -----------------------------------------------------------------------


async def cut(swarm: Swarm, forwarder: TcpForwarder, history: History) -> None:
    """Cut p2 - p3 and wait until each side sees only itself."""
    history.phase = "split"
    forwarder.cut()
    await swarm.until_views({"p1": {"p1", "p2"}, "p2": {"p1", "p2"}, "p3": {"p3"}},
                            "the cut to split the line", DROP_DEADLINE)


@pytest_twisted.ensureDeferred
async def test_keys_written_beyond_a_cut_link_are_read_everywhere_once_it_is_restored(
        swarm, history):
    forwarder = await line(swarm, forwarded=True)
    keys = await written(history, "cut-", "p2")
    history.watch("p1", "p2", "p3")
    await cut(swarm, forwarder, history)
    for k in keys:
        await history.set("p3", k, "v2")
    forwarder.restore()
    await history.converged()


# -- 7. both sides of a split write --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_both_sides_of_a_split_converge_to_the_later_write_and_the_later_delete(
        swarm, history):
    """For keys owned on each side, each order of the two sides' writes, and a delete
    on the side that holds the key after the other side wrote it."""
    forwarder = await line(swarm, forwarded=True)
    near = await owned(swarm, "near-", {"p1", "p2"}, 3)
    (far, far_too, far_gone) = await owned(swarm, "far-", {"p3"}, 3)
    near_gone = near.pop()
    for k in (near_gone, far_gone):
        await history.set("p2", k, "v0")
    history.watch("p1", "p3")
    await cut(swarm, forwarder, history)
    # (key, first writer, later writer): each key once per node
    orders = [(near[0], "p2", "p3"), (near[1], "p3", "p1"),
              (far, "p3", "p2"), (far_too, "p1", "p3")]
    for k, first, _ in orders:
        await history.set(first, k, f"first-{first}")
    for k, first, _ in orders:  # each side still reads its own write: the split is real
        assert await swarm.clients[first].get(k) == f"first-{first}"
    for k, _, later in orders:
        await history.set(later, k, f"later-{later}")
    await history.set("p3", near_gone, "far")
    await history.set("p1", far_gone, "near")
    await history.delete("p1", near_gone)
    await history.delete("p3", far_gone)
    forwarder.restore()
    await history.converged()
