"""Frames <-> request and reply dicts: decoding, validation and encoding in one place.

A text frame carries JSON and a binary frame CBOR; the reply uses the frame's encoding.
Everything a client sends passes through :func:`decode_frame` and
:meth:`RequestParser.parse` before any other part of the node looks at it, so a request
that reaches a handler is already well-formed: its op is known, its arguments present and
of the right type, its values within the depth limit and free of types the other encoding
cannot carry.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import cbor2

from swarm.errors import BadRequest, SwarmError, TooLarge, UnknownOp
from swarm.protocol import scan
from swarm.protocol.entry import Entry, version_from_wire
from swarm.protocol.ops import CLIENT_OPS, OPS, Kind

#: The largest absolute integer ``incr`` and ``delta`` accept: a signed 64-bit range,
#: so counters behave the same for clients in every language.
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

#: Integers inside values must fit CBOR's native 64-bit range (JSON has no limit, but
#: clients in most languages do, and a bignum may not survive a JSON reply).
VALUE_INT_MIN = -(2**64)
VALUE_INT_MAX = 2**64 - 1

#: The longest ttl accepted, in seconds (about 30 years); longer means "forever" anyway.
MAX_TTL = 1e9
#: The longest node id a client may name (as membership accepts from peers).
MAX_NODE_ID_BYTES = 256


@dataclass(frozen=True)
class Limits:
    """What a node accepts in one request."""

    max_key_bytes: int = 1024
    max_depth: int = 32
    max_batch: int = 10_000
    #: A reply frame may take this many encoded bytes; the replies past it are
    #: answered ``too_large`` (a big ``mget``, a batch of large ``get``s).
    max_reply_bytes: int = 64 * 1024 * 1024


# -- frames -----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number")


#: A decoded CBOR frame may weigh (by :func:`weigh`) at most this many times its
#: encoded bytes, plus EXPANSION_SLACK. Plain CBOR stays well under it (a small integer
#: takes 1 byte and weighs 8); only shared references (tags 28/29) and string
#: references (tags 25/256) can go beyond.
EXPANSION_FACTOR = 16
EXPANSION_SLACK = 64 * 1024

#: What decoding a frame may allocate, estimated by :func:`scan_cbor` before cbor2 runs:
#: at most DECODE_FACTOR times the frame's bytes plus DECODE_SLACK. Python objects cost
#: far more than their CBOR (an empty array is 1 byte and 64 in memory, a one-entry map
#: 4 bytes and 184), so without it a 4 MiB frame of empty arrays decodes to 560 MiB.
#: Honest frames stay below: a batch of small requests is about 20 times its bytes.
DECODE_FACTOR = 32
DECODE_SLACK = 5 * 1024 * 1024
#: The deepest nesting of arrays, maps and tags a frame may have (values: 32 levels,
#: see :class:`Limits`; the rest is room for batches, requests and peer messages).
MAX_FRAME_DEPTH = 128
#: Frames shorter than this skip the scan: they cannot decode to more than about
#: 72 times their size (an empty map per byte), which is DECODE_SLACK at most. The scan
#: costs about five times cbor2's own decoding (0.8 ms for a batch of 256 sets of 100
#: bytes, 34 KB), so the frames of ordinary batches are kept below it.
SCAN_FROM = 64 * 1024

#: The tags a frame may use as CBOR structure (string references 25/256, shared values
#: 28/29, self-described CBOR 55799); checked by :func:`weigh` after decoding.
STRUCTURAL_TAGS = frozenset({25, 28, 29, 256, 55799})
#: Tags that need all of a frame's bytes searched before cbor2 runs (references).
_REFERENCE_HEADS = tuple(
    head + tag.to_bytes(width, "big")
    for tag in (25, 29)
    for head, width in ((b"\xd8", 1), (b"\xd9", 2), (b"\xda", 4), (b"\xdb", 8))
)
#: What every one of those heads starts with: one search that finds none of it (as in
#: most frames) saves searching for each head (0.3 instead of 1.6 µs a small frame).
_REFERENCE_LEAD = re.compile(rb"[\xd8-\xdb][\x00\x19\x1d]")


class Unsupported:
    """What a CBOR tag outside STRUCTURAL_TAGS decodes to: no Python object of the
    tag's meaning (datetime, Decimal, regex, set, a bignum from 1 MB of bytes...) is
    ever built, so a tag costs nothing to decode, and :func:`check_value` and every
    argument check refuse it, with the request's own id."""

    __slots__ = ("tag", "reason")

    def __init__(self, tag: int, reason: str = "") -> None:
        self.tag = tag
        self.reason = reason or f"values may not hold CBOR tag {tag} (only plain data)"

    def __repr__(self) -> str:
        return f"Unsupported({self.tag})"


#: The longest bignum (tags 2/3) converted to an int: ids may be any integer, values
#: 64-bit ones (see :func:`check_value`); a longer one decodes to Unsupported, so a
#: frame repeating a big byte string by reference never builds big ints from it.
MAX_BIGNUM_BYTES = 64


def _bignum(tag: int) -> Callable[..., Any]:
    """Tag 2/3 (bignum): an int of at most MAX_BIGNUM_BYTES, else Unsupported."""

    def decode(content: Any, immutable: bool = False) -> Any:
        if isinstance(content, bytes) and len(content) <= MAX_BIGNUM_BYTES:
            n = int.from_bytes(content, "big")
            return n if tag == 2 else -1 - n
        return Unsupported(tag, f"integers in a CBOR frame may have at most {MAX_BIGNUM_BYTES} bytes")

    return decode


def _refuse(tag: int) -> Callable[..., Any]:
    return lambda content, immutable=False: Unsupported(tag)


#: Every tag cbor2 would turn into a Python object of its own (checked against cbor2 6:
#: dates, bignums, decimals, bigfloats, rationals, regexps, MIME, UUIDs, IP addresses,
#: sets...), overridden; tags cbor2 does not know go to :func:`_unknown_tag`.
_SEMANTIC_DECODERS: dict[int, Callable[..., Any]] = {
    tag: _refuse(tag)
    for tag in (0, 1, 4, 5, 30, 35, 36, 37, 52, 54, 100, 258, 260, 261, 1004, 43000)
}
_SEMANTIC_DECODERS.update({2: _bignum(2), 3: _bignum(3)})


def _unknown_tag(tag: cbor2.CBORTag, immutable: bool = False) -> Unsupported:
    return Unsupported(tag.tag)


def _no_references(content: Any, immutable: bool = False) -> Any:
    raise ValueError("string references and shared values are not accepted here")


#: For frames that may not use references (between nodes, whose encoders never make
#: them): a reference tag fails the decode where it is met, so nothing needs
#: searching for them first nor walking after.
_NO_REFERENCE_DECODERS = {
    **_SEMANTIC_DECODERS, **{tag: _no_references for tag in (25, 28, 29, 256)}}


def decode_cbor(payload: bytes, scan_from: int = SCAN_FROM, references: bool = True) -> Any:
    """One CBOR item and nothing after it, within the decoding and expansion budgets.

    Frames of ``scan_from`` bytes or more are scanned first (:func:`scan_cbor`); every
    frame decodes with tags turned into :class:`Unsupported`. With ``references``
    (client frames) string references and shared values are accepted, and the walk
    that refuses shared containers and expansion runs when the frame may hold one;
    without, a frame that holds one fails to decode, which costs no search of its
    bytes (the search alone is about 4 ns a byte).
    """
    walk = references
    if len(payload) >= scan_from:
        walk = scan_cbor(payload, DECODE_FACTOR * len(payload) + DECODE_SLACK) and walk
    elif walk and (_REFERENCE_LEAD.search(payload) is None or not any(
            head in payload for head in _REFERENCE_HEADS)):
        walk = False
    stream = io.BytesIO(payload)
    obj = cbor2.CBORDecoder(
        stream,
        semantic_decoders=_SEMANTIC_DECODERS if references else _NO_REFERENCE_DECODERS,
        tag_hook=_unknown_tag,
        max_depth=MAX_FRAME_DEPTH,
    ).decode()
    if stream.tell() != len(payload):
        raise BadRequest("frame holds bytes after its CBOR item")
    if walk:
        check_expansion(obj, EXPANSION_FACTOR * len(payload) + EXPANSION_SLACK)
    return obj


#: The estimated cost in memory of each decoded item, by CBOR major type (see
#: :func:`scan_cbor`): a slot in its container plus the object (small ints are shared).
_ITEM_COST = 8
_LIST_COST = 56
_MAP_COST = 64  # empty; with entries, 112 + 24 each (a hash table a third empty)
_MAP_ENTRY_COST = 24
_STRING_COST = 50  # strings of 0 or 1 byte are shared singletons
_NUMBER_COST = 32
_TAG_COST = 48


def scan_cbor(data: bytes, budget: int) -> bool:
    """Walk the CBOR heads of ``data`` without building anything; return whether it
    uses string or shared references (tags 25/29).

    Raises :class:`BadRequest` for a truncated or malformed item, a length longer
    than the bytes left, nesting past MAX_FRAME_DEPTH, trailing bytes; and
    :class:`TooLarge` when what cbor2 would allocate passes ``budget`` (estimated per
    item, as Python objects cost). Iterative, O(items), and it stops at the first
    fault, so its cost is bounded by the frame's size whatever the frame holds.
    """
    n = len(data)
    pos = 0
    references = False
    cost = 0
    # items left to read in each open container; -1: indefinite (ends with a break)
    left = [1]
    while left:
        if pos >= n:
            raise BadRequest("frame is not valid CBOR: it ends inside an item")
        head = data[pos]
        pos += 1
        major = head >> 5
        info = head & 31
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if pos + width > n:
                raise BadRequest("frame is not valid CBOR: it ends inside an item")
            arg = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        elif info == 31 and major in (2, 3, 4, 5, 7):
            arg = -1
        else:
            raise BadRequest(f"frame is not valid CBOR: reserved head byte 0x{head:02x}")
        if major == 7 and arg == -1:  # break
            if left[-1] != -1:
                raise BadRequest("frame is not valid CBOR: a break outside an indefinite item")
            left.pop()
        else:
            if left[-1] > 0:
                left[-1] -= 1
            elif left[-1] == -2:
                left[-1] = 0
            if major == 6:  # a tag: its content is one item, one level deeper
                if arg in (25, 29):
                    references = True
                elif arg not in STRUCTURAL_TAGS:
                    cost += _TAG_COST  # an Unsupported in place of the content
                if len(left) >= MAX_FRAME_DEPTH:
                    raise BadRequest("frame is nested too deeply")
                left.append(-2)
                continue
            if major <= 1:
                cost += _ITEM_COST + (_NUMBER_COST if arg > 256 else 0)
            elif major <= 3:
                if arg == -1:  # chunks of definite strings follow, until a break
                    left.append(-1)
                    cost += _ITEM_COST + _STRING_COST
                else:
                    if arg > n - pos:
                        raise BadRequest("frame is not valid CBOR: a string longer than the frame")
                    pos += arg
                    cost += _ITEM_COST + (_STRING_COST + arg if arg > 1 else 0)
            elif major <= 5:
                if arg == -1:
                    cost += _ITEM_COST + (_LIST_COST if major == 4 else _MAP_COST)
                    left.append(-1)
                else:
                    if arg > (n - pos) >> (major - 4):
                        raise BadRequest("frame is not valid CBOR: a container longer than the frame")
                    cost += _ITEM_COST + (
                        _LIST_COST + 8 * arg if major == 4
                        else _MAP_COST + (48 + _MAP_ENTRY_COST * arg if arg else 0)
                    )
                    if arg:
                        left.append(arg if major == 4 else 2 * arg)
                if len(left) > MAX_FRAME_DEPTH:
                    raise BadRequest("frame is nested too deeply")
            else:
                cost += _ITEM_COST + (_NUMBER_COST if info >= 25 else 0)
            if cost > budget:
                raise TooLarge(
                    f"frame would decode to more than {budget} bytes of memory"
                )
        while left and left[-1] == 0:
            left.pop()
    if pos != n:
        raise BadRequest("frame holds bytes after its CBOR item")
    return references


def check_expansion(obj: Any, budget: int) -> None:
    """Refuse a decoded frame that shares containers or weighs more than ``budget``.

    CBOR can say "the same object again" in a few bytes, so a small frame could stand
    for an enormous tree, or a reply that repeats a large id thousands of times.
    """
    if weigh(obj, budget, refuse_shared=True) > budget:
        raise TooLarge("frame decodes to far more data than it carries")


def weigh(obj: Any, budget: int, refuse_shared: bool = False) -> int:
    """About how many bytes ``obj`` takes: 8 per element plus the length of strings.

    A fast bound for frames and replies; what the store charges is
    :func:`swarm.store.memory.measure`.

    Stops as soon as the weight passes ``budget`` (and returns it), so the walk costs
    O(budget / 8) however the object is built.
    """
    stack = [obj]
    seen: set[int] = set()
    spent = 0
    while stack and spent <= budget:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            spent += 8 + len(item)
        elif isinstance(item, (list, dict)):
            if refuse_shared:
                if id(item) in seen:
                    raise BadRequest("frame shares a container between places (CBOR tag 29)")
                seen.add(id(item))
            spent += 8
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
        else:
            spent += 8
    return spent


def decode_frame(payload: bytes, is_binary: bool) -> Any:
    """Decode one frame's payload; any failure is a :class:`BadRequest`."""
    try:
        if is_binary:
            return decode_cbor(payload)
        text = payload.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except SwarmError:
        raise
    except UnicodeDecodeError:
        raise BadRequest("text frame is not valid UTF-8") from None
    except RecursionError:
        raise BadRequest("frame is nested too deeply") from None
    except ValueError as e:
        if not is_binary and "digits" in str(e):  # Python's int-conversion limit
            raise BadRequest(
                "frame is not valid JSON: a number with more than "
                f"{sys.get_int_max_str_digits()} digits"
            ) from None
        kind = "CBOR" if is_binary else "JSON"
        raise BadRequest(f"frame is not valid {kind}: {e}") from None
    except Exception as e:
        kind = "CBOR" if is_binary else "JSON"
        raise BadRequest(f"frame is not valid {kind}: {e}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return {"$base64": base64.b64encode(obj).decode("ascii")}
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_json_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
)


def encode_frame(obj: Any, is_binary: bool) -> bytes:
    """Encode a reply (or a batch of replies) in the encoding of the request's frame.

    JSON has no byte strings: a byte-string value stored by a CBOR client reaches a JSON
    client as ``{"$base64": "..."}``.
    """
    if is_binary:
        return cbor2.dumps(obj)
    return _json_encoder.encode(obj).encode("utf-8")


def join_frame(encoded: list[bytes], is_binary: bool) -> bytes:
    """One array frame of items each already encoded by :func:`encode_frame`.

    Encoding items one by one tells their sizes before the frame is built, so a sender
    can cut frames exactly where they would grow too big.
    """
    if not is_binary:
        return b"[" + b",".join(encoded) + b"]"
    return cbor_array_head(len(encoded)) + b"".join(encoded)


def cbor_array_head(count: int) -> bytes:
    """The head of a definite-length CBOR array (major type 4) of ``count`` items."""
    if count < 24:
        return bytes([0x80 + count])
    for extra, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if count < 1 << (8 * width):
            return bytes([0x80 + extra]) + count.to_bytes(width, "big")
    raise ValueError("array too long for CBOR")


# -- replies ----------------------------------------------------------------------------


def ok_reply(request_id: Any, results: dict) -> dict:
    reply = {"id": request_id, "ok": True}
    reply.update(results)
    return reply


def error_reply(request_id: Any, error: SwarmError) -> dict:
    return {"id": request_id, "ok": False, "error": error.to_wire()}


def request_id(obj: Any) -> Any:
    """The id to echo for ``obj``: its own when valid, else null."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if valid_id(rid):
            return rid
    return None


def valid_id(rid: Any) -> bool:
    if isinstance(rid, str):  # lone surrogates (JSON's "\\ud800"): no reply holds them
        try:
            utf8_size(rid)
        except BadRequest:
            return False
        return True
    return isinstance(rid, int) and not isinstance(rid, bool)


def utf8_size(s: str) -> int:
    """Bytes of ``s`` in UTF-8; :class:`BadRequest` if it is not valid Unicode."""
    if s.isascii():
        return len(s)
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("strings may not hold lone surrogates") from None


# -- argument validators ----------------------------------------------------------------


def check_value(value: Any, max_depth: int) -> None:
    """Raise :class:`BadRequest` unless ``value`` is plain data both encodings carry.

    Plain data: null, booleans, 64-bit integers, finite floats, valid Unicode strings,
    byte strings (from CBOR), arrays and maps with string keys, nested at most
    ``max_depth`` levels. A container met twice is refused: CBOR's shared references
    (tags 28/29) could otherwise make a tiny frame a tree of billions of nodes.
    """
    stack = [(value, 1)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            utf8_size(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not VALUE_INT_MIN <= item <= VALUE_INT_MAX:
                raise BadRequest("integers in values must fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BadRequest("values may not hold NaN or infinity")
        elif isinstance(item, bytes):
            continue
        elif isinstance(item, Unsupported):
            raise BadRequest(item.reason)
        elif isinstance(item, (list, dict)):
            if depth > max_depth:
                raise BadRequest(f"value is nested deeper than {max_depth} levels")
            if id(item) in seen:
                raise BadRequest("values may not share or repeat containers")
            seen.add(id(item))
            if isinstance(item, dict):
                for k in item:
                    if not isinstance(k, str):
                        raise BadRequest("map keys inside values must be strings")
                    utf8_size(k)
                children: Iterable = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)
        else:
            raise BadRequest(f"values may not hold {type(item).__name__}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RequestParser:
    """Validates decoded request objects against the ops' argument specs.

    ``parse`` returns a new dict holding ``id``, ``op`` and the op's arguments (optional
    arguments only when given); unknown extra fields are dropped, so newer clients can
    send optional fields an older node ignores.
    """

    def __init__(self, limits: Limits = Limits(), internal: bool = False) -> None:
        self.limits = limits
        self._ops = OPS if internal else CLIENT_OPS
        self._internal = internal
        self._validators: dict[str, Callable[[str, Any], Any]] = {
            "key": self._key,
            "value": self._value,
            "ttl": self._ttl,
            "flag": self._flag,
            "delta": self._delta,
            "keys": self._keys,
            "items": self._items,
            "entries": self._entries,
            "digests": self._digests,
            "node": self._node,
            "cursor": self._cursor,
            "match": self._match,
            "count": self._count,
            "position": self._position,
            "version": self._version,
        }

    def parse(self, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise BadRequest("a request must be an object")
        rid = obj.get("id")
        if "id" not in obj or not valid_id(rid):
            raise BadRequest("a request needs an id that is an integer or a string")
        name = obj.get("op")
        if not isinstance(name, str):
            raise BadRequest("a request needs an op that is a string")
        op = self._ops.get(name)
        if op is None:
            raise UnknownOp(f"unknown op {name!r}")
        request = {"id": rid, "op": name}
        for arg in op.args:
            if arg.name in obj:
                request[arg.name] = self._validators[arg.check](arg.name, obj[arg.name])
            elif arg.required:
                raise BadRequest(f"{name} needs the argument {arg.name!r}")
        if op.check is not None and (reason := op.check(request)) is not None:
            raise BadRequest(reason)
        if self._internal and op.kind is Kind.WRITE and "at" in obj:
            # the version a write was stamped with where it entered the swarm
            try:
                request["at"] = version_from_wire(obj["at"])
            except ValueError as e:
                raise BadRequest(f"at: {e}") from None
        return request

    def split(self, decoded: Any) -> tuple[list, bool]:
        """The request objects in a decoded frame, and whether it was a batch."""
        if isinstance(decoded, list):
            if len(decoded) > self.limits.max_batch:
                raise TooLarge(
                    f"a batch holds at most {self.limits.max_batch} requests"
                )
            return decoded, True
        return [decoded], False

    def _key(self, name: str, v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise BadRequest(f"{name} must be a non-empty string")
        size = utf8_size(v)
        if size > self.limits.max_key_bytes:
            raise TooLarge(
                f"key is {size} bytes; the limit is {self.limits.max_key_bytes}"
            )
        return v

    def _value(self, name: str, v: Any) -> Any:
        check_value(v, self.limits.max_depth)
        return v

    def _ttl(self, name: str, v: Any) -> float | None:
        if v is None:
            return None
        if not _is_number(v) or not (0 < v <= MAX_TTL):
            raise BadRequest(f"{name} must be null or a number of seconds in (0, 1e9]")
        return v

    def _flag(self, name: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise BadRequest(f"{name} must be a boolean")
        return v

    def _delta(self, name: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not (
            INT64_MIN <= v <= INT64_MAX
        ):
            raise BadRequest(f"{name} must be a 64-bit integer")
        return v

    def _keys(self, name: str, v: Any) -> list:
        if not isinstance(v, list):
            raise BadRequest(f"{name} must be an array of keys")
        return [self._key("each key", k) for k in v]

    def _items(self, name: str, v: Any) -> dict:
        if not isinstance(v, dict):
            raise BadRequest(f"{name} must be a map of keys to values")
        for k, value in v.items():
            self._key("each key", k)
            self._value("each value", value)
        return v

    def _entries(self, name: str, v: Any) -> list:
        if not isinstance(v, list) or not v:
            raise BadRequest(f"{name} must be a non-empty array of entries")
        for obj in v:
            try:
                entry = Entry.from_wire(obj)
            except ValueError as e:
                raise BadRequest(f"each of {name}: {e}") from None
            self._key("each key", entry.key)
            self._value("each value", entry.value)
        return v

    def _digests(self, name: str, v: Any) -> dict:
        if not isinstance(v, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**64
            for item in v.items() for n in item
        ):
            raise BadRequest(f"{name} must map partition numbers to 64-bit digests")
        return v

    def _node(self, name: str, v: Any) -> str:
        if not isinstance(v, str) or not v or utf8_size(v) > MAX_NODE_ID_BYTES:
            raise BadRequest(f"{name} must be a node id (a non-empty string)")
        return v

    def _cursor(self, name: str, v: Any) -> scan.Position:
        if v is None:
            return scan.START
        if not isinstance(v, str) or len(v) > 8 * self.limits.max_key_bytes + 64:
            raise BadRequest(f"{name} must be the cursor of a previous scan reply, or null")
        try:
            return scan.decode_cursor(v)
        except ValueError as e:
            raise BadRequest(f"{name}: {e}") from None

    def _match(self, name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise BadRequest(f"{name} must be a glob pattern (a string)")
        if utf8_size(v) > self.limits.max_key_bytes:
            raise TooLarge(f"{name} is longer than the longest key")
        return v

    def _count(self, name: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= scan.MAX_COUNT:
            raise BadRequest(f"{name} must be an integer from 1 to {scan.MAX_COUNT:,}")
        return v

    def _position(self, name: str, v: Any) -> scan.Position:
        try:
            return scan.position_from_wire(v)
        except ValueError as e:
            raise BadRequest(f"{name}: {e}") from None

    def _version(self, name: str, v: Any) -> tuple:
        try:
            return version_from_wire(v)
        except ValueError as e:
            raise BadRequest(f"{name}: {e}") from None
