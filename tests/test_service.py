"""SwarmNode as a service: listening, health, embedding API, shutdown."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from conftest import on_asyncio, start_node
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThread

from swarm.errors import BadRequest, NotInteger, TooLarge
from swarm.node.node import SwarmNode, endpoint_description


async def http_get(url: str) -> tuple[int, bytes]:
    """A plain HTTP GET by the standard library (in a thread), as a probe would do it."""

    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return await deferToThread(fetch)


def test_bare_port_listens_on_loopback():
    assert endpoint_description(9000) == "tcp:9000:interface=127.0.0.1"
    assert endpoint_description("unix:/tmp/s") == "unix:/tmp/s"


@pytest_twisted.ensureDeferred
async def test_health_is_json_200_while_serving(node):
    code, body = await http_get(node.url.replace("ws:", "http:") + "/health")
    assert code == 200
    health = json.loads(body)
    assert health["status"] == "ok" and health["node"] == "test-node"


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(node):
    code, _ = await http_get(node.url.replace("ws:", "http:") + "/nothing")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_embedding_api_round_trips(node):
    assert await node.set("k", {"a": [1, 2]}) is True
    assert await node.get("k") == {"a": [1, 2]}
    assert await node.get("missing", default="dflt") == "dflt"
    assert await node.incr("n", 5) == 5
    assert await node.mget(["k", "n", "x"]) == {"k": {"a": [1, 2]}, "n": 5}
    assert await node.delete("k") is True
    assert await node.exists("k") is False
    assert await node.ping() == "test-node"
    stats = await node.stats()
    assert stats["node"] == "test-node" and stats["keys"] == 1


@pytest_twisted.ensureDeferred
async def test_embedding_api_validates_like_the_wire(node):
    with pytest.raises(BadRequest):
        await node.set("", 1)
    with pytest.raises(TooLarge):
        await node.set("k" * 5000, 1)
    await node.set("s", "text")
    with pytest.raises(NotInteger):
        await node.incr("s")


@pytest_twisted.ensureDeferred
async def test_busy_port_fails_start_with_cannot_listen(node):
    port = node._listener.port.getHost().port
    other = SwarmNode(f"tcp:{port}:interface=127.0.0.1", reactor=reactor)
    with pytest.raises(CannotListenError):
        other.startService()


@pytest_twisted.ensureDeferred
async def test_stop_closes_port_and_clients():
    import websockets

    n = await start_node()
    url = n.url
    ws = await on_asyncio(websockets.connect(url))
    assert len(n.client_factory.connections) == 1
    await n.stopService()
    assert n.client_factory.connections == set()
    await on_asyncio(ws.wait_closed())
    assert ws.close_code == 1001
    with pytest.raises(OSError):  # connection refused: the port is closed
        await on_asyncio(websockets.connect(url, open_timeout=2))



@pytest_twisted.ensureDeferred
async def test_health_turns_503_as_soon_as_the_node_stops():
    from conftest import start_swarm, stop_all

    nodes = await start_swarm(2, [(1, 0)])
    try:
        await nodes[0].mset({f"k{i}": i for i in range(300)})
        stopping = nodes[0].stopService()  # hands its keys over before closing
        serving, body = nodes[0]._health()  # what GET /health renders
        assert not serving and body["status"] == "stopping"
        await stopping
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_replies_past_the_reply_budget_are_too_large_and_the_rest_arrive():
    from swarm.client.connection import SwarmClient
    from swarm.protocol.wire import Limits

    n = await start_node(limits=Limits(max_reply_bytes=100_000))
    client = await SwarmClient.connect(n.url)
    try:
        value = "v" * 10_000
        await client.mset({f"k{i}": value for i in range(30)})  # 300 KB in all
        with pytest.raises(TooLarge, match="ask for less"):
            await client.mget([f"k{i}" for i in range(30)])
        assert len(await client.mget([f"k{i}" for i in range(5)])) == 5
        replies = await client.batch([{"op": "get", "key": f"k{i}"} for i in range(30)])
        ok = [r["ok"] for r in replies]
        assert ok[:5] == [True] * 5 and ok[-5:] == [False] * 5
        assert ok == sorted(ok, reverse=True)  # a prefix fits, the rest is too_large
        assert replies[-1]["error"]["code"] == "too_large"
        assert await client.ping() == n.node_id  # the connection is fine
    finally:
        await client.close()
        await n.stopService()


@pytest_twisted.ensureDeferred
async def test_an_embedded_node_written_to_at_once_keeps_its_writes_when_it_joins():
    """Started and written to before its link is up, a node owns every key alone; when
    it joins a swarm that already holds those keys, its later writes win everywhere."""
    from conftest import converged, start_swarm, stop_all

    nodes = await start_swarm(2, [(1, 0)])
    keys = [f"k{i}" for i in range(40)]
    await nodes[0].mset(dict.fromkeys(keys, "old"))
    late = await start_node(node_id="late", peers=(nodes[0].url,))
    nodes.append(late)
    try:
        assert late.overlay.membership.reachable == {"late"}  # not linked yet
        for key in keys:
            assert await late.set(key, "written at start-up") is True
        await converged(nodes)
        for node in nodes:
            assert await node.mget(keys) == dict.fromkeys(keys, "written at start-up")
    finally:
        await stop_all(nodes)
