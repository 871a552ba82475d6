"""Throughput of one client against a swarm of three in-process nodes.

Run it::

    python -m swarm.bench [--ops 20000] [--seconds 10] [--depth 256] [--batch 256]

It starts nodes on 127.0.0.1 in this process, linked in a line A - B - C, waits until
each sees all three, connects one :class:`swarm.client.SwarmClient` to A and measures
``get`` and ``set`` on keys owned by A (0 hops), by B (1 hop) and by C (2 hops) in three
client modes:

* ``sequential``: one request at a time (also gives the median latency);
* ``pipelined``: ``--depth`` requests in flight, one frame each;
* ``batched``: ``client.batch`` of ``--batch`` requests in one frame, one batch at a time.

Then the same against a lone node for reference. Each measurement stops after ``--ops``
requests or ``--seconds`` seconds, whichever comes first. Client and nodes share one
process and one reactor (one CPU), so the numbers compare modes and distances on this
machine rather than promising a deployment's throughput.

With ``--url ws://host:port`` it starts nothing and measures the swarm behind that node
instead (nodes in their own processes, e.g. ``twistd swarmcache``): keys at each distance
are those owned by the nearest node at that hop count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from swarm import logs
from swarm.client.connection import SwarmClient
from swarm.node.node import SwarmNode

VALUE = "v" * 64
KEYS_PER_OWNER = 1000
MODES = ("sequential", "pipelined", "batched")


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
    return {hops: found[owner] for hops, owner in owner_at.items()}


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


async def measure(
    client: SwarmClient, mode: str, op: str, keys: list[str],
    ops: int, seconds: float, depth: int, batch: int,
) -> tuple[float, float | None]:
    """(ops/s, p50 latency in ms for sequential mode, else None)."""
    start = time.perf_counter()
    stop_at = start + seconds
    done = 0
    latencies: list[float] = []

    def next_request() -> dict:
        return make_request(op, keys[done % len(keys)])

    if mode == "sequential":
        while done < ops and time.perf_counter() < stop_at:
            sent = time.perf_counter()
            check(await client.request(**next_request()))
            latencies.append(time.perf_counter() - sent)
            done += 1
    elif mode == "batched":
        while done < ops and time.perf_counter() < stop_at:
            size = min(batch, ops - done)
            requests = [make_request(op, keys[(done + i) % len(keys)]) for i in range(size)]
            for reply in await client.batch(requests):
                check(reply)
            done += size
    else:  # pipelined: keep ``depth`` requests in flight, one frame each
        finished: Deferred = Deferred()
        state = {"sent": 0, "in_flight": 0}

        def send_one() -> None:
            state["sent"] += 1
            state["in_flight"] += 1
            request = make_request(op, keys[state["sent"] % len(keys)])
            client.request(**request).addCallback(check).addCallbacks(completed, failed)

        def completed(_: dict) -> None:
            nonlocal done
            done += 1
            state["in_flight"] -= 1
            if state["sent"] < ops and time.perf_counter() < stop_at:
                send_one()
            elif state["in_flight"] == 0 and not finished.called:
                finished.callback(None)

        def failed(reason: Any) -> None:
            if not finished.called:
                finished.errback(reason)

        for _ in range(min(depth, ops)):
            send_one()
        await finished
    elapsed = time.perf_counter() - start
    p50 = statistics.median(latencies) * 1000 if latencies else None
    return done / elapsed, p50


async def run_table(
    setup: str, client: SwarmClient, keys_by_hops: dict[int, list[str]],
    args: argparse.Namespace, print_row: Callable[..., None],
) -> None:
    for keys in keys_by_hops.values():  # every key exists before the first get
        for reply in await client.batch([make_request("set", k) for k in keys]):
            check(reply)
    for mode in MODES:
        for op in ("set", "get"):
            for hops, keys in keys_by_hops.items():
                rate, p50 = await measure(client, mode, op, keys, args.ops,
                                          args.seconds, args.depth, args.batch)
                print_row(setup, mode, op, hops, rate, p50)


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="time cap per measurement")
    parser.add_argument("--depth", type=int, default=256, help="pipelined requests in flight")
    parser.add_argument("--batch", type=int, default=256, help="requests per batch frame")
    parser.add_argument("--url", help="measure the swarm behind this node (ws://host:port) "
                        "instead of starting nodes in this process")
    args = parser.parse_args(argv)
    logs.set_level("warn")

    import autobahn

    import twisted

    print(f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
          f"Autobahn {autobahn.__version__}, {os.cpu_count()} CPUs; "
          f"--ops {args.ops} --seconds {args.seconds:g} --depth {args.depth} "
          f"--batch {args.batch}; {len(VALUE)}-byte values, CBOR")
    header = f"{'setup':<8} {'mode':<11} {'op':<4} {'hops':>4} {'ops/s':>9} {'p50 ms':>7}"
    print(header)
    print("-" * len(header))

    def print_row(setup: str, mode: str, op: str, hops: int, rate: float,
                  p50: float | None) -> None:
        latency = f"{p50:7.3f}" if p50 is not None else f"{'':>7}"
        print(f"{setup:<8} {mode:<11} {op:<4} {hops:>4} {rate:>9.0f} {latency}", flush=True)

    if args.url:
        client = await SwarmClient.connect(args.url, reactor=reactor)
        try:
            keys_by_hops = await remote_keys_by_hops(client)
            await run_table("remote", client, keys_by_hops, args, print_row)
        finally:
            await client.close()
        return
    for setup, ids in (("line-3", ["A", "B", "C"]), ("1-node", ["solo"])):
        nodes = await start_nodes(reactor, ids)
        client = await SwarmClient.connect(nodes[0].url, reactor=reactor)
        try:
            keys = {hops: keys_owned_by(nodes[0], owner) for hops, owner in enumerate(ids)}
            await run_table(setup, client, keys, args, print_row)
        finally:
            await client.close()
            for node in reversed(nodes):  # the far end first: each hands off to nearer
                await node.stopService()


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
