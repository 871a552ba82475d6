"""Rebalance on join (issue 11): how long a fifth node takes to get its share of a
loaded 4-node swarm, and what clients see meanwhile, on real ``twistd swarmcache``
processes.

Run it::

    python -m swarm.bench_rebalance [--keys 1000000] [--replicas 1] [--json]

1. *swarm*: nodes n1..n4 on 127.0.0.1 in a full mesh (each dials every one started
   before it), ``--replicas R`` and a memory budget that holds every copy.
2. *load* (not measured): ``--keys`` keys of ``--value-size`` bytes, each value naming
   its key, in ``mset`` batches of 1000 through all four nodes, until the nodes hold R
   copies of each key and none elsewhere.
3. *client load*: READERS connections ``get`` keys nobody writes and WRITERS
   connections ``set`` keys of their own (new values each time), one request at a time
   each, spread over n1..n4; they run from BASELINE seconds before the join until
   AFTER seconds after the rebalance is complete. Every read must return the value
   last acknowledged for its key.
4. *join*: n5 starts with all four as peers. **Link up** is the first moment one of
   n1..n4 reports five nodes in its view (``stats`` polled every POLL_LINK seconds);
   **complete** is the first poll (every POLL seconds, ``stats`` of every node) where
   every node sees five, n5 holds exactly the copies the new placement gives it, the
   swarm holds R copies of every key, and no node keeps a copy of a key it does not own
   (``other_copies``: an old owner drops a copy only once every new owner has
   confirmed it, so this also says the handoffs are over). *Entries moved* is what n5
   holds then (a join moves copies to the new node only).
5. *check*: every key read back through n5 (``mget``), compared with the value last
   acknowledged (or, for a write that failed, that value or the failed one).

Clients and this script share one process; each node has its own. On a 2-core machine
shared with other work the figures show orders of magnitude, not guarantees. Every wait
has a deadline; a missed one prints the nodes' log tails and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from swarm import logs
from swarm.bench import Result
from swarm.bench_compare import cpu_seconds
from swarm.bench_failover import Node, sleep, until
from swarm.client.connection import SwarmClient
from swarm.cluster.placement import Placement
from swarm.errors import SwarmError

NODES = ("n1", "n2", "n3", "n4")
JOINER = "n5"
MSET_CHUNK = 1000
#: mset batches in flight per loading connection (one connection per node).
LOAD_DEPTH = 2
LOAD_ATTEMPTS = 3
READERS = 2
WRITERS = 2
#: Keys each writer overwrites in turn during the measurement.
WRITER_KEYS = 2000
BASELINE = 2.0
AFTER = 1.0
POLL = 0.1
POLL_LINK = 0.02
#: The longest a rebalance may take before the run counts as failed.
DEADLINE = 120.0
#: Client requests give up after this long (a node's own --request-timeout is 5 s).
CLIENT_TIMEOUT = 10.0
#: Memory budget per node, bytes: every copy fits (about 450 B per 100-byte entry).
MAX_MEMORY = 4 * 1024 ** 3


def value_of(key: str, size: int, tag: str = "") -> str:
    """A value of ``size`` characters that names its key (and write), so a read that
    returns another key's or an older write's value is caught."""
    head = f"{key}:{tag}:"
    return head + "v" * max(0, size - len(head))


class Clients:
    """READERS + WRITERS connections, one request at a time each, until :meth:`stop`
    (or DEADLINE): when each request ended, its latency, and what went wrong."""

    def __init__(self, readers: list[SwarmClient], writers: list[SwarmClient],
                 read_keys: list[str], write_keys: list[str], size: int) -> None:
        self.size = size
        self.done: list[tuple[float, float]] = []  # (ended, latency) of good requests
        self.failed: Counter = Counter()  # (op, reason) -> count
        self.failed_at: list[float] = []
        self.wrong: list[str] = []  # reads that returned another value
        self.missed: list[str] = []  # reads that found no value
        #: key -> values a read may return (last acknowledged, and any failed since)
        self.expected: dict[str, set[str]] = {k: {value_of(k, size)} for k in write_keys}
        self._stopping = False
        per = max(1, len(write_keys) // max(1, len(writers)))
        runs = [self._read(c, read_keys[i::len(readers)]) for i, c in enumerate(readers)]
        runs += [self._write(c, write_keys[i * per:(i + 1) * per])
                 for i, c in enumerate(writers)]
        self._runs = gatherResults([Deferred.fromCoroutine(r) for r in runs])

    def _more(self, started: float) -> bool:
        return not self._stopping and time.monotonic() - started < DEADLINE

    async def _timed(self, op: str, request: Deferred) -> tuple[Any, bool]:
        sent = time.monotonic()
        try:
            reply = await request
        except Exception as e:
            self.failed[(op, getattr(e, "code", None) or type(e).__name__)] += 1
            self.failed_at.append(time.monotonic())
            await sleep(0.01)  # a failure may come at once: do not spin
            return None, False
        now = time.monotonic()
        self.done.append((now, now - sent))
        return reply, True

    async def _read(self, client: SwarmClient, keys: list[str]) -> None:
        started, n = time.monotonic(), 0
        while self._more(started):
            key = keys[n % len(keys)]
            n += 1
            value, ok = await self._timed("get", client.get(key))
            if ok and value is None:
                self.missed.append(key)
            elif ok and value != value_of(key, self.size):
                self.wrong.append(key)

    async def _write(self, client: SwarmClient, keys: list[str]) -> None:
        started, n = time.monotonic(), 0
        while self._more(started):
            key = keys[n % len(keys)]
            value = value_of(key, self.size, str(n))
            n += 1
            self.expected[key].add(value)  # from now on either may be read
            _, ok = await self._timed("set", client.set(key, value))
            if ok:
                self.expected[key] = {value}

    async def stop(self) -> None:
        self._stopping = True
        await self._runs

    def window(self, start: float, end: float) -> Result:
        """The good requests that ended between ``start`` and ``end``."""
        latencies = [lat for ended, lat in self.done if start <= ended < end]
        return Result(len(latencies), end - start, latencies)

    def lowest_rate(self, start: float, end: float) -> float | None:
        """Requests served in the slowest whole second of ``start``..``end``."""
        seconds = int(end - start)
        if seconds < 1:
            return None
        buckets = [0] * seconds
        for ended, _ in self.done:
            if start <= ended < start + seconds:
                buckets[int(ended - start)] += 1
        return float(min(buckets))

    def failures_in(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.failed_at)


async def stats_of(nodes: list[Node]) -> list[dict]:
    return list(await gatherResults([n.client.stats() for n in nodes]))


async def start_mesh(workdir: Path, replicas: int) -> list[Node]:
    options = ["--replicas", str(replicas), "--max-memory", str(MAX_MEMORY),
               "--log-level", "warn"]
    nodes: list[Node] = []
    for name in NODES:
        node = Node(workdir, name, [n.url for n in nodes], options=options)
        node.start()
        nodes.append(node)
    for node in nodes:
        await node.connect(CLIENT_TIMEOUT)

    async def mesh() -> bool:
        return all(s["swarm_nodes"] == len(NODES) and s["peers"] == len(NODES) - 1
                   for s in await stats_of(nodes))

    await until(mesh, "a full mesh of four nodes", 30)
    return nodes


async def load(nodes: list[Node], keys: list[str], size: int, replicas: int) -> float:
    """Every key written, and held by ``replicas`` owners only; the seconds it took."""
    start = time.monotonic()
    batches = [keys[i:i + MSET_CHUNK] for i in range(0, len(keys), MSET_CHUNK)]

    async def loader(client: SwarmClient, mine: list[list[str]]) -> None:
        for i in range(0, len(mine), LOAD_DEPTH):
            await gatherResults([Deferred.fromCoroutine(mset(client, batch))
                                 for batch in mine[i:i + LOAD_DEPTH]])

    async def mset(client: SwarmClient, batch: list[str]) -> None:
        for attempt in range(LOAD_ATTEMPTS):  # a busy machine may time one out
            try:
                await client.mset({k: value_of(k, size) for k in batch})
                return
            except SwarmError:
                if attempt == LOAD_ATTEMPTS - 1:
                    raise

    await gatherResults([Deferred.fromCoroutine(loader(n.client, batches[i::len(nodes)]))
                         for i, n in enumerate(nodes)])

    async def placed() -> bool:
        stats = await stats_of(nodes)
        return sum(s["keys"] for s in stats) == replicas * len(keys) and \
            all(s["other_copies"] == 0 for s in stats)

    await until(placed, f"{replicas} copies of {len(keys)} keys", 60 + len(keys) / 2000)
    return time.monotonic() - start


async def link_up(nodes: list[Node]) -> float:
    """When one of ``nodes`` first reports the joiner in its view."""
    while True:
        stats = await stats_of(nodes)
        if any(s["swarm_nodes"] == len(NODES) + 1 for s in stats):
            return time.monotonic()
        await sleep(POLL_LINK)


async def complete(everyone: list[Node], keys: int, replicas: int, owned: int) -> dict:
    """The joiner's stats once the rebalance is complete (see the module docstring)."""
    async def done() -> dict | None:
        stats = await stats_of(everyone)
        joiner = stats[-1]
        if all(s["swarm_nodes"] == len(everyone) and s["other_copies"] == 0
               for s in stats) and \
                sum(s["keys"] for s in stats) == replicas * keys and \
                joiner["primary_copies"] + joiner["replica_copies"] == owned:
            return joiner
        return None

    return await until(done, "a complete rebalance", DEADLINE)


async def check(client: SwarmClient, keys: list[str], expected: dict[str, set[str]],
                size: int) -> tuple[int, int]:
    """Every key read back: how many were missing, and how many had another value."""
    missing = wrong = 0
    for i in range(0, len(keys), MSET_CHUNK):
        names = keys[i:i + MSET_CHUNK]
        values = await client.mget(names)
        for key in names:
            if key not in values:
                missing += 1
            elif values[key] not in expected.get(key, (value_of(key, size),)):
                wrong += 1
    return missing, wrong


def cpu_of(nodes: list[Node]) -> list[float]:
    return [cpu_seconds(n.proc.pid) for n in nodes]


async def measure(args: argparse.Namespace, workdir: Path,
                  nodes: list[Node]) -> dict:
    keys = [f"k{i}" for i in range(args.keys)]
    nodes.extend(await start_mesh(workdir, args.replicas))
    loaded = await load(nodes, keys, args.value_size, args.replicas)
    after = Placement([*NODES, JOINER], args.replicas)
    owned = sum(JOINER in after.owners(k) for k in keys)
    writes = min(WRITER_KEYS, len(keys) // 4)
    write_keys, read_keys = keys[:writes], keys[writes:]
    readers = [await SwarmClient.connect(nodes[i % len(nodes)].url, timeout=CLIENT_TIMEOUT)
               for i in range(READERS)]
    writers = [await SwarmClient.connect(nodes[-1 - i % len(nodes)].url,
                                         timeout=CLIENT_TIMEOUT) for i in range(WRITERS)]
    clients = Clients(readers, writers, read_keys, write_keys, args.value_size)
    try:
        await sleep(BASELINE)
        cpu_before = cpu_of(nodes)
        joiner = Node(workdir, JOINER, [n.url for n in nodes], options=nodes[0].options)
        joiner.start()
        started = time.monotonic()
        nodes.append(joiner)
        linked = await link_up(nodes[:-1])
        await joiner.connect(CLIENT_TIMEOUT)
        final = await complete(nodes, len(keys), args.replicas, owned)
        finished = time.monotonic()
        cpu_after = cpu_of(nodes)
        await sleep(AFTER)
    finally:
        await clients.stop()
    ended = time.monotonic()
    missing, wrong = await check(joiner.client, keys, clients.expected, args.value_size)
    before = clients.window(linked - BASELINE, linked)
    during = clients.window(linked, finished)
    lowest = clients.lowest_rate(linked, finished)
    return {
        "keys": len(keys), "replicas": args.replicas, "value_size": args.value_size,
        "topology": "full mesh n1..n4; n5 dials all four",
        "load_seconds": round(loaded, 2),
        "start_to_link_seconds": round(linked - started, 3),
        "rebalance_seconds": round(finished - linked, 3),
        "entries_moved": final["keys"], "entries_expected": owned,
        "node_cpu_seconds": {n.node_id: round(a - b, 2) for n, a, b in
                             zip(nodes, cpu_after, [*cpu_before, 0.0])},
        "clients": {"readers": READERS, "writers": WRITERS, "write_keys": writes},
        "before": summary(before, clients.failures_in(linked - BASELINE, linked)),
        "during": summary(during, clients.failures_in(linked, finished), lowest),
        "failed": {f"{op} {why}": n for (op, why), n in clients.failed.items()},
        "wrong_reads": len(clients.wrong), "missed_reads": len(clients.missed),
        "check": {"missing": missing, "wrong": wrong, "after_seconds":
                  round(ended - finished, 2)},
    }


def summary(result: Result, failed: int, lowest: float | None = None) -> dict:
    figures = {"requests": result.done, "seconds": round(result.elapsed, 3),
               "per_second": round(result.rate), "failed": failed,
               "p50_ms": _ms(result.percentile(50)), "p99_ms": _ms(result.percentile(99)),
               "max_ms": _ms(result.percentile(100))}
    if lowest is not None:
        figures["lowest_per_second"] = lowest
    return figures


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def print_figures(f: dict) -> None:
    def line(name: str, value: str) -> None:
        print(f"{name + ':':<34} {value}", flush=True)

    def requests(w: dict) -> str:
        low = f", slowest second {w['lowest_per_second']:.0f}" \
            if "lowest_per_second" in w else ""
        return (f"{w['requests']} in {w['seconds']:.2f} s ({w['per_second']}/s{low}), "
                f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms, "
                f"{w['failed']} failed")

    line("topology", f["topology"])
    line("load (not measured)", f"{f['keys']} keys x {f['value_size']} B, "
         f"--replicas {f['replicas']}, {f['load_seconds']:.1f} s")
    line("n5 start to link up", f"{f['start_to_link_seconds']:.2f} s")
    line("rebalance: link up to complete", f"{f['rebalance_seconds']:.2f} s")
    line("rebalance: entries moved", f"{f['entries_moved']} "
         f"(placement gives n5 {f['entries_expected']})")
    line("rebalance: node CPU", ", ".join(
        f"{n} {s:.1f} s" for n, s in f["node_cpu_seconds"].items()))
    c = f["clients"]
    line("client load", f"{c['readers']} readers, {c['writers']} writers "
         f"({c['write_keys']} keys), one request at a time each")
    line("requests before (2 s)", requests(f["before"]))
    line("requests during rebalance", requests(f["during"]))
    line("requests failed, by reason", ", ".join(
        f"{k} {n}" for k, n in f["failed"].items()) or "none")
    line("reads that missed or were wrong", f"{f['missed_reads']} found no value, "
         f"{f['wrong_reads']} another value")
    k = f["check"]
    line("check after: keys lost", f"{k['missing']} missing, {k['wrong']} wrong value "
         f"(of {f['keys']}, read through n5)")


def machine() -> str:
    import autobahn

    import twisted

    return (f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"Autobahn {autobahn.__version__}, {os.cpu_count()} CPUs")


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench_rebalance",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys to load")
    parser.add_argument("--replicas", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.keys < 100 or args.value_size < 20:
        parser.error("--keys must be at least 100 and --value-size at least 20")
    logs.set_level("warn")
    workdir = Path(tempfile.mkdtemp(prefix="bench-rebalance-"))
    nodes: list[Node] = []
    try:
        figures = await measure(args, workdir, nodes)
    except Exception as e:  # a missed deadline, or a request that failed
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        for node in nodes:
            print(node.tail(), file=sys.stderr)
        raise SystemExit(1)
    finally:
        for node in nodes:
            node.kill()
    me = resource.getrusage(resource.RUSAGE_SELF)
    figures["machine"] = machine()
    figures["client_cpu_seconds"] = round(me.ru_utime + me.ru_stime, 1)
    figures["logs"] = str(workdir)
    if args.json:
        print(json.dumps(figures, indent=2), flush=True)
    else:
        print(figures["machine"])
        print_figures(figures)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
