"""Shared fixtures: real nodes listening on 127.0.0.1, port 0."""

from __future__ import annotations

import pytest_twisted
from swarm.service import SwarmNode


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
