"""Peak memory of a node under two attacks of issue 8, measured on a real process.

Run: ``PYTHONPATH=/work/main python tests/backpressure_rss.py`` (about 30 s). Not a test:
it prints figures (RSS from ``/proc``) for the closing note of issue 8; the bounded
behaviour itself is asserted by tests/test_backpressure.py.

- ``never-reads``: a client stores a 1 MB value, stops reading its socket and pipelines
  1,500 ``get``s of it. Without backpressure the node buffers every reply (1.5 GB).
- ``tiny-batch``: one 4 MB CBOR frame holding a batch of about 4 million one-byte items
  (each the integer 0, so each a bad request past the batch limit).

Each attack runs against a fresh node in a subprocess, so one does not inherit the
other's heap.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import cbor2
import websockets

NODE = """
import sys
from twisted.internet import reactor
from swarm.node.node import SwarmNode
node = SwarmNode("tcp:0:interface=127.0.0.1", node_id="rss", reactor=reactor)
node.startService()
node.when_listening().addCallback(lambda _: print(node.url, flush=True))
reactor.run()
"""

MiB = 1024 * 1024
#: Every wait below is bounded by this many seconds.
DEADLINE = 60.0


def rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of ``pid`` in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


async def settled(pid: int, quiet: float = 1.0) -> tuple[int, int]:
    """RSS once it has not grown by more than 1 MiB for ``quiet`` seconds."""
    deadline = time.monotonic() + DEADLINE
    last, since = rss(pid)[0], time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = rss(pid)[0]
        if now > last + MiB:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return rss(pid)


async def ping_time(url: str) -> float:
    """Seconds a fresh client waits for a ping reply."""
    start = time.monotonic()
    async with websockets.connect(url, open_timeout=DEADLINE) as ws:
        await ws.send(cbor2.dumps({"id": 1, "op": "ping"}))
        await asyncio.wait_for(ws.recv(), DEADLINE)
    return time.monotonic() - start


async def never_reads(url: str, pid: int) -> str:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(cbor2.dumps({"id": 0, "op": "set", "key": "big", "value": "v" * 1_000_000}))
        await asyncio.wait_for(ws.recv(), DEADLINE)
        base = await settled(pid)
        ws.transport.pause_reading()
        for i in range(1, 1501):
            await asyncio.wait_for(ws.send(cbor2.dumps({"id": i, "op": "get", "key": "big"})), DEADLINE)
        after = await settled(pid, quiet=2.0)
        other = await ping_time(url)
        ws.transport.abort()
    return (f"never-reads: RSS {base[0] / MiB:.0f} MiB before, {after[0] / MiB:.0f} MiB "
            f"after 1,500 gets (+{(after[0] - base[0]) / MiB:.0f} MiB), peak "
            f"{after[1] / MiB:.0f} MiB; another client's ping answered in {other:.3f} s")


async def tiny_batch(url: str, pid: int) -> str:
    count = 4 * MiB - 16
    frame = b"\x9a" + count.to_bytes(4, "big") + b"\x00" * count  # [0, 0, ...] in CBOR
    async with websockets.connect(url, max_size=None) as ws:
        base = await settled(pid)
        start = time.monotonic()
        await ws.send(frame)
        try:
            reply = await asyncio.wait_for(ws.recv(), DEADLINE)
            outcome = f"a {len(reply) / MiB:.1f} MiB reply"
        except websockets.ConnectionClosed as e:
            outcome = f"closed {e.rcvd.code if e.rcvd else None} ({e.rcvd.reason if e.rcvd else ''})"
        took = time.monotonic() - start
        after = await settled(pid)
    other = await ping_time(url)
    return (f"tiny-batch: {count:,} items in {len(frame) / MiB:.1f} MiB -> {outcome} after "
            f"{took:.1f} s; RSS {base[0] / MiB:.0f} MiB before, peak {after[1] / MiB:.0f} MiB "
            f"(+{(after[1] - base[0]) / MiB:.0f} MiB); another client's ping answered in "
            f"{other:.3f} s")


def run(attack) -> str:
    proc = subprocess.Popen([sys.executable, "-c", NODE], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=dict(os.environ))
    try:
        url = proc.stdout.readline().decode().strip()
        if not url:
            return f"{attack.__name__}: the node did not start"
        return asyncio.run(asyncio.wait_for(attack(url, proc.pid), 3 * DEADLINE))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    for attack in (never_reads, tiny_batch):
        print(run(attack), flush=True)
