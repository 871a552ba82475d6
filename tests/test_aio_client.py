"""The asyncio client (swarm.client.aio) against real nodes on the reactor's asyncio loop,
and against small websockets servers that record frames, stay silent or hang up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import cbor2
import pytest
import pytest_twisted
from websockets.asyncio.server import serve

from conftest import on_asyncio, running
from swarm.client.aio import AsyncSwarmClient
from swarm.client.frames import ConnectionClosed
from swarm.errors import (
    BadRequest,
    NotInteger,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownOp,
)

TOKEN = "aio-test-token"


@contextlib.asynccontextmanager
async def fake_node(answer: bool = True, hang_up: bool = False) -> AsyncIterator[tuple]:
    """A websockets server that records every frame (decoded) and answers each request
    ``{"ok": true, "value": id}``, or says nothing, or closes on the first frame."""
    frames: list[Any] = []

    async def handler(ws):
        async for message in ws:
            binary = isinstance(message, bytes)
            decoded = cbor2.loads(message) if binary else json.loads(message)
            frames.append(decoded)
            if hang_up:
                await ws.close()
                return
            if not answer:
                continue
            items = decoded if isinstance(decoded, list) else [decoded]
            replies = [{"id": r["id"], "ok": True, "found": True, "value": r["id"]}
                       for r in items]
            out = replies if isinstance(decoded, list) else replies[0]
            await ws.send(cbor2.dumps(out) if binary else json.dumps(out))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}", frames


def run(coro):
    return on_asyncio(coro, timeout=20)


@pytest.mark.parametrize("encoding", ["cbor", "json"])
@pytest_twisted.ensureDeferred
async def test_ops_round_trip_on_a_real_node(encoding):
    async def body():
        async with running(node_id="aio") as node:
            async with await AsyncSwarmClient.connect(node.url, encoding=encoding) as c:
                assert await c.ping() == "aio"
                assert await c.set("k", {"a": [1, 2.5, "x"]}, ttl=60) is True
                assert await c.get("k") == {"a": [1, 2.5, "x"]}
                assert await c.get("missing", "dflt") == "dflt"
                assert await c.set("k", 1, nx=True) is False
                assert await c.incr("n", 5) == 5
                assert await c.exists("n") is True
                found, left = await c.ttl("k")
                assert found and 0 < left <= 60
                assert await c.expire("k", None) is True
                assert await c.ttl("k") == (True, None)
                assert await c.mset({"a": 1, "b": 2}) == 2
                assert await c.mget(["a", "b", "zz"]) == {"a": 1, "b": 2}
                assert await c.delete("a") is True
                assert await c.delete("a") is False
                assert (await c.request("get", key="b"))["value"] == 2

    await run(body())


@pytest_twisted.ensureDeferred
async def test_errors_are_raised_as_their_swarm_error():
    async def body():
        async with running(max_value_size=1000) as node:
            async with await AsyncSwarmClient.connect(node.url) as c:
                await c.set("s", "text")
                with pytest.raises(NotInteger):
                    await c.incr("s")
                with pytest.raises(TooLarge):
                    await c.set("big", "x" * 5000)
                with pytest.raises(TooLarge):
                    await c.get("k" * 2000)
                with pytest.raises(BadRequest):
                    await c.get("")
                with pytest.raises(UnknownOp):
                    await c.request("nope")
                # a failed request leaves the connection usable
                assert await c.get("s") == "text"
                replies = await c.batch([{"op": "get", "key": "s"}, {"op": "nope"}])
                assert replies[0]["value"] == "text"
                assert replies[1]["error"]["code"] == "unknown_op"

    await run(body())


@pytest_twisted.ensureDeferred
async def test_many_requests_in_flight_are_matched_by_id_on_a_real_node():
    async def body():
        async with running() as node:
            async with await AsyncSwarmClient.connect(node.url) as c:
                await c.mset({f"k{i}": i for i in range(300)})
                values = await asyncio.gather(*(c.get(f"k{i}") for i in range(300)))
                assert values == list(range(300))
                counts = await asyncio.gather(*(c.incr("hits") for _ in range(100)))
                assert sorted(counts) == list(range(1, 101))
                assert c.pending == 0

    await run(body())


@pytest_twisted.ensureDeferred
async def test_one_loop_iteration_leaves_as_one_batch_frame():
    async def body():
        async with fake_node() as (url, frames):
            async with await AsyncSwarmClient.connect(url) as c:
                got = await asyncio.gather(*(c.get(f"k{i}") for i in range(50)))
                assert len(frames) == 1 and len(frames[0]) == 50
                assert got == [r["id"] for r in frames[0]]  # each its own reply
                assert await c.get("alone") == frames[1]["id"]  # a lone one: plain frame
            async with await AsyncSwarmClient.connect(url, autobatch=False) as c:
                frames.clear()
                await asyncio.gather(*(c.get(f"k{i}") for i in range(5)))
                assert len(frames) == 5 and all(isinstance(f, dict) for f in frames)

    await run(body())


@pytest_twisted.ensureDeferred
async def test_a_request_without_reply_times_out_and_others_go_on():
    async def body():
        async with fake_node(answer=False) as (url, frames):
            async with await AsyncSwarmClient.connect(url, timeout=0.2) as c:
                loop = asyncio.get_running_loop()
                start = loop.time()
                with pytest.raises(Timeout):
                    await c.get("k")
                assert 0.19 <= loop.time() - start < 5
                assert c.pending == 0

    await run(body())


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_pending_and_later_requests():
    async def body():
        async with fake_node(hang_up=True) as (url, frames):
            c = await AsyncSwarmClient.connect(url, timeout=5)
            results = await asyncio.gather(c.get("a"), c.get("b"), return_exceptions=True)
            assert all(isinstance(r, ConnectionClosed) for r in results), results
            assert isinstance(results[0], Unavailable)
            with pytest.raises(ConnectionClosed):
                await c.get("c")
            await c.close()

    await run(body())


@pytest_twisted.ensureDeferred
async def test_close_fails_what_is_in_flight():
    async def body():
        async with fake_node(answer=False) as (url, frames):
            c = await AsyncSwarmClient.connect(url, timeout=5)
            waiting = asyncio.ensure_future(c.get("k"))
            while not frames:
                await asyncio.sleep(0.01)
            await c.close()
            with pytest.raises(ConnectionClosed):
                await waiting

    await run(body())


@pytest_twisted.ensureDeferred
async def test_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")

    async def body():
        async with running(client_token_file=str(path)) as node:
            async with await AsyncSwarmClient.connect(node.url, token=TOKEN) as c:
                assert await c.set("k", 1) is True
            with pytest.raises(Unauthorized):
                await AsyncSwarmClient.connect(node.url)
            with pytest.raises(Unauthorized):
                await AsyncSwarmClient.connect(node.url, token="wrong")

    await run(body())


@pytest_twisted.ensureDeferred
async def test_an_unreachable_node_or_bad_arguments_are_clear_errors():
    from twistd_support import free_port

    async def body():
        with pytest.raises(Unavailable, match="cannot connect"):
            await AsyncSwarmClient.connect(f"ws://127.0.0.1:{free_port()}",
                                           connect_timeout=2)
        with pytest.raises(ValueError, match="encoding"):
            await AsyncSwarmClient.connect("ws://127.0.0.1:1", encoding="xml")

    await run(body())


def test_the_asyncio_path_imports_no_twisted():
    import subprocess

    code = ("import sys, swarm.client.aio, swarm.client.blocking; "
            "print(sorted(m for m in sys.modules if m.startswith(('twisted', 'autobahn'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
