"""GET /metrics (issue 10): scraped from live nodes with a real HTTP GET and parsed as
Prometheus parses it; values move with the requests, links and keys they count."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import start_node, start_swarm, stop_all, until
from prometheus_client.parser import text_string_to_metric_families

from swarm.client import SwarmClient
from swarm.errors import SwarmError
from swarm.node.node import _ws_url

TOKEN = "metrics-test-token-0123456789"


async def scrape(url: str, token: str | None = None) -> tuple[int, bytes]:
    """GET ``url`` (urllib, in a thread): the status and the body."""
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    from twisted.internet.threads import deferToThread

    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get() -> tuple[int, bytes]:
        try:
            with urlopen(Request(url, headers=headers), timeout=10) as response:
                return response.status, response.read()
        except HTTPError as e:
            return e.code, e.read()

    return await deferToThread(get)


async def metrics(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of the /metrics page under ``url``: (name, sorted labels) -> value."""
    code, body = await scrape(url + "/metrics", token)
    assert code == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def http(node: Any) -> str:
    return node.url.replace("ws://", "http://")


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_counts_requests_by_op_and_outcome_and_keys():
    node = await start_node(node_id="m1")
    client = await SwarmClient.connect(node.url)
    try:
        before = await metrics(http(node))
        assert value(before, "swarmcache_keys") == 0
        assert [dict(k[1])["node"] for k in before if k[0] == "swarmcache_node"] == ["m1"]
        await client.set("a", 1)
        await client.set("b", "x")
        await client.get("a")
        try:
            await client.incr("b")  # not a number
        except SwarmError:
            pass
        await client.batch([{"op": "get", "key": "a"}, {"op": "get", "key": "zz"}])
        after = await metrics(http(node))
        assert value(after, "swarmcache_requests_total", op="set", outcome="ok") == 2
        assert value(after, "swarmcache_requests_total", op="get", outcome="ok") == 3
        errors = [k for k in after if k[0] == "swarmcache_requests_total"
                  and dict(k[1])["op"] == "incr"]
        assert len(errors) == 1 and dict(errors[0][1])["outcome"] not in ("ok", "")
        assert value(after, "swarmcache_keys") == 2
        assert value(after, "swarmcache_memory_bytes") > 0
        assert value(after, "swarmcache_hits_total") >= 2
        assert value(after, "swarmcache_request_duration_seconds_count",
                     route="local", hops="0") == 6
        stats = await client.stats()
        assert stats["requests"] == 6  # the stats op is counted once it is answered
    finally:
        await client.close()
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_two_nodes_links_and_forwarded_latency_by_hops():
    nodes = await start_swarm(2, [(1, 0)])
    client = await SwarmClient.connect(nodes[0].url)
    try:
        samples = await metrics(http(nodes[0]))
        assert value(samples, "swarmcache_peer_links") == 1
        assert value(samples, "swarmcache_swarm_nodes") == 2
        elsewhere = next(f"k{i}" for i in range(1000)
                         if nodes[0].router.placement.primary(f"k{i}") == "n1")
        await client.set(elsewhere, 1)
        assert await client.get(elsewhere) == 1
        # a batch of requests bound for n1 goes there as one group
        await client.batch([{"op": "get", "key": elsewhere}] * 3)
        samples = await metrics(http(nodes[0]))
        assert value(samples, "swarmcache_request_duration_seconds_count",
                     route="forwarded", hops="1") == 5
        assert value(samples, "swarmcache_request_duration_seconds_bucket",
                     route="forwarded", hops="1", le="+Inf") == 5
        assert value(samples, "swarmcache_requests_total", op="get", outcome="ok") == 4
        assert value(await metrics(http(nodes[1])), "swarmcache_keys") == 1
        before = value(samples, "swarmcache_peer_bytes_sent_total")
        await client.set(elsewhere, "x" * 10_000)
        after = await metrics(http(nodes[0]))
        assert value(after, "swarmcache_peer_bytes_sent_total") >= before + 10_000
        assert value(after, "swarmcache_peer_frames_received_total") > 0
    finally:
        await client.close()
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_refused_peers_are_counted_by_close_code():
    guarded = await start_node(node_id="guarded", peer_secret=b"s" * 32)
    outsider = await start_node(node_id="outsider", peers=(guarded.url,))
    try:
        await until(lambda: guarded.overlay.refused_peers, what="the outsider refused")
        samples = await metrics(http(guarded))
        assert sum(v for (name, _), v in samples.items()
                   if name == "swarmcache_refused_peers_total") >= 1
        assert value(samples, "swarmcache_swarm_nodes") == 1
    finally:
        await stop_all([outsider, guarded])


@pytest_twisted.ensureDeferred
async def test_tokens_guard_metrics_and_the_metrics_port_needs_none(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    node = await start_node(node_id="m2", client_token_file=str(tokens),
                            metrics_port="tcp:0:interface=127.0.0.1")
    try:
        assert (await scrape(http(node) + "/metrics"))[0] == 401
        assert (await scrape(http(node) + "/metrics", "wrong"))[0] == 403
        samples = await metrics(http(node), TOKEN)
        assert value(samples, "swarmcache_refused_clients_total",
                     reason="no client token") == 1
        assert value(samples, "swarmcache_refused_clients_total",
                     reason="wrong client token") == 1
        internal = _ws_url(node.listeners()["metrics"], "http")
        assert value(await metrics(internal), "swarmcache_keys") == 0
        assert (await scrape(internal + "/"))[0] == 404  # /metrics alone
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_nodes_in_one_process_have_registries_of_their_own():
    a = await start_node(node_id="ra")
    b = await start_node(node_id="rb")
    try:
        await a.set("only-a", 1)
        assert value(await metrics(http(a)), "swarmcache_keys") == 1
        assert value(await metrics(http(b)), "swarmcache_keys") == 0
    finally:
        await stop_all([a, b])


def test_metrics_port_option_is_checked_and_reaches_the_config():
    from twisted.python import usage

    from swarm.node.config import NodeConfig
    from swarm.node.tap import Options

    with pytest.raises(usage.UsageError, match="--metrics-port 'nope:1' is not an endpoint"):
        Options().parseOptions(["--metrics-port", "nope:1"])
    options = Options()
    options.parseOptions(["--metrics-port", "9100"])
    assert NodeConfig.from_options(options).metrics_port == "9100"
