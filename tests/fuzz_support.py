"""What tests/test_live_fuzz.py sends and how it judges the answers: seeded generators of
hostile client frames and peer messages, a raw WebSocket client for what no library
sends (lying length headers, unmasked or truncated frames), the reply rules of
docs/protocol.md as one checker, and a node's resident memory from /proc.

Everything random comes from one ``random.Random`` the caller seeds, so a failing run
replays exactly. The hypothesis strategies of test_fuzz_decoders.py are not reused:
drawing from them outside ``@given`` (``.example()``) is not reproducible from a seed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
from typing import Any

import cbor2

from swarm.errors import SwarmError
from swarm.protocol.ops import CLIENT_OPS, OPS
from swarm.protocol.wire import decode_frame

#: Error codes of docs/protocol.md ("Errors").
DOCUMENTED_CODES = {"bad_request", "unknown_op", "too_large", "not_integer", "timeout",
                    "unavailable", "unauthorized", "overloaded", "internal"}
#: What each client op's success reply carries (docs/protocol.md, "Operations").
RESULT_FIELDS = {"ping": {"node"}, "set": {"stored"}, "get": {"found", "value"},
                 "delete": {"deleted"}, "exists": {"exists"}, "expire": {"updated"},
                 "ttl": {"found", "ttl"}, "incr": {"value"}, "mget": {"values"},
                 "mset": {"stored"}, "stats": {"stats"}, "nodes": {"self", "nodes"},
                 "owner": {"nodes"}, "mdelete": {"deleted"}, "scan": {"cursor", "keys"},
                 "flush": {"flushed"}}
#: Argument names the fuzzer fills in (client ops' and internal ops', and made up ones).
ARG_NAMES = ("key", "value", "ttl", "nx", "xx", "delta", "keys", "items", "entries",
             "digests", "at", "cursor", "to", "match", "count", "node", "after", "before")
#: Ops the fuzzer leaves out: those that empty a node would only wipe what the fuzz and
#: its bystander wrote (their refusals and errors are tested in test_v11_ops).
EMPTYING = {"flush", "clear"}
#: How many fuzz keys exist, so the fuzz cannot grow the store without bound.
FUZZ_KEYS = 200


def vm_rss(pid: int, field: str = "VmRSS") -> int:
    """``field`` (VmRSS, VmHWM...) of process ``pid`` in bytes, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- random structures ------------------------------------------------------------------


class Gen:
    """Random data, requests and frames from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random, key_prefix: str = "fz:") -> None:
        self.rng = rng
        self.key_prefix = key_prefix

    def text(self, most: int = 12) -> str:
        r = self.rng
        alphabet = ("abcxyz019 :-_", "\u00e9\u4e2d\U0001f600\u0000\ufffe", "\ud800\udfff")
        pool = r.choice(alphabet[:2] if r.random() < 0.95 else alphabet)
        return "".join(r.choice(pool) for _ in range(r.randrange(most + 1)))

    def integer(self) -> int:
        r = self.rng
        return r.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**64),
                         2**100, -(2**200), 10**150, r.randrange(-1000, 1000),
                         r.getrandbits(r.randrange(1, 600))])

    def scalar(self, cbor: bool) -> Any:
        r = self.rng
        choices = [None, True, False, self.integer(), r.uniform(-1e9, 1e9), 0.5, -0.0,
                   self.text(), self.text(40)]
        if cbor:
            choices += [float("nan"), float("inf"), -float("inf"), r.randbytes(r.randrange(20)),
                        cbor2.undefined, cbor2.CBORSimpleValue(r.choice([0, 19, 32, 255])),
                        cbor2.CBORTag(r.choice([0, 1, 2, 3, 4, 5, 24, 32, 37, 258, 55799,
                                                1004, 2**20, 2**63]),
                                      r.choice([0, "x", b"\x01" * r.choice([1, 64, 65, 300]),
                                                [1, 2], {"a": 1}]))]
        return r.choice(choices)

    def value(self, cbor: bool, depth: int = 0) -> Any:
        r = self.rng
        if depth > 4 or r.random() < 0.5:
            return self.scalar(cbor)
        if r.random() < 0.5:
            return [self.value(cbor, depth + 1) for _ in range(r.randrange(5))]
        out: dict = {}
        for _ in range(r.randrange(5)):
            k: Any = self.text(6)
            if cbor and r.random() < 0.2:
                k = r.choice([1, -5, b"k", 2.5, None, True])
            out[k] = self.value(cbor, depth + 1)
        return out

    def nested(self, depth: int) -> list:
        out: list = []
        for _ in range(depth - 1):
            out = [out]
        return out

    def key(self, cbor: bool) -> Any:
        r = self.rng
        x = r.random()
        if x < 0.8:
            return f"{self.key_prefix}{r.randrange(FUZZ_KEYS)}"
        if x < 0.85:
            return ""
        if x < 0.9:
            return self.key_prefix + "k" * 1100  # over 1024 bytes: too_large
        return self.value(cbor)

    def request_id(self, cbor: bool) -> Any:
        r = self.rng
        return r.choice([r.randrange(10**6), -r.randrange(10**6), self.text(8), 2**70,
                         -(2**64), 1.5, True, None, [1], {"id": 1}, "",
                         r.randrange(10**6), r.randrange(10**6)]
                        + ([b"id", cbor2.CBORTag(1, 0), cbor2.undefined] if cbor else []))

    def argument(self, name: str, cbor: bool) -> Any:
        r = self.rng
        if r.random() < 0.35:
            return self.value(cbor)
        if name == "key":
            return self.key(cbor)
        if name == "keys":
            return [self.key(cbor) for _ in range(r.randrange(6))]
        if name == "items":
            return {f"{self.key_prefix}{r.randrange(FUZZ_KEYS)}": self.value(cbor)
                    for _ in range(r.randrange(5))}
        if name == "ttl":
            return r.choice([None, 0, -1, 0.001, 30, 1e9, 1e9 + 1, 1e300, "5", True])
        if name in ("nx", "xx"):
            return r.choice([True, False, 1, "yes", None])
        if name == "delta":
            return r.choice([1, -1, 0, 2**63 - 1, -(2**63), 2**63, 1.0, True, "1"])
        if name == "entries":
            return [self.entry(cbor) for _ in range(r.randrange(4))]
        if name == "digests":
            return {r.randrange(300): r.getrandbits(r.choice([8, 64, 65]))
                    for _ in range(r.randrange(4))}
        if name == "at":
            return r.choice([[r.getrandbits(48), r.randrange(10)], [1], "x", -1, [2**70, 0]])
        if name == "match":
            return r.choice(["*", "fz:1*", "[", "[!a-", "?" * 2000, "\\", ""])
        if name == "count":
            return r.choice([1, 100, 10_000, 10_001, 0, -1, 2**70, 1.5, "9"])
        if name in ("cursor", "after"):
            return r.choice([None, "", "WzEsImEiXQ", "!!", [1, "a"], [2**40, "k"], [-1, ""]])
        return self.value(cbor)

    def entry(self, cbor: bool) -> Any:
        r = self.rng
        entry = {"key": self.key(cbor), "value": self.value(cbor),
                 "at": [r.getrandbits(r.choice([20, 48, 70])), r.randrange(5)],
                 "exp": r.choice([None, 0, 1e12, -5, "x"])}
        for name in list(entry):
            if r.random() < 0.1:
                del entry[name]
        return entry

    def request(self, cbor: bool, ops=OPS) -> Any:
        """A request: mostly well-formed, with random ops, argument types and ids."""
        r = self.rng
        names = [n for n in ops if n not in EMPTYING]
        op: Any = (r.choice([*names, "nope", "GET", ""]) if r.random() < 0.9
                   else self.value(cbor))
        obj: dict = {"id": self.request_id(cbor), "op": op}
        for name in ARG_NAMES:
            if r.random() < 0.3:
                obj[name] = self.argument(name, cbor)
        if isinstance(op, str) and op in OPS:  # mostly what the op needs: reach the store
            for arg in OPS[op].args:
                if arg.name not in obj and r.random() < 0.8:
                    obj[arg.name] = self.argument(arg.name, cbor)
        for name in list(obj):
            if r.random() < 0.03:
                del obj[name]
        return obj

    def structure(self, cbor: bool) -> Any:
        """One frame's content: a request, a batch (nested, empty, wrong items), or not
        a request at all."""
        r = self.rng
        x = r.random()
        if x < 0.45:
            return self.request(cbor, CLIENT_OPS)
        if x < 0.6:
            return self.request(cbor)
        if x < 0.8:
            return [self.request(cbor) for _ in range(r.randrange(12))]
        if x < 0.85:
            return [[self.request(cbor)], self.request(cbor), 5, None]
        if x < 0.9:
            return self.nested(r.choice([30, 33, 129, 200]))
        return self.value(cbor)

    def encode(self, obj: Any, cbor: bool) -> bytes:
        """``obj`` in CBOR (sometimes with sharing or string references) or JSON (NaN
        and unescaped lone surrogates allowed); b"" when it cannot be encoded."""
        r = self.rng
        try:
            if cbor:
                options = r.choice([{}, {}, {"value_sharing": True},
                                    {"string_referencing": True}, {"canonical": True}])
                return cbor2.dumps(obj, **options)
            return json.dumps(obj, ensure_ascii=r.random() < 0.5).encode("utf-8",
                                                                           "surrogatepass")
        except (TypeError, ValueError, OverflowError, cbor2.CBOREncodeError, RecursionError):
            return b""

    def mutate(self, payload: bytes) -> bytes:
        r = self.rng
        raw = bytearray(payload)
        for _ in range(r.randrange(1, 5)):
            if not raw:
                break
            i = r.randrange(len(raw))
            choice = r.randrange(3)
            if choice == 0:
                raw[i] = r.randrange(256)
            elif choice == 1:
                del raw[i]
            else:
                raw.insert(i, r.randrange(256))
        return bytes(raw)

    def client_frame(self) -> tuple[bytes, bool, str]:
        """(payload, binary, kind): one hostile client frame, small (see
        :meth:`large_client_frame` for the big ones)."""
        r = self.rng
        cbor = r.random() < 0.5
        x = r.random()
        if x < 0.12:
            return r.randbytes(r.randrange(200)), cbor, "random bytes"
        if x < 0.17:
            special = [b"NaN", b"[Infinity]", b'{"id":1,"op":"set","key":"fz:1","value":NaN}',
                       b"1" * 5000, b'{"id":' + b"9" * 4400 + b',"op":"ping"}',
                       b'{"id":1,"id":2,"op":"ping"}', b"\xff\xfe", b"", b" ",
                       b'{"id":"\\ud800","op":"ping"}',
                       b'{"id":1,"op":"set","key":"fz:s","value":"\\udfff"}',
                       b'{"id":1,"op":"set","key":"\\ud800","value":1}']
            return r.choice(special), False, "special JSON"
        if x < 0.22:
            special = [b"\x9f\x9f\x9f", b"\x5f\x41a\x41b\xff", b"\xbf\x61a\x01\xff",  # indef.
                       b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x7b" + b"\xff" * 8,
                       b"\xd8\x1c\x81\xd8\x1d\x00", b"\xf9\x7e\x00", b"\x1c", b"\xff",
                       cbor2.dumps({"id": 1, "op": "ping"}) + b"\x00",
                       b"\xa2\x62id\x01\x62op\x64ping"]
            return r.choice(special), True, "special CBOR"
        payload = self.encode(self.structure(cbor), cbor)
        if x < 0.35 and payload:
            return payload[:r.randrange(len(payload))], cbor, "truncated"
        if x < 0.5 and payload:
            return self.mutate(payload), cbor, "mutated"
        return payload, cbor, "structure"

    def large_client_frame(self, max_message: int) -> tuple[bytes, bool, str]:
        """A big frame: over the size limit, a batch over 10000 requests, a frame of
        tiny requests, or a deep nesting that fits in the limit."""
        r = self.rng
        cbor = r.random() < 0.5
        kind = r.randrange(5)
        if kind == 0:
            return r.randbytes(max_message + 1 + r.randrange(1000)), cbor, "over the limit"
        if kind == 1:
            batch = [{"id": i, "op": "ping"} for i in range(10_001)]
            return self.encode(batch, cbor), cbor, "batch of 10001"
        if kind == 2:  # a million tiny items: the reply would pass 64 MiB
            n = max_message // 4
            if cbor:
                return b"\x9a" + struct.pack(">I", n) + b"\x00" * n, True, "tiny batch"
            return b"[" + b"0," * (n - 1) + b"0]", False, "tiny batch"
        if kind == 3:
            depth = max_message // 4
            if cbor:
                return b"\x81" * depth + b"\x80", True, "deep nesting"
            return b"[" * depth + b"]" * depth, False, "deep nesting"
        value = "v" * (max_message // 2)
        return self.encode({"id": 1, "op": "set", "key": "fz:big", "value": value}, cbor), \
            cbor, "large value"


# -- judging client replies ---------------------------------------------------------------


def _expected_id(obj: Any) -> Any:
    """The id docs/protocol.md says a reply to ``obj`` carries: its own when an
    integer or a (valid Unicode) string, else null."""
    if not isinstance(obj, dict):
        return None
    rid = obj.get("id")
    if isinstance(rid, str):
        try:
            rid.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool):
        return rid
    return None


def _check_one(reply: Any, request: Any) -> str | None:
    if not isinstance(reply, dict) or "id" not in reply or not isinstance(reply.get("ok"), bool):
        return f"not a reply object: {reply!r:.200}"
    if reply["ok"]:
        op = request.get("op") if isinstance(request, dict) else None
        if op not in CLIENT_OPS:
            return f"ok for op {op!r:.50}: {reply!r:.200}"
        missing = RESULT_FIELDS[op] - set(reply)
        if missing:
            return f"{op} reply without {sorted(missing)}: {reply!r:.200}"
        return None
    error = reply.get("error")
    if (not isinstance(error, dict) or error.get("code") not in DOCUMENTED_CODES
            or not isinstance(error.get("message"), str)):
        return f"undocumented error reply: {reply!r:.200}"
    return None


def _whole_frame_refusal(reply: Any) -> bool:
    return (isinstance(reply, dict) and reply.get("id") is None and reply.get("ok") is False
            and isinstance(reply.get("error"), dict)
            and reply["error"].get("code") in ("bad_request", "too_large"))


def check_client_reply(payload: bytes, binary: bool, reply_payload: Any) -> str | None:
    """Why the node's answer to a frame breaks docs/protocol.md, or None.

    What the frame holds is read with ``swarm.protocol.wire.decode_frame``, the module
    the protocol names as the home of its decoding rules; a reply may always be a
    whole-frame refusal (id null), as for sharing, expansion and decoding budgets."""
    if isinstance(reply_payload, str) == binary:
        return "the reply is not in the encoding of the frame"
    try:
        reply = cbor2.loads(reply_payload) if binary else json.loads(reply_payload)
    except Exception as e:
        return f"the reply does not decode: {e}"
    try:
        decoded: Any = decode_frame(payload, binary)
    except SwarmError:
        return None if _whole_frame_refusal(reply) else f"undecodable frame got {reply!r:.200}"
    if isinstance(decoded, list):
        if _whole_frame_refusal(reply):
            return None
        if not isinstance(reply, list) or len(reply) != len(decoded):
            return f"a batch of {len(decoded)} got {reply!r:.200}"
        for request, one in zip(decoded, reply):
            if len(decoded) > 10_000 and (one.get("error") or {}).get("code") != "too_large":
                return f"a batch over 10000 got {one!r:.200}"
            problem = _check_one(one, request)
            if problem is None and one["id"] != _expected_id(request):
                problem = f"id {one['id']!r:.50} for request {request!r:.100}"
            if problem:
                return problem
        return None
    problem = _check_one(reply, decoded)
    if problem is None and reply["id"] != _expected_id(decoded) and not _whole_frame_refusal(reply):
        problem = f"id {reply['id']!r:.50} for request {decoded!r:.100}"
    return problem


# -- peer messages ----------------------------------------------------------------------


def _holds_unsupported(obj: Any) -> bool:
    """Whether ``obj`` decodes, in a node, to something holding
    ``swarm.protocol.wire.Unsupported`` (a tag or a bignum over 64 bytes)."""
    if isinstance(obj, cbor2.CBORTag):
        return True
    if isinstance(obj, int) and not isinstance(obj, bool):
        return abs(obj).bit_length() > 64 * 8 - (obj < 0)
    if isinstance(obj, (list, tuple)):
        return any(_holds_unsupported(x) for x in obj)
    if isinstance(obj, dict):
        return any(_holds_unsupported(x) for item in obj.items() for x in item)
    return False


class PeerGen(Gen):
    """Forged messages for a peer that passed the handshake. Announcements name only
    ``bogus-`` nodes (and the target itself, whose newer record it answers): they may
    list real nodes, but no real node lists them, so none becomes reachable; forging a
    record of another real node is an authenticated peer's power by design
    (docs/security.md) and would disturb the bystander, so it is not sent."""

    def __init__(self, rng: random.Random, target: str, real: list[str]) -> None:
        super().__init__(rng)
        self.target = target
        self.real = real
        self.bogus_sent: set[str] = set()

    def request_id(self, cbor: bool) -> Any:
        """Any id but one holding a CBOR tag or a bignum over 64 bytes: a node echoes
        such an id into a reply it cannot encode (the bug test_live_fuzz.py's
        ``test_a_forwarded_request_with_a_tagged_id_is_answered`` shows)."""
        for _ in range(50):
            rid = super().request_id(cbor)
            if not _holds_unsupported(rid):
                return rid
        return 1

    def bogus_id(self) -> str:
        r = self.rng
        n = r.choice([4, 8, 40, 250])
        return "bogus-" + "".join(r.choice("abcdef0123\u00e9") for _ in range(n))

    def announcement(self, big: bool = False) -> dict:
        r = self.rng
        node = self.target if r.random() < 0.03 else self.bogus_id()
        count = 1024 if big else r.randrange(8)
        links = [self.bogus_id() if r.random() < 0.7 else r.choice(self.real)
                 for _ in range(count)]
        ann = {"node": node, "inc": r.choice([0, 1, r.getrandbits(48), 2**64 - 1]),
               "seq": r.choice([0, 1, r.getrandbits(40), 2**64 - 1]), "links": links}
        if r.random() < 0.1:
            ann["leaving"] = True
        if node != self.target:
            self.bogus_sent.add(node)
        return ann

    def good_message(self, rid: int) -> dict:
        """:meth:`valid_message`, drawn again until CBOR can carry it (no lone
        surrogates)."""
        for _ in range(50):
            msg = self.valid_message(rid)
            try:
                cbor2.dumps(msg)
            except (ValueError, TypeError, cbor2.CBOREncodeError):
                continue
            return msg
        return {"t": "rep", "rid": rid, "rep": {}}

    def valid_message(self, rid: int) -> dict:
        """A message of a valid shape (the node must take it and stay linked): an lsa
        of bogus nodes, a request with random content, or a reply nobody asked for."""
        r = self.rng
        x = r.random()
        if x < 0.3:
            return {"t": "lsa", "anns": [self.announcement() for _ in range(r.randrange(6))]}
        if x < 0.85:
            msg = {"t": "req", "rid": rid, "ms": r.choice([0, 1, 50, 2000, 5000]),
                   "hops": r.choice([0, 1, 3, 32, 255]), "req": self.request(True)}
            if r.random() < 0.4:
                msg["to"] = r.choice([*self.real, self.bogus_id(), "nobody"])
            return msg
        rep = self.value(True)
        return {"t": "rep", "rid": r.getrandbits(r.choice([8, 32, 64])),
                "rep": rep if isinstance(rep, dict) else {"id": 1, "ok": True}}

    def terminal(self) -> tuple[bytes, bool, str]:
        """(payload, binary, what): a frame the peer protocol refuses with 4001."""
        r = self.rng
        cases = [
            (cbor2.dumps([{"t": r.choice(["nope", "HELLO", "", 5, None])}]), "unknown type"),
            (cbor2.dumps([{"t": "hello", "node": "x", "proto": 2, "swarm": "swarmcache",
                           "inc": 1}]), "second hello"),
            (cbor2.dumps([{"t": "auth", "mac": bytes(32)}]), "auth when linked"),
            (cbor2.dumps([{"t": "lsa", "anns": [dict(self.announcement(big=True),
                                                     links=["x"] * 1025)]}]), "1025 links"),
            (cbor2.dumps([{"t": "lsa", "anns": [{"node": "", "inc": 1, "seq": 1,
                                                 "links": []}]}]), "empty node id"),
            (cbor2.dumps([{"t": "lsa", "anns": [{"node": "x" * 257, "inc": 1, "seq": 1,
                                                 "links": []}]}]), "257-char node id"),
            (cbor2.dumps([{"t": "lsa", "anns": [{"node": "bogus-q", "inc": -1, "seq": 1,
                                                 "links": []}]}]), "negative inc"),
            (cbor2.dumps([{"t": "lsa", "anns": [{"node": "bogus-q", "inc": 1, "seq": 1,
                                                 "links": [1, 2]}]}]), "links not ids"),
            (cbor2.dumps([{"t": "lsa", "anns": {"node": "bogus-q"}}]), "anns not a list"),
            (cbor2.dumps([{"t": "req", "rid": 2**64, "ms": 1, "hops": 1,
                           "req": {"id": 1, "op": "ping"}}]), "rid over 64 bits"),
            (cbor2.dumps([{"t": "req", "rid": 1, "ms": 10**12, "hops": 1,
                           "req": {"id": 1, "op": "ping"}}]), "ms over a day"),
            (cbor2.dumps([{"t": "req", "rid": 1, "ms": 1, "hops": 256,
                           "req": {"id": 1, "op": "ping"}}]), "hops over 255"),
            (cbor2.dumps([{"t": "req", "rid": 1, "ms": 1, "hops": 1, "req": [1]}]),
             "req not a map"),
            (cbor2.dumps([{"t": "req", "rid": 1, "ms": 1, "hops": 1,
                           "req": {"id": 1, "op": "ping"}, "to": ""}]), "empty to"),
            (cbor2.dumps([{"t": "rep", "rid": "x", "rep": {}}]), "rid not an int"),
            (cbor2.dumps({"t": "lsa", "anns": []}), "not an array"),
            (cbor2.dumps([5]), "message not a map"),
            (r.randbytes(r.randrange(1, 64)) + b"\xff", "garbage"),
            (self.mutate(cbor2.dumps([self.good_message(1)]))[:-1] + b"\xff\xff", "mutated"),
        ]
        payload, what = r.choice(cases)
        return payload, True, what


# -- a raw WebSocket client ---------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
             rsv: int = 0, length: int | None = None) -> bytes:
    """One WebSocket frame, possibly a lie: ``length`` overrides the real length."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 2**16:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if not mask:
        return bytes(head) + payload
    key = b"\x5a\x13\xc7\x01"
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWS:
    """A WebSocket connection made by hand over asyncio streams: sends any bytes,
    reads the server's frames (answering pings), tells how the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str = "/", timeout: float = 5.0) -> "RawWS":
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
        key = base64.b64encode(b"fuzz-key-16bytes").decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"upgrade refused: {head[:100]!r}")
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next data or close frame: (opcode, payload); pings are answered."""
        while True:
            b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            payload = await asyncio.wait_for(self.reader.readexactly(n), timeout)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.send(ws_frame(0xA, payload))
            elif opcode != 0xA:
                return opcode, payload

    async def close_code(self, timeout: float = 10.0) -> int:
        """Read until the server closes: its close code, 1005 for a close frame without
        one, -1 for a connection dropped without a close frame."""
        try:
            while True:
                opcode, payload = await self.recv(timeout)
                if opcode == 0x8:
                    self.send(ws_frame(0x8, payload[:2]))
                    return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        except (asyncio.IncompleteReadError, ConnectionError):
            return -1
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.transport.abort()


