"""Unit tests of swarm.protocol.wire and swarm.errors: decoding, validation, encoding; no sockets."""

from __future__ import annotations

import base64
import datetime
import json
import signal
import struct

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from swarm.errors import (
    ERRORS_BY_CODE,
    BadRequest,
    InternalError,
    NotInteger,
    Overloaded,
    SwarmError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownOp,
    error_from_wire,
)
from swarm.protocol import scan
from swarm.protocol.ops import CLIENT_OPS
from swarm.protocol.wire import (
    INT64_MAX,
    INT64_MIN,
    MAX_TTL,
    Limits,
    RequestParser,
    check_value,
    decode_frame,
    encode_frame,
    error_reply,
    ok_reply,
    request_id,
)

CONTRACT_OPS = {
    "ping", "set", "get", "delete", "exists", "expire", "ttl",
    "incr", "mget", "mset", "stats", "nodes", "owner",
}
CONTRACT_CODES = {
    "bad_request", "unknown_op", "too_large", "not_integer", "timeout",
    "unavailable", "unauthorized", "overloaded", "internal",
}


@pytest.fixture
def parser():
    return RequestParser()


def nested_lists(levels, leaf=0):
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def nested_maps(levels, leaf=0):
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def same(a, b):
    """Equality that also tells 1 from 1.0 from True, and 0.0 from -0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def depth(value):
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


# -- decode_frame -----------------------------------------------------------------------


def decode_error(payload: bytes, binary: bool) -> BadRequest:
    """The BadRequest that ``decode_frame`` must raise for ``payload``."""
    with pytest.raises(BadRequest) as info:
        decode_frame(payload, binary)
    return info.value


def test_decode_json_text_frame():
    frame = '{"id": 7, "op": "set", "key": "k\u00e9", "value": [1, 2.5, null, true]}'
    assert decode_frame(frame.encode("utf-8"), False) == {
        "id": 7, "op": "set", "key": "k\u00e9", "value": [1, 2.5, None, True]
    }


def test_decode_cbor_binary_frame():
    obj = {"id": "a", "op": "set", "key": "k", "value": {"b": b"\x00\xff", "n": -3}}
    assert decode_frame(cbor2.dumps(obj), True) == obj


def test_decode_uses_the_flag_not_a_guess():
    # A JSON text sent as a binary frame is CBOR garbage, not JSON.
    with pytest.raises(BadRequest):
        decode_frame(b'{"id": 1, "op": "ping"}', True)
    with pytest.raises(BadRequest):
        decode_frame(cbor2.dumps({"id": 1, "op": "ping"}), False)


@pytest.mark.parametrize("payload", [b"\xff\xfe", b'{"key": "\xc3"}', b'"\xed\xa0\x80"'])
def test_decode_non_utf8_text_is_bad_request(payload):
    error = decode_error(payload, binary=False)
    assert error.code == "bad_request"
    assert "UTF-8" in error.message


@pytest.mark.parametrize(
    "payload", [b"", b"{", b"{'id': 1}", b'{"id": 1,}', b"[1, 2", b'{"id": 1} {"id": 2}', b"nul"]
)
def test_decode_invalid_json_is_bad_request(payload):
    assert "JSON" in decode_error(payload, binary=False).message


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",  # a lone break
        b"\x82\x01",  # an array of 2 with one item
        b"\x62\xff\xfe",  # a text string that is not UTF-8
        b"\x5b\x00\x00\x00\xff\xff\xff\xff\xff",  # a 1 TiB byte string, not there
        b"\x9b\x00\x00\x00\xff\xff\xff\xff\xff",  # a huge array, not there
        b"\x1c",  # reserved additional information
    ],
)
def test_decode_invalid_cbor_is_bad_request(payload):
    assert "CBOR" in decode_error(payload, binary=True).message


def test_decode_cbor_with_trailing_bytes_is_bad_request():
    with pytest.raises(BadRequest):
        decode_frame(cbor2.dumps({"id": 1, "op": "ping"}) + b"\xff\x00", True)


@pytest.mark.parametrize(
    "payload", [b"NaN", b"[Infinity]", b'{"v": -Infinity}', b'{"id": 1, "op": "set", "value": NaN}']
)
def test_decode_rejects_json_nan_and_infinity(payload):
    assert "not a JSON number" in decode_error(payload, binary=False).message


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" * 100_000,  # deep and truncated
    ],
    ids=["arrays", "objects", "unterminated"],
)
def test_decode_deep_json_is_bad_request_not_a_crash(payload):
    with pytest.raises(BadRequest):
        decode_frame(payload, False)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x81" * 100_000 + b"\x00",  # definite-length arrays
        b"\x9f" * 100_000 + b"\xff" * 100_000,  # indefinite-length arrays
        b"\xa1\x61a" * 100_000 + b"\x00",  # maps
        b"\xd8\x64" * 100_000 + b"\x00",  # tags on tags
    ],
    ids=["arrays", "indefinite", "maps", "tags"],
)
def test_decode_deep_cbor_is_bad_request_not_a_crash(payload):
    with pytest.raises(BadRequest):
        decode_frame(payload, True)


def test_decode_huge_json_number_becomes_inf_and_values_reject_it(parser):
    # 1e400 is valid JSON that Python reads as inf; the value check must catch it.
    decoded = decode_frame(b'{"id": 1, "op": "set", "key": "k", "value": [1e400]}', False)
    with pytest.raises(BadRequest):
        parser.parse(decoded)


# -- encode_frame and replies -----------------------------------------------------------


def test_encode_json_is_compact_utf8():
    out = encode_frame({"id": 1, "ok": True, "value": "\u00e9\u6f22"}, False)
    assert out == '{"id":1,"ok":true,"value":"\u00e9\u6f22"}'.encode("utf-8")


def test_encode_bytes_in_json_become_base64_objects():
    reply = ok_reply(3, {"found": True, "value": {"raw": b"\x00\xffhi", "list": [b""]}})
    decoded = json.loads(encode_frame(reply, False))
    assert decoded["value"] == {
        "raw": {"$base64": base64.b64encode(b"\x00\xffhi").decode("ascii")},
        "list": [{"$base64": ""}],
    }


def test_encode_bytes_in_cbor_stay_bytes():
    reply = ok_reply(3, {"value": b"\x00\xff"})
    assert decode_frame(encode_frame(reply, True), True)["value"] == b"\x00\xff"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "cbor"])
def test_encode_round_trip(binary):
    replies = [
        ok_reply(1, {"found": True, "value": {"a": [1, -2, 3.5, None, False, "x"]}}),
        ok_reply("two", {"values": {}}),
        error_reply(None, BadRequest("nope")),
    ]
    out = decode_frame(encode_frame(replies, binary), binary)
    assert same(out, replies)


def test_encode_json_never_writes_nan():
    with pytest.raises(ValueError):
        encode_frame({"v": float("nan")}, False)


def test_encode_json_refuses_unknown_types():
    with pytest.raises(TypeError):
        encode_frame({"v": {1, 2}}, False)


def test_reply_shapes():
    assert ok_reply("x", {"stored": True}) == {"id": "x", "ok": True, "stored": True}
    assert error_reply(5, TooLarge("big")) == {
        "id": 5, "ok": False, "error": {"code": "too_large", "message": "big"}
    }
    assert error_reply(None, UnknownOp())["error"] == {
        "code": "unknown_op", "message": "unknown_op"
    }


# -- RequestParser.parse: every op ------------------------------------------------------

VALID = {
    "ping": {},
    "stats": {},
    "nodes": {},
    "owner": {"key": "k"},
    "get": {"key": "k"},
    "exists": {"key": "k"},
    "delete": {"key": "k"},
    "ttl": {"key": "k"},
    "set": {"key": "k", "value": {"a": [1, b"x"]}},
    "expire": {"key": "k", "ttl": 5},
    "incr": {"key": "k"},
    "mget": {"keys": ["a", "b"]},
    "mset": {"items": {"a": 1, "b": [2]}},
    "mdelete": {"keys": ["a", "b"]},
    "scan": {"match": "user:[ab]*", "count": 10},
    "flush": {},
}

REQUIRED = {
    "owner": ["key"], "get": ["key"], "exists": ["key"], "delete": ["key"], "ttl": ["key"],
    "set": ["key", "value"], "expire": ["key", "ttl"], "incr": ["key"],
    "mget": ["keys"], "mset": ["items"], "mdelete": ["keys"],
}


def test_specs_cover_exactly_the_contract_ops():
    assert CONTRACT_OPS <= set(CLIENT_OPS)
    assert set(VALID) == set(CLIENT_OPS)


@pytest.mark.parametrize("op", sorted(VALID))
def test_parse_valid_request(parser, op):
    obj = {"id": 1, "op": op, **VALID[op]}
    assert parser.parse(obj) == obj


@pytest.mark.parametrize(
    "op,arg", [(op, arg) for op, args in sorted(REQUIRED.items()) for arg in args]
)
def test_parse_missing_required_argument_names_it(parser, op, arg):
    obj = {"id": 1, "op": op, **VALID[op]}
    del obj[arg]
    with pytest.raises(BadRequest) as info:
        parser.parse(obj)
    assert repr(arg) in info.value.message
    assert op in info.value.message


@pytest.mark.parametrize(
    "op,arg,bad",
    [
        (op, "key", bad)
        for op in ("owner", "get", "exists", "delete", "ttl", "set", "expire", "incr")
        for bad in (None, 1, b"k", ["k"], {"k": 1}, True)
    ]
    + [("mget", "keys", bad) for bad in ("a", None, {"a": 1}, ["a", 1], ["a", None], [""])]
    + [("mset", "items", bad) for bad in (["a", 1], None, "a", [["a", 1]])]
    + [("set", "nx", bad) for bad in (1, 0, "true", None)]
    + [("set", "xx", bad) for bad in (1, 0, "false", None)]
    + [("set", "value", bad) for bad in (float("nan"), {1: 2}, cbor2.undefined, nested_lists(33))]
    + [("incr", "delta", bad) for bad in (None, "1", [1])]
    + [("mdelete", "keys", bad) for bad in ("a", None, ["a", 1], [""])]
    + [("scan", "count", bad) for bad in (0, -1, 10_001, 1.5, "10", True, None)]
    + [("scan", "match", bad) for bad in (None, 1, b"a*", ["a"])]
    + [("scan", "cursor", bad) for bad in (1, b"x", "not a cursor", "W10", "WzEsMl0", ["a"])]
    + [("stats", "node", bad) for bad in ("", 1, None, "n" * 257)],
)
def test_parse_ill_typed_argument_is_bad_request(parser, op, arg, bad):
    obj = {"id": 1, "op": op, **VALID[op], arg: bad}
    with pytest.raises(BadRequest):
        parser.parse(obj)


@pytest.mark.parametrize("op", ["owner", "get", "exists", "delete", "ttl", "set", "expire", "incr"])
def test_parse_empty_key_is_bad_request(parser, op):
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": op, **VALID[op], "key": ""})


@pytest.mark.parametrize(
    "key,ok",
    [
        ("a" * 1024, True),
        ("a" * 1025, False),
        ("\u00e9" * 512, True),  # 2 bytes each: 1024
        ("\u00e9" * 513, False),
        ("\U0001d11e" * 256, True),  # 4 bytes each: 1024
        ("\U0001d11e" * 257, False),
        ("\u6f22" * 341 + "a", True),  # 3 bytes each: 1024
        ("\u6f22" * 342, False),  # 1026
    ],
)
def test_parse_key_size_is_measured_in_utf8_bytes(parser, key, ok):
    requests = [
        {"id": 1, "op": "get", "key": key},
        {"id": 1, "op": "set", "key": key, "value": 1},
        {"id": 1, "op": "owner", "key": key},
        {"id": 1, "op": "mget", "keys": ["short", key]},
        {"id": 1, "op": "mset", "items": {"short": 1, key: 2}},
    ]
    for obj in requests:
        if ok:
            assert parser.parse(obj) == obj
        else:
            with pytest.raises(TooLarge) as info:
                parser.parse(obj)
            assert info.value.code == "too_large"


def test_parse_key_limit_follows_limits():
    small = RequestParser(Limits(max_key_bytes=4))
    assert small.parse({"id": 1, "op": "get", "key": "abcd"})["key"] == "abcd"
    with pytest.raises(TooLarge):
        small.parse({"id": 1, "op": "get", "key": "abcde"})
    with pytest.raises(TooLarge):
        small.parse({"id": 1, "op": "get", "key": "\u00e9\u00e9a"})  # 5 bytes, 3 chars


@pytest.mark.parametrize("ttl", [1, 0.001, 2.5, 86400, MAX_TTL, 10**9])
@pytest.mark.parametrize("op", ["set", "expire", "mset"])
def test_parse_ttl_valid(parser, op, ttl):
    request = parser.parse({"id": 1, "op": op, **VALID[op], "ttl": ttl})
    assert same(request["ttl"], ttl)


@pytest.mark.parametrize(
    "ttl",
    [0, 0.0, -1, -0.5, True, False, "10", [10], {"s": 1}, float("nan"), float("inf"),
     MAX_TTL + 1, 10**400],
)
@pytest.mark.parametrize("op", ["set", "expire", "mset"])
def test_parse_ttl_invalid(parser, op, ttl):
    with pytest.raises(BadRequest) as info:
        parser.parse({"id": 1, "op": op, **VALID[op], "ttl": ttl})
    assert "ttl" in info.value.message


@pytest.mark.parametrize("op", ["set", "expire", "mset"])
def test_parse_ttl_null_is_allowed_and_kept(parser, op):
    request = parser.parse({"id": 1, "op": op, **VALID[op], "ttl": None})
    assert "ttl" in request and request["ttl"] is None


@pytest.mark.parametrize("op", ["set", "mset", "incr"])
def test_parse_optional_arguments_only_when_given(parser, op):
    request = parser.parse({"id": 1, "op": op, **VALID[op]})
    assert not {"ttl", "nx", "xx", "delta"} & set(request)


def test_parse_set_flags(parser):
    base = {"id": 1, "op": "set", "key": "k", "value": 1}
    assert parser.parse({**base, "nx": True})["nx"] is True
    assert parser.parse({**base, "xx": True, "nx": False}) == {**base, "xx": True, "nx": False}
    with pytest.raises(BadRequest):
        parser.parse({**base, "nx": True, "xx": True})


@pytest.mark.parametrize("delta", [0, 1, -1, 10**12, INT64_MAX, INT64_MIN])
def test_parse_delta_valid(parser, delta):
    request = parser.parse({"id": 1, "op": "incr", "key": "k", "delta": delta})
    assert same(request["delta"], delta)


@pytest.mark.parametrize(
    "delta", [True, False, 1.0, 1.5, float("nan"), INT64_MAX + 1, INT64_MIN - 1, 2**100]
)
def test_parse_delta_invalid(parser, delta):
    with pytest.raises(BadRequest) as info:
        parser.parse({"id": 1, "op": "incr", "key": "k", "delta": delta})
    assert "delta" in info.value.message


@pytest.mark.parametrize("op", ["frobnicate", "GET", "Ping", "", "get "])
def test_parse_unknown_op(parser, op):
    with pytest.raises(UnknownOp) as info:
        parser.parse({"id": 1, "op": op})
    assert info.value.code == "unknown_op"


@pytest.mark.parametrize("op", [None, 1, True, ["get"], {"op": "get"}, b"get"])
def test_parse_non_string_op(parser, op):
    with pytest.raises(BadRequest) as info:
        parser.parse({"id": 1, "op": op, "key": "k"})
    assert "op" in info.value.message


def test_parse_missing_op(parser):
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "key": "k"})


@pytest.mark.parametrize("rid", [1.0, 1.5, True, False, None, [1], {"a": 1}, b"id"])
def test_parse_bad_id(parser, rid):
    with pytest.raises(BadRequest) as info:
        parser.parse({"id": rid, "op": "ping"})
    assert "id" in info.value.message


def test_parse_missing_id(parser):
    with pytest.raises(BadRequest):
        parser.parse({"op": "ping"})


@pytest.mark.parametrize("rid", [0, -5, 2**70, "", "abc", "\u00e9"])
def test_parse_id_is_echoed_unchanged(parser, rid):
    assert same(parser.parse({"id": rid, "op": "ping"})["id"], rid)


@pytest.mark.parametrize("obj", [None, [], [{"id": 1, "op": "ping"}], "ping", 1, b"x"])
def test_parse_non_object(parser, obj):
    with pytest.raises(BadRequest):
        parser.parse(obj)


def test_parse_drops_extra_fields(parser):
    obj = {"id": 1, "op": "get", "key": "k", "trace": {"x": 1}, "future_flag": True, 5: "x"}
    assert parser.parse(obj) == {"id": 1, "op": "get", "key": "k"}
    assert "trace" in obj  # the input is left alone


def test_parse_extra_fields_are_not_validated(parser):
    # A newer client's extra field may hold anything, even what values may not.
    obj = {"id": 1, "op": "ping", "extra": [float("nan"), {1: 2}, nested_lists(100)]}
    assert parser.parse(obj) == {"id": 1, "op": "ping"}


def test_parse_checks_mset_values(parser):
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": "mset", "items": {"a": 1, "b": nested_maps(33)}})
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": "mset", "items": {"a": 1, "": 2}})
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": "mset", "items": {1: 1}})
    assert parser.parse({"id": 1, "op": "mset", "items": {}})["items"] == {}


def test_parse_empty_mget(parser):
    assert parser.parse({"id": 1, "op": "mget", "keys": []})["keys"] == []


def test_parse_cbor_request_end_to_end(parser):
    obj = {"id": 9, "op": "set", "key": "k", "value": b"\x00raw", "ttl": 1.5, "nx": True}
    assert parser.parse(decode_frame(cbor2.dumps(obj), True)) == obj


def test_parse_cbor_tagged_arguments_rejected(parser):
    when = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    for obj in (
        {"id": 1, "op": "get", "key": when},
        {"id": 1, "op": "set", "key": "k", "value": when},
        {"id": 1, "op": "set", "key": "k", "value": 1, "ttl": cbor2.CBORTag(1, 5)},
    ):
        with pytest.raises(BadRequest):
            parser.parse(decode_frame(cbor2.dumps(obj), True))


# Lone surrogates: JSON's "\ud800" escape decodes to a Python str that is not Unicode text;
# neither encoding can write it back, and a long key crashes the key-size check.

_SURROGATE_FRAMES = {
    "short-key": b'{"id": 1, "op": "get", "key": "\\ud800"}',
    "long-key": b'{"id": 1, "op": "get", "key": "' + b"\\ud800" * 300 + b'"}',
    "value": b'{"id": 1, "op": "set", "key": "k", "value": ["\\udfff"]}',
    "map-key-in-value": b'{"id": 1, "op": "set", "key": "k", "value": {"\\ud800": 1}}',
    "id": b'{"id": "\\ud800", "op": "ping"}',
}


@pytest.mark.parametrize("frame", list(_SURROGATE_FRAMES.values()), ids=list(_SURROGATE_FRAMES))
def test_lone_surrogates_are_bad_request(parser, frame):
    with pytest.raises(BadRequest):
        parser.parse(decode_frame(frame, False))


def test_surrogate_pairs_in_json_are_fine(parser):
    frame = b'{"id": 1, "op": "set", "key": "\\ud834\\udd1e", "value": "\\ud83d\\ude00"}'
    request = parser.parse(decode_frame(frame, False))
    assert request["key"] == "\U0001d11e" and request["value"] == "\U0001f600"
    assert json.loads(encode_frame(request, False)) == request


# -- request_id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj,expected",
    [
        ({"id": 4, "op": "nope"}, 4),
        ({"id": "x"}, "x"),
        ({"id": 0}, 0),
        ({"id": ""}, ""),
        ({"id": 1.0}, None),
        ({"id": True}, None),
        ({"id": None}, None),
        ({"id": [1]}, None),
        ({"op": "ping"}, None),
        ([{"id": 1}], None),
        ("id", None),
        (None, None),
    ],
)
def test_request_id(obj, expected):
    assert same(request_id(obj), expected)


# -- split ------------------------------------------------------------------------------


def test_split_single_and_batch(parser):
    one = {"id": 1, "op": "ping"}
    assert parser.split(one) == ([one], False)
    assert parser.split([one, one]) == ([one, one], True)
    assert parser.split([]) == ([], True)
    assert parser.split("junk") == (["junk"], False)


def test_split_batch_limit_default(parser):
    assert Limits().max_batch == 10_000
    requests, is_batch = parser.split([None] * 10_000)
    assert is_batch and len(requests) == 10_000
    with pytest.raises(TooLarge) as info:
        parser.split([None] * 10_001)
    assert info.value.code == "too_large"


def test_split_batch_limit_follows_limits():
    small = RequestParser(Limits(max_batch=2))
    assert small.split([1, 2]) == ([1, 2], True)
    with pytest.raises(TooLarge):
        small.split([1, 2, 3])


# -- check_value ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [nested_lists, nested_maps], ids=["lists", "maps"])
def test_check_value_depth_boundary(make):
    limit = Limits().max_depth
    assert limit == 32
    check_value(make(limit), limit)
    check_value(make(limit, leaf="deepest scalar"), limit)
    with pytest.raises(BadRequest):
        check_value(make(limit + 1), limit)


def test_check_value_depth_mixed_and_empty_containers():
    value = []
    for i in range(31):
        value = {"m": value} if i % 2 else [value]
    check_value(value, 32)  # the innermost empty list is level 1
    with pytest.raises(BadRequest):
        check_value({"x": value}, 32)
    with pytest.raises(BadRequest):
        check_value([0, "x", value], 32)


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_check_value_depth_follows_argument(limit):
    check_value(nested_lists(limit), limit)
    with pytest.raises(BadRequest):
        check_value(nested_lists(limit + 1), limit)
    # a deep branch anywhere counts, not only the first or the last
    check_value([1, nested_lists(limit - 1), "x"], limit)
    with pytest.raises(BadRequest):
        check_value([1, nested_lists(limit), "x"], limit)
    with pytest.raises(BadRequest):
        check_value({"a": 1, "b": nested_maps(limit), "c": None}, limit)


def test_check_value_scalars_are_not_levels():
    for scalar in (None, True, 0, -1.5, "s", b"b", 2**64 - 1, -(2**64)):
        check_value(scalar, 0)


@pytest.mark.parametrize(
    "value",
    [{1: "a"}, {None: 1}, {b"k": 1}, {(1,): 2}, [{"ok": {2.5: 1}}], {"a": [{True: 1}]}],
)
def test_check_value_map_keys_must_be_strings(value):
    with pytest.raises(BadRequest) as info:
        check_value(value, 32)
    assert "string" in info.value.message


@pytest.mark.parametrize(
    "hexframe",
    [
        "f7",  # undefined
        "f0",  # simple value 16
        "c11a5e0be100",  # tag 1: epoch datetime
        "c074323032302d30312d30315430303a30303a30305a",  # tag 0: datetime string
        "c482200f",  # decimal fraction
        "d81e820103",  # rational
        "d82550504fbea439b248a0be4ad8882c27a6d7",  # uuid
        "d8236161",  # regexp
        "d90102820102",  # set
        "d90fa001",  # unknown tag 4000
    ],
)
@pytest.mark.parametrize("where", ["top", "list", "map"])
def test_check_value_rejects_cbor_only_types(hexframe, where):
    item = decode_frame(bytes.fromhex(hexframe), True)
    value = {"top": item, "list": [1, item], "map": {"a": {"b": item}}}[where]
    with pytest.raises(BadRequest):
        check_value(value, 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_value_rejects_non_finite_floats(bad):
    for value in (bad, [1.0, bad], {"a": {"b": bad}}):
        with pytest.raises(BadRequest):
            check_value(value, 32)


def test_check_value_accepts_byte_strings():
    check_value({"b": [b"\x00"]}, 32)


def test_check_value_rejects_python_only_containers():
    for value in ((1, 2), {1, 2}, frozenset(), object()):
        with pytest.raises(BadRequest):
            check_value(value, 32)


def test_check_value_cyclic_cbor_is_rejected():
    # CBOR tags 28/29 (shareable / shared reference) can build a list that holds itself.
    frame = bytes.fromhex("d81c81d81d00")
    cyclic = cbor2.loads(frame)
    assert cyclic[0] is cyclic
    with pytest.raises(BadRequest):
        check_value(cyclic, 32)
    with pytest.raises(BadRequest):  # and a frame holding one never gets that far
        decode_frame(frame, True)


def test_check_value_accepts_wide_values():
    check_value({str(i): [i, str(i), float(i), None] for i in range(20_000)}, 32)


def _shared_dag_frame(levels):
    """A tiny CBOR frame whose value, unshared, has 2**levels leaves (shared references)."""
    items = [b"\xd8\x1c\x82\x00\x00"]
    for k in range(1, levels):
        ref = b"\xd8\x1d" + cbor2.dumps(k - 1)
        items.append(b"\xd8\x1c\x82" + ref + ref)
    return b"\x98" + bytes([levels]) + b"".join(items)


class _TookTooLong(Exception):
    pass


def test_check_value_shared_reference_bomb_is_rejected_quickly():
    frame = _shared_dag_frame(31)
    assert len(frame) < 300
    value = cbor2.loads(frame)
    with pytest.raises(SwarmError):  # refused at decoding, whole frame
        decode_frame(frame, True)

    def alarm(signum, stack):
        raise _TookTooLong()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(SwarmError):
            check_value(value, 32)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_values_that_pass_check_value_encode_as_json():
    value = decode_frame(cbor2.dumps({"n": 10**5000}), True)
    try:
        check_value(value, 32)
    except SwarmError:
        return  # rejecting it is a fine answer
    encode_frame(value, False)


# -- errors -----------------------------------------------------------------------------


def test_every_contract_code_has_a_class():
    assert set(ERRORS_BY_CODE) == CONTRACT_CODES
    expected = {
        "bad_request": BadRequest, "unknown_op": UnknownOp, "too_large": TooLarge,
        "not_integer": NotInteger, "timeout": Timeout, "unavailable": Unavailable,
        "unauthorized": Unauthorized, "overloaded": Overloaded, "internal": InternalError,
    }
    assert ERRORS_BY_CODE == expected
    for code, cls in expected.items():
        assert issubclass(cls, SwarmError) and cls.code == code


@pytest.mark.parametrize("code", sorted(CONTRACT_CODES))
def test_error_from_wire_known_codes(code):
    exc = error_from_wire({"code": code, "message": "went wrong"})
    assert type(exc) is ERRORS_BY_CODE[code]
    assert exc.code == code and exc.message == "went wrong" and str(exc) == "went wrong"
    assert error_from_wire(exc.to_wire()).to_wire() == {"code": code, "message": "went wrong"}


def test_error_from_wire_unknown_code_stays_readable():
    exc = error_from_wire({"code": "rate_limited", "message": "slow down"})
    assert isinstance(exc, SwarmError)
    assert exc.code == "rate_limited" and exc.message == "slow down"
    assert "slow down" in str(exc)
    assert exc.to_wire() == {"code": "rate_limited", "message": "slow down"}
    # the class itself is untouched
    assert SwarmError.code == "internal" and SwarmError().code == "internal"


def test_error_from_wire_missing_message_uses_code():
    exc = error_from_wire({"code": "timeout"})
    assert isinstance(exc, Timeout) and exc.message == "timeout"


@pytest.mark.parametrize("error", [None, "boom", ["bad_request"], 3])
def test_error_from_wire_malformed(error):
    exc = error_from_wire(error)
    assert isinstance(exc, InternalError) and exc.code == "internal"
    assert "malformed" in exc.message


def test_error_from_wire_non_string_code():
    exc = error_from_wire({"code": 42, "message": "odd"})
    assert isinstance(exc, SwarmError) and exc.message == "odd"
    assert type(exc) not in ERRORS_BY_CODE.values()


def test_swarm_error_default_message_is_code():
    assert NotInteger().to_wire() == {"code": "not_integer", "message": "not_integer"}


# -- property: plain values round-trip in both encodings --------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_plain = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_plain, binary=st.booleans())
def test_plain_values_round_trip(value, binary):
    assume(depth(value) <= Limits().max_depth)
    check_value(value, Limits().max_depth)
    request = {"id": 1, "op": "set", "key": "k", "value": value}
    decoded = decode_frame(encode_frame(request, binary), binary)
    assert same(decoded, request)
    assert same(RequestParser().parse(decoded)["value"], value)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "cbor"])
def test_value_at_depth_limit_round_trips(parser, binary):
    value = {"a": nested_lists(29, leaf={"z": [1.5]})}  # exactly 32 levels
    assert depth(value) == 32
    frame = encode_frame({"id": 1, "op": "set", "key": "k", "value": value}, binary)
    assert same(parser.parse(decode_frame(frame, binary))["value"], value)
    deeper = encode_frame({"id": 1, "op": "set", "key": "k", "value": [value]}, binary)
    with pytest.raises(BadRequest):
        parser.parse(decode_frame(deeper, binary))


@pytest.mark.parametrize("too_big", [2**64, -(2**64) - 1, 10**5000], ids=["2^64", "-2^64-1", "1e5000"])
def test_integers_beyond_64_bits_are_bad_request(too_big):
    with pytest.raises(BadRequest, match="64 bits"):
        check_value({"n": [too_big]}, 32)


def test_expansion_budget_bounds_the_walk_of_a_shared_string_frame():
    """2000 ids that are one 50 KB string: 80 KB of CBOR that would be a 100 MB reply."""
    big = b"\xd8\x1c" + cbor2.dumps("i" * 50_000)
    frame = b"\x99\x07\xd0" + big + b"\xd8\x1d\x00" * 1999
    with pytest.raises(TooLarge):
        decode_frame(frame, True)
    # the same data written out plainly is fine (it carries its own weight)
    plain = cbor2.dumps(["i" * 50_000] * 3)
    assert decode_frame(plain, True) == ["i" * 50_000] * 3


def test_expansion_check_accepts_plain_cbor_of_small_integers():
    # the worst honest ratio: 1-byte integers that weigh 8 each
    assert decode_frame(cbor2.dumps(list(range(24)) * 5000), True)[-1] == 23


def test_scan_cursor_null_or_absent_starts_and_a_given_one_round_trips(parser):
    assert parser.parse({"id": 1, "op": "scan", "cursor": None})["cursor"] == scan.START
    assert "cursor" not in parser.parse({"id": 1, "op": "scan"})
    cursor = scan.encode_cursor((4095, "user:\u00e9/\"x\""))
    assert parser.parse({"id": 1, "op": "scan", "cursor": cursor})["cursor"] == (
        4095, "user:\u00e9/\"x\"")


def test_scan_match_longer_than_a_key_is_too_large(parser):
    with pytest.raises(TooLarge):
        parser.parse({"id": 1, "op": "scan", "match": "*" * 1025})
