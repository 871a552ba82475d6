"""Throughput and latency of the client against a swarm, by mode and distance.

Run it::

    python -m swarm.bench [--ops 20000] [--seconds 10] [--depth 256] [--batch 256]
    python -m swarm.bench --url ws://127.0.0.1:8765
    python -m swarm.bench --compare

By default it starts nodes on 127.0.0.1 in this process, linked in a line A - B - C,
waits until each sees all three and the owners' migration window has passed (about
10 s, see :data:`SETTLE`), connects to A and measures ``get`` and ``set`` of
100-byte values on keys owned by A (0 hops), by B (1 hop) and by C (2 hops) in these
client modes:

* ``sequential``: one request at a time, on one connection (median and 99th percentile
  latency);
* ``pipelined``: ``--depth`` requests in flight, one frame each (``autobatch=False``);
* ``auto``: the same load with the client's default ``autobatch``: the requests made
  in one reactor turn leave as one frame;
* ``batched``: ``client.batch`` of ``--batch`` requests per frame, ``--in-flight``
  batches at a time;
* ``conns``: ``--connections`` connections, one request at a time on each.

Then the same against a lone node. Each measurement stops after ``--ops`` requests or
``--seconds`` seconds, whichever comes first. In-process, client and nodes share one
reactor (one CPU), so those figures compare modes and distances rather than promise a
deployment's throughput.

``--url ws://host:port`` starts nothing and measures the swarm behind that node (keys at
each distance are those owned by the nearest node at that hop count).

``--compare`` runs the comparison in docs/performance.md: three ``twistd swarmcache``
processes in a line, the client in this process on the first, every mode (with the
nodes' CPU time per request), then the same kinds of load on a ``redis-server`` started
on a free port with ``redis-benchmark`` (when both are installed), and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater, react

from swarm import logs
from swarm.client.connection import SwarmClient
from swarm.cluster.router import MIGRATION_WINDOW
from swarm.node.node import SwarmNode

VALUE = "v" * 100
KEYS_PER_OWNER = 1000
#: Seconds to wait once the views are complete, before measuring: for this long after
#: a change of view an owner asks the previous owners for the keys it serves (their
#: migration window), which a benchmark of steady state must not count.
SETTLE = MIGRATION_WINDOW + 0.5
MODES = ("sequential", "pipelined", "auto", "batched", "conns")


class Result:
    """One measurement: how many requests, in how long, their latencies if timed,
    and the nodes' CPU seconds meanwhile when known."""

    def __init__(self, done: int, elapsed: float, latencies: list[float],
                 cpu: float | None = None) -> None:
        self.done = done
        self.elapsed = elapsed
        self.latencies = sorted(latencies)
        self.cpu = cpu

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float | None:
        """The ``p`` percentile latency in ms (nearest rank), None when not timed."""
        if not self.latencies:
            return None
        rank = min(len(self.latencies) - 1, max(0, round(p / 100 * len(self.latencies)) - 1))
        return self.latencies[rank] * 1000

    @property
    def cpu_us(self) -> float | None:
        """The nodes' CPU time per request, in µs."""
        return None if self.cpu is None or not self.done else self.cpu / self.done * 1e6


async def start_nodes(reactor: Any, ids: list[str]) -> list[SwarmNode]:
    """Nodes linked in a line (each dials the one before it), once all see each other."""
    nodes = []
    for node_id in ids:
        node = SwarmNode("tcp:0:interface=127.0.0.1", reactor=reactor, node_id=node_id)
        node.startService()
        await node.when_listening()
        if nodes:
            node.add_peer(nodes[-1].url)
        nodes.append(node)
    deadline = reactor.seconds() + 15
    while not all(len(n.overlay.membership.reachable) == len(ids) for n in nodes):
        if reactor.seconds() > deadline:
            raise RuntimeError(f"{ids} did not converge within 15 s")
        await deferLater(reactor, 0.02, lambda: None)
    if len(ids) > 1:
        await deferLater(reactor, SETTLE, lambda: None)
    return nodes


def keys_owned_by(node: SwarmNode, owner: str) -> list[str]:
    """KEYS_PER_OWNER keys whose primary owner, in ``node``'s view, is ``owner``."""
    primary = node.router.placement.primary
    keys: list[str] = []
    i = 0
    while len(keys) < KEYS_PER_OWNER:
        key = f"bench-{i}"
        if primary(key) == owner:
            keys.append(key)
        i += 1
    return keys


async def remote_keys_by_hops(client: SwarmClient) -> dict[int, list[str]]:
    """For a node elsewhere: KEYS_PER_OWNER keys owned by the nearest node at each
    distance, found with the ``nodes`` and ``owner`` ops."""
    view = await client.nodes()
    owner_at: dict[int, str] = {}
    for node in sorted(view["nodes"], key=lambda n: (n["hops"], n["id"])):
        owner_at.setdefault(node["hops"], node["id"])
    found: dict[str, list[str]] = {owner: [] for owner in owner_at.values()}
    start = 0
    while any(len(keys) < KEYS_PER_OWNER for keys in found.values()):
        if start > 1000 * KEYS_PER_OWNER * len(found):
            raise RuntimeError("could not find keys for every distance")
        names = [f"bench-{i}" for i in range(start, start + 1024)]
        replies = await client.batch([{"op": "owner", "key": k} for k in names])
        for key, reply in zip(names, replies):
            keys = found.get(check(reply)["nodes"][0])
            if keys is not None and len(keys) < KEYS_PER_OWNER:
                keys.append(key)
        start += 1024
    return {hops: found[owner] for hops, owner in sorted(owner_at.items())}


def make_request(op: str, key: str) -> dict:
    return {"op": "get", "key": key} if op == "get" else {"op": "set", "key": key,
                                                           "value": VALUE}


def check(reply: dict) -> dict:
    """A failed request, or a get that misses (every key was set first), ends the run."""
    if not reply.get("ok"):
        raise RuntimeError(f"request failed: {reply.get('error')}")
    if reply.get("found") is False:
        raise RuntimeError(f"a get missed its key (reply {reply.get('id')})")
    return reply


class Load:
    """What one measurement sends: ``op`` on ``keys`` in turn, at most ``ops``
    requests or ``seconds`` seconds."""

    def __init__(self, op: str, keys: list[str], ops: int, seconds: float) -> None:
        self.op = op
        self.keys = keys
        self.ops = ops
        self.stop_at = time.perf_counter() + seconds
        self.sent = 0

    def more(self) -> bool:
        return self.sent < self.ops and time.perf_counter() < self.stop_at

    def take(self) -> dict:
        self.sent += 1
        return make_request(self.op, self.keys[self.sent % len(self.keys)])


async def sequential(client: SwarmClient, load: Load, latencies: list[float]) -> int:
    done = 0
    while load.more():
        request = load.take()
        sent = time.perf_counter()
        check(await client.request(**request))
        latencies.append(time.perf_counter() - sent)
        done += 1
    return done


async def pipelined(client: SwarmClient, load: Load, depth: int) -> int:
    """Keep ``depth`` requests in flight; each reply sends the next."""
    finished: Deferred = Deferred()
    state = {"done": 0, "in_flight": 0}

    def send_one() -> None:
        state["in_flight"] += 1
        client.request(**load.take()).addCallback(check).addCallbacks(completed, failed)

    def completed(_: dict) -> None:
        state["done"] += 1
        state["in_flight"] -= 1
        if load.more():
            send_one()
        elif state["in_flight"] == 0 and not finished.called:
            finished.callback(None)

    def failed(reason: Any) -> None:
        if not finished.called:
            finished.errback(reason)

    for _ in range(depth):
        if load.more():
            send_one()
    if state["in_flight"]:
        await finished
    return state["done"]


async def batched(client: SwarmClient, load: Load, batch: int, in_flight: int) -> int:
    async def one_stream() -> int:
        done = 0
        while load.more():
            requests = [load.take() for _ in range(min(batch, load.ops - load.sent))]
            for reply in await client.batch(requests):
                check(reply)
            done += len(requests)
        return done

    streams = [Deferred.fromCoroutine(one_stream()) for _ in range(in_flight)]
    return sum(await gatherResults(streams))


class Clients:
    """The connections a table uses, opened once: one with ``autobatch`` (the
    default), one without, and ``--connections`` more for the ``conns`` mode."""

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self.reactor = reactor
        self.auto: SwarmClient
        self.plain: SwarmClient
        self.many: list[SwarmClient] = []

    async def open(self, connections: int) -> Clients:
        connect = SwarmClient.connect
        self.auto = await connect(self.url, reactor=self.reactor)
        self.plain = await connect(self.url, reactor=self.reactor, autobatch=False)
        self.many = await gatherResults([
            connect(self.url, reactor=self.reactor, autobatch=False)
            for _ in range(connections)
        ])
        return self

    async def close(self) -> None:
        await gatherResults([c.close() for c in [self.auto, self.plain, *self.many]])


async def measure(clients: Clients, mode: str, op: str, keys: list[str],
                  args: argparse.Namespace, cpu: Callable[[], float] | None) -> Result:
    load = Load(op, keys, args.ops, args.seconds)
    latencies: list[float] = []
    cpu_before = cpu() if cpu else 0.0
    start = time.perf_counter()
    if mode == "sequential":
        done = await sequential(clients.auto, load, latencies)
    elif mode == "pipelined":
        done = await pipelined(clients.plain, load, args.depth)
    elif mode == "auto":
        done = await pipelined(clients.auto, load, args.depth)
    elif mode == "batched":
        done = await batched(clients.auto, load, args.batch, args.in_flight)
    else:
        done = sum(await gatherResults([
            Deferred.fromCoroutine(sequential(c, load, latencies)) for c in clients.many
        ]))
    elapsed = time.perf_counter() - start
    return Result(done, elapsed, latencies, cpu() - cpu_before if cpu else None)


async def run_table(
    setup: str, clients: Clients, keys_by_hops: dict[int, list[str]],
    args: argparse.Namespace, print_row: Callable[..., None],
    cpu: Callable[[], float] | None = None,
) -> dict[tuple[str, str, int], Result]:
    """Every mode, op and distance; the results by (mode, op, hops)."""
    for keys in keys_by_hops.values():  # every key exists before the first get
        for reply in await clients.auto.batch([make_request("set", k) for k in keys]):
            check(reply)
    table = {}
    for mode in args.modes:
        for op in ("set", "get"):
            for hops, keys in keys_by_hops.items():
                result = await measure(clients, mode, op, keys, args, cpu)
                table[mode, op, hops] = result
                print_row(setup, mode, op, hops, result)
    return table


def print_row(setup: str, mode: str, op: str, hops: int, result: Result) -> None:
    p50, p99, cpu_us = result.percentile(50), result.percentile(99), result.cpu_us
    print(f"{setup:<8} {mode:<11} {op:<4} {hops:>4} {result.rate:>9.0f} "
          f"{_ms(p50)} {_ms(p99)} {f'{cpu_us:9.1f}' if cpu_us is not None else '':>9}",
          flush=True)


def _ms(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else f"{'':>7}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="time cap per measurement")
    parser.add_argument("--depth", type=int, default=256, help="pipelined requests in flight")
    parser.add_argument("--batch", type=int, default=256, help="requests per batch frame")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="batches in flight in the batched mode")
    parser.add_argument("--connections", type=int, default=50,
                        help="connections of the conns mode")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"which modes, comma-separated (default: {','.join(MODES)})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="measure the swarm behind this node (ws://host:port) "
                       "instead of starting nodes in this process")
    where.add_argument("--compare", action="store_true",
                       help="three twistd nodes in a line, then redis-benchmark on a "
                       "local redis-server, and the ratios")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)} (choose from {', '.join(MODES)})")
    for name in ("ops", "depth", "batch", "in_flight", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    args = parse(argv)
    logs.set_level("warn")

    import autobahn

    import twisted

    print(f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
          f"Autobahn {autobahn.__version__}, {os.cpu_count()} CPUs; "
          f"--ops {args.ops} --seconds {args.seconds:g} --depth {args.depth} "
          f"--batch {args.batch} --in-flight {args.in_flight} "
          f"--connections {args.connections}; {len(VALUE)}-byte values, CBOR")
    header = (f"{'setup':<8} {'mode':<11} {'op':<4} {'hops':>4} {'ops/s':>9} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'node µs/op':>9}")
    print(header)
    print("-" * len(header))
    if args.compare:
        from swarm.bench_compare import compare

        await compare(reactor, args)
    elif args.url:
        await remote_table("remote", args.url, reactor, args)
    else:
        for setup, ids in (("line-3", ["A", "B", "C"]), ("1-node", ["solo"])):
            nodes = await start_nodes(reactor, ids)
            clients = await Clients(nodes[0].url, reactor).open(args.connections)
            try:
                keys = {hops: keys_owned_by(nodes[0], owner) for hops, owner in enumerate(ids)}
                await run_table(setup, clients, keys, args, print_row)
            finally:
                await clients.close()
                for node in reversed(nodes):  # the far end first: each hands off to nearer
                    await node.stopService()


async def remote_table(setup: str, url: str, reactor: Any, args: argparse.Namespace,
                       cpu: Callable[[], float] | None = None,
                       ) -> dict[tuple[str, str, int], Result]:
    clients = await Clients(url, reactor).open(args.connections)
    try:
        keys_by_hops = await remote_keys_by_hops(clients.auto)
        return await run_table(setup, clients, keys_by_hops, args, print_row, cpu)
    finally:
        await clients.close()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
