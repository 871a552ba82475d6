"""A node id is one live node: a second live node with an id already in the swarm is
refused on the link and says so; a node restarted with its id rejoins as itself.

Real nodes on 127.0.0.1 (port 0) in this process, and one real ``twistd`` case.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from conftest import converged, start_node, stop_all, until
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from swarm.errors import Unavailable
from swarm.node.node import SwarmNode


async def health(node: SwarmNode) -> tuple[int, dict]:
    """``GET /health`` by the standard library (in a thread), as a load balancer would
    probe: (status, parsed body)."""
    from twisted.internet.threads import deferToThread

    def fetch() -> tuple[int, dict]:
        url = node.url.replace("ws:", "http:") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await deferToThread(fetch)


@pytest.fixture
def logged():
    """(namespace, level, text) of every log event while the test runs."""
    events: list[tuple[str, LogLevel, str]] = []

    def observe(event) -> None:
        events.append((event.get("log_namespace", ""), event.get("log_level"),
                       formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def lines(events, level: LogLevel, *words: str) -> list[str]:
    return [text for _, lvl, text in events if lvl == level and all(w in text for w in words)]


@pytest.mark.parametrize("where", ["dials-the-swarm", "is-dialled", "dials-a-node-beyond"])
@pytest_twisted.ensureDeferred
async def test_a_second_live_node_with_an_id_in_the_swarm_is_refused_and_reports_it(
        where, logged):
    hub = await start_node(node_id="hub")
    original = await start_node(node_id="dup", peers=(hub.url,))
    beyond = await start_node(node_id="beyond", peers=(hub.url,))
    nodes = [hub, original, beyond]
    try:
        await converged(nodes)
        keys = {f"k{i}": i for i in range(40)}
        await hub.mset(keys)
        assert {(await hub.owner(k))[0] for k in keys} == {"hub", "dup", "beyond"}

        duplicate = await start_node(node_id="dup")
        nodes.append(duplicate)
        if where == "dials-the-swarm":
            refuser, upstream = hub, duplicate.add_peer(hub.url)
        elif where == "is-dialled":
            refuser, upstream = hub, hub.add_peer(duplicate.url)
        else:  # beyond reaches the original through hub, not directly
            refuser, upstream = beyond, duplicate.add_peer(beyond.url)

        await until(lambda: duplicate.overlay.conflict is not None,
                    what="the duplicate to learn that its id is refused")
        code, body = await health(duplicate)
        assert code == 503 and body["status"] == "conflict" and body["node"] == "dup"
        assert "'dup'" in body["reason"] and "already live" in body["reason"]
        # logged on both sides: the refusal where it happened, an error on the duplicate
        assert lines(logged, LogLevel.warn, "refusing peer link", "'dup'", "already live")
        assert lines(logged, LogLevel.error, "refused this node's id dup", "--node-id")
        # it tries again with growing delays, and is refused again
        await until(lambda: upstream.policy.handshake_failures >= 2,
                    what="the dialler to count the refusals")
        assert duplicate.overlay.conflict is not None
        assert duplicate.overlay.membership.reachable == {"dup"}
        # and it acknowledges no write that nobody else would ever see
        with pytest.raises(Unavailable, match="its id is refused"):
            await duplicate.set("k0", "lost?")
        with pytest.raises(Unavailable):
            await duplicate.get("k0")
        assert await duplicate.ping() == "dup"  # node ops still answer

        # the original goes on as before: in every view, and serving its keys
        for n in (hub, original, beyond):
            assert n.overlay.membership.reachable == {"hub", "dup", "beyond"}
            assert (await health(n))[0] == 200 and n.overlay.conflict is None
        assert ("dup" in refuser.overlay.neighbors) == (refuser is hub)  # the original
        assert await beyond.mget(list(keys)) == keys
        assert await original.mget(list(keys)) == keys
        assert await beyond.set("after", "yes") is True
        assert await original.get("after") == "yes"
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_a_node_refused_while_its_id_was_live_rejoins_once_the_old_one_is_gone():
    """A restart noticed late (the old life frozen, then dropped at the ping timeout) is
    refused at first; the dialler's backoff brings it in once the old links are dead."""
    hub = await start_node(node_id="hub")
    old = await start_node(node_id="n", peers=(hub.url,))
    new = None
    try:
        await converged([hub, old])
        new = await start_node(node_id="n", peers=(hub.url,))
        await until(lambda: new.overlay.conflict is not None, what="the first refusal")
        await old.stopService()
        await converged([hub, new], what="the new life to link in the old one's place")
        assert new.overlay.conflict is None
        code, body = await health(new)
        assert code == 200 and body["status"] == "ok"
        keys = {f"r{i}": i for i in range(40)}
        assert await new.mset(keys) == len(keys)
        assert await hub.mget(list(keys)) == keys
        assert "n" in {(await hub.owner(k))[0] for k in keys}
    finally:
        await stop_all([n for n in (hub, old, new) if n is not None])


@pytest_twisted.ensureDeferred
async def test_a_restart_with_the_same_id_after_a_stop_rejoins_at_once():
    hub = await start_node(node_id="hub")
    first = await start_node(node_id="n", peers=(hub.url,))
    second = None
    try:
        await converged([hub, first])
        await first.stopService()
        await until(lambda: hub.overlay.membership.reachable == {"hub"})
        second = await start_node(node_id="n", peers=(hub.url,))
        await converged([hub, second], what="the restarted node to rejoin")
        # accepted on its first attempt: no refusal, no backoff
        assert second.upstreams[0].policy.handshake_failures == 0
        assert second.overlay.conflict is None and (await health(second))[0] == 200
        assert await second.set("k", 1) is True and await hub.get("k") == 1
    finally:
        await stop_all([n for n in (hub, first, second) if n is not None])


# -- twistd ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_a_duplicate_id_is_refused_reports_503_and_logs_an_error(tmp_path: Path):
    from twistd_support import Twistd, eventually, free_port
    from twistd_support import health as get_health
    from twistd_support import start_node as start_twistd

    from swarm.client.connection import SwarmClient

    hub = start_twistd(tmp_path, "hub")
    procs = [hub]
    client = None
    try:
        original = start_twistd(tmp_path, "dup", "--peer", hub.url)
        procs.append(original)
        client = await SwarmClient.connect(hub.url, timeout=10, connect_timeout=5)

        async def linked() -> bool:
            return len((await client.nodes())["nodes"]) == 2

        await eventually(linked, "the original to link", 15, hub.describe)
        assert await client.set("k", "v") is True
        # the duplicate may turn 503 before its first probe: start it by hand
        port = free_port()
        duplicate = Twistd(tmp_path, ["-n", "--pidfile=", "swarmcache", "--port", str(port),
                                      "--node-id", "dup", "--peer", hub.url],
                           name="duplicate", port=port)
        procs.append(duplicate)

        async def refused() -> dict | None:
            code, body = get_health(port)  # a 503's body comes back unparsed
            body = json.loads(body) if code == 503 else None
            return body if body and body["status"] == "conflict" else None

        body = await eventually(refused, "the duplicate to report the conflict", 15,
                                duplicate.describe)
        assert "already live" in body["reason"]
        async def logged_error() -> bool:
            return "refused this node's id dup" in duplicate.output()

        await eventually(logged_error, "the duplicate's log line", 5, duplicate.describe)
        assert "refusing peer link" in hub.output()
        assert get_health(original.port)[0] == 200
        assert await client.get("k") == "v" and len((await client.nodes())["nodes"]) == 2
    finally:
        if client is not None:
            await client.close()
        for p in procs:
            p.kill()
