"""Peer frames: CBOR arrays of messages between linked nodes, validated in one place.

Every peer frame is a binary WebSocket message holding a CBOR array of message maps,
so batching many messages in one frame costs nothing extra. Each message has a type
``t``:

``hello``  ``node``, ``proto``, ``swarm``, ``inc``, ``nonce`` (random bytes), ``auth``
           (whether the sender holds a secret), ``batch`` (whether it takes ``breq``),
           ``raw`` (whether it takes ``brep`` with ``raw``), ``sync`` (whether it takes
           ``lsa.sum`` and ``lsa.have``) -- first message each way on a link
``auth``   ``mac``: the sender's proof that it holds the swarm's secret, bound to both
           hellos (:mod:`swarm.mesh.auth`); sent after the peer's hello when secrets
           are in use, and nothing else is accepted until it checks out
``lsa``    ``anns``: membership announcements to merge and flood. The ``lsa`` that
           answers an accepted hello carries the sender's whole database, or, to a
           peer whose hello said ``sync``, none of it and ``sum`` instead: ``digest``
           (:data:`~swarm.mesh.membership.DIGEST_BYTES` bytes), ``count`` and maybe
           ``yours`` (``[inc, seq]``) summarize it
           (:class:`~swarm.mesh.membership.Summary`). A node whose database differs
           answers with an ``lsa`` carrying ``have``: a map of node id to
           ``[inc, seq]`` for every announcement it holds (at most
           :data:`~swarm.mesh.membership.MAX_NODES`), answered in turn by an ``lsa``
           of the announcements that node lacks or holds older. A connection carries
           at most one ``sum`` and one ``have`` each way
``req``    ``rid``, ``ms`` (time left), ``hops`` (hops left), ``req`` (a request),
           optional ``to`` (the node that must run it, else the key's owner does)
``rep``    ``rid``, ``rep`` (the reply to the ``req`` with that ``rid`` on this link)
``breq``   ``rid``, ``ms``, ``hops``, optional ``to`` as in ``req``, and ``reqs``: up to
           :data:`MAX_GROUP_REQUESTS` requests sharing them (:mod:`swarm.mesh.link`),
           optional ``at`` (the index of the first of them in the group ``rid``, when
           the group was cut into several messages); only to a peer whose hello said
           ``batch``
``brep``   ``rid``, ``at``, and ``reps``: the replies to requests ``at`` ... of group
           ``rid``, in order; a group is answered by one or more of them. To a peer
           whose hello said ``raw``, ``raw`` may stand in for ``reps``: the CBOR
           encoding of that array, as bytes, so that a relay passes the replies on
           without decoding or encoding them (:mod:`swarm.mesh.link`); only its head
           (a definite array of 1 to :data:`MAX_GROUP_REQUESTS`) is checked on the
           way, the node that reads the replies checks the rest
``bye``    no fields -- the sender is stopping: route nothing more over this connection
           (as if it were down) but let the requests pending on it finish; a node that
           has not said ``bye`` itself answers with one. Messages on a connection are
           ordered, so once the answer arrives no new request can follow it, and the
           stopping node closes as soon as what it serves is answered

A malformed frame or message raises :class:`PeerProtocolError`; the link is closed.
No node encodes CBOR string references or shared values (tags 25, 28, 29, 256), so a
frame that holds one is malformed: it fails to decode where the tag is met, and peer
frames pay neither the search for reference tags nor the walk after decoding that
client frames pay (:func:`~swarm.protocol.wire.decode_cbor`).
Numbers are bounded, so nothing a peer sends overflows a timer or a float: ``ms`` at
most :data:`MAX_REQUEST_MS` (a day), ``hops`` at most :data:`MAX_HOPS`, ``rid`` and
``inc`` below 2**64.

Close codes (WebSocket application range; the reason says more):

``1001``  the node is shutting down
``1009``  a frame larger than :data:`MAX_PEER_MESSAGE` (Autobahn's own code)
``4000``  refused at hello: another swarm, another protocol version, this node's own id,
          or a first message that is not hello
``4001``  protocol error: a frame or message that is malformed, or a second hello
``4002``  duplicate id: the hello names a node that is already live in the swarm with
          another incarnation (reachable through another link, or linked directly);
          the node so refused reports it (``Overlay.conflict``, ``/health`` 503)
``4003``  this node failed while handling a peer's message (a bug: see its log)
``4004``  not authenticated: a wrong proof (another secret, or a replayed handshake),
          or one side has a secret and the other none
"""

from __future__ import annotations

from typing import Any, Iterator

import cbor2

from swarm.errors import InternalError, TooLarge
from swarm.mesh.auth import NONCE_BYTES, PROOF_BYTES
from swarm.mesh.membership import (
    MAX_COUNTER,
    MAX_ID_BYTES,
    Announcement,
    Summary,
    versions_from_wire,
)
from swarm.protocol.wire import decode_cbor, join_frame

#: 2: entries carry versions (issue 6), and links close in two phases (``bye``).
PROTOCOL_VERSION = 2

#: WebSocket close codes a node uses on peer links (application range 4000-4999).
CLOSE_REFUSED = 4000
CLOSE_PROTOCOL_ERROR = 4001
CLOSE_DUPLICATE_ID = 4002
CLOSE_INTERNAL_ERROR = 4003
CLOSE_UNAUTHORIZED = 4004

#: The longest time left a forwarded request may carry (one day; requests time out in
#: seconds), and the most hops it may have left (the router starts at 32).
MAX_REQUEST_MS = 24 * 3600 * 1000
MAX_HOPS = 255
#: The most requests a ``breq`` may carry (a node sends at most 1024 in one).
MAX_GROUP_REQUESTS = 10_000

class PeerProtocolError(Exception):
    """A peer sent something this node cannot accept."""


#: The largest peer frame a node accepts; a link that receives more is closed (1009).
MAX_PEER_MESSAGE = 64 * 1024 * 1024
#: The largest frame read before the link is up (hello and auth are a few hundred
#: bytes): an unauthenticated peer cannot make this node buffer or decode more.
MAX_HANDSHAKE_MESSAGE = 4096
#: Frames are cut at about this size, so one large reply does not hold up the others.
FRAME_TARGET = 1024 * 1024
#: Peer frames below this size are decoded without the memory scan of client frames
#: (:data:`swarm.protocol.wire.SCAN_FROM`): only a peer that passed the handshake sends
#: frames over MAX_HANDSHAKE_MESSAGE, the frames of batched traffic (tens of KB) would
#: pay five times their decoding for it, and one frame can still build at most about
#: 72 MiB of objects. Larger frames (handoffs, big values) are scanned.
PEER_SCAN_FROM = FRAME_TARGET


def encode_message(msg: dict) -> bytes:
    return cbor2.dumps(msg)


def encode_peer_frame(messages: list[dict]) -> bytes:
    """All ``messages`` in one frame (the inverse of :func:`decode_peer_frame`)."""
    return _frame([encode_message(m) for m in messages])


def _frame(encoded: list[bytes]) -> bytes:
    return join_frame(encoded, True)


#: The list each splittable message carries: a group too large for one frame is cut.
_GROUPED = {"breq": "reqs", "brep": "reps"}


def packed_replies(rid: int, at: int, replies: list[dict]) -> dict:
    """A ``brep`` of ``replies`` sent as ``raw`` (to a peer that takes it): they are
    encoded as one item when the message is (:func:`frames_of`), so a group too
    large for a frame is still cut in halves first."""
    return {"t": "brep", "rid": rid, "at": at, "reps": replies, "pack": True}


def reply_count(raw: bytes) -> int | None:
    """How many replies a ``brep``'s ``raw`` holds, read from its head alone; None
    when it is not a definite CBOR array of 1 to MAX_GROUP_REQUESTS items."""
    if not raw or raw[0] >> 5 != 4:
        return None
    info = raw[0] & 0x1F
    if info < 24:
        count = info
    elif 24 <= info <= 27:
        size = 1 << (info - 24)
        if len(raw) < 1 + size:
            return None
        count = int.from_bytes(raw[1:1 + size], "big")
    else:
        return None
    return count if 0 < count <= MAX_GROUP_REQUESTS else None


def unpack_replies(raw: bytes) -> list[dict]:
    """The replies a ``brep``'s ``raw`` holds, checked as ``reps`` would be."""
    try:
        replies = decode_cbor(raw, PEER_SCAN_FROM, references=False)
    except Exception as e:
        raise PeerProtocolError(f"undecodable brep.raw: {e}") from None
    return _maps({"t": "brep", "raw": replies}, "raw", MAX_GROUP_REQUESTS)


def frames_of(messages: list[dict], refuse) -> Iterator[bytes]:
    """Peer frames holding ``messages`` in order, each about FRAME_TARGET at most.

    Messages are encoded one by one, so a frame is cut exactly where it would grow too
    big; a ``breq`` or ``brep`` larger than FRAME_TARGET is cut in halves (their ``at``
    says where each starts), so a group of large values neither passes the frame
    limit nor holds up other messages; a message that alone exceeds MAX_PEER_MESSAGE,
    or that cannot be encoded at all (a bug or a peer's odd value: it must not cost the
    messages around it, nor a group's other members, as a group is cut down to the one
    that fails), is replaced by what ``refuse(msg, error)`` returns (an encoded
    message, or None to drop it).
    """
    chunk: list[bytes] = []
    size = 0
    for data in _encoded(messages, refuse):
        if chunk and size + len(data) > FRAME_TARGET:
            yield _frame(chunk)
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield _frame(chunk)


def _encoded(messages: list[dict], refuse) -> Iterator[bytes]:
    work = list(reversed(messages))
    while work:
        msg = work.pop()
        data: bytes | None = None
        try:
            data = encode_message(_packed(msg) if "pack" in msg else msg)
            error = None if len(data) <= MAX_PEER_MESSAGE - 16 else TooLarge(
                f"a {len(data)}-byte peer message exceeds the limit of {MAX_PEER_MESSAGE}")
        except Exception as e:
            error = InternalError(f"an unencodable peer message: {e}")
        field = _GROUPED.get(msg.get("t"))
        if field in msg and len(msg[field]) > 1 and (data is None or len(data) > FRAME_TARGET):
            # in halves, down to the one request or reply that cannot go if there is one
            items, at = msg[field], msg.get("at", 0)
            half = len(items) // 2
            work.append(dict(msg, at=at + half, **{field: items[half:]}))
            work.append(dict(msg, at=at, **{field: items[:half]}))
            continue
        if error is not None:
            data = refuse(msg, error)
        if data is not None:
            yield data


def _packed(msg: dict) -> dict:
    return {"t": "brep", "rid": msg["rid"], "at": msg["at"], "raw": cbor2.dumps(msg["reps"])}


def decode_peer_frame(payload: bytes, is_binary: bool) -> list[dict]:
    if not is_binary:
        raise PeerProtocolError("peer frames are binary CBOR")
    try:
        messages = decode_cbor(payload, PEER_SCAN_FROM, references=False)
    except Exception as e:
        raise PeerProtocolError(f"undecodable peer frame: {e}") from None
    if not isinstance(messages, list):
        raise PeerProtocolError("a peer frame is an array of messages")
    return check_messages(messages)


def _int(msg: dict, name: str, maximum: int = MAX_COUNTER) -> int:
    v = msg.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= maximum:
        raise PeerProtocolError(f"{msg.get('t')}.{name} must be an integer from 0 to {maximum}")
    return v


def _map(msg: dict, name: str) -> dict:
    v = msg.get(name)
    if not isinstance(v, dict):
        raise PeerProtocolError(f"{msg.get('t')}.{name} must be a map")
    return v


def _maps(msg: dict, name: str, most: int) -> list:
    v = msg.get(name)
    if not (isinstance(v, list) and 0 < len(v) <= most
            and all(isinstance(item, dict) for item in v)):
        raise PeerProtocolError(f"{msg.get('t')}.{name} must be an array of 1 to {most} maps")
    return v


def _str(msg: dict, name: str) -> str:
    v = msg.get(name)
    if not isinstance(v, str) or not v or len(v) > MAX_ID_BYTES:
        raise PeerProtocolError(
            f"{msg.get('t')}.{name} must be a string of 1 to {MAX_ID_BYTES} characters")
    return v


def _bytes(msg: dict, name: str, size: int) -> bytes:
    v = msg.get(name)
    if not isinstance(v, bytes) or len(v) != size:
        raise PeerProtocolError(f"{msg.get('t')}.{name} must be {size} bytes")
    return v


def check_messages(messages: list) -> list[dict]:
    """Validate decoded peer messages (what :func:`decode_peer_frame` does after CBOR),
    for whoever carries messages without frames, such as an in-memory simulator.

    The input is left as it is: an ``lsa`` comes back as a new map whose ``anns`` are
    :class:`~swarm.mesh.membership.Announcement` objects, whose ``sum`` is a
    :class:`~swarm.mesh.membership.Summary` and whose ``have`` maps node ids to
    ``(inc, seq)`` tuples.
    """
    return [_check(m) for m in messages]


def _check(msg: Any) -> dict:
    if not isinstance(msg, dict):
        raise PeerProtocolError("a peer message is a map")
    t = msg.get("t")
    if t == "hello":
        _str(msg, "node"), _str(msg, "swarm"), _int(msg, "proto"), _int(msg, "inc")
        if "nonce" in msg:  # nodes before issue 8 send none
            _bytes(msg, "nonce", NONCE_BYTES)
        for flag in ("auth", "batch", "raw", "sync"):
            if not isinstance(msg.get(flag, False), bool):
                raise PeerProtocolError(f"hello.{flag} must be a boolean")
    elif t == "auth":
        _bytes(msg, "mac", PROOF_BYTES)
    elif t == "lsa":
        anns = msg.get("anns")
        if not isinstance(anns, list):
            raise PeerProtocolError("lsa.anns must be an array")
        try:
            msg = dict(msg, anns=[Announcement.from_wire(a) for a in anns])
            if "sum" in msg:
                msg["sum"] = Summary.from_wire(msg["sum"])
            if "have" in msg:
                msg["have"] = versions_from_wire(msg["have"])
        except ValueError as e:
            raise PeerProtocolError(str(e)) from None
    elif t == "req":
        _int(msg, "rid"), _int(msg, "ms", MAX_REQUEST_MS), _int(msg, "hops", MAX_HOPS)
        _map(msg, "req")
        if "to" in msg:
            _str(msg, "to")
    elif t == "rep":
        _int(msg, "rid"), _map(msg, "rep")
    elif t == "breq":
        _int(msg, "rid"), _int(msg, "ms", MAX_REQUEST_MS), _int(msg, "hops", MAX_HOPS)
        _maps(msg, "reqs", MAX_GROUP_REQUESTS)
        if "to" in msg:
            _str(msg, "to")
        if "at" in msg:
            _int(msg, "at", MAX_GROUP_REQUESTS)
    elif t == "brep":
        _int(msg, "rid"), _int(msg, "at", MAX_GROUP_REQUESTS)
        if "raw" not in msg:
            _maps(msg, "reps", MAX_GROUP_REQUESTS)
        elif "reps" in msg or not isinstance(msg["raw"], bytes) or reply_count(msg["raw"]) is None:
            raise PeerProtocolError(
                "brep.raw must be, instead of brep.reps, the bytes of a definite array "
                f"of 1 to {MAX_GROUP_REQUESTS} replies")
    elif t != "bye":
        raise PeerProtocolError(f"unknown peer message type {t!r}")
    return msg


def hello(node: str, swarm: str, incarnation: int, nonce: bytes | None = None,
          auth: bool = False) -> dict:
    msg = {"t": "hello", "node": node, "proto": PROTOCOL_VERSION, "swarm": swarm,
           "inc": incarnation, "auth": auth, "batch": True, "raw": True, "sync": True}
    if nonce is not None:
        msg["nonce"] = nonce
    return msg


def auth(mac: bytes) -> dict:
    return {"t": "auth", "mac": mac}


def bye() -> dict:
    return {"t": "bye"}


def check_hello(msg: dict, self_id: str, swarm: str) -> str | None:
    """Why a hello is refused, or None to accept it."""
    if msg["t"] != "hello":
        return "the first message on a peer link must be hello"
    if msg["proto"] != PROTOCOL_VERSION:
        return f"peer protocol {msg['proto']} is not {PROTOCOL_VERSION}"
    if msg["swarm"] != swarm:
        return f"peer is in swarm {msg['swarm']!r}, this node in {swarm!r}"
    if msg["node"] == self_id:
        return f"peer has this node's own id {self_id!r} (a link to itself?)"
    return None
