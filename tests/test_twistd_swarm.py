"""Swarms of real ``twistd swarmcache`` processes on 127.0.0.1.

Each test starts ``twistd -n --pidfile= swarmcache ... --peer ws://127.0.0.1:PORT``
processes (see :mod:`twistd_support`) and talks to them with
:class:`swarm.client.SwarmClient`; the ``cluster`` fixture kills every process it started.
Every wait polls a condition against a deadline.

* (a) a line p1 <- p2 <- p3: views, reads and writes across two hops, one copy per key;
* (b) SIGKILL of the middle of that line: the ends notice, answer at once, and the
  restarted middle (same port, same id) joins them up again;
* (c) two processes that dial each other.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twistd_support import Twistd, eventually, free_port, start_node
from twisted.internet.defer import Deferred

from swarm.client.connection import SwarmClient
from swarm.errors import Unavailable

VIEW_DEADLINE = 15.0  # a fresh swarm agrees on its view
#: Peers are pinged every 1 s with a 2 s timeout, so a dead neighbor goes within ~3 s.
DROP_DEADLINE = 8.0
#: --peer redials with backoff from 0.5 s capped at 30 s: a rejoin takes at most ~30 s.
REJOIN_DEADLINE = 35.0
#: Well under the nodes' 5 s request timeout.
QUICK = 2.0
#: node id -> hops, as each node of the line p1 <- p2 <- p3 sees it.
LINE = {
    "p1": {"p1": 0, "p2": 1, "p3": 2},
    "p2": {"p2": 0, "p1": 1, "p3": 1},
    "p3": {"p3": 0, "p2": 1, "p1": 2},
}


# -- processes ---------------------------------------------------------------------------


class Cluster:
    """The processes and clients of one test; :meth:`close` ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Twistd] = []
        self.clients: list[SwarmClient] = []

    def start(self, node_id: str, peers: tuple[Twistd | int, ...] = (),
              port: int | None = None) -> Twistd:
        """Start a node with ``--replicas 1`` that dials ``peers`` (nodes or ports), and
        wait until /health names it."""
        options = ["--replicas", "1"]
        for p in peers:
            options += ["--peer", f"ws://127.0.0.1:{p.port if isinstance(p, Twistd) else p}"]
        proc = start_node(self.workdir, node_id, *options, port=port,
                          name=f"{node_id}-{len(self.procs)}")
        self.procs.append(proc)
        return proc

    async def client(self, proc: Twistd) -> SwarmClient:
        c = await SwarmClient.connect(proc.url, timeout=10, connect_timeout=5)
        self.clients.append(c)
        return c

    async def until_view(self, client: SwarmClient, expected: dict[str, int], what: str,
                         timeout: float = VIEW_DEADLINE) -> None:
        """Wait until ``client``'s node sees the swarm as ``expected`` (id -> hops)."""

        async def check() -> bool:
            return await hops(client) == expected

        await eventually(check, what, timeout, self.logs)

    async def close(self) -> None:
        from twisted.internet import reactor

        try:
            for c in self.clients:
                d = c.close()
                d.addTimeout(2, reactor)
                d.addErrback(lambda _: None)
                await d
        finally:
            for p in self.procs:
                p.kill()

    def logs(self) -> str:
        return "\n".join(p.describe() for p in self.procs)


@pytest_twisted.async_yield_fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()


# -- waiting -----------------------------------------------------------------------------


async def hops(client: SwarmClient) -> dict[str, int]:
    """node id -> hops, as the client's node sees the swarm."""
    view = await client.nodes()
    return {n["id"]: n["hops"] for n in view["nodes"]}


async def timed(d: Deferred) -> tuple[float, Any]:
    """(seconds taken, result or the exception raised) of a request."""
    start = time.monotonic()
    try:
        result: Any = await d
    except Exception as e:
        result = e
    return time.monotonic() - start, result


async def line_of_three(cluster: Cluster):
    """p1 <- p2 <- p3, converged: every node sees all three. The processes and a
    client on each."""
    p1 = cluster.start("p1")
    p2 = cluster.start("p2", peers=(p1,))
    p3 = cluster.start("p3", peers=(p2,))
    c1, c2, c3 = [await cluster.client(p) for p in (p1, p2, p3)]
    await ends_see_the_line(cluster, c1, c3, "line", VIEW_DEADLINE)
    await cluster.until_view(c2, LINE["p2"], "p2 to see the line")
    return (p1, p2, p3), (c1, c2, c3)


async def ends_alone(cluster: Cluster, c1: SwarmClient, c3: SwarmClient, what: str) -> None:
    """p1 and p3, the ends of the line, each drop ``what`` and see only themselves."""
    await cluster.until_view(c1, {"p1": 0}, f"p1 to drop {what}", DROP_DEADLINE)
    await cluster.until_view(c3, {"p3": 0}, f"p3 to drop {what}", DROP_DEADLINE)


async def ends_see_the_line(cluster: Cluster, c1: SwarmClient, c3: SwarmClient, what: str,
                            timeout: float = REJOIN_DEADLINE) -> None:
    """p1 and p3, the ends of the line, each see the whole line."""
    await cluster.until_view(c1, LINE["p1"], f"p1 to see the {what}", timeout)
    await cluster.until_view(c3, LINE["p3"], f"p3 to see the {what}", timeout)


# -- (a) a line of three -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_line_of_three_processes_shares_keys_one_copy_each(cluster):
    (p1, p2, p3), (c1, c2, c3) = await line_of_three(cluster)
    view = await c1.nodes()
    assert view["self"] == "p1"
    by_id = {n["id"]: n for n in view["nodes"]}
    assert sorted(by_id["p2"]["neighbors"]) == ["p1", "p3"]

    # two hops each way
    assert await c3.set("from-p3", {"via": "p3"}) is True
    assert await c1.get("from-p3") == {"via": "p3"}
    assert await c1.set("from-p1", b"\x00p1") is True
    assert await c3.get("from-p1") == b"\x00p1"
    assert await c1.delete("from-p3") is True and await c3.delete("from-p1") is True

    keys = [f"key-{i}" for i in range(50)]
    for i, k in enumerate(keys):
        assert await (c1, c2, c3)[i % 3].set(k, i) is True
    assert await c2.mget(keys) == {k: i for i, k in enumerate(keys)}

    # the owner op agrees on every node, one owner per key with --replicas 1
    owners: dict[str, str] = {}
    for k in keys:
        answers = {tuple(await c.owner(k)) for c in (c1, c2, c3)}
        assert len(answers) == 1, (k, answers)
        (owner,) = answers.pop()
        owners[k] = owner
    expected = {n: sum(o == n for o in owners.values()) for n in ("p1", "p2", "p3")}
    assert all(expected.values()), f"50 keys should land on every node: {expected}"

    # each process holds exactly the keys it owns: 50 copies in all, one per key
    async def held() -> dict[str, int]:
        return {s["node"]: s["keys"] for s in [await c.stats() for c in (c1, c2, c3)]}

    assert await held() == expected
    for k in keys:
        assert await c3.exists(k) is True


# -- (b) SIGKILL of the middle, then its restart -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_killed_middle_is_dropped_and_its_restart_rejoins(cluster):
    (p1, p2, p3), (c1, _c2, c3) = await line_of_three(cluster)
    keys = [f"k{i}" for i in range(30)]
    assert await c1.mset({k: k.upper() for k in keys}) == len(keys)
    owners = {k: (await c1.owner(k))[0] for k in keys}
    on_p1 = [k for k in keys if owners[k] == "p1"]
    assert on_p1 and len(on_p1) < len(keys), owners

    p2.proc.send_signal(signal.SIGKILL)
    p2.proc.wait(10)
    killed_at = time.monotonic()

    # p1 answers at once, whether or not it has noticed yet: what it holds, or
    # unavailable / not found for what was elsewhere; never a 5 s timeout
    for k in keys:
        took, result = await timed(c1.get(k))
        assert took < QUICK, f"get {k} took {took:.2f}s: {result!r}"
        if k in on_p1:
            assert result == k.upper(), (k, result)
        else:
            assert result is None or isinstance(result, Unavailable), (k, result)

    await ends_alone(cluster, c1, c3, "the killed p2")
    assert time.monotonic() - killed_at < DROP_DEADLINE
    # alone, each end owns every key: it serves what it has and writes locally
    for k in on_p1:
        took, result = await timed(c1.get(k))
        assert took < QUICK and result == k.upper(), (k, took, result)
    took, result = await timed(c1.set("during-outage", 1))
    assert took < QUICK and result is True, (took, result)
    took, result = await timed(c3.get("during-outage"))
    assert took < QUICK and result is None, (took, result)

    # the same process comes back on the same port with the same id
    restarted = cluster.start("p2", peers=(p1,), port=p2.port)
    started_at = time.monotonic()
    await ends_see_the_line(cluster, c1, c3, "restarted line")
    assert time.monotonic() - started_at < REJOIN_DEADLINE
    assert restarted.proc.poll() is None

    # and keys cross the whole line again
    assert await c3.set("after-rejoin", "yes") is True
    assert await c1.get("after-rejoin") == "yes"
    for k in on_p1:
        assert await c3.get(k) == k.upper()


# -- (c) two processes that dial each other ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_processes_dialling_each_other(cluster):
    port_b = free_port()
    a = cluster.start("a", peers=(port_b,))
    b = cluster.start("b", peers=(a,), port=port_b)
    ca, cb = await cluster.client(a), await cluster.client(b)
    await cluster.until_view(ca, {"a": 0, "b": 1}, "a to see b")
    await cluster.until_view(cb, {"b": 0, "a": 1}, "b to see a")
    for i in range(20):
        writer, reader = (ca, cb) if i % 2 else (cb, ca)
        assert await writer.set(f"x{i}", i) is True
        assert await reader.get(f"x{i}") == i
    owners = {(await ca.owner(f"x{i}"))[0] for i in range(20)}
    assert owners == {"a", "b"}, "both nodes should own some of 20 keys"
    stats = [await c.stats() for c in (ca, cb)]
    assert sum(s["keys"] for s in stats) == 20
    # one link between them (two connections, one neighbor each)
    assert [s["peers"] for s in stats] == [1, 1]
    assert a.proc.poll() is None and b.proc.poll() is None


# -- (d) a frozen middle: only the pings can tell ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_frozen_middle_is_dropped_by_pings_and_rejoins_when_thawed(cluster):
    """SIGSTOP keeps p2's sockets open, so only the WebSocket pings (1 s + 2 s) notice."""
    from twisted.internet.defer import gatherResults

    (p1, p2, p3), (c1, _c2, c3) = await line_of_three(cluster)
    keys = [f"f{i}" for i in range(20)]
    assert await c1.mset({k: i for i, k in enumerate(keys)}) == len(keys)
    remote = [k for k in keys if (await c1.owner(k))[0] != "p1"]
    assert remote

    p2.proc.send_signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        # requests already on their way to p2 fail when the link is dropped, before
        # their own 5 s deadline
        results = await gatherResults(
            [Deferred.fromCoroutine(timed(c1.get(k))) for k in remote])
        for k, (took, result) in zip(remote, results):
            assert took < 4.5, f"get {k} took {took:.2f}s: {result!r}"
            assert result is None or isinstance(result, Unavailable), (k, result)
        await ends_alone(cluster, c1, c3, "the frozen p2")
        assert time.monotonic() - frozen_at < DROP_DEADLINE
    finally:
        p2.proc.send_signal(signal.SIGCONT)
    await ends_see_the_line(cluster, c1, c3, "thawed line")
    assert await c3.set("after-thaw", 1) is True and await c1.get("after-thaw") == 1
