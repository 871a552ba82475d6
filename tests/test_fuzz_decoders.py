"""Issue 8, fuzzing: every decoder, given any input, returns a valid result or raises
its documented error (SwarmError for client frames, PeerProtocolError for peer frames),
never another exception that would reach Twisted. Random bytes, mutated encodings of
valid-ish structures, and generated requests and peer messages."""

from __future__ import annotations

import json

import cbor2
from hypothesis import HealthCheck, given, settings, strategies as st

from swarm.errors import SwarmError
from swarm.mesh.peer_wire import (
    PROTOCOL_VERSION,
    PeerProtocolError,
    check_hello,
    check_messages,
    decode_peer_frame,
)
from swarm.protocol.ops import OPS
from swarm.protocol.wire import RequestParser, check_value, decode_frame, encode_frame

EXAMPLES = 300
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.binary(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=5),
    max_leaves=20,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
op_names = st.sampled_from(sorted(OPS) + ["nope", ""])
requests = st.fixed_dictionaries(
    {"id": st.integers(-5, 2**66) | st.text(max_size=5) | values, "op": op_names | values},
    optional={name: values | st.text(min_size=1, max_size=8) | st.lists(st.text(max_size=4), max_size=3)
              for name in ("key", "value", "ttl", "nx", "xx", "delta", "keys", "items",
                           "entries", "digests", "at", "cursor", "match", "count")},
)
client = RequestParser()
internal = RequestParser(internal=True)


def _decode_and_parse(payload: bytes, binary: bool) -> None:
    """What a node does with a frame; only SwarmError may come out."""
    try:
        decoded = decode_frame(payload, binary)
    except SwarmError:
        return
    for parser in (client, internal):
        try:
            batch, _ = parser.split(decoded)
        except SwarmError:
            continue
        for obj in batch:
            try:
                request = parser.parse(obj)
            except SwarmError:
                continue
            encode_frame({"id": request["id"], "ok": True}, binary)  # its id is sendable


def _mutations(data: st.DataObject, payload: bytes) -> bytes:
    if not payload:
        return payload
    raw = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            raw[i] = data.draw(st.integers(0, 255))
        elif choice == 1:
            del raw[i]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    return bytes(raw)


@fuzz
@given(st.binary(max_size=300))
def test_any_bytes_as_a_cbor_frame(payload):
    _decode_and_parse(payload, True)


@fuzz
@given(st.binary(max_size=300))
def test_any_bytes_as_a_text_frame(payload):
    _decode_and_parse(payload, False)


@fuzz
@given(st.data(), values, st.sampled_from([{}, {"string_referencing": True},
                                           {"value_sharing": True}]))
def test_mutated_cbor_of_generated_values(data, value, options):
    payload = cbor2.dumps({"id": 1, "op": "set", "key": "k", "value": value}, **options)
    _decode_and_parse(payload, True)
    _decode_and_parse(_mutations(data, payload), True)


@fuzz
@given(st.data(), json_values)
def test_mutated_json_of_generated_values(data, value):
    payload = json.dumps({"id": 1, "op": "set", "key": "k", "value": value}).encode()
    _decode_and_parse(payload, False)
    _decode_and_parse(_mutations(data, payload), False)


@fuzz
@given(st.lists(requests, max_size=4) | requests, st.booleans())
def test_generated_requests_parse_or_are_refused(frame, binary):
    try:
        payload = encode_frame(frame, binary)
    except (TypeError, ValueError, OverflowError):  # no JSON for bytes keys, NaN...
        return
    _decode_and_parse(payload, binary)


@fuzz
@given(json_values)
def test_a_value_that_passes_check_value_round_trips_in_both_encodings(value):
    try:
        check_value(value, 32)
    except SwarmError:
        return
    for binary in (True, False):
        assert decode_frame(encode_frame(value, binary), binary) == value


# -- peer frames -----------------------------------------------------------------------

peer_types = st.sampled_from(["hello", "lsa", "req", "rep", "bye", "nope"])
peer_messages = st.fixed_dictionaries(
    {"t": peer_types | values},
    optional={name: values | st.integers(-1, 2**65) | st.text(max_size=5)
              | st.lists(st.fixed_dictionaries({}, optional={
                  "node": st.text(max_size=4) | values, "inc": st.integers(-1, 2**65),
                  "seq": st.integers(-1, 2**65), "links": st.lists(st.text(max_size=3)) | values,
              }), max_size=3)
              for name in ("node", "proto", "swarm", "inc", "anns", "rid", "ms", "hops",
                           "req", "rep", "to")},
)


def _decode_peer(payload: bytes, binary: bool = True) -> None:
    try:
        messages = decode_peer_frame(payload, binary)
    except PeerProtocolError:
        return
    assert isinstance(messages, list)
    for msg in messages:
        assert isinstance(msg, dict)
        if msg.get("t") == "hello":
            check_hello(msg, "self", "swarm")


@fuzz
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_as_a_peer_frame(payload, binary):
    _decode_peer(payload, binary)


@fuzz
@given(st.data(), st.lists(peer_messages, max_size=4))
def test_generated_and_mutated_peer_frames(data, messages):
    try:
        payload = cbor2.dumps(messages)
    except (TypeError, ValueError):
        return
    _decode_peer(payload)
    _decode_peer(_mutations(data, payload))


@fuzz
@given(st.lists(peer_messages | values, max_size=4))
def test_check_messages_accepts_or_refuses_with_peer_protocol_error(messages):
    try:
        checked = check_messages(messages)
    except PeerProtocolError:
        return
    assert len(checked) == len(messages)


def test_a_valid_hello_passes_all_checks():
    hello = {"t": "hello", "node": "n1", "proto": PROTOCOL_VERSION, "swarm": "swarm", "inc": 1}
    (msg,) = decode_peer_frame(cbor2.dumps([hello]), True)
    assert check_hello(msg, "self", "swarm") is None
