"""Replication figures (issue 7): failover, restore, refill and anti-entropy traffic,
measured on three real ``twistd swarmcache`` processes.

Run it::

    python -m swarm.bench_failover [--keys 100000] [--value-size 100]

It starts nodes p1, p2 and p3 on 127.0.0.1 with ``--replicas 2`` (and the ping and
request timeouts printed in the first lines), linked in a triangle. Every peer link
goes through a byte-counting TCP relay in this process (p1 dials p2 and p3, p2 dials
p3); clients connect to the nodes directly. Then:

1. *load*: ``--keys`` keys of ``--value-size`` bytes in ``mset`` batches of 1000
   through p2, until the nodes' ``keys`` sum to two copies of each;
2. *failover*: sequential ``get`` of one key whose primary is p1 (its other owner is
   p3) through p2, each with a short client timeout, and sequential ``set`` of other
   keys whose primary is p1 through p3, while p1 is SIGKILLed: how long until that
   key reads again, what failed, and the longest a write waited;
3. *restore*: from the SIGKILL until p2 and p3 each hold every key;
4. *refill*: p1 started again (same ``--node-id``, port and peers, empty) until it
   holds every key it owns (counted with ``owner`` before the kill); then how many
   copies the others still keep of keys they no longer own;
5. *anti-entropy*: copies still on nodes that no longer own them would be handed over
   at the next change of view and counted with the round, so up to FLUSHES changes of
   view are made to hand them over first. Then, once the relays are quiet, an
   in-process node that announces it is leaving (reachable, owning nothing, so no
   entry moves) links straight to p1; 2 s after that change of view every node
   compares every partition it owns with their other owners (the round every 300 s
   covers only the partitions a node is primary for, about half as many). The relays
   count the bytes of that round (WebSocket frames as TCP payload, both directions,
   all three links), minus the pings of an equally long quiet window after it.

Client and relays share this process; the nodes have their own. Timings on a loaded
machine are noisy: they show orders of magnitude, not guarantees. Every wait has a
deadline; a missed one prints the tails of the nodes' logs and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure

from swarm import logs
from swarm.client.connection import SwarmClient

REPLICAS = 2
PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
#: The failover reads give up on a reply this soon (a node hedges after 0.5 s).
READ_TIMEOUT = 1.0
WRITE_TIMEOUT = 10.0
MSET_CHUNK = 1000
POLL = 0.05
#: Relay traffic below this many bytes per second counts as quiet (pings only).
QUIET_RATE = 1024
#: How long after p1's refill the others may take to drop the copies they no longer own.
SETTLE_DEADLINE = 30.0
#: How many times step 5 makes the view change to have leftover copies handed over.
FLUSHES = 3
NODES = ("p1", "p2", "p3")
#: ``twistd`` run by this interpreter (``python -m twisted`` is ``twist``, another runner).
TWISTD = "from twisted.scripts.twistd import run; run()"


class Missed(Exception):
    """A wait passed its deadline."""


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float) -> Any:
    """Poll ``check()`` until it returns something true (its errors but Missed count
    as "not yet"); Missed after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = await _attempt(check)
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise Missed(f"no {what} within {timeout:g} s (last: {last!r})")
        await sleep(POLL)


async def _attempt(check: Callable[[], Awaitable[Any]]) -> Any:
    """What ``check()`` returns, or the exception it raised (Missed goes through)."""
    try:
        return await check()
    except Missed:
        raise
    except Exception as e:
        return e


# -- byte-counting relays ----------------------------------------------------------------


class _RelayEnd(Protocol):
    """One side of a relayed connection: counts what it receives, sends it on."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.other: _RelayEnd | None = None

    def dataReceived(self, data: bytes) -> None:
        self.relay.bytes += len(data)
        if self.other is not None:
            self.other.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.other is not None:
            self.other.transport.loseConnection()


class _Accepted(_RelayEnd):
    """The dialling node's side: opens the connection to the target, then relays."""

    def connectionMade(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        self.transport.pauseProducing()  # nothing is read before the target answers
        target = _RelayEnd(self.relay)
        endpoint = TCP4ClientEndpoint(self.relay.reactor, "127.0.0.1", self.relay.target, 5)
        connectProtocol(endpoint, target).addCallbacks(
            self._linked, lambda _: self.transport.abortConnection())

    def _linked(self, target: _RelayEnd) -> None:
        if not self.transport.connected:
            target.transport.loseConnection()
            return
        self.other, target.other = target, self
        # a full send buffer on one side stops reading on the other
        self.transport.registerProducer(target.transport, True)
        target.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()


class Relay:
    """TCP from a free 127.0.0.1 port to ``127.0.0.1:target``; ``bytes`` counts the
    payload relayed in both directions."""

    def __init__(self, reactor: Any, target: int) -> None:
        self.reactor = reactor
        self.target = target
        self.bytes = 0
        self.port: Any = None

    async def start(self) -> Relay:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(Factory.forProtocol(lambda: _Accepted(self)))
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port.getHost().port}"


# -- twistd processes --------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago (a node that loses the race is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``twistd swarmcache`` process per :meth:`start`, same id, port and peers
    each time, its output in ``workdir``; ``client`` connects to it once it answers."""

    def __init__(self, workdir: Path, node_id: str, peers: list[str],
                 options: list[str] | None = None) -> None:
        self.workdir = workdir
        self.node_id = node_id
        self.peers = peers
        #: options besides --port, --node-id and --peer (default: this benchmark's)
        self.options = options if options is not None else [
            "--replicas", str(REPLICAS), "--ping-interval", str(PING_INTERVAL),
            "--ping-timeout", str(PING_TIMEOUT), "--request-timeout", str(REQUEST_TIMEOUT),
        ]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.client: SwarmClient | None = None
        self.log = workdir / f"{node_id}.log"
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        options = [
            "--port", f"tcp:{self.port}:interface=127.0.0.1", "--node-id", self.node_id,
            *self.options, *(f"--peer={url}" for url in self.peers),
        ]
        root = str(Path(__file__).resolve().parent.parent)  # this checkout's swarm
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            log.write(f"---- twistd swarmcache {' '.join(options)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "swarmcache", *options],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env,
            )

    async def connect(self, timeout: float = WRITE_TIMEOUT) -> SwarmClient:
        """A client once the node answers ``ping`` with its id (it may be starting)."""

        async def answered() -> SwarmClient | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise Missed(f"{self.node_id} exited with {self.proc.returncode}")
            client = await SwarmClient.connect(self.url, timeout=timeout, connect_timeout=1)
            if await client.ping() == self.node_id:
                return client
            await client.close()
            return None

        self.client = await until(answered, f"answer from {self.node_id}", 20)
        return self.client

    async def stats(self) -> dict:
        assert self.client is not None
        return await self.client.stats()

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client = None

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"==== {self.log} (last {chars} characters)\n{text[-chars:]}"


# -- the steps ---------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> str:
    import autobahn

    import twisted

    return (f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"Autobahn {autobahn.__version__}, {os.cpu_count()} CPUs; --keys {args.keys} "
            f"--value-size {args.value_size}; nodes: --replicas {REPLICAS} --write-ack all "
            f"--ping-interval {PING_INTERVAL:g} --ping-timeout {PING_TIMEOUT:g} "
            f"--request-timeout {REQUEST_TIMEOUT:g}")


def report(name: str, value: str) -> None:
    print(f"{name + ':':<48} {value}", flush=True)


async def copies(nodes: list[Node]) -> list[dict]:
    return [await n.stats() for n in nodes]


async def load(nodes: dict[str, Node], keys: list[str], value: str) -> None:
    client = nodes["p2"].client
    assert client is not None
    start = time.monotonic()
    for i in range(0, len(keys), MSET_CHUNK):
        await client.mset({k: value for k in keys[i:i + MSET_CHUNK]})
    acked = time.monotonic() - start
    want = REPLICAS * len(keys)

    async def two_copies() -> bool:
        return sum(s["keys"] for s in await copies(list(nodes.values()))) == want

    await until(two_copies, f"{want} copies after the load", 60 + len(keys) / 1000)
    held = time.monotonic() - start
    report("load (mset batches of 1000, through p2)",
           f"{acked:.2f} s acknowledged ({len(keys) / acked:.0f} keys/s), "
           f"{held:.2f} s until the nodes hold {want} copies")


async def owners_of(client: SwarmClient, keys: list[str]) -> dict[str, list[str]]:
    """Each key's owners, primary first, as the node behind ``client`` places them."""
    owners: dict[str, list[str]] = {}
    for i in range(0, len(keys), MSET_CHUNK):
        names = keys[i:i + MSET_CHUNK]
        replies = await client.batch([{"op": "owner", "key": k} for k in names])
        for key, reply in zip(names, replies):
            if not reply.get("ok"):
                raise RuntimeError(f"owner of {key!r} failed: {reply.get('error')}")
            owners[key] = reply["nodes"]
    return owners


class Loop:
    """Sequential requests of one kind until :meth:`stop`: when each was sent, how long
    it took, and what failed (by error code), counted from ``since``."""

    def __init__(self, request: Callable[[int], Deferred], good: Callable[[Any], bool]):
        self._request = request
        self._good = good
        self.since = float("inf")
        self.ok = 0
        self.first_good_after: float | None = None  # seconds after ``since``
        self.failed: Counter = Counter()
        self.longest = 0.0  # of requests sent after ``since``, or in flight then
        self._stopping = False
        self._done = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        for n in range(10_000_000):
            if self._stopping:
                return
            sent = time.monotonic()
            try:
                reply = await self._request(n)
                why = None if self._good(reply) else "wrong value"
            except Exception as e:
                why = getattr(e, "code", None) or type(e).__name__
            now = time.monotonic()
            if now >= self.since:
                self.longest = max(self.longest, now - sent)
            if why is None:
                self.ok += 1
                if sent >= self.since and self.first_good_after is None:
                    self.first_good_after = now - self.since
            else:
                if now >= self.since:
                    self.failed[why] += 1
                await sleep(0.01)  # a failure may come at once: do not spin

    async def stop(self) -> None:
        self._stopping = True
        await self._done

    def failures(self) -> str:
        total = sum(self.failed.values())
        codes = ", ".join(f"{code} {n}" for code, n in self.failed.most_common())
        return f"{total}" + (f" ({codes})" if codes else "")


async def failover(nodes: dict[str, Node], owners: dict[str, list[str]],
                   value: str) -> None:
    """Steps 2 and 3."""
    p1, p2, p3 = (nodes[n] for n in NODES)
    keys = list(owners)
    owned = [k for k in keys if owners[k][0] == "p1"]
    read_key = next((k for k in owned if owners[k][1] == "p3"), owned[0])
    written = [k for k in owned[:201] if k != read_key]
    reader = await SwarmClient.connect(p2.url, timeout=READ_TIMEOUT)
    writer = await SwarmClient.connect(p3.url, timeout=WRITE_TIMEOUT)
    reads = Loop(lambda n: reader.get(read_key), lambda v: v == value)
    writes = Loop(lambda n: writer.set(written[n % len(written)], value), bool)
    try:
        await until(lambda: _succeed(reads.ok >= 20 and writes.ok >= 20),
                    "20 reads and writes before the kill", 30)
        killed = reads.since = writes.since = time.monotonic()
        p1.kill()
        await until(lambda: _succeed(reads.first_good_after is not None),
                    f"good read of {read_key} after the kill", 60)

        async def survivors_full() -> bool:
            return all(s["keys"] == len(keys) for s in await copies([p2, p3]))

        await until(survivors_full, "p2 and p3 holding every key", 120 + len(keys) / 500)
        restored = time.monotonic() - killed
    finally:
        await reads.stop()
        await writes.stop()
        await reader.close()
        await writer.close()
    window = f"SIGKILL to restored, {restored:.1f} s"
    report("failover: first good read after SIGKILL",
           f"{reads.first_good_after * 1000:.0f} ms (key {read_key!r}, owners p1 p3, "
           f"read through p2, client timeout {READ_TIMEOUT:g} s)")
    sent = reads.ok + sum(reads.failed.values())
    report("failover: reads failed", f"{reads.failures()} of {sent} after the kill "
           f"({window})")
    report("failover: writes failed", f"{writes.failures()} ({window}; sets of "
           f"{len(written)} keys owned by p1, through p3)")
    report("failover: first acknowledged write after kill",
           f"{(writes.first_good_after or float('nan')) * 1000:.0f} ms")
    report("failover: longest write wait", f"{writes.longest * 1000:.0f} ms")
    report("restore: SIGKILL to p2, p3 holding all keys", f"{restored:.2f} s")


async def _succeed(value: Any) -> Any:
    return value


async def placed(nodes: list[Node], keys: int) -> bool:
    """Two copies of each key, none on a node that does not own it."""
    stats = await copies(nodes)
    return sum(s["keys"] for s in stats) == REPLICAS * keys and \
        all(s["other_copies"] == 0 for s in stats)


async def settled_within(nodes: list[Node], keys: int, timeout: float) -> bool:
    """Whether the copies are :func:`placed` within ``timeout`` seconds."""
    try:
        return await until(lambda: placed(nodes, keys), "copies placed", timeout)
    except Missed:
        return False


async def refill(nodes: dict[str, Node], owners: dict[str, list[str]]) -> None:
    """Step 4: p1 is refilled once it holds every key it owns (as primary or other
    owner: a view that flaps may hand it others' keys too); then how many copies
    the others keep of keys they no longer own (a handoff that failed is not tried
    again before the next change of view), after at most SETTLE_DEADLINE seconds."""
    p1 = nodes["p1"]
    mine = sum("p1" in o for o in owners.values())
    p1.start()
    await p1.connect()
    answering = time.monotonic() - p1.started_at

    async def refilled() -> bool:  # it may hold more for a while: count its own
        stats = await p1.stats()
        return stats["primary_copies"] + stats["replica_copies"] == mine

    await until(refilled, f"p1 holding its {mine} keys again", 120 + len(owners) / 500)
    took = time.monotonic() - p1.started_at
    report("refill: p1 restarted empty, start to refilled",
           f"{took:.2f} s for {mine} keys ({mine / took:.0f} keys/s; "
           f"answering after {answering:.2f} s)")
    everyone = list(nodes.values())
    if await settled_within(everyone, len(owners), SETTLE_DEADLINE):
        left = "none"
    else:  # worth a figure, not the end of the run
        stats = await copies(everyone)
        left = ", ".join(f"{s['node']} {s['other_copies']}" for s in stats) + \
            f" after {SETTLE_DEADLINE:g} s (total {sum(s['keys'] for s in stats)} copies)"
    report("refill: copies kept by nodes not owning them", left)


async def quiet(relays: list[Relay], what: str, timeout: float = 60) -> float:
    """Wait until the relays carry less than QUIET_RATE bytes/s over one second."""

    async def calm() -> bool:
        before = sum(r.bytes for r in relays)
        await sleep(1.0)
        return sum(r.bytes for r in relays) - before < QUIET_RATE

    await until(calm, what, timeout)
    return time.monotonic()


async def join_leaving(nodes: dict[str, Node], name: str, reactor: Any,
                       ghosts: list) -> Any:
    """An in-process node that announces it is leaving, linked straight to p1 (its
    link is not counted): a change of view on every node that places no key anew."""
    from swarm.node.node import SwarmNode

    ghost = SwarmNode("tcp:0:interface=127.0.0.1", reactor=reactor, node_id=name,
                      replicas=REPLICAS, ping_interval=PING_INTERVAL,
                      ping_timeout=PING_TIMEOUT)
    ghosts.append(ghost)
    ghost.startService()
    await ghost.when_listening()
    ghost.overlay.leave()  # reachable, but owns nothing
    ghost.add_peer(nodes["p1"].url)
    await views_of(nodes, 4)
    return ghost


async def views_of(nodes: dict[str, Node], count: int) -> None:
    async def seen() -> bool:
        return all([len((await n.client.nodes())["nodes"]) == count
                    for n in nodes.values()])

    await until(seen, f"{count} nodes in every view", 30)


async def stop_quietly(ghost: Any, timeout: float) -> None:
    from twisted.internet import reactor

    stopped = ghost.stopService()
    stopped.addTimeout(timeout, reactor)
    stopped.addErrback(lambda _: None)
    await stopped


async def anti_entropy(nodes: dict[str, Node], relays: list[Relay], reactor: Any,
                       keys: int, ghosts: list) -> None:
    """Step 5. Copies left where they are not owned would be handed over at the next
    change of view and counted with the round, so one is made to flush them first."""
    everyone = list(nodes.values())
    left = sum(s["other_copies"] for s in await copies(everyone))
    cycles = 0
    while cycles < FLUSHES and not await settled_within(everyone, keys, cycles and 30):
        cycles += 1
        flusher = await join_leaving(nodes, f"flush-{cycles}", reactor, ghosts)
        await settled_within(everyone, keys, 60)
        await stop_quietly(flusher, 10)
        await views_of(nodes, 3)
    if cycles:
        still = sum(s["other_copies"] for s in await copies(everyone))
        report("anti-entropy: flushed first", f"{left} leftover copies by {cycles} "
               f"leaving nodes joining and leaving; {still} left")
    await quiet(relays, "quiet relays before the round")
    before = await copies(everyone)
    await join_leaving(nodes, "leaving", reactor, ghosts)
    start, start_bytes = time.monotonic(), sum(r.bytes for r in relays)

    async def rounds_ran() -> bool:
        stats = await copies(everyone)
        return all(s["anti_entropy_rounds"] > b["anti_entropy_rounds"]
                   for s, b in zip(stats, before))

    await until(rounds_ran, "an anti-entropy round on every node", 30)
    end = await quiet(relays, "quiet relays after the round")
    round_bytes = sum(r.bytes for r in relays) - start_bytes
    window = end - start
    after = await copies(everyone)
    idle_start = sum(r.bytes for r in relays)
    await sleep(window)  # a measuring window, not a wait for anything
    idle = sum(r.bytes for r in relays) - idle_start
    later = await copies(everyone)

    def change(field: str, new: list[dict], old: list[dict]) -> int:
        return sum(a[field] - b[field] for a, b in zip(new, old))

    moved = [s["keys"] for s in after] != [s["keys"] for s in before]
    extra = change("anti_entropy_rounds", later, after)
    net = round_bytes - idle
    report("anti-entropy: bytes per round, whole swarm",
           f"{net} B ({net / 1024:.1f} KiB) with {keys} keys: "
           f"{change('anti_entropy_rounds', after, before)} node rounds over every owned "
           f"partition, {change('repairs', after, before)} entries repaired")
    report("anti-entropy: measured",
           f"{round_bytes} B on the 3 peer links in {window:.1f} s from view change "
           f"seen to quiet, minus {idle} B of pings in the next {window:.1f} s"
           + (f" (WARNING: {extra} more rounds ran meanwhile)" if extra else "")
           + (" (WARNING: entries moved)" if moved else ""))


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench_failover",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="keys to load")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    args = parser.parse_args(argv)
    if args.keys < 300 or args.value_size < 1:
        parser.error("--keys must be at least 300 and --value-size at least 1")
    logs.set_level("warn")
    print(machine_info(args), flush=True)
    keys = [f"k{i}" for i in range(args.keys)]
    value = "v" * args.value_size
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    nodes: dict[str, Node] = {}
    ghosts: list = []
    try:
        p3 = Node(workdir, "p3", [])
        to_p3 = await Relay(reactor, p3.port).start()
        p2 = Node(workdir, "p2", [to_p3.url])
        to_p2 = await Relay(reactor, p2.port).start()
        to_p3_from_p1 = await Relay(reactor, p3.port).start()
        p1 = Node(workdir, "p1", [to_p2.url, to_p3_from_p1.url])
        relays = [to_p3, to_p2, to_p3_from_p1]
        nodes = {"p1": p1, "p2": p2, "p3": p3}
        for node in (p3, p2, p1):
            node.start()
            await node.connect()

        async def triangle() -> bool:
            stats = await copies([p1, p2, p3])
            return all(s["swarm_nodes"] == 3 and s["peers"] == 2 for s in stats)

        await until(triangle, "a triangle of three nodes", 30)
        print(f"logs in {workdir}", flush=True)
        await load(nodes, keys, value)
        owners = await owners_of(p2.client, keys)
        await failover(nodes, owners, value)
        await refill(nodes, owners)
        await anti_entropy(nodes, relays, reactor, args.keys, ghosts)
    except Exception as e:  # a missed deadline, or a request that failed
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        for node in nodes.values():
            print(node.tail(), file=sys.stderr)
        raise SystemExit(1)
    finally:
        for node in nodes.values():
            node.kill()
        for ghost in ghosts:
            await stop_quietly(ghost, 3)
    me, nodes_cpu = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    report("CPU used", f"{me.ru_utime + me.ru_stime:.1f} s by this process (client, "
           f"relays), {nodes_cpu.ru_utime + nodes_cpu.ru_stime:.1f} s by the nodes")


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
