"""Who may connect, and how many at once: client tokens, browser origins, the connection
cap and the handshake timeout (issue 8), against real listeners on 127.0.0.1.

The attacks are reproduced as an attacker would run them: a third-party WebSocket
client (``websockets``) without a token or from a foreign page's Origin, and raw TCP
sockets that open and stay idle or drip a request one byte at a time (Slowloris).
The unit tests at the end drive the same code on a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import websockets
from conftest import running
from test_bad_input import asyncio_test
from test_bad_input import wait_until as until
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from websockets.exceptions import InvalidHandshake, InvalidStatus

from swarm.client import SwarmClient
from swarm.edge import admission
from swarm.edge.admission import Admission, TokenFile, origin_allowed
from swarm.edge.web import build_site
from swarm.node.config import NodeConfig

#: Upper bound for one wait on the network.
STEP = 10.0
TOKEN = "s3cret-token-for-tests"
OTHER = "another-token"


@contextlib.asynccontextmanager
async def closing(socks: list) -> AsyncIterator[list]:
    """Raw (reader, writer) sockets the block opens, closed at its end."""
    try:
        yield socks
    finally:
        for _, writer in socks:
            writer.close()


async def idle_socket_closed(port: int, what: str) -> None:
    """A socket that sends nothing is closed by the node within 5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await until(lambda: is_closed(reader), what, 5.0)
    finally:
        writer.close()


def token_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "tokens"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


async def ws_open(url: str, **kw: Any) -> websockets.ClientConnection:
    return await websockets.connect(url, open_timeout=STEP, **kw)


async def set_get(ws: websockets.ClientConnection, key: str = "k") -> None:
    """A set then a get on ``ws`` round-trip."""
    await ws.send(json.dumps({"id": 1, "op": "set", "key": key, "value": "v"}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), STEP))
    assert reply["ok"] is True, reply
    await ws.send(json.dumps({"id": 2, "op": "get", "key": key}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), STEP))
    assert reply["ok"] is True and reply["value"] == "v", reply


async def works(url: str, **kw: Any) -> None:
    ws = await ws_open(url, **kw)
    try:
        await set_get(ws)
    finally:
        await asyncio.wait_for(ws.close(), STEP)


async def refused(url: str, **kw: Any) -> tuple[int, Any]:
    """The HTTP status the upgrade is refused with, and the response headers."""
    with pytest.raises(InvalidStatus) as info:
        ws = await ws_open(url, **kw)
        await ws.close()
    response = info.value.response
    return response.status_code, response.headers


def bearer(token: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def http_status(port: int, path: str = "/health") -> int:
    """One HTTP/1.0 GET on a fresh socket: its status code (0: no answer, closed)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), STEP)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), STEP)
    except ConnectionError:
        return 0
    finally:
        writer.close()
    return int(line.split()[1]) if line else 0


async def is_closed(reader: asyncio.StreamReader, wait: float = 0.02) -> bool:
    """Whether the node has closed this raw socket (EOF or reset) by now."""
    try:
        data = await asyncio.wait_for(reader.read(4096), wait)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b"" or await is_closed(reader, wait)


def port_of(node) -> int:
    return int(node.url.rsplit(":", 1)[1])


# -- tokens ---------------------------------------------------------------------------


@asyncio_test
async def test_token_required_missing_401_wrong_403(tmp_path):
    async with running(client_token_file=token_file(tmp_path, TOKEN)) as node:
        status, headers = await refused(node.url)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _ = await refused(node.url, **bearer("wrong"))
        assert status == 403
        status, _ = await refused(node.url + "/?token=wrong")
        assert status == 403


@asyncio_test
async def test_good_token_in_header_or_query_works(tmp_path):
    path = token_file(tmp_path, "# clients", "", TOKEN, "  ", OTHER)
    async with running(client_token_file=path) as node:
        await works(node.url, **bearer(TOKEN))
        await works(node.url, **bearer(OTHER))
        await works(node.url + f"/?token={TOKEN}")
        # the project's own client: the token in the URL
        client = await SwarmClient.connect(node.url + f"/?token={TOKEN}").asFuture(
            asyncio.get_running_loop())
        await client.set("c", 1).asFuture(asyncio.get_running_loop())
        assert await client.get("c").asFuture(asyncio.get_running_loop()) == 1
        await client.close().asFuture(asyncio.get_running_loop())
        # /health and /peer take no token
        assert await http_status(port_of(node)) == 200


@asyncio_test
async def test_reload_takes_new_tokens_and_drops_removed_ones(tmp_path):
    path = token_file(tmp_path, TOKEN)
    async with running(client_token_file=path) as node:
        admission = node._listener.site.admission
        await works(node.url, **bearer(TOKEN))
        Path(path).write_text(OTHER + "\n")
        assert admission.reload() is True
        await works(node.url, **bearer(OTHER))
        assert (await refused(node.url, **bearer(TOKEN)))[0] == 403
        # a reload that fails keeps the tokens it had
        Path(path).write_text("# nothing left\n")
        assert admission.reload() is False
        Path(path).unlink()
        assert admission.reload() is False
        await works(node.url, **bearer(OTHER))


# -- origins --------------------------------------------------------------------------


@asyncio_test
async def test_foreign_origin_refused_listed_one_works():
    allowed = ("https://app.example", "http://127.0.0.1:8000/")
    async with running(allowed_origins=allowed) as node:
        assert (await refused(node.url, origin="https://evil.example"))[0] == 403
        assert (await refused(node.url, origin="https://app.example:444"))[0] == 403
        await works(node.url, origin="https://app.example")
        await works(node.url, origin="http://127.0.0.1:8000")
        await works(node.url)  # no Origin: not a browser
        assert (await refused(node.url, origin="null"))[0] == 403


@asyncio_test
async def test_no_allowed_origin_refuses_every_browser():
    async with running() as node:
        assert (await refused(node.url, origin="https://evil.example"))[0] == 403
        assert (await refused(node.url, origin="null"))[0] == 403
        await works(node.url)


@asyncio_test
async def test_star_allows_any_origin_but_null():
    async with running(allowed_origins=("*",)) as node:
        await works(node.url, origin="https://evil.example")
        await works(node.url)
        assert (await refused(node.url, origin="null"))[0] == 403


@asyncio_test
async def test_token_lets_a_foreign_origin_in(tmp_path):
    async with running(client_token_file=token_file(tmp_path, TOKEN),
                       allowed_origins=("https://app.example",)) as node:
        await works(node.url, origin="https://evil.example", **bearer(TOKEN))
        await works(node.url + f"/?token={TOKEN}", origin="https://evil.example")
        # a listed origin still needs the token when tokens are required
        assert (await refused(node.url, origin="https://app.example"))[0] == 401
        assert (await refused(node.url, origin="https://evil.example",
                              **bearer("wrong")))[0] == 403


# -- the connection cap ---------------------------------------------------------------


@asyncio_test
async def test_max_connections_refuses_past_the_cap_and_recovers():
    socks = []
    async with running(max_connections=5, handshake_timeout=30.0) as node, \
            closing(socks):
        port = port_of(node)
        site = node._listener.site
        for _ in range(5):
            socks.append(await asyncio.open_connection("127.0.0.1", port))
        await until(lambda: _true(site.open_connections == 5), "5 connections held")
        sixth = await asyncio.open_connection("127.0.0.1", port)
        assert await until(lambda: is_closed(sixth[0]), "the 6th to be closed")
        sixth[1].close()
        assert await http_status(port) == 0  # /health is locked out too
        reader, writer = socks.pop()
        writer.close()

        async def health_back() -> bool:
            return await http_status(port) == 200

        await until(health_back, "/health to answer again")
        # the 5 kept ones were never closed
        for reader, _ in socks:
            assert not await is_closed(reader)


async def _true(value: Any) -> Any:
    return value


# -- the handshake timeout (Slowloris) ------------------------------------------------


async def drip(writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
               data: bytes, every: float, limit: float) -> float | None:
    """Send ``data`` one byte every ``every`` seconds; the seconds until the node closed
    the socket, or None if it was still open after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(len(data)):
        if loop.time() - start > limit:
            return None
        try:
            writer.write(data[i:i + 1])
            await writer.drain()
        except ConnectionError:
            return loop.time() - start
        if await is_closed(reader, every):
            return loop.time() - start
    return None


SLOW_REQUEST = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nX-Padding: " + b"a" * 500 + b"\r\n\r\n")


@asyncio_test
async def test_dripping_handshake_is_closed_after_the_timeout():
    async with running(handshake_timeout=0.5) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(node))
        took = await drip(writer, reader, SLOW_REQUEST, 0.1, limit=5.0)
        writer.close()
        assert took is not None, "a request dripped a byte every 0.1 s stayed open 5 s"
        assert 0.4 < took < 3.0, took
        # an idle socket that sends nothing at all, likewise
        await idle_socket_closed(port_of(node), "an idle socket to be closed")


@asyncio_test
async def test_keep_alive_connection_idles_out_after_its_reply():
    async with running(handshake_timeout=0.5) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(node))
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), STEP)).startswith(b"HTTP/1.1 200")
        assert await until(lambda: is_closed(reader), "the idle keep-alive to close", 5.0)
        writer.close()


@asyncio_test
async def test_slowloris_lockout_lifts_once_the_sockets_time_out():
    """50 idle sockets against a cap of 40: 40 are held and 10 refused at once; the node
    drops the 40 after the handshake timeout and a client gets in."""
    timeout = 1.0
    socks = []
    loop = asyncio.get_running_loop()
    async with running(max_connections=40, handshake_timeout=timeout) as node, \
            closing(socks):
        port = port_of(node)
        site = node._listener.site
        for _ in range(50):
            socks.append(await asyncio.open_connection("127.0.0.1", port))
        opened = loop.time()
        await until(lambda: _true(site.open_connections == 40), "40 connections held")
        closed = [await is_closed(r) for r, _ in socks]
        held = closed.count(False)
        assert held <= 40
        assert await http_status(port) == 0  # locked out for now

        async def health_back() -> bool:
            return await http_status(port) == 200

        await until(health_back, "/health to answer after the lockout", 10.0)
        recovered = loop.time() - opened
        assert recovered < timeout + 5.0, recovered
        await works(node.url)
        for reader, _ in socks:
            assert await until(lambda r=reader: is_closed(r), "every slow socket closed")
        print(f"\nslowloris: cap 40, {held} of 50 sockets held, /health back after "
              f"{recovered:.2f}s (handshake timeout {timeout}s)")


@asyncio_test
async def test_open_websocket_outlives_the_handshake_timeout():
    """A client that upgraded in time stays: proven by a slow socket, opened just after
    it, being closed first while the WebSocket still answers."""
    async with running(handshake_timeout=0.5) as node:
        ws = await ws_open(node.url)
        await idle_socket_closed(port_of(node), "the slow socket to be closed")
        # and the timeout again, measured by a second slow socket
        await idle_socket_closed(port_of(node), "a second slow socket closed")
        assert node._listener.site.open_connections == 1  # the WebSocket, still counted
        await set_get(ws)
        await asyncio.wait_for(ws.close(), STEP)


@asyncio_test
async def test_closed_websockets_give_their_place_back():
    """Upgraded connections are counted until they close, then free their place."""
    async with running(max_connections=3) as node:
        site = node._listener.site
        for _ in range(5):  # more than the cap, one after the other
            await works(node.url)
        await until(lambda: _true(site.open_connections == 0), "every place given back")
        kept = [await ws_open(node.url) for _ in range(3)]
        await until(lambda: _true(site.open_connections == 3), "3 WebSockets counted")
        with pytest.raises((OSError, InvalidHandshake,
                            asyncio.TimeoutError, EOFError)):
            extra = await websockets.connect(node.url, open_timeout=2.0)
            await extra.close()
        for ws in kept:
            await asyncio.wait_for(ws.close(), STEP)
        await until(lambda: _true(site.open_connections == 0), "places given back")
        await works(node.url)


def self_signed(tmp_path: Path) -> Path:
    """A PEM file of a new key and a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "server.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + cert.public_bytes(serialization.Encoding.PEM))
    return path


@asyncio_test
async def test_wss_is_admitted_counted_and_outlives_the_handshake_timeout(tmp_path):
    """Over TLS the WebSocket gets the TLS transport Autobahn wants, and the counting
    wrapper still sees it close."""
    import ssl

    pem = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(pem))
    async with running(port=f"ssl:0:interface=127.0.0.1:privateKey={pem}",
                       client_token_file=token_file(tmp_path, TOKEN),
                       handshake_timeout=0.5) as node:
        port = port_of(node)
        url = f"wss://127.0.0.1:{port}"
        site = node._listener.site
        assert (await refused(url, ssl=context))[0] == 401
        ws = await ws_open(url, ssl=context, **bearer(TOKEN))
        await idle_socket_closed(port, "a slow socket to be closed")
        assert site.open_connections == 1
        await set_get(ws)
        await asyncio.wait_for(ws.close(), STEP)
        await until(lambda: _true(site.open_connections == 0), "the wss place given back")


# -- units on a fake clock ---------------------------------------------------------------


def test_token_file_skips_blanks_and_comments(tmp_path):
    tokens = TokenFile(token_file(tmp_path, "# a comment", "", "  one  ", "two", "#three"))
    assert tokens.count == 2
    assert tokens.valid(b"one") and tokens.valid(b"two")
    assert not tokens.valid(b"three") and not tokens.valid(b"#three")
    assert not tokens.valid(b"") and not tokens.valid(b"on")


def test_empty_or_missing_token_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no client tokens"):
        TokenFile(token_file(tmp_path, "# only a comment", ""))
    with pytest.raises(ValueError, match="cannot read"):
        TokenFile(str(tmp_path / "missing"))


def test_every_token_is_compared(tmp_path, monkeypatch):
    """No early exit: a match on the first token costs as many compares as none."""
    tokens = TokenFile(token_file(tmp_path, "a", "b", "c"))
    calls = []
    real = admission.hmac.compare_digest
    monkeypatch.setattr(admission.hmac, "compare_digest",
                        lambda x, y: calls.append(1) or real(x, y))
    assert tokens.valid(b"a")
    assert len(calls) == 3
    assert not tokens.valid(b"zzz")
    assert len(calls) == 6


def test_failed_reload_keeps_tokens_and_logs(tmp_path):
    from twisted.logger import globalLogPublisher

    path = token_file(tmp_path, "tok-xyz")
    tokens = TokenFile(path)
    Path(path).write_text("\n# none\n")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert tokens.reload() is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert tokens.valid(b"tok-xyz")
    errors = [e for e in events if e.get("log_level").name == "error"]
    assert errors and errors[0]["path"] == path
    assert "tok-xyz" not in repr(errors)


def test_origin_matching():
    assert origin_allowed("https://a.example", ("https://a.example",))
    assert origin_allowed("HTTPS://A.example", ("https://a.example/",))
    assert not origin_allowed("https://a.example:8443", ("https://a.example",))
    assert not origin_allowed("https://a.example.evil", ("https://a.example",))
    assert origin_allowed("https://any.example", ("*",))
    assert not origin_allowed("null", ("*",))
    assert not origin_allowed("https://a.example", ())


def _site(clock, **config: Any):
    return build_site(None, None, lambda: (True, {}), NodeConfig(**config), clock)


def _connect(site):
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_drip_feed_is_cut_at_the_deadline_on_a_fake_clock():
    """Twisted's own channel timeout restarts on every byte; ours does not."""
    clock = task.Clock()
    site = _site(clock, handshake_timeout=5.0)
    protocol, transport = _connect(site)
    for i in range(49):  # a byte every 0.1 s: 4.9 s
        protocol.dataReceived(SLOW_REQUEST[i:i + 1])
        clock.advance(0.1)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected
    protocol.connectionLost(None)
    assert site.open_connections == 0


def test_answered_request_stops_the_timer_until_the_next_one():
    clock = task.Clock()
    site = _site(clock, handshake_timeout=5.0)
    protocol, transport = _connect(site)
    clock.advance(4.0)
    protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200")
    clock.advance(4.0)  # 8 s since connect, 4 s since the reply
    assert not transport.disconnected
    clock.advance(1.1)
    assert transport.disconnected


def test_cap_counts_and_refuses_on_a_fake_clock():
    clock = task.Clock()
    site = _site(clock, max_connections=2)
    (p1, t1), (p2, t2) = _connect(site), _connect(site)
    assert site.open_connections == 2
    p3, t3 = _connect(site)
    assert t3.disconnected and not t1.disconnected and not t2.disconnected
    assert site.open_connections == 2
    p3.connectionLost(None)
    p1.connectionLost(None)
    assert site.open_connections == 1
    p4, t4 = _connect(site)
    assert not t4.disconnected
    assert site.open_connections == 2


def test_admission_without_token_file_reloads_as_a_no_op():
    assert Admission().reload() is True
    assert Admission.from_config(NodeConfig()).tokens is None
