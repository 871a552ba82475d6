"""``twistd swarmcache`` as an operator runs it: real processes, real ports.

Each test starts ``twistd -n --pidfile= swarmcache ...`` with subprocess (the plugin is found
in the installed package, so reinstall it after changing the code), talks to it over
127.0.0.1 only, and kills whatever it started in a ``finally``. Every wait has a deadline
and polls a condition; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import cbor2
import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio
from twistd_support import (
    CLEAN_SIGTERM_STATUS,
    EXIT_DEADLINE,
    Twistd,
    free_port,
    health,
    start_node,
)


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
                   "--max-message-size", "--node-id", "--log-level",
                   "--ping-interval", "--ping-timeout"):
        assert option in out, f"{option} missing from --help:\n{out}"


def test_readme_options_table_is_the_options_twistd_takes():
    """Every option of ``twistd swarmcache --help`` is in the README's table, and no
    row names one that does not exist."""
    from swarm.node.tap import Options

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Options", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, re.M))
    taken = {f"--{name}" for name in _long_options(Options())}
    assert documented == taken


def _long_options(options) -> set[str]:
    names = {p[0] for p in options.optParameters}
    names |= {name[4:].replace("_", "-") for name in dir(options) if name.startswith("opt_")}
    return names - {"help", "version"}


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


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that a socket of the test listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def kill_daemon(pidfile: Path) -> None:
    """SIGKILL the daemon that ``pidfile`` names, if it is still there."""
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


@pytest.mark.parametrize("daemon", [False, True], ids=["nodaemon", "daemon"])
@pytest.mark.parametrize("bad", ["busy", "out-of-range"])
def test_a_port_it_cannot_listen_on_ends_twistd_at_once_with_one_line_and_no_pidfile(
    tmp_path, busy_port, daemon, bad
):
    port, line = {
        "busy": (str(busy_port),
                 f"cannot listen on 127.0.0.1:{busy_port}: Address already in use"),
        "out-of-range": ("tcp:99999", "cannot listen on tcp:99999: "),
    }[bad]
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    args = [f"--pidfile={pidfile}", f"--logfile={logfile}", "swarmcache", "--port", port]
    t = Twistd(tmp_path, args if daemon else ["-n", *args])
    started = time.monotonic()
    try:
        status = t.wait()
        took = time.monotonic() - started
        log = logfile.read_text(errors="replace") if logfile.exists() else ""
    finally:
        t.kill()
        kill_daemon(pidfile)
    said = t.output() + log
    assert status != 0, t.describe()
    assert took < 10, f"took {took:.1f}s; {t.describe()}"
    assert line in log, log
    if daemon:  # the waiting parent says it on the terminal
        assert line in t.output(), t.describe()
    if bad == "out-of-range":
        assert "port must be 0-65535" in log, log
    assert "Traceback" not in said, said
    assert not pidfile.exists(), said


#: A Twisted endpoint plugin: ``later:PORT`` listens on 127.0.0.1:PORT half a second
#: after it is asked to, so a busy port fails the listen after twistd has started.
LATER_ENDPOINT_PLUGIN = """
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IStreamServerEndpoint, IStreamServerEndpointStringParser)
from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class Later:
    def __init__(self, reactor, port):
        self.reactor, self.port = reactor, int(port)

    def listen(self, factory):
        now = TCP4ServerEndpoint(self.reactor, self.port, interface="127.0.0.1")
        return deferLater(self.reactor, 0.5, now.listen, factory)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class LaterParser:
    prefix = "later"

    def parseStreamServer(self, reactor, port):
        return Later(reactor, port)


later = LaterParser()
"""


def test_a_listen_that_fails_after_twistd_started_ends_it_with_status_1_and_one_line(
    tmp_path, busy_port, monkeypatch
):
    plugins = tmp_path / "path" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "swarmcache_test_later.py").write_text(LATER_ENDPOINT_PLUGIN)
    path = [str(tmp_path / "path"), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    pidfile = tmp_path / "twistd.pid"
    t = Twistd(tmp_path, ["-n", f"--pidfile={pidfile}", "swarmcache",
                          "--port", f"later:{busy_port}"])
    try:
        status = t.wait()
    finally:
        t.kill()
    out = t.output()
    assert status == 1, t.describe()
    assert out.count(f"cannot listen on 127.0.0.1:{busy_port}: Address already in use") == 1, out
    assert "#critical]" in out and "Server Shut Down." in out, out
    assert "Traceback" not in out, out
    assert not pidfile.exists(), out


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
        ("--request-timeout", "0"),
        ("--ping-interval", "0"),
        ("--ping-interval", "soon"),
        ("--ping-timeout", "0.3"),
        ("--ping-timeout", "nan"),
        ("--port", "bogus:1"),
        ("--port", "tcp:notaport"),
        ("--port", "99999"),
        ("--secret-file", "/nonexistent/secret"),
        ("--peer-ca", "/nonexistent/ca.pem"),
        ("--peer-ca", "/dev/null"),  # no certificate in it
        ("--client-token-file", "/nonexistent/tokens"),
        ("--client-token-file", "/dev/null"),  # no token in it
        ("--max-connections", "0"),
        ("--handshake-timeout", "0"),
        ("--idle-timeout", "-1"),
        ("--max-in-flight", "many"),
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


def test_ping_options_reach_the_peer_links_both_ways():
    from swarm.node.tap import Options, makeService

    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--peer",
                          "ws://127.0.0.1:1", "--ping-interval", "1.5",
                          "--ping-timeout", "4"])
    node = makeService(options)
    [upstream] = node.upstreams
    for factory in (node.peer_factory, upstream.factory):  # accepted and dialled links
        assert (factory.autoPingInterval, factory.autoPingTimeout) == (1.5, 4.0)


@pytest.mark.parametrize("option, value, error", [
    ("--ping-interval", "0.5", "a number of seconds must be in [1, 1e+09]: '0.5'"),
    # Autobahn's whole-second ping timers would drop every link at once.
    ("--ping-timeout", "0.5", "a number of seconds must be in [1, 1e+09]: '0.5'"),
    ("--request-timeout", "-0.5", "a number of seconds must be in (0, 86400]: '-0.5'"),
    # the time left travels to peers in ms, and peers refuse more than a day
    ("--request-timeout", "86401", "a number of seconds must be in (0, 86400]: '86401'"),
    ("--default-ttl", "-1", "a number of seconds must be in [0, 1e+09]: '-1'"),
    ("--replicas", "0", "a whole number must be at least 1: '0'"),
])
def test_numbers_out_of_range_name_the_range_and_the_value(option, value, error):
    from twisted.python import usage

    from swarm.node.tap import Options

    with pytest.raises(usage.UsageError, match=re.escape(error)):
        Options().parseOptions([option, value])


def test_secret_file_is_read_and_a_short_secret_refused(tmp_path):
    from twisted.python import usage

    from swarm.node.config import NodeConfig
    from swarm.node.tap import Options

    good, short = tmp_path / "good", tmp_path / "short"
    good.write_text("  0123456789abcdef0123  \n")
    short.write_text("tooshort\n")
    options = Options()
    options.parseOptions(["--secret-file", str(good), "--allowed-origin",
                          "https://app.example/", "--allowed-origin", "*"])
    config = NodeConfig.from_options(options)
    assert config.peer_secret == b"0123456789abcdef0123"
    assert config.allowed_origins == ("https://app.example", "*")
    assert "0123456789" not in repr(config)  # never in a log line
    with pytest.raises(usage.UsageError, match="holds 8 bytes; a secret needs at least 16"):
        Options().parseOptions(["--secret-file", str(short)])


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
