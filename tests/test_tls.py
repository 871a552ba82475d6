"""wss:// end to end: a node on an ``ssl:`` endpoint serves clients and peers over TLS,
and a dialling node checks the peer's certificate against ``peer_ca`` (or the system's
trust store) and its name against the URL's host. Certificates are made per test
(tests/tls_support.py); everything listens on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import os
import ssl

import pytest
import pytest_twisted
import websockets
from conftest import converged, on_asyncio, stop_all, until
from tls_support import Pki, make_pki
from twisted.logger import formatEvent, globalLogPublisher

from swarm.client.connection import SwarmClient
from swarm.errors import Unavailable
from swarm.node.node import SwarmNode
from swarm.protocol.urls import trust_root

#: Seconds a refused dialler is watched: long enough for several redials on its backoff.
REFUSAL_DEADLINE = 20.0


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def dialler_log():
    """The text of every event swarm.mesh.dialer logs while the test runs."""
    lines: list[str] = []

    def observe(event) -> None:
        if event.get("log_namespace") == "swarm.mesh.dialer":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


async def start_tls_node(pki: Pki, cert=None, **options) -> SwarmNode:
    """A started node whose one endpoint is ``ssl:0:interface=127.0.0.1:...``."""
    from twisted.internet import reactor

    node = SwarmNode(pki.server_endpoint(cert), reactor=reactor, **options)
    node.startService()
    await node.when_listening()
    return node


async def start_dialler(url: str, **options) -> SwarmNode:
    """A started node on plain TCP that dials ``url``."""
    from conftest import start_node

    return await start_node(peers=(url,), **options)


def wss(node: SwarmNode, host: str = "127.0.0.1") -> str:
    """The wss:// URL of a node listening on ssl:, at ``host``."""
    assert node.url.startswith("wss://127.0.0.1:")  # a TLS listener says so
    return f"wss://{host}:{node._listener.port.getHost().port}"


async def refused(dialler: SwarmNode, target: SwarmNode, log: list[str], words: str,
                  failures: int = 3) -> list[str]:
    """Wait until ``dialler`` has logged ``failures`` refusals that say ``words``, then
    check it never linked and still serves; the lines that said it."""
    (upstream,) = dialler.upstreams

    def said() -> list[str]:
        return [line for line in log if words in line and upstream.url in line]

    await until(lambda: len(said()) >= failures, timeout=REFUSAL_DEADLINE,
                what=f"{failures} refusals saying {words!r}; log: {log[-5:]}")
    assert upstream.peer_id is None and upstream.policy.handshake_failures >= failures
    assert dialler.overlay.membership.reachable == {dialler.node_id}
    assert target.overlay.membership.reachable == {target.node_id}
    assert dialler.running and await dialler.set("still", "serving") is True
    assert await dialler.get("still") == "serving"
    return said()


# -- clients -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_node_on_an_ssl_endpoint_serves_wss_to_a_websockets_client(pki):
    node = await start_tls_node(pki, node_id="tls")
    try:
        async def session(context: ssl.SSLContext) -> list[dict]:
            async with websockets.connect(wss(node), ssl=context, open_timeout=10) as ws:
                replies = []
                for request in ({"id": 1, "op": "set", "key": "k", "value": "over tls"},
                                {"id": 2, "op": "get", "key": "k"}):
                    await ws.send(json.dumps(request))
                    replies.append(json.loads(await ws.recv()))
                return replies

        set_reply, get_reply = await on_asyncio(session(pki.client_context()))
        assert set_reply["ok"] is True and get_reply["value"] == "over tls"
        with pytest.raises(ssl.SSLCertVerificationError):
            await on_asyncio(session(pki.client_context(pki.other_ca)))
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_swarm_client_over_wss_trusts_only_the_ca_it_is_given(pki):
    from twisted.internet import reactor

    node = await start_tls_node(pki, node_id="tls")
    try:
        client = await SwarmClient.connect(wss(node), reactor=reactor, connect_timeout=10,
                                           ca=str(pki.ca))
        assert await client.set("k", b"\x00bytes") is True
        assert await client.get("k") == b"\x00bytes"
        await client.close()
        for ca in (str(pki.other_ca), None):  # None: the system's trust store
            with pytest.raises(Unavailable) as info:
                await SwarmClient.connect(wss(node), reactor=reactor, connect_timeout=10,
                                          ca=ca)
            assert "certificate verify failed" in str(info.value)
    finally:
        await node.stopService()


def test_a_ca_file_without_a_certificate_is_refused_up_front(tmp_path, pki):
    empty = tmp_path / "not-a-ca.pem"
    empty.write_text("just text\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        trust_root(str(empty))
    with pytest.raises(ValueError, match="no PEM certificate"):
        SwarmNode("tcp:0:interface=127.0.0.1", peers=("wss://127.0.0.1:1",),
                  peer_ca=str(empty))
    with pytest.raises(OSError):
        trust_root(str(tmp_path / "missing.pem"))
    trust_root(str(pki.ca))  # a good one loads


# -- peers -------------------------------------------------------------------------------


@pytest.mark.parametrize("ca", ["ca", "bundle"])
@pytest_twisted.ensureDeferred
async def test_peers_link_over_wss_checked_against_peer_ca(pki, tmp_path, ca):
    """B dials A at wss://127.0.0.1:PORT; A's certificate names 127.0.0.1 (IP SAN) and is
    signed by the CA in peer_ca (alone, or second in a bundle of two)."""
    from twisted.internet import reactor

    peer_ca = pki.ca
    if ca == "bundle":
        peer_ca = tmp_path / "bundle.pem"
        peer_ca.write_bytes(pki.other_ca.read_bytes() + pki.ca.read_bytes())
    a = await start_tls_node(pki, node_id="A")
    b = await start_dialler(wss(a), node_id="B", peer_ca=str(peer_ca))
    nodes = [a, b]
    try:
        await converged(nodes, what="A and B to link over wss")
        assert b.upstreams[0].peer_id == "A"
        view = await b.nodes()
        assert {n["id"] for n in view["nodes"]} == {"A", "B"}
        keys = {f"k{i}": i for i in range(20)}  # some owned by A, some by B
        assert await b.mset(keys) == len(keys)
        client = await SwarmClient.connect(wss(a), reactor=reactor, connect_timeout=10,
                                           ca=str(pki.ca))
        try:
            assert await client.mget(list(keys)) == keys
        finally:
            await client.close()
        assert {(await a.owner(k))[0] for k in keys} == {"A", "B"}
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_a_peer_signed_by_another_ca_is_refused_and_redialled_on_backoff(
        pki, dialler_log):
    a = await start_tls_node(pki, node_id="A")
    b = await start_dialler(wss(a), node_id="B", peer_ca=str(pki.other_ca))
    try:
        said = await refused(b, a, dialler_log, "TLS handshake failed: certificate verify failed")
        assert str(pki.other_ca) in said[0]
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_refused(pki, dialler_log):
    """A's certificate names only localhost: dialled as 127.0.0.1 it is refused, though
    signed by the right CA; dialled as localhost, the same node links."""
    a = await start_tls_node(pki, cert=pki.localhost_cert, node_id="A")
    b = await start_dialler(wss(a), node_id="B", peer_ca=str(pki.ca))
    try:
        said = await refused(b, a, dialler_log, "certificate is not for 127.0.0.1")
        assert "IPAddressMismatch" in said[0]
    finally:
        await b.stopService()
    by_name = await start_dialler(wss(a, host="localhost"), node_id="C", peer_ca=str(pki.ca))
    try:
        await converged([a, by_name], what="A and C to link with wss://localhost")
    finally:
        await stop_all([a, by_name])


@pytest_twisted.ensureDeferred
async def test_without_peer_ca_the_system_trust_store_refuses_a_private_ca(
        pki, dialler_log):
    a = await start_tls_node(pki, node_id="A")
    b = await start_dialler(wss(a), node_id="B")  # no peer_ca: platformTrust()
    try:
        said = await refused(b, a, dialler_log, "certificate verify failed")
        assert "the system's trust store" in said[0]
    finally:
        await stop_all([a, b])


# -- twistd ------------------------------------------------------------------------------


def https_health(port: int, context: ssl.SSLContext) -> dict:
    """``GET https://127.0.0.1:PORT/health``, verified with ``context``: its JSON body."""
    import urllib.request

    with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2,
                                context=context) as r:
        return json.loads(r.read())


@pytest_twisted.ensureDeferred
async def test_twistd_nodes_link_over_wss_with_peer_ca(pki, tmp_path):
    """``--port ssl:...`` on A; ``--peer wss://127.0.0.1:PORT --peer-ca FILE`` on B; both
    with the swarm's ``--secret-file`` too, as a deployment across networks runs them."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread
    from twistd_support import START_DEADLINE, Twistd, eventually, free_port, start_node

    secret = tmp_path / "secret"
    secret.write_text(os.urandom(16).hex() + "\n")
    port = free_port()
    a = Twistd(tmp_path, ["-n", "--pidfile=", "swarmcache", "--node-id", "A",
                          "--port", pki.server_endpoint(port=port),
                          "--secret-file", str(secret)], name="A", port=port)
    b = None
    try:
        async def a_healthy() -> bool:
            body = await deferToThread(https_health, port, pki.client_context())
            return body.get("node") == "A"

        await eventually(a_healthy, "A to serve /health over https", START_DEADLINE,
                         a.describe)
        b = start_node(tmp_path, "B", "--peer", f"wss://127.0.0.1:{port}",
                       "--peer-ca", str(pki.ca), "--secret-file", str(secret))
        on_b = await SwarmClient.connect(b.url, reactor=reactor, connect_timeout=10)
        on_a = await SwarmClient.connect(f"wss://127.0.0.1:{port}", reactor=reactor,
                                         connect_timeout=10, ca=str(pki.ca))
        try:
            async def linked() -> bool:
                views = [await c.nodes() for c in (on_a, on_b)]
                return all({n["id"] for n in v["nodes"]} == {"A", "B"} for v in views)

            await eventually(linked, "A and B to link over wss", 30,
                             lambda: a.describe() + b.describe())
            keys = {f"k{i}": i for i in range(20)}
            assert await on_b.mset(keys) == len(keys)
            assert await on_a.mget(list(keys)) == keys
        finally:
            await on_a.close()
            await on_b.close()
    finally:
        for proc in (b, a):
            if proc is not None:
                proc.kill()
