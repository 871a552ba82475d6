"""Issue 8's attacks replayed on real ``twistd swarmcache`` processes on 127.0.0.1.

Run it::

    python -m swarm.bench_attacks [--quick] [--only N,N]

Each attack prints what happened as it runs, then a table: attack | outcome | peak RSS
growth of the attacked node | its bystander's requests (ok/failed/longest wait). The
script reports; it asserts nothing. An outcome starts with the verdict the fixes of
issue 8 promise (``refused:``, ``bounded:``, ``delivered:``, ``consistent:``), or with
``NOT`` and that verdict when the node did something else (a bug worth a look), or
``ERROR`` when the bench itself could not finish the attack.

1. a peer ``hello`` on /peer of a node with --secret-file: without a proof, and with a
   wrong one (closed 4004; the ``nodes`` op still lists only the real nodes);
2. the same with the id of a node of the swarm (4004, before the identity check);
3. a 16 MiB frame on /peer before any hello (closed 1009 from its header);
4. a 4 MB CBOR batch of four million tiny items on ``/`` (a reply or a 1009 close);
5. 1 MB frames of string references (tags 256/25), shared references (28/29) and
   bignums (tag 2) repeated by reference (each refused with an error, id null);
6. a client that pipelines 1,500 gets of a 1 MiB value and never reads (closed 1008,
   or held with the node's memory bounded);
7. an ``mget`` of five 1 MiB values, a reply over --max-message-size (delivered);
8. slowloris: sockets dripping an HTTP request one byte a second for at most the
   drip time (the node holds --max-connections, aborts the rest at accept and every
   held one at --handshake-timeout): how many were held, /health during the drip and
   how long after it until /health answers;
9. an upgrade from ``Origin: https://evil.example`` (HTTP 403);
10. --max-memory 64mb filled with nested maps and lists: bytes accounted against the
    node's RSS growth (``python -m swarm.bench_memory`` measures the same accounting
    in one process, shape by shape);
11. SIGTERM while a client pipelines writes: every write answered ``stored`` is held
    by the other node, and no other (the node answers every request it has read).

Peak RSS growth is the node's VmHWM (reset through /proc/<pid>/clear_refs as the attack
starts) or VmRSS sampled every 50 ms, whichever is higher, minus VmRSS at the start.
The bystander is a client connected before the attack that runs gets of one small key
one after another (:class:`swarm.bench_failover.Loop`). Heavy attacks get a node of
their own; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import secrets
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import cbor2
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import react
from twisted.python.failure import Failure

from swarm import logs
from swarm.bench_failover import TWISTD, Loop, Missed, Node, report, sleep, until
from swarm.client.connection import SwarmClient

MiB = 1024 * 1024
#: Node options every node of this bench gets (quick peer pings for the linked pairs).
BASE_OPTIONS = ("--ping-interval", "1", "--ping-timeout", "2", "--request-timeout", "5")
#: Each attack, its node start included, is cut off after this many seconds.
ATTACK_DEADLINE = 90.0
#: A bystander's request that takes longer than this fails (Timeout).
BYSTANDER_TIMEOUT = 5.0
#: Growth in MiB past which an attack's memory does not count as bounded.
BOUNDED_MIB = 256
#: Values of about 1 MiB: the largest string --max-value-size (1 MiB) takes, as
#: CPython holds it (57 bytes of header plus one a character).
BIG = 1 * MiB - 57


# -- nodes and what they weigh ----------------------------------------------------------


class Target(Node):
    """A node of :mod:`swarm.bench_failover` started with this bench's options."""

    def __init__(self, workdir: Path, node_id: str, *options: str,
                 peers: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, node_id, list(peers))
        self.options = [*BASE_OPTIONS, *options, *(f"--peer={url}" for url in peers)]

    def start(self) -> None:
        argv = ["-n", "--pidfile=", "swarmcache", "--node-id", self.node_id,
                "--port", f"tcp:{self.port}:interface=127.0.0.1", *self.options]
        source = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            filter(None, (source, os.environ.get("PYTHONPATH")))))
        self.started_at = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", TWISTD, *argv], env=env,
                                         cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def vm(pid: int, field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/<pid>/status in bytes; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next((x for x in status if x.startswith(field + ":")), f"{field}: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024


class Peak:
    """The most a process's RSS grows over a window (see the module's docstring)."""

    def __init__(self, pid: int) -> None:
        from twisted.internet.task import LoopingCall

        self.pid = pid
        self.base = vm(pid, "VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.highest = self.base
        self._sampler = LoopingCall(self._sample)
        self._sampler.start(0.05)

    def _sample(self) -> None:
        self.highest = max(self.highest, vm(self.pid, "VmRSS"))

    def growth(self) -> float:
        """MiB above the start, so far (call at the end: it also stops the sampling)."""
        self._sample()
        if self._sampler.running:
            self._sampler.stop()
        if self.hwm_reset:
            self.highest = max(self.highest, vm(self.pid, "VmHWM"))
        return (self.highest - self.base) / MiB

    async def settled(self, quiet: float, timeout: float) -> float:
        """Wait until RSS has grown by less than 1 MiB for ``quiet`` seconds (at most
        ``timeout``); MiB above the start then."""
        deadline = time.monotonic() + timeout
        last, since = vm(self.pid, "VmRSS"), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            await sleep(0.1)
            now = vm(self.pid, "VmRSS")
            if now > last + MiB:
                last, since = now, time.monotonic()
        return (vm(self.pid, "VmRSS") - self.base) / MiB


class Bystander:
    """A client of the attacked node going about its business through the attack:
    gets of one small key, one after another, counted from :meth:`begin`."""

    def __init__(self, client: SwarmClient, loop: Loop) -> None:
        self.client = client
        self.loop = loop
        self._ok_before = 0

    @classmethod
    async def on(cls, node: Node) -> Bystander:
        client = await SwarmClient.connect(node.url, timeout=BYSTANDER_TIMEOUT)
        await client.set("bystander", "still here")
        loop = Loop(lambda n: client.get("bystander"), lambda v: v == "still here")
        await until(lambda: _now(loop.ok >= 5), "5 bystander gets", 20)
        return cls(client, loop)

    def begin(self) -> None:
        self._ok_before = self.loop.ok
        self.loop.since = time.monotonic()

    async def end(self) -> str:
        await self.loop.stop()
        await self.client.close()
        failed = sum(self.loop.failed.values())
        return f"{self.loop.ok - self._ok_before}/{failed}/{self.loop.longest * 1000:.0f} ms"


async def _now(value: Any) -> Any:
    return value


# -- a WebSocket client written by hand ---------------------------------------------------


#: Clients must mask their frames; a mask of zeros leaves the payload as it is, so a
#: 16 MiB frame costs no work to send.
_MASK = b"\0\0\0\0"


def frame_head(length: int, opcode: int = 2) -> bytes:
    """A client frame's header (final, masked) for ``length`` bytes of payload."""
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + _MASK
    if length < 1 << 16:
        return bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", length) + _MASK
    return bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", length) + _MASK


def upgrade_request(port: int, path: str = "/", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Key: " + base64.b64encode(secrets.token_bytes(16)).decode(),
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawSocket(Protocol):
    """A WebSocket client with nothing in the way: it sends exactly the bytes it is
    given, reads only when asked (``transport.pauseProducing``) and records the HTTP
    status, every message (or just counts them) and the close code."""

    def __init__(self, request: bytes, keep: bool = True) -> None:
        self.request = request
        self.keep = keep
        self.status: int | None = None
        self.upgraded: Deferred[int] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.messages: list[bytes] = []
        self.count = 0
        self.on_message: Callable[[bytes], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._buffer = bytearray()
        self._parts: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def send(self, payload: bytes, binary: bool = True) -> None:
        self.transport.write(frame_head(len(payload), 2 if binary else 1) + payload)

    def send_cbor(self, message: Any) -> None:
        self.send(cbor2.dumps(message))

    @property
    def closed(self) -> bool:
        return self.lost.called

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self.status is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(bytes(self._buffer[:end]).split(b" ", 2)[1])
            del self._buffer[:end + 4]
            self.upgraded.callback(self.status)
        while self._frame():
            pass

    def _frame(self) -> bool:
        """Take one whole frame off the buffer, if there is one."""
        buf = self._buffer
        if len(buf) < 2:
            return False
        opcode, length, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length >= 126:
            start = 4 if length == 126 else 10
            if len(buf) < start:
                return False
            length = int.from_bytes(buf[2:start], "big")
        if len(buf) < start + length:
            return False
        payload, fin = bytes(buf[start:start + length]), buf[0] & 0x80
        del buf[:start + length]
        if opcode == 8:
            self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
            self.close_reason = payload[2:].decode(errors="replace")
            self.transport.write(frame_head(0, 8))
        elif opcode == 9:
            self.transport.write(frame_head(len(payload), 10) + payload)
        elif opcode in (0, 1, 2):
            self._parts.append(payload)
            if fin:
                self._message(b"".join(self._parts))
                self._parts = []
        return True

    def _message(self, payload: bytes) -> None:
        self.count += 1
        if self.keep:
            self.messages.append(payload)
        if self.on_message is not None:
            self.on_message(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.upgraded.called:
            self.upgraded.callback(0)
        self.lost.callback(None)

    def ended(self) -> str:
        """How the connection ended, as far as this end knows."""
        if self.close_code is not None:
            reason = f" ({self.close_reason})" if self.close_reason else ""
            return f"closed {self.close_code}{reason}"
        return "dropped without a close frame" if self.closed else "still open"


async def dial(port: int, request: bytes, keep: bool = True) -> RawSocket:
    """A :class:`RawSocket` once the node has answered its HTTP request."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    sock = await connectProtocol(endpoint, RawSocket(request, keep))
    await within(sock.upgraded, 10, "the HTTP answer to an upgrade")
    return sock


async def within(d: Deferred, seconds: float, what: str) -> Any:
    """``await d``, or Missed after ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.defer import TimeoutError

    try:
        return await d.addTimeout(seconds, reactor)
    except TimeoutError:
        raise Missed(f"no {what} within {seconds:g} s") from None


async def next_message(sock: RawSocket, seconds: float) -> bytes | None:
    """The next message, or None when the connection ends first (or nothing comes)."""
    have = sock.count
    deadline = time.monotonic() + seconds
    while sock.count == have and not sock.closed and time.monotonic() < deadline:
        await sleep(0.02)
    return sock.messages[-1] if sock.count > have and sock.keep else None


async def gone(sock: RawSocket, seconds: float) -> bool:
    """Whether the connection ends within ``seconds``."""
    try:
        await within(sock.lost, seconds, "close")
    except Missed:
        return False
    return True


# -- HTTP status, for /health and refused upgrades ----------------------------------------


class _FirstLine(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.status: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n" in self.head and not self.status.called:
            self.status.callback(int(self.head.split(b" ", 2)[1]))
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.status.called:
            self.status.callback(0)


async def http_status(port: int, request: bytes, seconds: float = 1.0) -> int:
    """The status of the answer to ``request``; 0 when none comes in ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=seconds)
    try:
        asking = await within(connectProtocol(endpoint, _FirstLine(request)), seconds, "")
        return await within(asking.status, seconds, "status")
    except Exception:
        return 0


def health_request(port: int) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


# -- the attacks ----------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    outcome: str
    growth: float | None = None
    bystander: str = "n/a"


def verdict(word: str, good: bool, detail: str) -> str:
    return f"{word}: {detail}" if good else f"NOT {word}: {detail}"


class Bench:
    """The nodes of a run, and what each attack needs of them."""

    def __init__(self, workdir: Path, quick: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        self.nodes: list[Target] = []
        self.secret = workdir / "swarm.secret"
        self.secret.write_text(secrets.token_hex(32))

    async def node(self, node_id: str, *options: str,
                   peers: tuple[str, ...] = ()) -> Target:
        node = Target(self.workdir, node_id, *options, peers=peers)
        self.nodes.append(node)
        node.start()
        await node.connect()
        return node

    async def linked(self, *nodes: Target) -> None:
        want = sorted(n.node_id for n in nodes)

        async def seen() -> bool:
            return all([await ids_seen(n) == want for n in nodes])

        await until(seen, f"{' and '.join(want)} linked", 30)

    def done_with(self, *nodes: Target) -> None:
        for node in nodes:
            node.kill()

    async def measured(self, node: Target, attack: Callable[[], Awaitable[str]],
                       bystander: bool = True) -> tuple[str, float, str]:
        """Run ``attack`` against ``node`` with a bystander on it: (outcome, peak RSS
        growth in MiB, the bystander's figures)."""
        by = await Bystander.on(node) if bystander else None
        self.peak = Peak(node.pid)
        if by is not None:
            by.begin()
        try:
            outcome = await attack()
        finally:
            growth = self.peak.growth()
            figures = await by.end() if by is not None else "n/a"
        return outcome, growth, figures

    # 1 and 2 ----------------------------------------------------------------------------

    async def secret_pair(self) -> tuple[Target, Target]:
        if not hasattr(self, "_pair"):
            s1 = await self.node("s1", "--secret-file", str(self.secret))
            s2 = await self.node("s2", "--secret-file", str(self.secret), peers=(s1.url,))
            await self.linked(s1, s2)
            self._pair = (s1, s2)
        return self._pair

    async def hellos(self, node: Target, as_id: str) -> list[str]:
        """A hello without a proof, then one with a nonce answered by a wrong proof;
        how each connection ended."""
        ends = []
        for claims_secret in (False, True):
            sock = await dial(node.port, upgrade_request(node.port, "/peer"))
            if sock.status != 101:
                ends.append(f"HTTP {sock.status}")
                continue
            hello = {"t": "hello", "node": as_id, "proto": 2, "swarm": "swarmcache",
                     "inc": time.time_ns() // 1000, "auth": claims_secret}
            if claims_secret:
                hello["nonce"] = secrets.token_bytes(32)
            sock.send_cbor([hello])
            if claims_secret:  # a proof, whatever the node's hello and proof say
                sock.send_cbor([{"t": "auth", "mac": secrets.token_bytes(32)}])
            await gone(sock, 10)
            ends.append(sock.ended())
            sock.transport.abortConnection()
        return ends

    async def peer_hello(self, as_existing: bool) -> Row:
        s1, s2 = await self.secret_pair()
        as_id = "s2" if as_existing else "intruder"

        async def attack() -> str:
            no_proof, wrong_proof = await self.hellos(s1, as_id)
            seen = await ids_seen(s1)
            good = all(e.startswith("closed 4004") for e in (no_proof, wrong_proof)) and \
                seen == ["s1", "s2"]
            return verdict("refused", good, f"no proof: {no_proof}; wrong proof: "
                           f"{wrong_proof}; nodes on s1: {' '.join(seen)}")

        name = ("2 hello with an existing id (s2), no secret" if as_existing else
                "1 hello on /peer without the secret")
        return Row(name, *await self.measured(s1, attack))

    # 3 -----------------------------------------------------------------------------------

    async def big_peer_frame(self) -> Row:
        s1, _ = await self.secret_pair()

        async def attack() -> str:
            sock = await dial(s1.port, upgrade_request(s1.port, "/peer"))
            started = time.monotonic()
            sock.transport.write(frame_head(16 * MiB) + bytes(16 * MiB))
            closed = await gone(sock, 10)
            took = time.monotonic() - started
            sock.transport.abortConnection()
            return verdict("refused", closed and sock.close_code in (1009, None),
                           f"{sock.ended()} {took * 1000:.0f} ms after the 16 MiB frame "
                           "was sent (before any hello)")

        outcome, growth, by = await self.measured(s1, attack)
        if growth >= 16 and outcome.startswith("refused"):
            outcome = "NOT " + outcome + " (but the node grew by the frame's size)"
        return Row("3 16 MiB frame on /peer before hello", outcome, growth, by)

    # 4 -----------------------------------------------------------------------------------

    async def tiny_batch(self) -> Row:
        node = await self.node("c4")
        count = 4 * MiB - 16
        frame = b"\x9a" + count.to_bytes(4, "big") + bytes(count)  # [0, 0, ...]

        async def attack() -> str:
            sock = await dial(node.port, upgrade_request(node.port), keep=False)
            started = time.monotonic()
            sock.send(frame)
            await next_message(sock, 60)
            took = time.monotonic() - started
            got = f"a reply after {took:.1f} s" if sock.count else \
                f"{sock.ended()} after {took:.1f} s"
            sock.transport.abortConnection()
            return verdict("bounded", bool(sock.count) or sock.close_code == 1009,
                           f"{count:,} items in {len(frame) / MiB:.1f} MiB: {got}")

        outcome, growth, by = await self.measured(node, attack)
        self.done_with(node)
        return Row("4 4 MB CBOR batch of tiny items", over(outcome, growth), growth, by)

    # 5, 7, 9 ------------------------------------------------------------------------------

    async def client_node(self) -> Target:
        if not hasattr(self, "_client_node"):
            self._client_node = await self.node("c5")
        return self._client_node

    async def references(self) -> Row:
        node = await self.client_node()

        async def attack() -> str:
            sock = await dial(node.port, upgrade_request(node.port))
            answers = []
            for name, frame in reference_frames().items():
                sock.send(frame)
                reply = await next_message(sock, 30)
                answers.append(f"{name} -> {describe_reply(reply, sock)}")
            refused = all(a.endswith(("bad_request", "too_large")) for a in answers)
            sock.transport.abortConnection()
            return verdict("refused", refused, "; ".join(answers))

        outcome, growth, by = await self.measured(node, attack)
        return Row("5 1 MB frames of CBOR references", over(outcome, growth), growth, by)

    async def big_mget(self) -> Row:
        node = await self.client_node()
        keys = [f"big{i}" for i in range(5)]
        values = {k: k[-1] * BIG for k in keys}
        for key, value in values.items():
            await node.client.set(key, value)

        async def attack() -> str:
            client = await SwarmClient.connect(node.url, timeout=30)
            started = time.monotonic()
            got = await client.mget(keys)
            took = time.monotonic() - started
            await client.close()
            good = got == values
            return verdict("delivered", good, f"{sum(map(len, got.values())) / MiB:.1f} MiB "
                           f"of {len(got)} values in one reply, {took * 1000:.0f} ms")

        return Row("7 mget of five 1 MiB values", *await self.measured(node, attack))

    async def evil_origin(self) -> Row:
        node = await self.client_node()

        async def attack() -> str:
            evil = await http_status(node.port, upgrade_request(
                node.port, headers={"Origin": "https://evil.example"}), 5)
            plain = await http_status(node.port, upgrade_request(node.port), 5)
            return verdict("refused", evil == 403, f"HTTP {evil} (the same upgrade "
                           f"without Origin: HTTP {plain})")

        return Row("9 upgrade from Origin https://evil.example",
                   *await self.measured(node, attack))

    # 6 -----------------------------------------------------------------------------------

    async def never_reads(self) -> Row:
        node = await self.node("c6")
        gets = 1500

        async def attack() -> str:
            sock = await dial(node.port, upgrade_request(node.port), keep=False)
            sock.send_cbor({"id": 0, "op": "set", "key": "big", "value": "v" * BIG})
            await next_message(sock, 10)
            sock.transport.pauseProducing()
            for i in range(1, gets + 1):
                sock.send_cbor({"id": i, "op": "get", "key": "big"})
            held = await self.peak.settled(2.0, 20)
            sock.transport.resumeProducing()  # now read what the node kept for it
            drained = await gone(sock, 20)
            read = sock.count - 1
            sock.transport.abortConnection()
            good = sock.close_code == 1008 or held < BOUNDED_MIB
            return verdict("bounded", good, f"{gets} gets pipelined, unread: the node "
                           f"held +{held:.0f} MiB; then reading: {read} replies, "
                           + (sock.ended() if drained else "still open after 20 s"))

        outcome, growth, figures = await self.measured(node, attack)
        self.done_with(node)
        return Row("6 1,500 pipelined gets of 1 MiB, never read", over(outcome, growth),
                   growth, figures)

    # 8 -----------------------------------------------------------------------------------

    async def slowloris(self) -> Row:
        quick = self.quick
        limit, timeout = (200, 5.0) if quick else (1024, 10.0)
        sockets, drip_for = (300, 8.0) if quick else (1100, 15.0)
        node = await self.node("l8", "--max-connections", str(limit),
                               "--handshake-timeout", f"{timeout:g}")

        async def attack() -> str:
            drips = Drips(node.port, sockets)
            drips.open()
            probes = ok = 0
            while time.monotonic() - drips.started < drip_for and not drips.all_lost():
                status = await http_status(node.port, health_request(node.port), 0.5)
                probes, ok = probes + 1, ok + (status == 200)
                await sleep(0.25)
            stopped = time.monotonic()
            still = drips.stop()
            answered = await until(lambda: http_ok(node.port), "/health after the drip", 30)
            after = time.monotonic() - stopped
            held = drips.connected - drips.aborted_early
            good = held <= limit and answered and not still
            return verdict("bounded", good, (
                f"{drips.connected} of {sockets} sockets connected, {held} held past 1 s "
                f"(--max-connections {limit}, 2 taken by clients), {drips.aborted_early} "
                f"aborted within 1 s, the rest at {drips.median_life():.1f} s (--handshake-timeout "
                f"{timeout:g}); drip stopped after {stopped - drips.started:.1f} s with "
                f"{still} still open; /health during: {ok}/{probes} answered, after: in "
                f"{after * 1000:.0f} ms"))

        outcome, growth, by = await self.measured(node, attack)
        self.done_with(node)
        return Row("8 slowloris", outcome, growth, by)

    # 10 ----------------------------------------------------------------------------------

    async def nested_fill(self) -> Row:
        from swarm.bench_memory import SHAPES

        budget = 64 * MiB
        node = await self.node("m10", "--max-memory", "64mb")
        shapes = [SHAPES["nested"], SHAPES["list of 20 maps"], SHAPES["map of 20"]]

        async def attack() -> str:
            written, first_eviction = 0, None
            stats: dict = {}
            while written < 400_000:
                items = {f"n{written + i}": shapes[(written + i) % 3](written + i)
                         for i in range(500)}
                await node.client.mset(items)
                written += len(items)
                stats = await node.client.stats()
                if first_eviction is None and stats["evictions"]:
                    first_eviction = written
                if first_eviction and written >= 1.5 * first_eviction:
                    break
            settled = await self.peak.settled(1.0, 10)
            accounted = stats["memory_bytes"] / MiB
            good = stats["memory_bytes"] <= budget and settled <= 2 * budget / MiB
            return verdict("bounded", good, (
                f"{written} nested values written, {stats['keys']} kept, "
                f"{stats['evictions']} evicted; accounted {accounted:.1f} MiB of 64, "
                f"RSS +{settled:.1f} MiB settled (accounted/RSS "
                f"{accounted / max(settled, 0.1):.2f})"))

        outcome, growth, figures = await self.measured(node, attack)
        self.done_with(node)
        return Row("10 --max-memory 64mb of nested values", outcome, growth, figures)

    # 11 ----------------------------------------------------------------------------------

    async def sigterm(self) -> Row:
        a = await self.node("a11", "--replicas", "1")
        b = await self.node("b11", "--replicas", "1", peers=(a.url,))
        await self.linked(a, b)
        peak = Peak(a.pid)
        sent, replies, code = await pipeline_through_sigterm(a)
        growth = peak.growth()
        await until(lambda: _now(a.proc.poll() is not None), "a11 to exit", 30)
        stored = {r["id"] for r in replies if r.get("ok") and r.get("stored")}
        failed = [r for r in replies if not r.get("ok")]
        held: set[int] = set()
        for start in range(0, sent, 1000):
            ids = range(start, min(start + 1000, sent))
            values = await b.client.mget([f"k{i}" for i in ids])
            held |= {i for i in ids if f"k{i}" in values}
        good = held == stored and not failed and code == 1001
        outcome = verdict("consistent", good, (
            f"{sent} writes pipelined, SIGTERM after 300 replies: {len(stored)} answered "
            f"stored, {len(failed)} failed, {sent - len(replies)} unanswered, close "
            f"{code}; b11 holds {len(held)} of them ({len(held - stored)} never answered, "
            f"{len(stored - held)} answered and lost); a11 exited {a.proc.returncode}"))
        self.done_with(a, b)
        return Row("11 SIGTERM under pipelined writes", outcome, growth,
                   "n/a (the node stops)")


def over(outcome: str, growth: float, limit: float = BOUNDED_MIB) -> str:
    """``outcome``, turned into a NOT when the node grew by ``limit`` MiB or more."""
    if growth < limit or outcome.startswith("NOT"):
        return outcome
    return f"NOT {outcome} (grew {growth:.0f} MiB, the limit here is {limit:g})"


async def ids_seen(node: Node) -> list[str]:
    """The ids the ``nodes`` op of ``node`` lists."""
    assert node.client is not None
    return sorted(n["id"] for n in (await node.client.nodes())["nodes"])


async def http_ok(port: int) -> bool:
    return await http_status(port, health_request(port), 1.0) == 200


def reference_frames(size: int = 1_000_000) -> dict[str, bytes]:
    """``set`` requests of about ``size`` bytes whose values are mostly references."""
    text = cbor2.dumps("x" * 1024)
    blob = cbor2.dumps(bytes(64 * 1024))

    def request(key: str, value: bytes) -> bytes:
        head = b"\xa4" + b"".join(map(cbor2.dumps, ("id", 1, "op", "set", "key", key)))
        return head + cbor2.dumps("value") + value

    def array(first: bytes, repeat: bytes, tag: bytes = b"") -> bytes:
        count = (size - len(first) - 64) // len(repeat)
        return tag + b"\x9a" + (count + 1).to_bytes(4, "big") + first + repeat * count

    return {
        "string refs 256/25": request("s", array(text, b"\xd8\x19\x00", b"\xd9\x01\x00")),
        "shared refs 28/29": request("h", array(b"\xd8\x1c" + text, b"\xd8\x1d\x00")),
        "bignums 2 by ref": request("b", array(b"\xc2" + blob, b"\xc2\xd8\x19\x00",
                                               b"\xd9\x01\x00")),
    }


def describe_reply(reply: bytes | None, sock: RawSocket) -> str:
    if reply is None:
        return sock.ended()
    answer = cbor2.loads(reply)
    if answer.get("ok"):
        return f"ACCEPTED (id {answer.get('id')})"
    return f"id {answer.get('id')} {answer['error']['code']}"


class _Drip(Protocol):
    def __init__(self, drips: Drips) -> None:
        self.drips = drips
        self.since = 0.0

    def connectionMade(self) -> None:
        self.since = time.monotonic()
        self.drips.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.drips.closed(self, time.monotonic() - self.since)


class Drips:
    """Slowloris: ``count`` sockets, each sending one byte of an HTTP request a second."""

    REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 64

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.open_now: set[_Drip] = set()
        self.connected = self.aborted_early = 0
        self.lives: list[float] = []
        self.started = 0.0
        self._sent = 0
        self._ticker: Any = None

    def open(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientFactory
        from twisted.internet.task import LoopingCall

        factory = ClientFactory.forProtocol(lambda: _Drip(self))
        self.started = time.monotonic()
        for _ in range(self.count):
            reactor.connectTCP("127.0.0.1", self.port, factory, timeout=5)
        self._ticker = LoopingCall(self._drip)
        self._ticker.start(1.0, now=False)

    def opened(self, drip: _Drip) -> None:
        self.connected += 1
        self.open_now.add(drip)

    def closed(self, drip: _Drip, life: float) -> None:
        if drip in self.open_now:
            self.open_now.discard(drip)
            self.lives.append(life)
            self.aborted_early += life < 1.0

    def _drip(self) -> None:
        byte = self.REQUEST[self._sent % len(self.REQUEST):][:1]
        self._sent += 1
        for drip in list(self.open_now):
            drip.transport.write(byte)

    def all_lost(self) -> bool:
        return self.connected >= self.count and not self.open_now

    def stop(self) -> int:
        """Stop dripping and close every socket; how many were still open."""
        self._ticker.stop()
        still = len(self.open_now)
        for drip in list(self.open_now):
            drip.transport.abortConnection()
        return still

    def median_life(self) -> float:
        late = sorted(x for x in self.lives if x >= 1.0)
        return late[len(late) // 2] if late else float("nan")


#: Writes the SIGTERM client may send in all; the close stops it well before.
MAX_WRITES = 20_000
#: Replies before the SIGTERM, so the node is busy with hundreds more when it comes.
BEFORE_SIGTERM = 300


async def pipeline_through_sigterm(node: Target) -> tuple[int, list[dict], int | None]:
    """JSON ``set k<i>`` frames into ``node`` without waiting for replies; SIGTERM at
    the BEFORE_SIGTERM-th reply, and on sending until the connection closes. (The
    writes sent, the replies, the close code.)"""
    sock = await dial(node.port, upgrade_request(node.port))
    replies: list[dict] = []

    def replied(payload: bytes) -> None:
        replies.append(json.loads(payload))
        if len(replies) == BEFORE_SIGTERM:
            node.proc.send_signal(signal.SIGTERM)

    sock.on_message = replied
    sent = 0
    while sent < MAX_WRITES and not sock.closed and sock.close_code is None:
        for _ in range(50):
            sock.send(json.dumps({"id": sent, "op": "set", "key": f"k{sent}",
                                  "value": sent}).encode(), binary=False)
            sent += 1
        await sleep(0)
    await gone(sock, 30)
    sock.transport.abortConnection()
    return sent, replies, sock.close_code


# -- the run --------------------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the slowloris sockets, and the nodes,
    which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


ATTACKS: list[tuple[str, str, Callable[[Bench], Awaitable[Row]]]] = [
    ("1", "refused", lambda b: b.peer_hello(as_existing=False)),
    ("2", "refused", lambda b: b.peer_hello(as_existing=True)),
    ("3", "refused", Bench.big_peer_frame),
    ("4", "bounded", Bench.tiny_batch),
    ("5", "refused", Bench.references),
    ("6", "bounded", Bench.never_reads),
    ("7", "delivered", Bench.big_mget),
    ("8", "bounded", Bench.slowloris),
    ("9", "refused", Bench.evil_origin),
    ("10", "bounded", Bench.nested_fill),
    ("11", "consistent", Bench.sigterm),
]
"""Each attack: its number, the verdict its outcome should start with, the coroutine."""


async def run_one(bench: Bench, number: str, attack: Callable[[Bench], Awaitable[Row]]) -> Row:
    try:
        return await within(Deferred.fromCoroutine(attack(bench)), ATTACK_DEADLINE,
                            f"end of attack {number}")
    except Exception as e:  # the bench failed, not the node: say so and go on
        print(f"attack {number}: {type(e).__name__}: {e}", file=sys.stderr)
        for node in bench.nodes:
            if node.proc is not None and node.proc.poll() is None:
                print(node.tail(1500), file=sys.stderr)
        return Row(f"{number} (see stderr)", f"ERROR: {type(e).__name__}: {e}")


def table(rows: list[Row]) -> str:
    lines = ["| attack | outcome | peak RSS growth MiB | bystander ok/failed/longest wait |",
             "|---|---|---|---|"]
    for r in rows:
        growth = "-" if r.growth is None else f"{r.growth:.1f}"
        lines.append(f"| {r.attack} | {r.outcome} | {growth} | {r.bystander} |")
    return "\n".join(lines)


async def main(reactor: Any, argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench_attacks",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=(
        "slowloris with 300 sockets against --max-connections 200 and "
        "--handshake-timeout 5, dripping at most 8 s (under a minute in all)"))
    parser.add_argument("--only", metavar="N,N", type=lambda v: v.split(","), help=(
        "run only these attacks (by number, e.g. 1,3,9)"))
    args = parser.parse_args(argv)
    numbers = {number for number, _, _ in ATTACKS}
    if args.only and not set(args.only) <= numbers:
        parser.error(f"--only takes attack numbers from 1 to {len(ATTACKS)}")
    logs.set_level("warn")
    fds = raise_fd_limit()
    import autobahn
    import twisted

    print(f"Python {platform.python_version()}, Twisted {twisted.__version__}, Autobahn "
          f"{autobahn.__version__}, {os.cpu_count()} CPUs, RLIMIT_NOFILE {fds[0]}; "
          f"{'--quick' if args.quick else 'full run'}; nodes: {' '.join(BASE_OPTIONS)}",
          flush=True)
    started = time.monotonic()
    bench = Bench(Path(tempfile.mkdtemp(prefix="bench-attacks-")), args.quick)
    print(f"logs in {bench.workdir}", flush=True)
    rows = []
    try:
        for number, _, attack in ATTACKS:
            if args.only and number not in args.only:
                continue
            row = await run_one(bench, number, attack)
            report(row.attack, f"{row.outcome}; peak RSS +{row.growth or 0:.1f} MiB; "
                   f"bystander {row.bystander}")
            rows.append(row)
    finally:
        bench.done_with(*bench.nodes)
    if not (args.quick or args.only):
        from swarm.bench_memory import _in_subprocess

        shape = _in_subprocess("nested", 20_000, rss=True)
        report("bench_memory, 'nested' in one process", (
            f"{shape['entry_accounted']:.0f} B accounted per entry, "
            f"{shape['entry_measured']:.0f} B of RSS (ratio "
            f"{shape['entry_accounted'] / max(shape['entry_measured'], 1):.2f})"))
    print(f"\n{len(rows)} attacks in {time.monotonic() - started:.0f} s\n", flush=True)
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
