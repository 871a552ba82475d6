"""A node's Prometheus metrics (``GET /metrics``, issue 10).

The request path is hot, so it pays only for a :class:`RequestMeter`: plain ints in
dicts, counted as each client request is answered. Everything else (store, links,
replication, hardening) is read from the counters the node keeps anyway, when
Prometheus scrapes: :class:`NodeCollector` turns both into metric families, one
``CollectorRegistry`` per node (several nodes may share a process).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily as Counter
from prometheus_client.core import GaugeMetricFamily as Gauge
from prometheus_client.core import HistogramMetricFamily as Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource

#: Upper bounds (seconds) of the latency buckets: few, from a local hit to a slow hop.
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 2.5)
#: Hop counts from this one up share a label value ("4+"), to keep the series few.
MANY_HOPS = 4


def _hops(hops: int | None) -> str:
    if hops is None:
        return "unknown"  # the owner left the view while the request was on its way
    return str(hops) if hops < MANY_HOPS else f"{MANY_HOPS}+"


class RequestMeter:
    """Client requests by op and outcome, and their latency by route and hops.

    A reply given at once was answered here (``local``, 0 hops). One that comes later
    is placed when it arrives: ``local`` when this node is its key's primary (it
    waited for copies or a handoff), ``forwarded`` with the hops to the primary, or
    ``fanout`` for a multi-key op split among owners.
    """

    def __init__(self, router: Any) -> None:
        self.clock = router.overlay.clock
        self._router = router
        #: (op, "ok" or error code) -> requests answered
        self.answered: dict[tuple[str, str], int] = {}
        #: (route, hops) -> [count per bucket of BUCKETS, count above them, sum of s]
        self.latency: dict[tuple[str, str], list] = {}

    @property
    def total(self) -> int:
        """Client requests answered since the start."""
        return sum(self.answered.values())

    def record(self, op: str, reply: dict | Deferred, started: float,
               key: str | None = None) -> dict | Deferred:
        """Count ``reply`` to a request on ``key`` (None: a node or multi-key op),
        now or when it fires; returns it."""
        if isinstance(reply, Deferred):
            return reply.addCallback(self._later, op, started, key)
        self._count(op, reply, ("local", "0"), started)
        return reply

    def record_group(self, replies: list[dict], ops: list[str], started: float,
                     primaries: list[str]) -> list[dict]:
        """Count the replies of a group forwarded to ``primaries``; returns them."""
        hops = self._router.overlay.membership.hops
        for op, reply, primary in zip(ops, replies, primaries):
            self._count(op, reply, ("forwarded", _hops(hops.get(primary))), started)
        return replies

    def _later(self, reply: dict, op: str, started: float, key: str | None) -> dict:
        router = self._router
        if key is None:
            where = ("fanout", "multi")
        else:
            primary = router.placement.primary(key)
            where = ("local", "0") if primary == router.node_id else (
                "forwarded", _hops(router.overlay.membership.hops.get(primary)))
        self._count(op, reply, where, started)
        return reply

    def _count(self, op: str, reply: dict, where: tuple[str, str], started: float) -> None:
        if reply.get("ok"):
            outcome = "ok"
        else:
            error = reply.get("error")
            outcome = error.get("code", "internal") if isinstance(error, dict) else "internal"
        counted = (op, outcome)
        self.answered[counted] = self.answered.get(counted, 0) + 1
        elapsed = self.clock.seconds() - started
        cell = self.latency.get(where)
        if cell is None:
            cell = self.latency[where] = [0] * (len(BUCKETS) + 1) + [0.0]
        cell[bisect_left(BUCKETS, elapsed)] += 1
        cell[-1] += elapsed


# -- export ------------------------------------------------------------------------------


#: stats() field -> (metric name, help): gauges, then counters (``_total`` is added).
_STAT_GAUGES = {
    "keys": ("swarmcache_keys", "Live entries held by this node."),
    "tombstones": ("swarmcache_tombstones", "Deletions remembered so that copies agree."),
    "memory_bytes": ("swarmcache_memory_bytes", "Bytes the entries take (--max-memory "
                     "counts these)."),
    "max_memory_bytes": ("swarmcache_max_memory_bytes", "The --max-memory budget."),
    "peers": ("swarmcache_peers", "Neighbors this node has a link up with."),
    "peer_links": ("swarmcache_peer_links", "Peer links up, spares included."),
    "swarm_nodes": ("swarmcache_swarm_nodes", "Nodes reachable in this node's view, itself "
                    "included."),
    "connections": ("swarmcache_client_connections", "Client WebSocket connections open."),
    "uptime_s": ("swarmcache_uptime_seconds", "Seconds since the node started."),
}
_STAT_COUNTERS = {
    "hits": ("swarmcache_hits", "Reads that found their key here."),
    "misses": ("swarmcache_misses", "Reads that did not find their key here."),
    "evictions": ("swarmcache_evictions", "Entries evicted (LRU) to stay within "
                  "--max-memory."),
    "expirations": ("swarmcache_expirations", "Entries removed as their TTL ran out."),
    "merged": ("swarmcache_merged", "Entries taken from other nodes (handoffs, copies, "
               "repairs) that were newer than the copy here."),
    "outdated": ("swarmcache_outdated", "Entries from other nodes older than the copy "
                 "here, and so dropped."),
    "retried": ("swarmcache_retried", "Requests routed again after their way to the "
                "owner was lost."),
    "hedged": ("swarmcache_hedged", "Reads also sent to a next owner because their owner "
               "was slow to answer."),
    "anti_entropy_rounds": ("swarmcache_anti_entropy_rounds", "Anti-entropy rounds run."),
    "repairs": ("swarmcache_repairs", "Entries repaired by anti-entropy."),
}


class NodeCollector:
    """Reads one :class:`~swarm.node.node.SwarmNode` at scrape time."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def describe(self) -> list:
        return []  # nothing to read before the node is built; names come with collect()

    def collect(self) -> Iterator[Any]:
        node = self.node
        stats = node.core.stats()
        info = Gauge("swarmcache_node", "Always 1; the node's id, swarm and version.",
                     labels=["node", "swarm", "version"])
        info.add_metric([node.node_id, node.config.swarm, stats["version"]], 1)
        yield info
        for field, (name, text) in _STAT_GAUGES.items():
            yield Gauge(name, text, value=stats[field])
        for field, (name, text) in _STAT_COUNTERS.items():
            yield Counter(name, text, value=stats[field])
        copies = Gauge("swarmcache_copies", "Live entries by this node's role for their "
                       "partition (other: on their way to their owners).", labels=["role"])
        for role in ("primary", "replica", "other"):
            copies.add_metric([role], stats[f"{role}_copies"])
        yield copies
        yield from self._requests()
        yield from self._hardening()

    def _requests(self) -> Iterator[Any]:
        meter = self.node.router.meter
        requests = Counter("swarmcache_requests", "Client requests answered, by op and "
                           "outcome (ok, or the error code).", labels=["op", "outcome"])
        for (op, outcome), count in sorted(meter.answered.items()):
            requests.add_metric([op, outcome], count)
        yield requests
        latency = Histogram(
            "swarmcache_request_duration_seconds",
            "Time from a client request's arrival to its reply, by where it ran (local, "
            "forwarded, fanout) and hops to its key's primary.", labels=["route", "hops"])
        for (route, hops), cell in sorted(meter.latency.items()):
            buckets, seen = [], 0
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), cell[:-1]):
                seen += count
                buckets.append((bound, seen))
            latency.add_metric([route, hops], buckets, cell[-1])
        yield latency

    def _hardening(self) -> Iterator[Any]:
        node = self.node
        refused = Counter("swarmcache_refused_connections", "TCP connections aborted as "
                          "they came, past --max-connections, by listener.",
                          labels=["listener"])
        refused_clients = Counter("swarmcache_refused_clients", "HTTP requests refused by "
                                  "the client admission policy (tokens, origins), by "
                                  "reason.", labels=["reason"])
        for name, listener in node.listeners().items():
            refused.add_metric([name], listener.site.refused)
            for reason, count in sorted(listener.site.admission.refusals.items()):
                refused_clients.add_metric([reason], count)
        yield refused
        yield refused_clients
        overlay = node.overlay
        peers = Counter("swarmcache_refused_peers", "Peer connections this node closed "
                        "during the handshake or for breaking the peer protocol, by "
                        "WebSocket close code (4000 refused, 4001 protocol error, 4002 duplicate id, 4003 internal error, 4004 unauthorized).",
                        labels=["code"])
        for code, count in sorted(overlay.refused_peers.items()):
            peers.add_metric([str(code)], count)
        yield peers
        for field, text in (("bytes_sent", "Peer WebSocket payload bytes sent."),
                            ("bytes_received", "Peer WebSocket payload bytes received."),
                            ("frames_sent", "Peer WebSocket frames sent."),
                            ("frames_received", "Peer WebSocket frames received.")):
            yield Counter(f"swarmcache_peer_{field}", text, value=overlay.traffic[field])
        paused = Gauge("swarmcache_client_connections_paused", "Client connections not "
                       "read from now: their write buffer is full (the client does not "
                       "read), or --max-in-flight requests are being worked on.",
                       labels=["why"])
        sessions = [getattr(p, "session", None) for p in node.client_factory.connections]
        sessions = [s for s in sessions if s is not None]
        paused.add_metric(["write_buffer_full"], sum(s.write_full for s in sessions))
        paused.add_metric(["in_flight_limit"],
                          sum(not s.reading and not s.write_full for s in sessions))
        yield paused
        yield Gauge("swarmcache_peer_dial_failures", "Handshakes failed in a row on the "
                    "links this node dials (--peer), summed over them.",
                    value=sum(u.policy.handshake_failures for u in node.upstreams))


def registry_of(node: Any):
    """A registry of its own for ``node`` (never the process-wide one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


class _MetricsResource(Resource):
    # prometheus_client.twisted.MetricsResource imports the global reactor when it is
    # imported (before twistd or pytest-twisted can choose one) and renders in a
    # thread; a scrape reads counters the reactor thread owns, so it renders here.
    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


def metrics_resource(registry: Any) -> Resource:
    """The twisted.web resource that answers a scrape of ``registry``."""
    return _MetricsResource(registry)
