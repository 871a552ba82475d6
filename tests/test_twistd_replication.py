"""``--replicas 2`` with real ``twistd`` processes on 127.0.0.1: SIGKILL a node and
every acknowledged write is read back from every survivor."""

from __future__ import annotations

import pytest
import pytest_twisted
from twistd_support import Swarm, eventually, ping_options

PINGS, NOTICE = ping_options()
KEYS = [f"k{i}" for i in range(100)]


@pytest_twisted.async_yield_fixture
async def swarm(tmp_path):
    async with Swarm(tmp_path, "--replicas", "2", *PINGS) as s:
        yield s


@pytest.mark.parametrize("victim", ["p1", "p2"])
@pytest_twisted.ensureDeferred
async def test_sigkill_of_a_node_loses_no_acknowledged_write(swarm, victim):
    await swarm.start("p1")
    await swarm.start("p2", swarm.url("p1"))
    await swarm.start("p3", swarm.url("p2"), swarm.url("p1"))  # a triangle
    await swarm.until_whole("three nodes to link", 30)
    client = swarm.clients["p3"]
    assert await client.mset(dict.fromkeys(KEYS, "v")) == len(KEYS)
    owners = {k: await client.owner(k) for k in KEYS}
    assert all(len(o) == 2 for o in owners.values())
    assert any(o[0] == victim for o in owners.values())  # it was primary for some

    swarm.nodes[victim].kill()
    swarm.clients.pop(victim)
    survivors = [n for n in swarm.nodes if n != victim]
    await swarm.until_views({n: set(survivors) for n in survivors},
                            f"the survivors to drop {victim}", 10 + NOTICE)

    async def all_read() -> bool:
        for name in survivors:
            if await swarm.clients[name].mget(KEYS) != dict.fromkeys(KEYS, "v"):
                return False
        return True

    await eventually(all_read, "every key from every survivor", 10, swarm.logs)
