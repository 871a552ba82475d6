"""Peer links with a shared secret, between real nodes on 127.0.0.1, and the outsider
of issue 8: a hand-written WebSocket client on ``/peer`` that says hello to join."""

from __future__ import annotations

import asyncio

import cbor2
import pytest_twisted
import websockets
from conftest import converged, on_asyncio, start_node, stop_all, until

from swarm.mesh.auth import new_nonce
from swarm.mesh.peer_wire import (
    CLOSE_REFUSED,
    CLOSE_UNAUTHORIZED,
    MAX_HANDSHAKE_MESSAGE,
    PROTOCOL_VERSION,
    encode_peer_frame,
)

SECRET = b"0123456789abcdef-shared"
OTHER = b"fedcba9876543210-other!"
KEYS = [f"k{i}" for i in range(50)]


@pytest_twisted.ensureDeferred
async def test_nodes_with_the_same_secret_link_and_share_their_keys():
    a = await start_node(node_id="a", peer_secret=SECRET)
    b = await start_node(node_id="b", peer_secret=SECRET, peers=(a.url,))
    try:
        await converged([a, b])
        assert await b.mset({k: k for k in KEYS}) == len(KEYS)
        assert await a.mget(KEYS) == {k: k for k in KEYS}
        assert len(a.store) + len(b.store) == len(KEYS)  # shared, one copy each
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_a_node_with_another_secret_or_none_never_links():
    a = await start_node(node_id="a", peer_secret=SECRET)
    wrong = await start_node(node_id="wrong", peer_secret=OTHER, peers=(a.url,))
    none = await start_node(node_id="none", peers=(a.url,))
    try:
        # each has been refused twice (the dialler backs off and tries again)
        await until(lambda: all(n.upstreams[0].policy.handshake_failures >= 2
                                for n in (wrong, none)),
                    what="two refused handshakes each")
        for n in (a, wrong, none):
            assert n.overlay.membership.reachable == {n.node_id}
            assert n.overlay.neighbors == []
    finally:
        await stop_all([a, wrong, none])


async def outsider_hello(url: str, *extra: dict, auth: bool = False) -> int:
    """Join ``url`` as a hand-written peer: hello (plus ``extra`` messages) and then
    whatever the node does; the close code it ends with."""
    async with websockets.connect(url + "/peer", open_timeout=5) as ws:
        hello = {"t": "hello", "node": "intruder", "proto": PROTOCOL_VERSION,
                 "swarm": "swarmcache", "inc": 1, "nonce": new_nonce(), "auth": auth}
        await ws.send(encode_peer_frame([hello, *extra]))
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else -1


@pytest_twisted.ensureDeferred
async def test_an_outsider_cannot_join_a_swarm_with_a_secret():
    a = await start_node(node_id="a", peer_secret=SECRET)
    b = await start_node(node_id="b", peer_secret=SECRET, peers=(a.url,))
    try:
        await converged([a, b])
        await a.mset({k: "real" for k in KEYS})
        held = len(a.store), len(b.store)
        forged = {"t": "lsa", "anns": [{"node": "intruder", "inc": 1, "seq": 1,
                                        "links": ["a"]}]}
        take = {"t": "req", "rid": 1, "ms": 1000, "hops": 3,
                "req": {"id": 1, "op": "take", "keys": KEYS}}
        # without a secret; with a made-up proof; with messages instead of a proof
        assert await on_asyncio(outsider_hello(a.url, forged)) == CLOSE_UNAUTHORIZED
        made_up = {"t": "auth", "mac": bytes(32)}
        assert await on_asyncio(outsider_hello(a.url, made_up, auth=True)) == \
            CLOSE_UNAUTHORIZED
        assert await on_asyncio(outsider_hello(a.url, take, auth=True)) == 4001
        for n in (a, b):
            assert n.overlay.membership.reachable == {"a", "b"}
            assert "intruder" not in {x.node for x in n.overlay.membership.announcements()}
        assert (len(a.store), len(b.store)) == held  # nothing handed to it or taken
        assert await b.mget(KEYS) == {k: "real" for k in KEYS}
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_a_large_frame_before_the_handshake_closes_the_connection():
    """16 MiB before any hello grew a node to 2.39 GiB; now more than a few KiB before
    the link is trusted is refused with 1009 and the node serves on."""
    a = await start_node(node_id="a", peer_secret=SECRET)

    async def flood() -> int:
        async with websockets.connect(a.url + "/peer", open_timeout=5,
                                      max_size=None) as ws:
            try:
                await ws.send(cbor2.dumps([{"t": "hello", "pad": b"x" * (1 << 20)}]))
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else -1

    try:
        assert await on_asyncio(flood()) == 1009
        assert MAX_HANDSHAKE_MESSAGE <= 4096
        assert await a.set("still", "serving") is True
    finally:
        await stop_all([a])


@pytest_twisted.ensureDeferred
async def test_twistd_nodes_link_with_a_secret_file_and_refuse_another(tmp_path):
    from twistd_support import Swarm

    good, other = tmp_path / "swarm.secret", tmp_path / "other.secret"
    good.write_bytes(SECRET + b"\n")
    other.write_bytes(OTHER)
    async with Swarm(tmp_path, "--secret-file", str(good)) as swarm:
        await swarm.start("s1")
        await swarm.start("s2", swarm.url("s1"))
        await swarm.until_whole("two nodes with one secret to link", 30)
        assert await swarm.clients["s2"].set("k", "v") is True
        assert await swarm.clients["s1"].get("k") == "v"
        swarm.options = ["--secret-file", str(other)]
        await swarm.start("s3", swarm.url("s1"))

        def refused() -> bool:
            return "did not prove it holds the swarm's secret" in swarm.nodes["s1"].output()

        await until(refused, what="s1 to refuse s3")
        await swarm.until_views({"s1": {"s1", "s2"}, "s3": {"s3"}}, "s3 kept out", 5)


@pytest_twisted.ensureDeferred
async def test_open_peer_links_are_said_at_start_and_loudly_off_loopback():
    from twisted.internet.address import IPv4Address
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    class Port:
        def __init__(self, host: str) -> None:
            self.host = host

        def getHost(self):
            return IPv4Address("TCP", self.host, 8765)

    open_node = await start_node(node_id="open")
    closed_node = await start_node(node_id="closed", peer_secret=SECRET)
    try:
        said = {}
        for node, host in ((open_node, "127.0.0.1"), (open_node, "10.1.2.3"),
                           (closed_node, "10.1.2.3")):
            with capturedLogs() as events:
                node._say_who_may_link(Port(host))
            said[node.node_id, host] = [(e["log_level"], formatEvent(e)) for e in events]
        [(level, text)] = said["open", "127.0.0.1"]
        assert level == LogLevel.info and "not authenticated" in text
        [(level, text)] = said["open", "10.1.2.3"]
        assert level == LogLevel.warn and "OPEN TO ANYONE WHO CAN REACH 10.1.2.3" in text
        [(level, text)] = said["closed", "10.1.2.3"]
        assert level == LogLevel.info and "need the swarm's secret" in text
    finally:
        await stop_all([open_node, closed_node])


@pytest_twisted.ensureDeferred
async def test_a_peer_connection_that_never_completes_its_handshake_is_closed():
    """Autobahn answers pings, so without a deadline a /peer socket that says nothing
    (or a hello and no proof) would hold a connection for ever."""
    a = await start_node(node_id="a", peer_secret=SECRET, handshake_timeout=1)

    async def silent(*messages: dict) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        async with websockets.connect(a.url + "/peer", open_timeout=5) as ws:
            started = loop.time()
            if messages:
                await ws.send(encode_peer_frame(list(messages)))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as e:
                return (e.rcvd.code if e.rcvd else -1), loop.time() - started

    try:
        hello = {"t": "hello", "node": "slow", "proto": PROTOCOL_VERSION,
                 "swarm": "swarmcache", "inc": 1, "nonce": new_nonce(), "auth": True}
        (quiet, quiet_s), (no_proof, no_proof_s) = await on_asyncio(
            asyncio.gather(silent(), silent(hello)))
        assert (quiet, no_proof) == (CLOSE_REFUSED, CLOSE_UNAUTHORIZED)
        assert 0.5 < quiet_s < 5 and 0.5 < no_proof_s < 5
        assert a.overlay.neighbors == []
    finally:
        await stop_all([a])
