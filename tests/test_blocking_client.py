"""The blocking client (swarm.client.blocking) against real ``twistd swarmcache``
processes (pytest-twisted holds the main thread's reactor, so the node runs apart), and
against small threaded websockets servers that stay silent or record frames."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from websockets.sync.server import serve

from swarm.client.blocking import BlockingSwarmClient
from swarm.client.frames import ConnectionClosed
from swarm.errors import NotInteger, Timeout, TooLarge, Unauthorized, Unavailable, UnknownOp
from twistd_support import free_port, start_node

TOKEN = "blocking-test-token"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc = start_node(tmp_path_factory.mktemp("blocking"), "blk", "--max-value-size", "1000")
    yield proc
    proc.kill()


@contextlib.contextmanager
def fake_node(answer: bool = True) -> Iterator[tuple[str, list]]:
    """A threaded websockets server that records frames and answers each request with
    ``{"ok": true, "value": id}`` (or never answers)."""
    frames: list[Any] = []

    def handler(ws):
        for message in ws:
            binary = isinstance(message, bytes)
            decoded = cbor2.loads(message) if binary else json.loads(message)
            frames.append(decoded)
            if answer:
                items = decoded if isinstance(decoded, list) else [decoded]
                out = [{"id": r["id"], "ok": True, "value": r["id"]} for r in items]
                out = out if isinstance(decoded, list) else out[0]
                ws.send(cbor2.dumps(out) if binary else json.dumps(out))

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}", frames
        finally:
            server.shutdown()
            thread.join(5)


@pytest.mark.parametrize("encoding", ["cbor", "json"])
def test_ops_return_their_results(node, encoding):
    with BlockingSwarmClient(node.url, encoding=encoding) as c:
        assert c.ping() == "blk"
        assert c.set(f"{encoding}:k", [1, "two", {"three": 3.0}]) is True
        assert c.get(f"{encoding}:k") == [1, "two", {"three": 3.0}]
        assert c.get(f"{encoding}:missing", 7) == 7
        assert c.incr(f"{encoding}:n", 3) == 3
        assert c.mset({f"{encoding}:a": 1, f"{encoding}:b": 2}, ttl=30) == 2
        assert c.mget([f"{encoding}:a", f"{encoding}:zz"]) == {f"{encoding}:a": 1}
        assert c.delete(f"{encoding}:a") is True
        assert c.exists(f"{encoding}:a") is False
        replies = c.batch([{"op": "get", "key": f"{encoding}:b"}, {"op": "nope"}])
        assert replies[0]["value"] == 2 and replies[1]["ok"] is False


def test_errors_are_raised_and_the_connection_stays_usable(node):
    with BlockingSwarmClient(node.url, pool_size=1) as c:
        c.set("text", "abc")
        with pytest.raises(NotInteger):
            c.incr("text")
        with pytest.raises(TooLarge):
            c.set("big", "x" * 5000)
        with pytest.raises(UnknownOp):
            c.request("nope")
        assert c.get("text") == "abc"
        assert len(c._idle) == 1  # one connection served every call


def test_threads_share_a_bounded_pool(node):
    with BlockingSwarmClient(node.url, pool_size=3) as c:
        c.delete("shared")
        errors: list[BaseException] = []

        def work():
            try:
                for _ in range(40):
                    c.incr("shared")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert c.get("shared") == 320
        assert 1 <= len(c._idle) <= 3


def test_a_restarted_node_is_redialled(tmp_path):
    proc = start_node(tmp_path, "rst")
    try:
        with BlockingSwarmClient(proc.url, pool_size=2, timeout=5) as c:
            assert c.set("k", 1) is True
            before = c._idle[0]
            proc.kill()
            with pytest.raises(Unavailable):  # nobody listens: the dial fails
                c.get("k")
            proc = start_node(tmp_path, "rst", port=proc.port, name="rst-again")
            assert c.set("k", 2) is True  # a fresh connection, on the same client
            assert c.get("k") == 2
            assert before not in c._idle
    finally:
        proc.kill()


def test_a_pooled_connection_closed_by_the_node_is_replaced_without_error(tmp_path):
    proc = start_node(tmp_path, "gone")
    try:
        with BlockingSwarmClient(proc.url, timeout=5) as c:
            assert c.set("k", 1) is True
            old = c._idle[0]
            proc.kill()
            proc = start_node(tmp_path, "gone", port=proc.port, name="gone-again")
            # The old connection saw the close while idle: the request never left on
            # it, so it goes on a new one and the caller sees no error.
            assert c.ping() == "gone"
            assert old not in c._idle
    finally:
        proc.kill()


def test_a_request_without_reply_times_out_and_is_not_resent():
    with fake_node(answer=False) as (url, frames):
        with BlockingSwarmClient(url, timeout=0.3) as c:
            with pytest.raises(Timeout):
                c.set("k", 1)
            assert len(frames) == 1  # a write that left is never sent again
            assert c._idle == []  # its connection may still get the reply: dropped


def test_batches_go_in_one_frame():
    with fake_node() as (url, frames):
        with BlockingSwarmClient(url) as c:
            replies = c.batch([{"op": "get", "key": f"k{i}"} for i in range(20)])
            assert len(frames) == 1 and len(frames[0]) == 20
            assert [r["value"] for r in replies] == [r["id"] for r in frames[0]]


def test_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    proc = start_node(tmp_path, "tok", "--client-token-file", str(path))
    try:
        with BlockingSwarmClient(proc.url, token=TOKEN) as c:
            assert c.set("k", 1) is True
        with BlockingSwarmClient(proc.url, token="wrong") as c:
            with pytest.raises(Unauthorized):
                c.get("k")
        with BlockingSwarmClient(proc.url) as c:
            with pytest.raises(Unauthorized):
                c.get("k")
    finally:
        proc.kill()


def test_bad_arguments_and_closed_clients():
    with pytest.raises(ValueError, match="encoding"):
        BlockingSwarmClient("ws://127.0.0.1:1", encoding="xml")
    with pytest.raises(ValueError, match="pool_size"):
        BlockingSwarmClient("ws://127.0.0.1:1", pool_size=0)
    with pytest.raises(Unavailable, match="cannot connect"):
        BlockingSwarmClient(f"ws://127.0.0.1:{free_port()}", connect_timeout=2).get("k")
    c = BlockingSwarmClient("ws://127.0.0.1:1")
    c.close()
    with pytest.raises(ConnectionClosed):
        c.get("k")
