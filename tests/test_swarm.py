"""Swarms of real nodes on loopback, in the shapes networks force on them."""

from __future__ import annotations

import itertools

import pytest
import pytest_twisted
from conftest import converged, start_node, start_swarm, stop_all, until
from twisted.internet.defer import Deferred

from swarm.client.connection import SwarmClient
from swarm.errors import Unavailable

LINE5 = [(i, i + 1) for i in range(4)]
RING4 = [(0, 1), (1, 2), (2, 3), (3, 0)]
TREE7 = [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
STAR5 = [(i, 0) for i in range(1, 5)]
MESH4 = list(itertools.combinations(range(4), 2))


async def every_node_reads_every_write(nodes) -> None:
    """Set a key through each node, read and delete it through each other node."""
    for i, writer in enumerate(nodes):
        for j, reader in enumerate(nodes):
            key = f"k-{i}-{j}"
            assert await writer.set(key, [i, j]) is True
            assert await reader.get(key) == [i, j]
            assert await reader.exists(key) is True
            assert await reader.delete(key) is True
            assert await writer.get(key, "gone") == "gone"


def exactly_one_copy(nodes, keys) -> bool:
    return all(sum(n.store.exists(k) for n in nodes) == 1 for k in keys)


@pytest.mark.parametrize(
    "count,edges", [(5, LINE5), (4, RING4), (7, TREE7), (5, STAR5), (4, MESH4)],
    ids=["line5", "ring4", "tree7", "star5", "mesh4"],
)
@pytest_twisted.ensureDeferred
async def test_every_node_sees_every_key(count, edges):
    nodes = await start_swarm(count, edges)
    try:
        await every_node_reads_every_write(nodes)
        keys = [f"key{i}" for i in range(60)]
        await nodes[0].mset({k: k for k in keys})
        assert await nodes[-1].mget(keys + ["absent"]) == {k: k for k in keys}
        assert exactly_one_copy(nodes, keys)
        # the owner op agrees everywhere and names the node that holds the key
        owners = {tuple(await n.owner("key7")) for n in nodes}
        assert len(owners) == 1
        (holder,) = owners.pop()
        assert next(n for n in nodes if n.node_id == holder).store.exists("key7")
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_nodes_op_reports_hops_and_neighbors_on_a_line():
    nodes = await start_swarm(5, LINE5)
    try:
        view = await nodes[0].nodes()
        assert view["self"] == "n0"
        by_id = {n["id"]: n for n in view["nodes"]}
        assert {k: v["hops"] for k, v in by_id.items()} == {f"n{i}": i for i in range(5)}
        assert sorted(by_id["n2"]["neighbors"]) == ["n1", "n3"]
        assert by_id["n4"]["neighbors"] == ["n3"]
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_seed_scenario_two_clients_two_nodes():
    """C2 reaches only N2, N2 links to N1, C1 uses N1: both share the same keys."""
    n1 = await start_node(node_id="N1")
    n2 = await start_node(node_id="N2", peers=(n1.url,))
    try:
        await converged([n1, n2])
        c1 = await SwarmClient.connect(n1.url)
        c2 = await SwarmClient.connect(n2.url)
        for i in range(20):
            await c2.set(f"shared{i}", {"from": "C2", "i": i})
        for i in range(20):
            assert await c1.get(f"shared{i}") == {"from": "C2", "i": i}
        assert await c1.incr("counter") == 1
        assert await c2.incr("counter") == 2
        assert exactly_one_copy([n1, n2], [f"shared{i}" for i in range(20)])
        await c1.close()
        await c2.close()
    finally:
        await stop_all([n2, n1])


@pytest_twisted.ensureDeferred
async def test_two_nodes_that_dial_each_other_have_one_link():
    a = await start_node(node_id="a")
    b = await start_node(node_id="b", peers=(a.url,))
    a.add_peer(b.url)
    try:
        await until(lambda: a.overlay.link_count() == 2 and b.overlay.link_count() == 2,
                    what="both connections up")
        assert a.overlay.neighbors == ["b"] and b.overlay.neighbors == ["a"]
        stats = await a.stats()
        assert (stats["peers"], stats["peer_links"], stats["swarm_nodes"]) == (1, 2, 2)
        await every_node_reads_every_write([a, b])
        # nothing flaps: the same two connections are still up a little later
        before = list(a.peer_factory.connections) + list(b.peer_factory.connections)
        await until(lambda: a.overlay.membership.own.seq >= 2)
        assert list(a.peer_factory.connections) + list(b.peer_factory.connections) == before
        assert a.overlay.membership.own.seq == 2  # one link came up, no down/up churn
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_ring_reroutes_around_a_dead_node():
    nodes = await start_swarm(4, RING4)
    try:
        victim = nodes[1]
        # abrupt death: no goodbye, no handoff
        victim._listener.port.stopListening()
        for f in victim._listener.factories:
            for p in list(f.connections):
                p.transport.abortConnection()
        for u in victim.upstreams:
            u.stopService()
        survivors = [nodes[0], nodes[2], nodes[3]]
        await converged(survivors, what="survivors to drop the dead node")
        assert all("n1" not in n.overlay.membership.reachable for n in survivors)
        # n0 and n2 were linked only through n1 and n3: traffic goes round via n3
        assert nodes[0].overlay.membership.hops["n2"] == 2
        await every_node_reads_every_write(survivors)
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_key_written_before_a_join_is_readable_after_it():
    nodes = await start_swarm(3, [(1, 0), (2, 1)])
    newcomer = None
    try:
        keys = [f"pre{i}" for i in range(300)]
        await nodes[0].mset({k: i for i, k in enumerate(keys)})
        newcomer = await start_node(node_id="n3", peers=(nodes[2].url,))
        everyone = nodes + [newcomer]
        await converged(everyone)
        # reads are right at once: the newcomer takes what the handoff has not brought
        for n in everyone:
            assert await n.mget(keys) == {k: i for i, k in enumerate(keys)}
        await until(lambda: exactly_one_copy(everyone, keys), what="handoffs to finish")
        # the newcomer owns about a quarter of the keys
        assert 30 < len(newcomer.store) < 150
    finally:
        await stop_all(nodes + ([newcomer] if newcomer else []))


@pytest_twisted.ensureDeferred
async def test_graceful_leave_hands_keys_over():
    nodes = await start_swarm(3, [(1, 0), (2, 0)])
    try:
        keys = [f"k{i}" for i in range(200)]
        await nodes[1].mset({k: k for k in keys})
        leaver = nodes[0]
        assert len(leaver.store) > 0
        await leaver.stopService()
        rest = nodes[1:]
        # n1 and n2 were linked only through n0: link them, and nothing is lost
        rest[0].add_peer(rest[1].url)
        await converged(rest)
        assert await rest[0].mget(keys) == {k: k for k in keys}
        assert exactly_one_copy(rest, keys)
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_unreachable_owner_is_unavailable_not_a_hang():
    nodes = await start_swarm(2, [(1, 0)])
    try:
        # make n0 believe n1 owns everything while no link leads there
        n0 = nodes[0]
        for link in list(n0.peer_factory.connections):
            link.transport.abortConnection()
        await until(lambda: n0.overlay.membership.reachable == {"n0"})
        from swarm.cluster.placement import Placement

        n0.router.placement = Placement(["n1"], 1)
        with pytest.raises(Unavailable):
            await n0.get("anything")
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_peer_of_another_swarm_is_refused_and_backed_off():
    a = await start_node(node_id="a", swarm="blue")
    b = await start_node(node_id="b", swarm="green")
    try:
        upstream = b.add_peer(a.url)
        await until(lambda: upstream.policy.handshake_failures >= 2,
                    what="the refused dialer to count failed handshakes")
        assert a.overlay.neighbors == [] and b.overlay.neighbors == []
        assert (await b.nodes())["nodes"] == [{"id": "b", "neighbors": [], "hops": 0}]
        # refusals count toward the backoff, so redials slow down
        assert upstream.policy(0) >= 0.5 * 0.5 * 2 ** 2
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_peer_with_this_nodes_own_id_is_refused():
    a = await start_node(node_id="same")
    b = await start_node(node_id="same")
    try:
        upstream = b.add_peer(a.url)
        await until(lambda: upstream.policy.handshake_failures >= 1)
        assert a.overlay.neighbors == [] and b.overlay.neighbors == []
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_writes_during_a_graceful_leave_are_not_lost():
    nodes = await start_swarm(3, [(0, 1), (1, 2), (2, 0)])  # a triangle
    try:
        leaver, stayer = nodes[0], nodes[1]
        before = {f"old{i}": i for i in range(200)}
        await stayer.mset(before)
        stopping = leaver.stopService()
        # written while the leaver hands over; some would have been its keys
        during = {f"new{i}": i for i in range(200)}
        await stayer.mset(during)
        await stopping
        rest = nodes[1:]
        await converged(rest)
        for n in rest:
            assert await n.mget(list(before) + list(during)) == {**before, **during}
        assert exactly_one_copy(rest, list(before) + list(during))
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_a_join_under_load_loses_no_write_and_serves_no_stale_read():
    """Reads and increments keep flowing through every old node while a node joins."""
    import random

    from twisted.internet.defer import gatherResults

    nodes = await start_swarm(3, [(1, 0), (2, 1)])
    newcomer = None
    try:
        expected = {f"load{i}": 0 for i in range(900)}
        await nodes[0].mset(expected)
        rng = random.Random(7)
        after_join = []

        def joined() -> bool:
            return newcomer is not None and len(newcomer.store) > 0

        async def traffic(i: int) -> None:
            # each client has its own keys, so its expectations stay exact
            mine = [k for n, k in enumerate(expected) if n % 3 == i]
            late = 0
            for n in range(5000):  # bounded; ends 150 ops after the join
                key = rng.choice(mine)
                if n % 3 == 0:
                    expected[key] += 1
                    assert await nodes[i].incr(key) == expected[key]
                else:
                    assert await nodes[i].get(key) == expected[key]
                late += joined()
                if late >= 150:
                    break
            after_join.append(late)

        async def join() -> None:
            nonlocal newcomer
            newcomer = await start_node(node_id="n3", peers=(nodes[2].url,))

        await gatherResults([Deferred.fromCoroutine(traffic(i)) for i in range(3)]
                            + [Deferred.fromCoroutine(join())])
        assert after_join == [150, 150, 150]  # every client kept going past the join
        everyone = nodes + [newcomer]
        await converged(everyone)
        assert await newcomer.mget(list(expected)) == expected
        await until(lambda: exactly_one_copy(everyone, list(expected)),
                    what="handoffs to finish")
        assert len(newcomer.store) > 100
    finally:
        await stop_all(nodes + ([newcomer] if newcomer else []))


@pytest_twisted.ensureDeferred
async def test_two_nodes_with_one_id_do_not_flood_forever():
    """A copy-pasted --node-id: both ends correct the other a few times, then stop."""
    from swarm.mesh.membership import MAX_SELF_CORRECTIONS

    hub = await start_node(node_id="hub")
    twin1 = await start_node(node_id="twin", peers=(hub.url,))
    await until(lambda: hub.overlay.neighbors == ["twin"])
    twin2 = await start_node(node_id="twin")
    other = await start_node(node_id="other")
    try:
        # twin2 links to other before other learns of twin1 (a hello naming a live id
        # is refused), then other joins hub: each twin's announcements reach the other
        twin2.add_peer(other.url)
        await until(lambda: other.overlay.neighbors == ["twin"]
                    and twin2.overlay.neighbors == ["other"], what="twin2 to link to other")
        other.add_peer(hub.url)
        await until(lambda: max(twin1.overlay.membership.self_conflicts,
                                twin2.overlay.membership.self_conflicts) > MAX_SELF_CORRECTIONS,
                    what="the twins to notice each other")
        seqs = (twin1.overlay.membership.own.seq, twin2.overlay.membership.own.seq)
        # quiet: a further announcement round changes nothing any more
        await until(lambda: hub.overlay.membership.reachable >= {"hub", "other"})
        from twisted.internet import reactor, task
        await task.deferLater(reactor, 0.3, lambda: None)  # a flood would go on here
        assert (twin1.overlay.membership.own.seq, twin2.overlay.membership.own.seq) == seqs
    finally:
        await stop_all([other, twin2, twin1, hub])


@pytest_twisted.ensureDeferred
async def test_disagreeing_views_end_at_the_hop_limit_and_leak_nothing():
    """n0 believes n1 owns every key and n1 believes n0 does: the request bounces
    until its hop limit, then the client gets unavailable, and no Deferred is left."""
    from swarm.cluster.placement import Placement

    nodes = await start_swarm(2, [(1, 0)])
    try:
        n0, n1 = nodes
        n0.router.placement = Placement(["n1"], 1)
        n1.router.placement = Placement(["n0"], 1)
        with pytest.raises(Unavailable, match="hop limit"):
            await n0.get("bouncing")
        assert not n0.overlay.busy and not n1.overlay.busy
        # views agree again after the next change: the key is served normally
        n0.router.view_changed()
        n1.router.view_changed()
        assert await n0.set("bouncing", 1) and await n1.get("bouncing") == 1
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_a_healed_partition_merges_views_and_data():
    nodes = await start_swarm(4, LINE5[:3])  # n0 - n1 - n2 - n3
    try:
        cut = nodes[1].upstreams[0]  # n1 dials n2: the only link between the halves
        await cut.stopService()
        left, right = nodes[:2], nodes[2:]
        await converged(nodes, 2, what="the halves to see only themselves")
        # each half goes on serving, with its own placement
        await left[0].mset({f"left{i}": i for i in range(100)})
        await right[1].mset({f"right{i}": i for i in range(100)})
        assert await right[0].get("left1") is None  # not visible across the cut
        cut.startService()  # heal
        await converged(nodes, what="the views to merge")
        expected = {**{f"left{i}": i for i in range(100)},
                    **{f"right{i}": i for i in range(100)}}
        for n in nodes:
            assert await n.mget(list(expected)) == expected
        await until(lambda: exactly_one_copy(nodes, list(expected)),
                    what="entries to reach their owners")
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_large_values_move_on_a_join_without_breaking_the_link():
    """Handoffs are cut into frames a peer accepts: 300 values of 512 KiB (150 MiB)."""
    nodes = [await start_node(node_id="n0", max_memory=1024 * 1024 * 1024)]
    newcomer = None
    try:
        big = "x" * (512 * 1024)
        keys = [f"big{i}" for i in range(300)]
        for i in range(0, 300, 6):  # client frames stay under 4 MiB
            await nodes[0].mset({k: big for k in keys[i:i + 6]})
        newcomer = await start_node(node_id="n1", peers=(nodes[0].url,),
                                    max_memory=1024 * 1024 * 1024)
        everyone = nodes + [newcomer]
        await until(lambda: len(newcomer.store) > 100 and exactly_one_copy(everyone, keys),
                    timeout=60, what="the big values to move")
        # the ~75 MiB handoff went through without the link ever dropping
        assert newcomer.overlay.membership.own.seq == 2
        assert all(len(n.overlay.membership.reachable) == 2 for n in everyone)
    finally:
        await stop_all(nodes + ([newcomer] if newcomer else []))


@pytest_twisted.ensureDeferred
async def test_a_separate_peer_port_takes_the_links_and_the_client_port_none():
    import websockets
    from conftest import on_asyncio
    from websockets.exceptions import InvalidStatus

    a = await start_node(node_id="a", peer_port="tcp:0:interface=127.0.0.1")
    b = await start_node(node_id="b")
    try:
        assert a.peer_url != a.url
        b.add_peer(a.peer_url)
        await until(lambda: a.overlay.neighbors == ["b"], what="the link on the peer port")
        assert await b.set("k", 1) and await a.get("k") == 1
        # the client port no longer answers at /peer
        with pytest.raises(InvalidStatus):
            await on_asyncio(websockets.connect(a.url + "/peer", open_timeout=5))
        # and the peer port serves no clients
        with pytest.raises(InvalidStatus):
            await on_asyncio(websockets.connect(a.peer_url, open_timeout=5))
    finally:
        await stop_all([b, a])


@pytest_twisted.ensureDeferred
async def test_a_node_stopped_and_started_again_rejoins_as_an_owner():
    nodes = await start_swarm(2, [(1, 0)])
    try:
        n1 = nodes[1]
        await n1.stopService()
        await until(lambda: nodes[0].overlay.membership.reachable == {"n0"})
        n1.startService()  # the same service object, as a MultiService parent may do
        await until(lambda: all(n.overlay.membership.owners == {"n0", "n1"} for n in nodes),
                    what="n1 to own keys again")
        assert n1._health()[0] is True
        keys = [f"k{i}" for i in range(50)]
        await nodes[0].mset({k: k for k in keys})
        assert len(n1.store) > 0 and await n1.mget(keys) == {k: k for k in keys}
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_peer_is_logged_with_its_url_and_the_reason():
    import socket

    from twisted.logger import formatEvent, globalLogPublisher

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines: list[str] = []

    def observe(event) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    node = await start_node(node_id="lonely")
    try:
        node.add_peer(f"ws://127.0.0.1:{port}")
        url = f"ws://127.0.0.1:{port}/peer"
        await until(lambda: any(f"cannot reach peer {url}: Connection was refused" in line
                                for line in lines), what="the failure to be logged")
        await until(lambda: any(f"to connect {url} in" in line for line in lines),
                    what="the retry line to name the URL")
    finally:
        globalLogPublisher.removeObserver(observe)
        await node.stopService()


def random_overlay(count: int, extra: int, seed: int) -> list[tuple[int, int]]:
    """A random spanning tree on ``count`` nodes plus ``extra`` random links: connected,
    of no particular shape. Each node dials only nodes started before it."""
    import random

    rng = random.Random(seed)
    edges = {(i, rng.randrange(i)) for i in range(1, count)}
    while len(edges) < count - 1 + extra:
        a, b = rng.sample(range(count), 2)
        if (a, b) not in edges and (b, a) not in edges:
            edges.add((max(a, b), min(a, b)))
    return sorted(edges)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_random_overlays_serve_every_key_from_every_node(seed):
    edges = random_overlay(6, extra=seed - 1, seed=seed)
    nodes = await start_swarm(6, edges)
    try:
        await every_node_reads_every_write(nodes)
        keys = [f"r{seed}-{i}" for i in range(120)]
        await nodes[seed].mset({k: k for k in keys})
        for n in nodes:
            assert await n.mget(keys) == {k: k for k in keys}
        assert exactly_one_copy(nodes, keys)
        # every node agrees on the hop counts the graph implies
        for n in nodes:
            view = {e["id"]: e["hops"] for e in (await n.nodes())["nodes"]}
            assert view == bfs_hops(n.node_id, edges)
    finally:
        await stop_all(nodes)


def bfs_hops(start: str, edges) -> dict[str, int]:
    from collections import deque

    adjacent: dict[str, set] = {}
    for a, b in edges:
        adjacent.setdefault(f"n{a}", set()).add(f"n{b}")
        adjacent.setdefault(f"n{b}", set()).add(f"n{a}")
    hops, queue = {start: 0}, deque([start])
    while queue:
        u = queue.popleft()
        for v in adjacent.get(u, ()):
            if v not in hops:
                hops[v] = hops[u] + 1
                queue.append(v)
    return hops
