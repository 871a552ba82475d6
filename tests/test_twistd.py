"""``twistd swarmcache`` as an operator runs it: real processes, real ports.

Each test starts ``twistd -n --pidfile= swarmcache ...`` with subprocess (the plugin is found
in the installed package, so reinstall it after changing the code), talks to it over
127.0.0.1 only, and kills whatever it started in a ``finally``. Every wait has a deadline
and polls a condition; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import cbor2
import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio
from twistd_support import EXIT_DEADLINE, Twistd, free_port, health, start_node


def run_twistd(workdir: Path, args: list[str], name: str = "once") -> tuple[int, str]:
    """Run a twistd that is expected to exit by itself; its status and output."""
    t = Twistd(workdir, args, name)
    try:
        return t.wait(), t.output()
    finally:
        t.kill()


@pytest.fixture
def twistd_node(tmp_path):
    n = start_node(tmp_path, "t1")
    try:
        yield n
    finally:
        n.kill()


# -- helpers for the async tests --------------------------------------------------------


#: After a clean shutdown on SIGTERM, twistd (Twisted >= 20.3, twisted/scripts/twistd.py
#: ``app._exitWithSignal``) re-sends itself the signal, so the status is -SIGTERM rather
#: than 0; supervisors such as systemd count that as a clean stop. Either is accepted.
CLEAN_SIGTERM_STATUS = (0, -signal.SIGTERM)


async def stopped_by_sigterm(t: Twistd) -> str:
    """SIGTERM ``t``; it must shut down cleanly within the deadline. Its output."""
    t.proc.send_signal(signal.SIGTERM)
    status = await t.exited()
    out = t.output()
    assert status in CLEAN_SIGTERM_STATUS, t.describe()
    assert "Server Shut Down." in out, t.describe()
    assert "Traceback" not in out, t.describe()
    return out


async def ws_call(ws, request: dict, cbor: bool) -> dict:
    await ws.send(cbor2.dumps(request) if cbor else json.dumps(request))
    frame = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(frame, bytes) == cbor
    return cbor2.loads(frame) if cbor else json.loads(frame)


def _swarm_client():
    """swarm.client.SwarmClient when it is there and has ``connect``, else None."""
    try:
        from swarm.client.connection import SwarmClient
    except ImportError:
        return None
    return SwarmClient if callable(getattr(SwarmClient, "connect", None)) else None


# -- (a) help --------------------------------------------------------------------------


def test_help_lists_the_contract_options(tmp_path):
    status, out = run_twistd(tmp_path, ["swarmcache", "--help"])
    assert status == 0, out
    for option in ("--port", "--peer", "--replicas", "--max-memory",
                   "--max-message-size", "--node-id", "--log-level"):
        assert option in out, f"{option} missing from --help:\n{out}"


# -- (b) a node serving clients, then SIGTERM --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_node_serves_websocket_clients_and_stops_cleanly_on_sigterm(twistd_node):
    node = twistd_node
    code, body = health(node.port)
    assert code == 200 and body["node"] == "t1" and body["status"] == "ok"

    async def with_websockets() -> None:
        async with websockets.connect(node.url, open_timeout=10) as ws:
            for cbor in (False, True):
                key = f"ws-{'cbor' if cbor else 'json'}"
                r = await ws_call(ws, {"id": 1, "op": "set", "key": key,
                                       "value": {"n": [1, 2]}}, cbor)
                assert r == {"id": 1, "ok": True, "stored": True}
                r = await ws_call(ws, {"id": 2, "op": "get", "key": key}, cbor)
                assert r == {"id": 2, "ok": True, "found": True, "value": {"n": [1, 2]}}
            r = await ws_call(ws, {"id": 3, "op": "ping"}, False)
            assert r["node"] == "t1"

    await on_asyncio(with_websockets())

    SwarmClient = _swarm_client()
    if SwarmClient is not None:
        client = await SwarmClient.connect(node.url, timeout=10, connect_timeout=10)
        try:
            assert await client.ping() == "t1"
            assert await client.get("ws-json") == {"n": [1, 2]}
            assert await client.set("from-client", b"\x00bytes") is True
            assert await client.get("from-client") == b"\x00bytes"
            assert await client.incr("count", 3) == 3
        finally:
            await client.close()

        async def seen_by_websockets() -> None:
            async with websockets.connect(node.url, open_timeout=10) as ws:
                r = await ws_call(ws, {"id": 4, "op": "get", "key": "count"}, False)
                assert r["value"] == 3

        await on_asyncio(seen_by_websockets())

    out = await stopped_by_sigterm(node)
    assert "node t1 stopping" in out, out


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_connected_clients_with_1001(twistd_node):
    node = twistd_node

    async def connected_through_shutdown() -> int:
        async with websockets.connect(node.url, open_timeout=10) as ws:
            assert (await ws_call(ws, {"id": 1, "op": "ping"}, True))["ok"] is True
            node.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), EXIT_DEADLINE)
            assert closed.value.rcvd is not None, "dropped without a close frame"
            return closed.value.rcvd.code

    assert await on_asyncio(connected_through_shutdown()) == 1001
    status = await node.exited()
    assert status in CLEAN_SIGTERM_STATUS, node.describe()
    assert "Traceback" not in node.output(), node.describe()


# -- (c) busy port -----------------------------------------------------------------------


def test_second_node_on_a_busy_port_exits_with_cannot_listen(twistd_node, tmp_path):
    node = twistd_node
    status, out = run_twistd(
        tmp_path / "second",
        ["-n", "--pidfile=", "swarmcache", "--port", str(node.port), "--node-id", "t2"],
    )
    assert status != 0, out
    assert "cannot listen" in out, out
    assert str(node.port) in out, out
    assert "Traceback" not in out, out
    # The first node is not disturbed.
    code, body = health(node.port)
    assert code == 200 and body["node"] == "t1"


# -- (d) bad option values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-memory", "lots"),
        ("--max-value-size", "-5"),
        ("--log-level", "loud"),
        ("--peer", "http://x"),
        ("--replicas", "0"),
        ("--default-ttl", "soon"),
        ("--port", "bogus:1"),
        ("--port", "tcp:notaport"),
        ("--port", "99999"),
    ],
)
def test_bad_option_value_exits_non_zero_with_a_clear_message(tmp_path, option, value):
    args = [option, value] if option == "--port" else ["--port", str(free_port()),
                                                          option, value]
    status, out = run_twistd(tmp_path, ["-n", "--pidfile=", "swarmcache", *args])
    assert status != 0, out
    assert "Traceback" not in out, out
    # The last line is the message: it names the option or quotes the bad value.
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert option.lstrip("-") in last or repr(value) in last, out


# -- (e) log level -------------------------------------------------------------------------


@pytest.mark.parametrize("level, shown", [("info", True), ("debug", True),
                                          ("warn", False), ("error", False)])
@pytest_twisted.ensureDeferred
async def test_log_level_controls_the_started_line(tmp_path, level, shown):
    node_id = f"t-{level}"
    n = start_node(tmp_path, node_id, "--log-level", level)
    try:
        out = await stopped_by_sigterm(n)
    finally:
        n.kill()
    # twistd's own lines are there either way: the output was captured.
    assert "starting up" in out, out
    assert (f"node {node_id} started" in out) == shown, out
    assert ("listening on" in out) == shown, out
