"""Shared fixtures: real nodes listening on 127.0.0.1 (port 0), swarms of them, and a
store on a fake clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import pytest_twisted

from swarm.node.node import SwarmNode


def on_asyncio(coro, timeout: float = 60.0):
    """Run ``coro`` (asyncio code such as the ``websockets`` client) as a task on the
    reactor's loop, with a deadline; a Deferred of its result."""
    import asyncio

    from twisted.internet.defer import Deferred

    return Deferred.fromFuture(asyncio.ensure_future(asyncio.wait_for(coro, timeout)))


@contextlib.asynccontextmanager
async def running(port: str = "tcp:0:interface=127.0.0.1", **options) -> AsyncIterator[SwarmNode]:
    """For asyncio code: a node started on ``port`` with ``options``, stopped at the end
    of the block."""
    import asyncio

    from twisted.internet import reactor  # pytest-twisted's asyncio reactor

    loop = asyncio.get_running_loop()
    node = SwarmNode(port, reactor=reactor, **options)
    node.startService()
    try:
        await node.when_listening().asFuture(loop)
        yield node
    finally:
        await node.stopService().asFuture(loop)


async def start_node(**options) -> SwarmNode:
    """A started node on a free loopback port; the caller stops it."""
    from twisted.internet import reactor  # after pytest-twisted installs asyncio's

    options.setdefault("reactor", reactor)
    node = SwarmNode("tcp:0:interface=127.0.0.1", **options)
    node.startService()
    await node.when_listening()
    return node


@pytest_twisted.async_yield_fixture
async def node():
    n = await start_node(node_id="test-node")
    yield n
    await n.stopService()


async def until(condition, timeout: float = 15.0, interval: float = 0.02, what: str = ""):
    """Wait for ``condition()`` to hold, polling; fail after ``timeout`` seconds."""
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await task.deferLater(reactor, interval, lambda: None)


async def converged(nodes, count: int | None = None, what: str = "") -> None:
    """Wait until every node of ``nodes`` sees ``count`` nodes (default: all of them)."""
    count = len(nodes) if count is None else count
    await until(
        lambda: all(len(n.overlay.membership.reachable) == count for n in nodes),
        what=what or f"{count} nodes to see each other",
    )


async def start_swarm(count: int, edges, **options) -> list[SwarmNode]:
    """``count`` nodes named n0.. where (a, b) in ``edges`` means na dials nb; waits
    until every node sees all the others."""
    nodes = [await start_node(node_id=f"n{i}", **options) for i in range(count)]
    for a, b in edges:
        nodes[a].add_peer(nodes[b].url)
    await converged(nodes)
    return nodes


async def stop_all(nodes) -> None:
    from twisted.internet.defer import gatherResults

    await gatherResults([n.stopService() for n in nodes if n.running])


# -- a store on a fake clock, for the unit tests of swarm.store.memory and swarm.cluster.commands ------



@pytest.fixture
def clock():
    """``task.Clock``: time moves only when the test advances it."""
    from twisted.internet.task import Clock

    return Clock()


@pytest.fixture
def store(clock):
    """An empty MemoryStore with the default limits, on ``clock``."""
    from swarm.store.memory import MemoryStore

    return MemoryStore(clock)
