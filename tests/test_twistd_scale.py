"""Twenty real ``twistd swarmcache`` processes on 127.0.0.1 (issue 11), with
``--replicas 2`` and quick peer pings, linked in a seeded random tree plus three cross
links (:func:`swarm.bench_startup.topology`):

1. all twenty started at once in a random order, so some dial peers that do not listen
   yet: every node's view holds all twenty, and a key written at a leaf is read from
   every node;
2. 300 more keys, then three nodes SIGKILLed one after another: after each kill the
   survivors' views agree and hold two copies of every key again before the next, and
   at the end every key is read from every survivor. The three are picked so that the
   survivors stay linked after each kill (a tree cut at an inner node would leave two
   swarms that cannot reach each other, which is no failure of the nodes). They go one
   at a time because two copies cannot survive three owners going at once: about 1.6%
   of the keys would have both their copies on the three;
3. the three restarted at once with their ids, ports and peers: every view holds all
   twenty again, and every key is read from every node.

Also a smoke test of ``python -m swarm.bench_startup`` and unit tests of its topology.
How fast the swarm converges is measured by that benchmark, not asserted here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twistd_support import Swarm, eventually, free_port, ping_options

from swarm.bench_startup import connected, describe, neighbours, topology

ROOT = Path(__file__).resolve().parent.parent
NODES = 20
CROSS = 3
SEED = 11
PINGS, NOTICE = ping_options()
#: Generous for a busy 2-core machine; the benchmark measures the real figures.
VIEW_DEADLINE = 60.0
DROP_DEADLINE = NOTICE + 20
COPY_DEADLINE = 20.0
KEYS = [f"k{i}" for i in range(300)]


def victims(dials: dict[str, list[str]], spare: str, rng: random.Random) -> list[str]:
    """Three nodes other than ``spare``, such that the rest stays linked after each one
    is gone in turn."""
    left, chosen = set(dials), []
    for node in rng.sample(sorted(set(dials) - {spare}), len(dials) - 1):
        if len(chosen) < 3 and connected(left - {node}, dials):
            chosen.append(node)
            left.discard(node)
    return chosen


def test_victims_keep_the_rest_linked():
    for seed in range(20):
        _, dials = topology(NODES, CROSS, seed)
        chosen = victims(dials, "n00", random.Random(seed))
        assert len(chosen) == 3 and "n00" not in chosen
        for i in range(4):
            assert connected(set(dials) - set(chosen[:i]), dials)


def test_topology_is_a_seeded_tree_with_cross_links():
    order, dials = topology(NODES, CROSS, 5)
    assert sorted(order) == sorted(dials) == [f"n{i:02d}" for i in range(NODES)]
    links = {frozenset((a, b)) for a, targets in dials.items() for b in targets}
    assert len(links) == sum(map(len, dials.values())) == NODES - 1 + CROSS  # no twice
    assert all(a not in targets for a, targets in dials.items())
    assert connected(order, dials)
    assert topology(NODES, CROSS, 5) == (order, dials)
    assert topology(NODES, CROSS, 6) != (order, dials)
    _, tree = topology(NODES, 0, 5)  # no cross link: cutting an inner node splits it
    inner = [n for n, near in neighbours(tree).items() if len(near) > 1]
    assert inner and not any(connected(set(tree) - {n}, tree) for n in inner)
    _, full = topology(3, 10, 1)  # more cross links than pairs: every pair once
    assert sorted(map(len, neighbours(full).values())) == [2, 2, 2]


def test_connected():
    dials = {"a": ["b"], "b": ["c"], "c": [], "d": []}
    assert connected({"a", "b", "c"}, dials) and connected({"d"}, dials)
    assert not connected({"a", "c"}, dials) and not connected(dials, dials)
    assert connected(set(), dials)


async def read_everywhere(swarm: Swarm, names, values: dict[str, str]) -> bool:
    """Whether every node of ``names`` reads every key of ``values`` as written."""
    for name in names:
        if await swarm.clients[name].mget(list(values)) != values:
            return False
    return True


async def copies(swarm: Swarm, names) -> int:
    """How many entries the nodes of ``names`` hold between them."""
    return sum([(await swarm.clients[n].stats())["keys"] for n in names])


@pytest_twisted.ensureDeferred
async def test_twenty_nodes_converge_survive_three_kills_and_rejoin(tmp_path):
    order, dials = topology(NODES, CROSS, SEED)
    near = neighbours(dials)
    leaf = next(n for n in order if len(near[n]) == 1)
    doomed = victims(dials, leaf, random.Random(SEED))
    ports: dict[str, int] = {}
    for name in order:
        while (port := free_port()) in ports.values():
            pass
        ports[name] = port
    async with Swarm(tmp_path, "--replicas", "2", *PINGS) as swarm:
        for name in order:  # all at once, each dialling whoever it dials
            swarm.launch(name, *(f"ws://127.0.0.1:{ports[p]}" for p in dials[name]),
                         port=ports[name])
        await swarm.until_up(order)
        await swarm.until_whole("twenty nodes started at once to link", VIEW_DEADLINE)

        await swarm.clients[leaf].set("from-the-leaf", leaf)
        values = {"from-the-leaf": leaf}
        await eventually(lambda: read_everywhere(swarm, order, values),
                         f"the key written at {leaf} read from every node", 10, swarm.logs)

        values.update((k, f"v{k}") for k in KEYS)
        assert await swarm.clients[leaf].mset(dict(values)) == len(values)
        alive = list(order)

        async def two_copies() -> bool:
            return await copies(swarm, alive) >= 2 * len(values)

        await eventually(two_copies, "two copies of every key", COPY_DEADLINE, swarm.logs)
        for victim in doomed:
            swarm.nodes[victim].kill()
            swarm.clients.pop(victim)
            alive.remove(victim)
            await swarm.until_views({n: set(alive) for n in alive},
                                    f"the survivors to drop {victim}", DROP_DEADLINE)
            await eventually(two_copies, f"two copies of every key without {victim}",
                             COPY_DEADLINE, swarm.logs)
        assert await read_everywhere(swarm, alive, values)

        for victim in doomed:
            swarm.launch(victim)  # its id, port and peers
        await swarm.until_up(doomed)
        await swarm.until_whole("the three to rejoin", VIEW_DEADLINE)
        await eventually(lambda: read_everywhere(swarm, order, values),
                         "every key from every node after the rejoin", 20, swarm.logs)


def test_bench_startup_smoke(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "swarm.bench_startup", "--nodes", "4", "--cross", "1",
         "--runs", "2", "--stagger", "0.2", "--busy", "--busy-seconds", "5", "--json"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["busy"] is True and [r["seed"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert sorted(run["nodes"]) == ["n00", "n01", "n02", "n03"]
        for node in run["nodes"].values():
            assert 0 < node["listening"] <= node["complete"]
        last = max(n["listening"] for n in run["nodes"].values())
        assert run["to_last_listening"] == last
        assert run["to_complete"] >= 0
    assert report["max"]["to_complete"] == max(r["to_complete"] for r in report["runs"])
    assert describe(report["max"]).startswith("first start to last listening")
