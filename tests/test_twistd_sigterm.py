"""SIGTERM under pipelined load (issue 8): every request the stopping node has read gets
its reply, or is not applied.

Two real ``twistd`` nodes; a ``websockets`` client pipelines writes of distinct keys
into node a as fast as it can and a SIGTERM reaches a while hundreds are in flight.
Node a leaves gracefully (its entries go to b), so afterwards b holds exactly what was
applied anywhere: the keys it holds must be exactly the writes answered ``stored``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest_twisted
import websockets
from conftest import on_asyncio
from twistd_support import CLEAN_SIGTERM_STATUS, Swarm

#: Writes the client may send in all (bounded); it stops at the close well before.
MAX_WRITES = 20_000
#: Writes answered before the SIGTERM, so the node is busy when it comes.
BEFORE_SIGTERM = 300


async def _pipeline_through_a_sigterm(url: str, send_sigterm) -> dict:
    """Send set k<i> frames without waiting; SIGTERM as the BEFORE_SIGTERM-th reply
    arrives, while the node holds hundreds more it has read; go on sending until the
    connection closes. Returns the replies by id, the ids sent and the close code."""
    replies: dict[int, dict] = {}
    sent: list[int] = []
    sigterm_at: list[int] = []
    async with websockets.connect(url, open_timeout=10, max_size=None) as ws:

        async def read() -> None:
            async for frame in ws:
                reply = json.loads(frame)
                replies[reply["id"]] = reply
                if not sigterm_at and len(replies) >= BEFORE_SIGTERM:
                    sigterm_at.append(len(sent))
                    send_sigterm()

        reader = asyncio.ensure_future(read())
        try:
            for i in range(MAX_WRITES):
                if reader.done():
                    break
                await ws.send(json.dumps({"id": i, "op": "set", "key": f"k{i}", "value": i}))
                sent.append(i)
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the reader run
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(reader, 30)
        code = ws.close_code
    return {"replies": replies, "sent": sent, "code": code,
            "sigterm_at": sigterm_at[0] if sigterm_at else None}


@pytest_twisted.ensureDeferred
async def test_sigterm_under_pipelined_writes_answers_every_request_it_applied(tmp_path):
    async with Swarm(tmp_path, "--replicas", "1") as s:
        await s.start("a")
        await s.start("b", s.url("a"))
        await s.until_whole("a and b linked", 20)
        a = s.nodes["a"]
        started = time.monotonic()
        out = await on_asyncio(
            _pipeline_through_a_sigterm(a.url, lambda: a.proc.send_signal(signal.SIGTERM)),
            timeout=90,
        )
        assert await a.exited() in CLEAN_SIGTERM_STATUS, a.describe()
        assert "Traceback" not in a.output(), a.describe()
        replies, sent = out["replies"], out["sent"]
        assert out["sigterm_at"] is not None, "the node answered too few writes to stop"
        assert out["code"] == 1001, a.describe()

        stored = {i for i, r in replies.items() if r.get("ok") and r.get("stored")}
        failed = {i: r["error"]["code"] for i, r in replies.items() if not r.get("ok")}
        keys = [f"k{i}" for i in sent]
        held = set()
        b = s.clients["b"]
        for start in range(0, len(keys), 1000):
            values = await b.mget(keys[start:start + 1000])
            held |= {start + j for j, v in enumerate(values) if v is not None}
        print(f"sent {len(sent)} writes, SIGTERM after {out['sigterm_at']}; "
              f"{len(stored)} answered stored, {len(failed)} failed, "
              f"{len(sent) - len(replies)} unanswered; b holds {len(held)}; "
              f"{time.monotonic() - started:.1f} s")
        assert not failed, f"writes answered with errors: {failed}\n{a.describe()}"
        assert held - stored == set(), "applied, and never answered"
        assert stored - held == set(), "answered stored, and lost"
        assert len(sent) - len(replies) > 0, "the SIGTERM came after every write was read"

