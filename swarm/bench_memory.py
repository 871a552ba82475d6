"""What ``--max-memory`` charges against what values really cost, per shape of value.

Run ``python -m swarm.bench_memory``. For each shape it decodes COUNT values from
their CBOR frames (as a client's ``set`` would), then measures, in a fresh
subprocess per shape so one shape's garbage does not flatter the next:

- value: :func:`swarm.store.memory.measure` per value against the bytes tracemalloc
  sees allocated for the values alone;
- entry: the store's ``memory_bytes`` per entry against tracemalloc and against RSS
  growth when the values are stored in a :class:`MemoryStore` (keys, slots, versions,
  the LRU map: what the budget is meant to bound).

The ratio is accounted / measured; the goal is 0.75-1.25 for every shape.

``python -m swarm.bench_memory --keys 1000000`` instead stores that many keys
(``key:000000000001``, 16 bytes) of 100-byte string values in one store and prints the
RSS growth and the accounting per key, the longest of three full garbage collections
with all of them held, and, when ``redis-server`` is installed, Redis's
``used_memory`` growth per key for the same keys and values, and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Callable

#: Values of each shape, made from an index so they are distinct objects.
SHAPES: dict[str, Callable[[int], Any]] = {
    "ascii str 10": lambda i: f"v{i:09d}",
    "ascii str 1000": lambda i: f"{i:010d}" * 100,
    "latin-1 str 100": lambda i: f"é{i:09d}" * 10,
    "ucs-2 str 100": lambda i: f"日{i:09d}" * 10,
    "emoji str 100": lambda i: f"🙂{i:09d}" * 10,
    "bytes 10": lambda i: i.to_bytes(10, "big"),
    "bytes 1000": lambda i: i.to_bytes(4, "big") * 250,
    "small int": lambda i: i + 300,
    "float": lambda i: i + 0.5,
    "bool/null": lambda i: (True, False, None)[i % 3],
    "list of 20 ints": lambda i: list(range(i, i + 20)),
    "list of 10 floats": lambda i: [i + k / 4 for k in range(10)],
    "list of bools": lambda i: [True, False, None] * 10,
    "map of 3": lambda i: {"name": f"user{i}", "age": i % 90 + 300, "ok": True},
    "map of 20": lambda i: {f"field{k}": i + k for k in range(20)},
    "nested": lambda i: {"id": i, "tags": ["a", "bb", f"t{i}"],
                         "pos": {"x": i / 3, "y": [i, i + 1000]}, "meta": [{}, []]},
    "list of 20 maps": lambda i: [{"k": i + k, "v": [k + 300]} for k in range(20)],
}


def _frames(shape: str, count: int) -> list[bytes]:
    from swarm.protocol.wire import encode_frame

    make = SHAPES[shape]
    return [encode_frame(make(i), True) for i in range(count)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure_shape(shape: str, count: int, rss: bool = False) -> dict:
    """Accounted and measured bytes per value and per entry for ``count`` values."""
    from twisted.internet.task import Clock

    from swarm.protocol.wire import decode_frame
    from swarm.store.memory import ENTRY_OVERHEAD, MemoryStore, measure

    frames = _frames(shape, count)
    keys = [f"key:{i:07d}" for i in range(count)]
    held: list[Any] = [None] * (0 if rss else count)  # freed memory would flatter RSS
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(len(held)):
        held[i] = decode_frame(frames[i], True)
    value_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    started = time.perf_counter()
    accounted = sum(measure(v) for v in held)
    held_count = max(len(held), 1)
    cost_us = (time.perf_counter() - started) / held_count * 1e6

    del held
    gc.collect()
    store = MemoryStore(Clock(), max_memory=1 << 40, max_value_bytes=1 << 40)
    if rss:
        rss_before = _rss()
    else:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    for key, frame in zip(keys, frames):
        # a key and a value new like a request's, decoded where they are stored
        store.set(key.encode().decode(), decode_frame(frame, True), None)
    gc.collect()
    entry_bytes = (_rss() - rss_before) if rss else tracemalloc.get_traced_memory()[0] - before
    if not rss:
        tracemalloc.stop()
    return {
        "shape": shape,
        "count": count,
        "value_accounted": accounted / held_count,
        "value_measured": value_bytes / held_count,
        "entry_accounted": store.memory_bytes / count,
        "entry_measured": entry_bytes / count,
        "entry_overhead": ENTRY_OVERHEAD,
        "measure_us": cost_us,
    }


def _in_subprocess(shape: str, count: int, rss: bool) -> dict:
    code = (
        "import json, sys; from swarm.bench_memory import measure_shape; "
        f"print(json.dumps(measure_shape({shape!r}, {count}, rss={rss})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout)


def _key_and_value(i: int) -> tuple[str, str]:
    return f"key:{i:012d}", "v" * 90 + f"{i:010d}"


def measure_keys(count: int) -> dict:
    """RSS growth and accounting per key, and the full-GC pause, for ``count`` keys."""
    from twisted.internet.task import Clock

    from swarm.protocol.wire import decode_frame, encode_frame
    from swarm.store.memory import MemoryStore

    store = MemoryStore(Clock(), max_memory=1 << 40)
    gc.collect()
    before = _rss()
    for i in range(count):
        key, value = _key_and_value(i)
        store.set(key, decode_frame(encode_frame(value, True), True), None)
    gc.collect()
    grown = _rss() - before
    pauses = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        pauses.append(time.perf_counter() - started)
    return {"count": count, "rss": grown / count, "accounted": store.memory_bytes / count,
            "gc_ms": max(pauses) * 1000}


def redis_bytes_per_key(count: int) -> float | None:
    """Redis's ``used_memory`` growth per key for the same keys, None without Redis."""
    import shutil
    import tempfile

    from swarm.bench_compare import Redis

    if shutil.which("redis-server") is None:
        return None
    workdir = tempfile.mkdtemp(prefix="swarm-bench-memory-")
    redis = Redis(workdir)
    try:
        conn = redis.connect()
        with conn:
            reader = conn.makefile("rb")

            def call(*commands: list[bytes]) -> list[bytes]:
                out = bytearray()
                for args in commands:
                    out += b"*%d\r\n" % len(args)
                    for arg in args:
                        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
                conn.sendall(out)
                replies = []
                for _ in commands:
                    line = reader.readline()
                    if line.startswith(b"$"):
                        line = reader.read(int(line[1:]) + 2)
                    replies.append(line)
                return replies

            def used() -> int:
                (info,) = call([b"INFO", b"memory"])
                return int(info.split(b"used_memory:")[1].split(b"\r\n")[0])

            start = used()
            for first in range(0, count, 10_000):
                call(*([b"SET", *(part.encode() for part in _key_and_value(i))]
                       for i in range(first, min(first + 10_000, count))))
            return (used() - start) / count
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _ratio(accounted: float, measured: float) -> str:
    return f"{accounted / measured:6.2f}" if measured >= 1 else f"{'-':>6}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="values per shape")
    parser.add_argument("--keys", type=int, help="measure this many 100-byte entries "
                        "(and Redis, when installed) instead of every shape")
    args = parser.parse_args(argv)
    if args.keys:
        code = ("import json; from swarm.bench_memory import measure_keys; "
                f"print(json.dumps(measure_keys({args.keys})))")
        ours = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                         text=True, timeout=1800, check=True).stdout)
        print(f"{args.keys} keys of 16 bytes, 100-byte string values: RSS growth "
              f"{ours['rss']:.0f} B/key, accounted {ours['accounted']:.0f} B/key "
              f"(accounted/RSS {ours['accounted'] / ours['rss']:.2f}), longest full GC "
              f"{ours['gc_ms']:.0f} ms")
        redis = redis_bytes_per_key(args.keys)
        if redis is None:
            print("redis-server is not installed: no comparison")
        else:
            print(f"Redis used_memory growth {redis:.0f} B/key; RSS per key / Redis "
                  f"{ours['rss'] / redis:.2f}x (target <= 1.5x)")
        return
    print(f"{args.count} values per shape; bytes per value (ratio = accounted / measured)")
    print(f"{'shape':18} {'measure':>8} {'traced':>8} {'ratio':>6} | {'entry acc':>9} "
          f"{'traced':>8} {'ratio':>6} {'RSS':>8} {'ratio':>6} | {'us/call':>7}")
    for shape in SHAPES:
        t = _in_subprocess(shape, args.count, rss=False)
        r = _in_subprocess(shape, args.count, rss=True)
        print(f"{shape:18} {t['value_accounted']:8.0f} {t['value_measured']:8.0f} "
              f"{_ratio(t['value_accounted'], t['value_measured'])} | "
              f"{t['entry_accounted']:9.0f} {t['entry_measured']:8.0f} "
              f"{t['entry_accounted'] / max(t['entry_measured'], 1):6.2f} "
              f"{r['entry_measured']:8.0f} "
              f"{r['entry_accounted'] / max(r['entry_measured'], 1):6.2f} | "
              f"{t['measure_us']:7.2f}")


if __name__ == "__main__":
    main()
