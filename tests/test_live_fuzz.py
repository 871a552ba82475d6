"""Issue 8, fuzzing, live: two real ``twistd swarmcache`` nodes linked with a secret,
node ``a`` fuzzed on both endpoints while a bystander client keeps working on it.

* client endpoint ``/``: a few thousand hostile frames over a few connections (random
  bytes as text and binary, random JSON and CBOR requests and batches with random ops,
  argument types, ids, tags, huge integers and nesting, truncated and mutated
  encodings, frames over the limits, WebSocket-level abuse). Each frame gets a reply
  that docs/protocol.md allows (:func:`fuzz_support.check_client_reply`) or a close code
  it documents;
* peer endpoint ``/peer``, unauthenticated: garbage, oversized frames, bad hellos and
  bad proofs are closed with the code docs/security.md and swarm/mesh/peer_wire.py give,
  and never told more than the handshake;
* peer endpoint after a good handshake (hello and proof made here with the secret):
  forged announcements, requests, replies to unknown ids and malformed messages. Every
  well-formed request is answered, every malformed frame closes the link with 4001;
* meanwhile the bystander's every set and get on its own keys (on both nodes) is
  correct, and it makes progress; afterwards neither node logged a traceback, the swarm
  is still {a, b}, and ``a``'s resident memory comes back near where it started.

Everything is seeded (``SEED``) and bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import cbor2
import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio
from fuzz_support import (
    DOCUMENTED_CODES,
    Gen,
    PeerGen,
    RawWS,
    check_client_reply,
    mib,
    vm_rss,
    ws_frame,
)
from twistd_support import health, start_node

from swarm.mesh.auth import proof, verify
from swarm.mesh.peer_wire import PeerProtocolError, decode_peer_frame, encode_peer_frame, hello

SEED = 20240808
SECRET = b"live-fuzz-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-0123456789abcdef"
SWARM = "swarmcache"
MAX_MESSAGE = 4 * 1024 * 1024  # the node's default --max-message-size

CLIENT_CONNECTIONS = 4
CLIENT_FRAMES = 8000  # in all, over CLIENT_CONNECTIONS
LARGE_FRAMES = 24  # of them over the limits or near them (see Gen.large_client_frame)
UNAUTH_CONNECTIONS = 300
LINKED_SESSIONS = 100
BIG_ANNOUNCEMENTS = 24  # lsa entries with 1024 links each, kept by the nodes by design
#: Each fuzzer stops at this many seconds whatever it has sent (a busy 2-core box).
FUZZ_SECONDS = 22.0
#: The longest wait for any one reply, close or handshake.
STEP = 10.0
#: A peer request's deadline is at most 5 s (PeerGen.good_message), so all its
#: replies are in by then, and a little.
PEER_REPLIES = 8.0
MEMORY_DEADLINE = 15.0
#: RSS may stay this much above its warmed-up start. What stays on purpose: the bogus
#: nodes' announcements, which a node keeps by design (one per node id, at most 10,000,
#: docs/security.md), about 3 KiB each with their ids: ~12 MiB for the ~3,700 of one
#: run (measured: 300 sessions' worth holds 29 MiB); at most 200 fuzz keys of small
#: values; and CPython's allocator keeping arenas that the 4 MiB frames decoding into
#: millions of objects needed (measured: +9 MiB once; 24,000 small frames alone: +0).
#: A leak per frame (several thousand frames, some of MiB) would pass 64 MiB.
MEMORY_SLACK = 64 * 1024 * 1024


def secret_file(tmp_path) -> str:
    path = tmp_path / "swarm.secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


async def call(ws, request: dict, cbor: bool, timeout: float = STEP) -> dict:
    """One request on an otherwise idle connection, and its reply."""
    await ws.send(cbor2.dumps(request) if cbor else json.dumps(request))
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return cbor2.loads(raw) if isinstance(raw, bytes) else json.loads(raw)


# -- the bystander ------------------------------------------------------------------------


class Bystander:
    """Sets and reads back its own keys in turn, in JSON and CBOR, checking every
    reply; counts requests and failures (with what went wrong)."""

    LIMIT = 100_000

    def __init__(self, url: str, keys: list[str]) -> None:
        self.url = url
        self.keys = keys
        self.ops = 0
        self.failures: list[str] = []
        self.stopping = False

    async def run(self) -> None:
        async with websockets.connect(self.url, max_size=None, open_timeout=STEP) as ws:
            for n in range(1, self.LIMIT):
                if self.stopping:
                    return
                cbor = n % 2 == 0
                key = self.keys[n % len(self.keys)]
                value = {"n": n, "s": "x" * (n % 37), "l": [n, None, True]}
                if cbor:
                    value["b"] = n.to_bytes(4, "big")
                try:
                    stored = await call(ws, {"id": 2 * n, "op": "set", "key": key,
                                             "value": value, "ttl": None}, cbor)
                    got = await call(ws, {"id": 2 * n + 1, "op": "get", "key": key}, cbor)
                except Exception as e:  # a close or a timeout: the bystander is hurt
                    self.failures.append(f"request {n} on {key}: {e!r}")
                    return
                self.ops += 2
                if stored != {"id": 2 * n, "ok": True, "stored": True}:
                    self.failures.append(f"set {key}: {stored!r:.200}")
                if got != {"id": 2 * n + 1, "ok": True, "found": True, "value": value}:
                    self.failures.append(f"get {key}: {got!r:.200} (set {value!r})")

    async def until(self, ops: int) -> None:
        deadline = time.monotonic() + STEP
        while self.ops < ops and not self.failures:
            assert time.monotonic() < deadline, f"the bystander is stuck at {self.ops} ops"
            await asyncio.sleep(0.05)


# -- client endpoint ----------------------------------------------------------------------


class ClientFuzz:
    """Frames sent to ``/`` and what became of them."""

    def __init__(self, port: int) -> None:
        self.url = f"ws://127.0.0.1:{port}"
        self.port = port
        self.frames = 0
        self.kinds: dict[str, int] = {}
        self.closes: dict[int, int] = {}
        self.problems: list[str] = []

    async def connection(self, gen: Gen, frames: int, large_every: int,
                         deadline: float) -> None:
        ws = await websockets.connect(self.url, max_size=None, open_timeout=STEP)
        try:
            for i in range(frames):
                if time.monotonic() > deadline:
                    return
                large = large_every and i % large_every == large_every - 1
                payload, binary, kind = (gen.large_client_frame(MAX_MESSAGE) if large
                                         else gen.client_frame())
                self.frames += 1
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                try:
                    await ws.send(payload, text=not binary)
                    reply = await asyncio.wait_for(ws.recv(), STEP)
                except websockets.ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else -1
                    self.closes[code] = self.closes.get(code, 0) + 1
                    # 1009: a frame over --max-message-size, or a batch whose error
                    # reply would pass 64 MiB (docs/protocol.md, Limits)
                    if not (code == 1009 and len(payload) > 10_000):
                        self.problems.append(f"{kind} frame {payload[:80]!r} closed {code}")
                    ws = await websockets.connect(self.url, max_size=None, open_timeout=STEP)
                    continue
                except asyncio.TimeoutError:
                    self.problems.append(f"no reply in {STEP}s to {kind} {payload[:80]!r}")
                    return
                problem = check_client_reply(payload, binary, reply)
                if problem:
                    self.problems.append(f"{kind} frame {payload[:120]!r}: {problem}")
        finally:
            await ws.close()

    async def raw_abuse(self) -> None:
        """WebSocket-level abuse no library sends: RFC 6455 makes the node close with
        1002 (protocol error) or 1009 (too big); a frame cut short then dropped, or a
        fragmented request, must leave the node serving."""
        cases = [
            (ws_frame(0x2, b"", length=2**40), {1009}, "a header claiming 1 TiB"),
            (ws_frame(0x1, b"x" * 10, length=MAX_MESSAGE + 1), {1009}, "a length over the limit"),
            (ws_frame(0x1, b'{"id":1,"op":"ping"}', mask=False), {1002}, "unmasked"),
            (ws_frame(0x3, b"x"), {1002}, "reserved opcode"),
            (ws_frame(0x1, b"{}", rsv=4), {1002}, "rsv bit"),
            (ws_frame(0x9, b"p" * 126), {1002}, "long ping"),
            (ws_frame(0x0, b"x"), {1002}, "continuation first"),
            # RFC 6455 7.1.7: failing the connection may also drop it (-1)
            (ws_frame(0x8, b"\x03\xe7"), {1002, -1}, "close code 999"),
            (ws_frame(0x1, b'{"id":1,', fin=False) + ws_frame(0x2, b"x"), {1002},
             "data frame inside a fragmented one"),
        ]
        for data, codes, what in cases:
            ws = await RawWS.open(self.port)
            ws.send(data)
            code = await ws.close_code(STEP)
            self.frames += 1
            self.closes[code] = self.closes.get(code, 0) + 1
            if code not in codes:
                self.problems.append(f"raw {what}: closed {code}, not {codes}")
        for cut in (1, 2, 5, 20):  # a frame cut short, the connection dropped
            ws = await RawWS.open(self.port)
            ws.send(ws_frame(0x1, b'{"id":1,"op":"ping"}' * 3)[:cut])
            ws.abort()
            self.frames += 1
        ws = await RawWS.open(self.port)  # fragmented: one request in three frames
        ws.send(ws_frame(0x1, b'{"id":7,', fin=False) + ws_frame(0x9, b"hi")
                + ws_frame(0x0, b'"op":', fin=False) + ws_frame(0x0, b'"ping"}'))
        opcode, payload = await ws.recv(STEP)
        self.frames += 1
        reply = json.loads(payload)
        if opcode != 0x1 or reply.get("id") != 7 or reply.get("ok") is not True:
            self.problems.append(f"fragmented ping got {opcode} {payload[:200]!r}")
        ws.abort()

    async def run(self, seed: int, frames: int, large: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        per = frames // CLIENT_CONNECTIONS
        large_every = per // max(1, large // CLIENT_CONNECTIONS) if large else 0
        await self.raw_abuse()
        await asyncio.gather(*(
            self.connection(Gen(random.Random(seed + i)), per, large_every, deadline)
            for i in range(CLIENT_CONNECTIONS)))


# -- peer endpoint ------------------------------------------------------------------------


class PeerFuzz:
    """Connections to ``/peer``: outsiders, then peers that pass the handshake."""

    def __init__(self, port: int, target: str, real: list[str], seed: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/peer"
        self.port = port
        self.target = target
        self.rng = random.Random(seed)
        self.gen = PeerGen(self.rng, target, real)
        #: outsiders, outsider_frames, trusted, trusted_frames, messages, requests,
        #: replies, dropped (requests on connections dropped before their replies)
        self.n: Counter[str] = Counter()
        self.big_announcements = 0
        self.closes: dict[int, int] = {}
        self.problems: list[str] = []
        self.sessions = 0

    def _closed(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1

    def _hello(self, node: str, nonce: bytes | None, **changes: Any) -> dict:
        msg = hello(node, SWARM, self.rng.getrandbits(40), nonce, auth=True)
        msg.update(changes)
        return {k: v for k, v in msg.items() if v is not None}

    def outsider_case(self, fid: str, ours: bytes, theirs: bytes) -> tuple[str, Any, list]:
        """(what, expected close code or codes, frames): one way of failing the
        handshake."""
        r, target = self.rng, self.target
        good = self._hello(fid, ours)
        mine = proof(SECRET, SWARM, fid, target, ours, theirs)
        frame = encode_peer_frame
        cases = [
            ("a text frame", 4001, ["hello"]),
            ("garbage", 4001, [r.randbytes(r.randrange(1, 300)) + b"\xff"]),
            ("not an array", 4001, [cbor2.dumps(good)]),
            ("5000 bytes before the handshake", 1009,
             [cbor2.dumps([dict(good, pad=b"x" * 5000)])]),
            ("nothing, then another protocol", 4000, [frame([]), frame([dict(good, proto=1)])]),
            ("lsa first", 4000, [frame([{"t": "lsa", "anns": []}])]),
            ("another swarm", 4000, [frame([dict(good, swarm="other")])]),
            ("the node's own id", 4000, [frame([dict(good, node=target)])]),
            ("protocol 3", 4000, [frame([dict(good, proto=3)])]),
            ("no node", 4001, [frame([{k: v for k, v in good.items() if k != "node"}])]),
            ("a 257-char id", 4001, [frame([dict(good, node="x" * 257)])]),
            ("negative inc", 4001, [frame([dict(good, inc=-1)])]),
            ("inc over 64 bits", 4001, [frame([dict(good, inc=2**64)])]),
            ("a 31-byte nonce", 4001, [frame([dict(good, nonce=ours[:31])])]),
            ("auth not a boolean", 4001, [frame([dict(good, auth="yes")])]),
            ("no secret", 4004, [frame([dict(good, auth=False)])]),
            ("auth without nonce", 4001, [frame([{k: v for k, v in good.items()
                                                  if k != "nonce"}])]),
            ("a random proof", 4004, [frame([good, {"t": "auth", "mac": r.randbytes(32)}])]),
            ("another secret's proof", 4004, [frame([good, {"t": "auth", "mac": proof(
                OTHER_SECRET, SWARM, fid, target, ours, theirs)}])]),
            ("a stale nonce's proof", 4004, [frame([good, {"t": "auth", "mac": proof(
                SECRET, SWARM, fid, target, ours, r.randbytes(32))}])]),
            ("a proof for another id", 4004, [frame([good, {"t": "auth", "mac": proof(
                SECRET, SWARM, fid + "x", target, ours, theirs)}])]),
            ("the node's proof reflected", 4004, [frame([good]), frame([{"t": "auth", "mac":
                proof(SECRET, SWARM, target, fid, theirs, ours)}])]),
            ("a 31-byte proof", 4001, [frame([good, {"t": "auth", "mac": mine[:31]}])]),
            ("lsa instead of the proof", 4001, [frame([good]), frame([{"t": "lsa", "anns": [
                {"node": fid, "inc": 1, "seq": 1, "links": [target]}]}])]),
            ("a request instead of the proof", 4001, [frame([good, {
                "t": "req", "rid": 1, "ms": 1000, "hops": 3,
                "req": {"id": 1, "op": "take", "keys": ["k"]}}])]),
            # a mutation may leave a valid hello (and the node waiting for a proof):
            # the random proof after it is refused then
            ("a mutated hello", {4000, 4001, 4004, 1009}, [
                self.gen.mutate(frame([good])), frame([{"t": "auth", "mac": r.randbytes(32)}])]),
        ]
        return r.choice(cases)

    async def outsider(self, n: int) -> None:
        fid = f"outsider-{n}"
        ours = self.rng.randbytes(32)
        async with websockets.connect(self.url, max_size=None, open_timeout=STEP) as ws:
            theirs = cbor2.loads(await asyncio.wait_for(ws.recv(), STEP))[0]["nonce"]
            what, expected, frames = self.outsider_case(fid, ours, theirs)
            told: list[str] = []
            code = -1
            try:
                for f in frames:
                    await ws.send(f, text=isinstance(f, str))
                    self.n["outsider_frames"] += 1
                while True:
                    told += [m.get("t") for m in cbor2.loads(
                        await asyncio.wait_for(ws.recv(), STEP))]
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else -1
            except asyncio.TimeoutError:
                self.problems.append(f"outsider {what}: not closed in {STEP}s")
        self.n["outsiders"] += 1
        self._closed(code)
        if code not in (expected if isinstance(expected, set) else {expected}):
            self.problems.append(f"outsider {what}: closed {code}, not {expected}")
        if set(told) - {"auth"}:
            self.problems.append(f"outsider {what} was told {told}")

    async def outsider_raw(self) -> None:
        """A header claiming a 1 TiB frame before any hello: 1009, nothing buffered."""
        ws = await RawWS.open(self.port, "/peer")
        ws.send(ws_frame(0x2, b"", length=2**40))
        code = await ws.close_code(STEP)
        self.n["outsiders"] += 1
        self.n["outsider_frames"] += 1
        self._closed(code)
        if code != 1009:
            self.problems.append(f"outsider with a 1 TiB header: closed {code}, not 1009")

    async def handshake(self, ws, fid: str, inc: int) -> list[dict]:
        """Hello and proof, as a node does; what the node sent once it linked."""
        ours = self.rng.randbytes(32)
        await ws.send(encode_peer_frame([hello(fid, SWARM, inc, ours, auth=True)]))
        got: dict[str, dict] = {}
        while not {"hello", "auth"} <= set(got):
            for m in cbor2.loads(await asyncio.wait_for(ws.recv(), STEP)):
                got[m["t"]] = m
        theirs = got["hello"]["nonce"]
        assert verify(SECRET, SWARM, self.target, fid, theirs, ours, got["auth"]["mac"])
        await ws.send(encode_peer_frame(
            [{"t": "auth", "mac": proof(SECRET, SWARM, fid, self.target, ours, theirs)}]))
        return cbor2.loads(await asyncio.wait_for(ws.recv(), STEP))

    async def linked_session(self, n: int, deadline: float) -> None:
        """A trusted peer: rounds of forged messages of valid shape (every request
        must be answered), then an ending: a malformed frame (4001), bye, two byes
        (4001), or the connection dropped with requests in flight."""
        r, gen = self.rng, self.gen
        fid = f"fuzz-{n}"
        async with websockets.connect(self.url, max_size=None, open_timeout=STEP) as ws:
            first = await self.handshake(ws, fid, r.getrandbits(40))
            self.n["trusted"] += 1
            if not first or any(m.get("t") != "lsa" for m in first):
                self.problems.append(f"{fid}: first linked frame {first!r:.200}")
            asked: dict[int, dict] = {}
            answered: dict[int, Any] = {}
            told: list[dict] = []
            code: list[int] = []

            async def read() -> None:
                try:
                    async for raw in ws:
                        for m in cbor2.loads(raw):
                            if m.get("t") == "rep":
                                answered[m.get("rid")] = m.get("rep")
                            else:
                                told.append(m)
                except websockets.ConnectionClosed:
                    pass
                code.append(ws.close_code if ws.close_code is not None else -1)

            reader = asyncio.ensure_future(read())
            rid = 0
            for _ in range(r.randrange(1, 8)):
                if time.monotonic() > deadline:
                    break
                messages = []
                for _ in range(r.randrange(1, 25)):
                    rid += 1
                    msg = gen.good_message(rid)
                    if msg["t"] == "req":
                        asked[rid] = msg
                    messages.append(msg)
                if self.big_announcements < BIG_ANNOUNCEMENTS and r.random() < 0.3:
                    self.big_announcements += 1
                    messages.append({"t": "lsa", "anns": [gen.announcement(big=True)]})
                await ws.send(encode_peer_frame(messages))
                self.n["trusted_frames"] += 1
                self.n["messages"] += len(messages)
            ending = r.choice(["malformed"] * 5 + ["bye", "two byes", "drop"])
            if ending == "drop":
                ws.transport.abort()  # requests in flight: their replies go nowhere
                await asyncio.wait_for(reader, STEP)
                self.n["dropped"] += len(asked)
                return
            until = time.monotonic() + PEER_REPLIES
            while set(asked) - set(answered) and time.monotonic() < until and not code:
                await asyncio.sleep(0.02)
            self.n["requests"] += len(asked)
            self.n["replies"] += len(answered)
            missing = set(asked) - set(answered)
            if missing:
                self.problems.append(f"{fid}: no reply to {[asked[m] for m in missing][:3]!r:.300}")
            for rid_, rep in answered.items():
                ok = isinstance(rep, dict) and isinstance(rep.get("ok"), bool) and (
                    rep["ok"] or (rep.get("error") or {}).get("code") in DOCUMENTED_CODES)
                if rid_ not in asked or not ok:
                    self.problems.append(f"{fid}: reply {rid_}: {rep!r:.200}")
            if code:
                self.problems.append(f"{fid}: closed {code[0]} on well-formed messages")
                return
            if ending == "malformed":
                payload, binary, what = gen.terminal()
                await ws.send(payload, text=not binary)
                expected = 4001
            else:
                await ws.send(encode_peer_frame([{"t": "bye"}]))
                if ending == "two byes":
                    await ws.send(encode_peer_frame([{"t": "bye"}]))
                    what, expected = "two byes", 4001
                else:
                    what, expected = "bye", None
            self.n["trusted_frames"] += 1
            if expected is None:  # bye: answered with bye, the link parted; we close
                until = time.monotonic() + STEP
                while not any(m.get("t") == "bye" for m in told) and time.monotonic() < until:
                    await asyncio.sleep(0.02)
                if not any(m.get("t") == "bye" for m in told):
                    self.problems.append(f"{fid}: bye not answered")
                await ws.close()
                expected = 1000
            await asyncio.wait_for(reader, STEP)
            self._closed(code[0])
            if code[0] != expected:
                self.problems.append(f"{fid} sent {what}: closed {code[0]}, not {expected}")

    async def trusted_raw(self) -> None:
        """After a good handshake a frame may be 64 MiB: a header claiming 1 TiB is
        closed with 1009 before a byte of it is buffered."""
        fid = "fuzz-raw"
        ws = await RawWS.open(self.port, "/peer")
        ours = self.rng.randbytes(32)
        ws.send(ws_frame(0x2, encode_peer_frame([hello(fid, SWARM, 1, ours, auth=True)])))
        got: dict[str, dict] = {}
        while not {"hello", "auth"} <= set(got):
            got.update((m["t"], m) for m in cbor2.loads((await ws.recv(STEP))[1]))
        ws.send(ws_frame(0x2, encode_peer_frame([{"t": "auth", "mac": proof(
            SECRET, SWARM, fid, self.target, ours, got["hello"]["nonce"])}])))
        linked = cbor2.loads((await ws.recv(STEP))[1])
        ws.send(ws_frame(0x2, b"", length=2**40))
        code = await ws.close_code(STEP)
        self.n["trusted"] += 1
        self.n["trusted_frames"] += 2
        self._closed(code)
        if not linked or any(m.get("t") != "lsa" for m in linked) or code != 1009:
            self.problems.append(f"trusted 1 TiB header: linked {linked!r:.100}, closed {code}")

    async def identity_cases(self, real: list[str]) -> None:
        """A good proof for the id of a live node with another incarnation: 4002."""
        other = next(n for n in real if n != self.target)
        async with websockets.connect(self.url, max_size=None, open_timeout=STEP) as ws:
            code = -1
            try:
                await self.handshake(ws, other, 12345)
                await asyncio.wait_for(ws.recv(), STEP)
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else -1
        self.n["trusted"] += 1
        self._closed(code)
        if code != 4002:
            self.problems.append(f"a proven hello as {other!r}: closed {code}, not 4002")

    async def run(self, outsiders: int, sessions: int, seconds: float,
                  real: list[str]) -> None:
        deadline = time.monotonic() + seconds
        await self.outsider_raw()
        await self.trusted_raw()
        await self.identity_cases(real)
        for n in range(max(outsiders, sessions)):
            if time.monotonic() > deadline:
                break
            if n < outsiders:
                await self.outsider(n)
            if n < sessions:
                await self.linked_session(self.sessions, deadline)
                self.sessions += 1


# -- the test -----------------------------------------------------------------------------


class RssWatch:
    """Samples a process's VmRSS every 0.1 s: the peak seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = vm_rss(pid)
        self.stopping = False

    async def run(self) -> None:
        for _ in range(10_000):
            if self.stopping:
                return
            self.peak = max(self.peak, vm_rss(self.pid))
            await asyncio.sleep(0.1)


async def settled(port: int, want: dict, what: str, timeout: float = STEP) -> dict:
    """Poll ``stats`` and ``nodes`` on a fresh connection until ``want`` holds
    (a dict of stats fields, and "view": the set of reachable ids)."""
    deadline = time.monotonic() + timeout
    while True:
        async with websockets.connect(f"ws://127.0.0.1:{port}", open_timeout=STEP) as ws:
            stats = (await call(ws, {"id": 1, "op": "stats"}, True))["stats"]
            view = {n["id"] for n in (await call(ws, {"id": 2, "op": "nodes"}, True))["nodes"]}
        seen = dict(stats, view=view)
        # this polling connection is one of the connections the stats count
        if all(seen.get(k) == v for k, v in want.items()):
            return seen
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {seen}"
        await asyncio.sleep(0.1)


async def scenario(a, b) -> dict:
    keys = [f"bystander:{i}" for i in range(64)]
    async with websockets.connect(a.url, open_timeout=STEP) as ws:
        owners = [(await call(ws, {"id": i, "op": "owner", "key": k}, True))["nodes"][0]
                  for i, k in enumerate(keys)]
    assert set(owners) == {"a", "b"}, owners  # the bystander's keys live on both nodes

    bystander = Bystander(a.url, keys)
    running = asyncio.ensure_future(bystander.run())
    watch_a, watch_b = RssWatch(a.proc.pid), RssWatch(b.proc.pid)
    try:
        await bystander.until(200)
        # warm-up: every path once, so what they import and cache is in the start figure
        await ClientFuzz(a.port).run(SEED - 1, 200, 4, FUZZ_SECONDS)
        warm = PeerFuzz(a.port, "a", ["a", "b"], SEED - 1)
        await warm.run(5, 2, FUZZ_SECONDS, ["a", "b"])
        await settled(a.port, {"peers": 1, "connections": 2, "view": {"a", "b"}},
                      "the warm-up's connections to close")
        rss_before = vm_rss(a.proc.pid)
        rss_b_before = vm_rss(b.proc.pid)
        ops_before = bystander.ops

        client = ClientFuzz(a.port)
        peer = PeerFuzz(a.port, "a", ["a", "b"], SEED)
        watchers = [asyncio.ensure_future(w.run()) for w in (watch_a, watch_b)]
        started = time.monotonic()
        await asyncio.gather(
            client.run(SEED, CLIENT_FRAMES, LARGE_FRAMES, FUZZ_SECONDS),
            peer.run(UNAUTH_CONNECTIONS, LINKED_SESSIONS, FUZZ_SECONDS, ["a", "b"]))
        fuzz_seconds = time.monotonic() - started
        ops_during = bystander.ops - ops_before

        after = await settled(a.port, {"peers": 1, "connections": 2, "view": {"a", "b"}},
                              "the fuzz connections to close")
        deadline = time.monotonic() + MEMORY_DEADLINE
        while vm_rss(a.proc.pid) > rss_before + MEMORY_SLACK and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        rss_after = vm_rss(a.proc.pid)
        await bystander.until(bystander.ops + 20)  # still served after it all
    finally:
        bystander.stopping = watch_a.stopping = watch_b.stopping = True
        await asyncio.wait_for(running, STEP)

    figures = {
        "rss_before": rss_before, "rss_peak": watch_a.peak,
        "rss_hwm": vm_rss(a.proc.pid, "VmHWM"), "rss_after": rss_after,
        "rss_b": (rss_b_before, watch_b.peak, vm_rss(b.proc.pid)),
        "client": client, "peer": peer, "bystander": bystander, "ops_during": ops_during,
        "fuzz_seconds": fuzz_seconds, "stats": after,
    }
    report(figures)
    return figures


def report(f: dict) -> None:
    client, peer, bystander = f["client"], f["peer"], f["bystander"]
    b_before, b_peak, b_after = f["rss_b"]
    print(f"\nlive fuzz (seed {SEED}), {f['fuzz_seconds']:.1f} s of fuzzing")
    print(f"  node a RSS: before {mib(f['rss_before'])}, peak {mib(f['rss_peak'])} "
          f"(VmHWM {mib(f['rss_hwm'])}), after {mib(f['rss_after'])}")
    print(f"  node b RSS: before {mib(b_before)}, peak {mib(b_peak)}, after {mib(b_after)}")
    print(f"  client endpoint: {client.frames} frames, closes {client.closes}, "
          f"kinds {dict(sorted(client.kinds.items()))}")
    n = peer.n
    print(f"  peer endpoint: {n['outsiders']} outsider connections ({n['outsider_frames']} "
          f"frames), {n['trusted']} trusted connections ({n['trusted_frames']} frames, "
          f"{n['messages']} messages, {n['requests']} requests, {n['replies']} replies, "
          f"{n['dropped']} requests on dropped connections, "
          f"{peer.big_announcements} announcements of 1024 links, "
          f"{len(peer.gen.bogus_sent)} bogus nodes), closes {dict(sorted(peer.closes.items()))}")
    print(f"  bystander: {bystander.ops} requests ({f['ops_during']} during the fuzz), "
          f"{len(bystander.failures)} failures")
    for problem in (client.problems + peer.problems)[:30]:
        print("  PROBLEM:", problem)
    print(f"  node a afterwards: keys {f['stats'].get('keys')}, view {sorted(f['stats']['view'])}")


@pytest_twisted.ensureDeferred
async def test_both_endpoints_fuzzed_live_while_a_bystander_works(tmp_path):
    secret = secret_file(tmp_path)
    a = start_node(tmp_path, "a", "--secret-file", secret)
    b = None
    try:
        b = start_node(tmp_path, "b", "--secret-file", secret, f"--peer={a.url}")
        figures = await on_asyncio(_linked_then(a, b), timeout=120)
        client, peer, bystander = figures["client"], figures["peer"], figures["bystander"]
        for node in (a, b):  # up, serving, and nothing raised inside it
            assert node.proc.poll() is None, node.describe()
            assert health(node.port)[0] == 200
            out = node.output()
            assert "Traceback" not in out and "Unhandled" not in out, node.describe()
        assert bystander.failures == []
        assert figures["ops_during"] >= 100, "the bystander made no progress while fuzzed"
        assert client.problems == []
        assert peer.problems == []
        assert client.frames >= 1000 and peer.n["outsiders"] >= 50
        assert peer.n["trusted"] >= 15
        assert figures["rss_after"] <= figures["rss_before"] + MEMORY_SLACK
    finally:
        for node in (a, b):
            if node is not None:
                node.kill()


async def _linked_then(a, b) -> dict:
    await settled(a.port, {"view": {"a", "b"}}, "a and b to link", 20)
    return await scenario(a, b)


# -- bugs the fuzz found ------------------------------------------------------------------


async def _trusted_peer(port: int, fid: str):
    """A websockets connection to ``/peer`` that passed the handshake as ``fid``."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/peer", max_size=None,
                                  open_timeout=STEP)
    await PeerFuzz(port, "a", ["a"], SEED).handshake(ws, fid, 1)
    return ws


async def _replies(ws, rids: set[int], timeout: float) -> dict[int, Any]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while set(rids) - set(got) and time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            break
        got.update((m["rid"], m["rep"]) for m in cbor2.loads(raw) if m.get("t") == "rep")
    return got


@pytest_twisted.ensureDeferred
async def test_a_forwarded_request_with_a_tagged_id_is_answered(tmp_path):
    a = start_node(tmp_path, "a", "--secret-file", secret_file(tmp_path))
    try:
        async def scenario() -> dict:
            ws = await _trusted_peer(a.port, "fuzz-tag")
            await ws.send(encode_peer_frame([
                {"t": "req", "rid": 1, "ms": 2000, "hops": 3,
                 "req": {"id": cbor2.CBORTag(1, 0), "op": "ping"}},
                {"t": "req", "rid": 2, "ms": 2000, "hops": 3, "req": {"id": 2, "op": "ping"}},
            ]))
            try:
                return await _replies(ws, {1, 2}, 3.0)
            finally:
                await ws.close()

        got = await on_asyncio(scenario(), timeout=30)
        assert got.get(2, {}).get("ok") is True, got  # the good request is answered
        assert got.get(1, {}).get("ok") is False, got  # the bad one refused
        assert "Traceback" not in a.output(), a.describe()
    finally:
        a.kill()


@pytest.mark.parametrize("inc, seq", [(2**64, 1), (2**64 - 1, 1), (1, 2**64 - 1), (2**62, 0)])
@pytest_twisted.ensureDeferred
async def test_an_announcement_of_the_node_with_a_huge_incarnation_leaves_its_hello_valid(
        tmp_path, inc, seq):
    a = start_node(tmp_path, "a", "--secret-file", secret_file(tmp_path))
    try:
        async def scenario() -> dict:
            ws = await _trusted_peer(a.port, "fuzz-inc")
            try:
                await ws.send(encode_peer_frame([{"t": "lsa", "anns": [
                    {"node": "a", "inc": inc, "seq": seq, "links": []}]}]))
                await ws.send(encode_peer_frame([{"t": "req", "rid": 1, "ms": 2000,
                                                  "hops": 3, "req": {"id": 1, "op": "ping"}}]))
                await _replies(ws, {1}, STEP)  # the lsa has been taken in by then
                await ws.close()
            except websockets.ConnectionClosed as e:  # past 64 bits: a protocol error
                assert e.rcvd.code == 4001 and inc >= 2**64, e
            async with websockets.connect(f"ws://127.0.0.1:{a.port}/peer",
                                          open_timeout=STEP) as fresh:
                return decode_peer_frame(await asyncio.wait_for(fresh.recv(), STEP), True)[0]

        try:
            their_hello = await on_asyncio(scenario(), timeout=30)
        except PeerProtocolError as e:  # what any peer dialling it now sees
            raise AssertionError(f"the node's hello is refused by its peers: {e}") from None
        assert their_hello["t"] == "hello"
        assert their_hello["inc"] < 2**62, their_hello
    finally:
        a.kill()
