"""Issue 8: decoding work and memory per frame are bounded by the frame's size, for
every CBOR and JSON construct. Each attack runs in a subprocess under a 1 GiB address
limit and reports its peak RSS growth and time; before the fix the first ones grew to
3.8 GiB (bignums repeated by reference) and 560 MiB (4 MiB of empty arrays)."""

from __future__ import annotations

import json
import subprocess
import sys

import cbor2
import pytest

from swarm.errors import BadRequest, SwarmError, TooLarge
from swarm.protocol.wire import (
    DECODE_FACTOR,
    DECODE_SLACK,
    RequestParser,
    Unsupported,
    check_value,
    decode_frame,
    scan_cbor,
)


def _array(items: list[bytes]) -> bytes:
    return b"\x9a" + len(items).to_bytes(4, "big") + b"".join(items)


BIG = cbor2.dumps(b"\x01" * 65536)
ATTACKS = {
    # tag 2 over a string reference to one 64 KiB byte string, 200,000 times
    "bignum-stringrefs": b"\xd9\x01\x00" + _array([b"\xc2" + BIG] + [b"\xc2\xd8\x19\x00"] * 200_000),
    # the same through a shared value (tags 28/29)
    "bignum-shared": _array([b"\xd8\x1c" + BIG] + [b"\xc2\xd8\x1d\x00"] * 200_000),
    "one-1MB-bignum": b"\xc2" + cbor2.dumps(b"\xff" * 1_000_000),
    "stringrefs-64KiB": b"\xd9\x01\x00" + _array([cbor2.dumps("s" * 65536)] + [b"\xd8\x19\x00"] * 300_000),
    "empty-arrays-4MiB": _array([b"\x80"] * 4_000_000),
    "empty-maps-4MiB": _array([b"\xa0"] * 4_000_000),
    "tiny-maps-4MiB": _array([b"\xa1\x61a\x00"] * 1_000_000),
    "deep-arrays": b"\x81" * 100_000 + b"\x00",
    "deep-indefinite": b"\x9f" * 100_000 + b"\xff" * 100_000,
    "deep-tags": b"\xd8\x64" * 100_000 + b"\x00",
    "declared-2^40-array": b"\x9b" + (2**40).to_bytes(8, "big") + b"\x00" * 20_000,
    "declared-2^40-map": b"\xbb" + (2**40).to_bytes(8, "big") + b"\x00" * 20_000,
    "declared-2^40-bytes": b"\x5b" + (2**40).to_bytes(8, "big") + b"\x00" * 20_000,
    "bigfloat-2^1e9": b"\xc5\x82" + cbor2.dumps(10**9) + b"\x01",
    "decimal-1e18": b"\xc4\x82" + cbor2.dumps(10**18) + b"\x01",
    "regex": b"\xd8\x23" + cbor2.dumps("(a+)+" * 1000),
}
JSON_ATTACKS = {
    "json-deep": b"[" * 1_000_000 + b"]" * 1_000_000,
    "json-million-digits": b"1" * 1_000_000,
    "json-empty-arrays": b"[" + b"[]," * 1_300_000 + b"[]]",
}

_RUNNER = r"""
import json, resource, sys, time
from swarm.protocol.wire import decode_frame
def hwm_kib():  # VmHWM is this image's own peak (ru_maxrss carries the parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
payload = open(sys.argv[1], "rb").read()
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
base = hwm_kib()
started = time.perf_counter()
try:
    decode_frame(payload, sys.argv[2] == "cbor")
    outcome = "ok"
except Exception as e:
    outcome = type(e).__name__
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started,
                  "peak_mib": (hwm_kib() - base) / 1024}))
"""


def _run(tmp_path, name: str, payload: bytes, encoding: str) -> dict:
    path = tmp_path / name
    path.write_bytes(payload)
    out = subprocess.run([sys.executable, "-c", _RUNNER, str(path), encoding],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    print(name, f"{len(payload) / 2**20:.2f} MiB", result)
    return result


@pytest.mark.parametrize("name", list(ATTACKS) + list(JSON_ATTACKS))
def test_attack_frames_stay_within_the_frame_budget(tmp_path, name):
    payload = ATTACKS.get(name) or JSON_ATTACKS[name]
    result = _run(tmp_path, name, payload, "json" if name in JSON_ATTACKS else "cbor")
    assert result["outcome"] in ("ok", "BadRequest", "TooLarge")
    # what decoding may hold: the budget of the scan, plus the interpreter's noise
    budget_mib = (DECODE_FACTOR * len(payload) + DECODE_SLACK) / 2**20
    assert result["peak_mib"] <= budget_mib + 16
    assert result["seconds"] < 10


def test_a_bignum_repeated_by_reference_decodes_to_unsupported_not_to_big_ints():
    frame = b"\xd9\x01\x00" + _array([b"\xc2" + BIG] + [b"\xc2\xd8\x19\x00"] * 3)
    decoded = decode_frame(frame, True)
    assert all(isinstance(v, Unsupported) for v in decoded)
    with pytest.raises(BadRequest, match="at most 64 bytes"):
        check_value(decoded, 32)


def test_small_bignums_are_integers_so_big_ids_still_echo():
    assert decode_frame(cbor2.dumps(2**70), True) == 2**70
    assert decode_frame(cbor2.dumps(-(2**70)), True) == -(2**70)
    with pytest.raises(BadRequest, match="64 bits"):
        check_value(decode_frame(cbor2.dumps([2**70]), True), 32)


@pytest.mark.parametrize("hexframe", [
    "c11a5e0be100", "c074323032302d30312d30315430303a30303a30305a", "c482200f",
    "c5822003", "d81e820103", "d82550504fbea439b248a0be4ad8882c27a6d7", "d8236161",
    "d90102820102", "d90fa001", "d8344401020304", "d9010444c0a80001", "d864190001",
])
def test_every_semantic_tag_decodes_to_unsupported_and_values_refuse_it(hexframe):
    decoded = decode_frame(bytes.fromhex(hexframe), True)
    assert isinstance(decoded, Unsupported)
    with pytest.raises(BadRequest):
        check_value({"a": [decoded]}, 32)
    parser = RequestParser()
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": "set", "key": "k", "value": decoded})
    with pytest.raises(BadRequest):
        parser.parse({"id": 1, "op": "get", "key": decoded})


def test_structural_tags_still_work():
    assert decode_frame(cbor2.dumps(["abc", "abc", "abc"], string_referencing=True), True) == ["abc"] * 3
    assert decode_frame(cbor2.dumps([[1, 2]], value_sharing=True), True) == [[1, 2]]
    assert decode_frame(b"\xd9\xd9\xf7\x01", True) == 1


def test_scan_refuses_what_would_decode_past_its_budget():
    frame = _array([b"\x80"] * 100_000)
    with pytest.raises(TooLarge):
        scan_cbor(frame, 32 * len(frame))
    assert scan_cbor(frame, 100 * len(frame)) is False


@pytest.mark.parametrize("frame", [
    b"\x82\x01", b"\x9f\x01", b"\xff", b"\x1c", b"\x5a\x00\x00\x00\x05ab", b"\x01\x02",
    b"\xd8", b"\x19\x01",
], ids=["short-array", "open-indefinite", "lone-break", "reserved", "short-bytes",
        "trailing", "tag-without-item", "short-int"])
def test_scan_and_decoder_agree_on_malformed_frames(frame):
    with pytest.raises(BadRequest):
        scan_cbor(frame, 1 << 30)
    with pytest.raises(SwarmError):
        decode_frame(frame, True)


@pytest.mark.parametrize("value", [
    [1, "two", b"three", 4.5, None, True, {"k": [[], {}]}],
    {"batch": [{"id": i, "op": "get", "key": f"k{i}"} for i in range(3000)]},
    ["x" * 40_000, b"y" * 40_000],
])
def test_scan_accepts_honest_frames_that_decode_alike(value):
    for kwargs in ({}, {"string_referencing": True}, {"value_sharing": True}):
        frame = cbor2.dumps(value, **kwargs)
        scan_cbor(frame, DECODE_FACTOR * len(frame) + DECODE_SLACK)
        assert decode_frame(frame, True) == value


def test_a_json_number_of_a_million_digits_is_a_clear_bad_request():
    with pytest.raises(BadRequest, match="more than 4300 digits"):
        decode_frame(b"[" + b"1" * 1_000_000 + b"]", False)


def test_the_quick_search_for_references_finds_every_reference_head():
    """A frame the one-search filter passes over would skip the expansion check."""
    from swarm.protocol import wire

    for head in wire._REFERENCE_HEADS:
        assert wire._REFERENCE_LEAD.search(b"\x82\x01" + head + b"\x00") is not None
    assert wire._REFERENCE_LEAD.search(cbor2.dumps({"op": "get", "key": "k", "id": 1})) is None
