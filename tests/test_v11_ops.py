"""The protocol's v1.1 ops: mdelete, scan and flush, and stats of another node.

The scan's order and merge are pure logic, tested here against a model (random keys on
random nodes, moved between steps as a changing view would move them); the store's
side (keys per partition, the flush floor) on a fake clock; then real nodes on
loopback, in a line, with tokens, and while a node joins mid-scan.
"""

from __future__ import annotations

import json
import random

import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio, start_node, start_swarm, stop_all, until
from twistd_support import Swarm, eventually
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.client import SwarmClient
from swarm.cluster.placement import partition_of
from swarm.edge.admission import TokenFile
from swarm.errors import BadRequest, Unauthorized, Unavailable
from swarm.protocol import scan
from swarm.protocol.entry import Entry
from swarm.store.memory import MemoryStore

# -- the scan's pure logic ------------------------------------------------------------------


def by_partition(keys) -> dict[int, set[str]]:
    parts: dict[int, set[str]] = {}
    for k in keys:
        parts.setdefault(partition_of(k), set()).add(k)
    return parts


def test_cursor_round_trips_and_refuses_what_it_did_not_make():
    for position in [(0, ""), (17, "a"), (4095, "ü/\"\\\n" * 3)]:
        cursor = scan.encode_cursor(position)
        assert cursor.isascii() and "=" not in cursor
        assert scan.decode_cursor(cursor) == position
    for bad in ["", "!!", "e30", "WzEsMiwzXQ", "WyJhIiwiYiJd"]:  # {}, [1,2,3], ["a","b"]
        with pytest.raises(ValueError):
            scan.decode_cursor(bad)


def test_matcher_is_a_whole_key_case_sensitive_glob():
    m = scan.matcher("user:[ab]?*")
    assert m("user:a1") and m("user:bxyz")
    assert not m("user:c1") and not m("User:a1") and not m("user:a") and not m("xuser:a1")
    assert scan.matcher("a*")("a\nb")  # * crosses newlines too


def test_node_step_stops_at_count_and_says_how_far_it_looked():
    keys = [f"k{i}" for i in range(50)]
    order = sorted((partition_of(k), k) for k in keys)
    found, upto = scan.keys_after(by_partition(keys), scan.START, 10)
    assert found == [k for _, k in order[:10]] and upto == order[9]
    rest, upto = scan.keys_after(by_partition(keys), order[9], 100)
    assert rest == [k for _, k in order[10:]] and upto is None


def test_node_step_looks_at_a_bounded_number_of_keys_when_few_match():
    keys = [f"k{i}" for i in range(300)]
    found, upto = scan.keys_after(by_partition(keys), scan.START, 10,
                                  scan.matcher("nothing*"), look_at=100)
    assert found == [] and upto is not None
    looked = [k for p, k in sorted((partition_of(k), k) for k in keys) if (p, k) <= upto]
    assert 100 <= len(looked) < 300


@settings(max_examples=150, deadline=None)
@given(
    keys=st.sets(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4),
                 min_size=0, max_size=120),
    nodes=st.integers(1, 5),
    count=st.integers(1, 40),
    look_at=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_every_key_present_throughout_is_returned_even_as_keys_move(keys, nodes, count,
                                                                    look_at, seed):
    """A model of the swarm: each key on one or two of the nodes; between steps some
    keys move to other nodes (a changing view) and keys that come and go are added
    and removed. Every key present throughout comes back, and the scan ends."""
    rng = random.Random(seed)
    holders = {k: set(rng.sample(range(nodes), rng.randint(1, min(2, nodes)))) for k in keys}
    transient = [f"t{i}" for i in range(20)]
    position, seen, steps = scan.START, set(), 0
    while True:
        parts = [by_partition(k for k, h in holders.items() if n in h) for n in range(nodes)]
        answers = [scan.keys_after(p, position, count, None, look_at) for p in parts]
        step, upto = scan.merge_step(answers, count, partition_of)
        assert len(step) <= count and len(step) == len(set(step))
        assert all((partition_of(k), k) > position for k in step)  # it only moves on
        seen.update(step)
        steps += 1
        assert steps < 10 * len(keys) + 50
        if upto is None:
            break
        assert upto > position
        position = upto
        for k in rng.sample(sorted(keys), min(len(keys), 3)):  # the view moves keys
            holders[k] = {rng.randrange(nodes)}
        t = rng.choice(transient)  # keys that come and go meanwhile
        if t in holders:
            del holders[t]
        else:
            holders[t] = {rng.randrange(nodes)}
    assert keys <= seen


# -- the store ------------------------------------------------------------------------------


def store(clock) -> MemoryStore:
    return MemoryStore(clock, partition=partition_of)


def test_store_lists_live_keys_only(clock):
    s = store(clock)
    s.set("a", 1, None)
    s.set("b", 1, ttl=5)
    s.set("c", 1, None)
    s.delete("c")
    clock.advance(6)
    found, upto = s.keys_after(scan.START, 10)
    assert found == ["a"] and upto is None
    assert s.partition_counts() == {partition_of("a"): 1}


def test_a_store_without_partitions_cannot_be_scanned(clock):
    with pytest.raises(TypeError):
        MemoryStore(clock).keys_after(scan.START, 10)


def test_clear_removes_what_is_older_and_keeps_it_from_coming_back(clock):
    s = store(clock)
    s.set("old", 1, None)
    s.delete("gone")
    before = s.hlc.now()
    stale = Entry("stale", "x", None, (before[0] - 1, 0, "elsewhere"), False)
    assert s.clear(before) == 1
    assert len(s) == 0 and s.stats()["tombstones"] == 0 and s.memory_bytes == 0
    assert s.put(stale) is False  # a replica's or a handoff's older copy
    assert s.set("late", 1, None, at=stale.version) is True  # made before the flush:
    assert s.get("late") == (False, None)  # flushed with it
    s.set("new", 2, None)
    assert s.get("new") == (True, 2)
    assert s.put(Entry("newer", 3, None, s.hlc.now(), False)) is True


def test_mdelete_counts_the_keys_that_existed(clock):
    from swarm.cluster.commands import StoreCommands

    commands = StoreCommands(store(clock))
    commands.execute({"id": 1, "op": "mset", "items": {"a": 1, "b": 2}})
    assert commands.execute({"id": 2, "op": "mdelete", "keys": ["a", "b", "c", "a"]}) == {
        "deleted": 2}


# -- admin tokens ---------------------------------------------------------------------------


def test_token_file_marks_admin_tokens_and_refuses_other_words(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops\nclient-token\nadmin-token admin\n")
    tokens = TokenFile(str(path))
    assert tokens.valid(b"client-token") and tokens.valid(b"admin-token")
    assert tokens.admin(b"admin-token") and not tokens.admin(b"client-token")
    assert not tokens.admin(b"admin")
    path.write_text("t1\nt2 root\n")
    with pytest.raises(ValueError, match="line 2"):
        TokenFile(str(path))


# -- real nodes -------------------------------------------------------------------------------


async def scan_all(client, **options) -> list[str]:
    keys, cursor, steps = [], None, 0
    while True:
        cursor, step = await client.scan(cursor, **options)
        keys += step
        steps += 1
        assert steps < 1000
        if cursor is None:
            return keys


@pytest_twisted.ensureDeferred
async def test_scan_mdelete_flush_on_one_node(node):
    client = await SwarmClient.connect(node.url)
    try:
        await client.mset({f"user:{i}": i for i in range(250)} | {"other": 0})
        keys = await scan_all(client, count=40)
        assert sorted(keys) == sorted([f"user:{i}" for i in range(250)] + ["other"])
        assert len(keys) == len(set(keys))  # one node: no key twice
        assert sorted(await scan_all(client, match="user:1?")) == [f"user:1{i}" for i in range(10)]
        assert await client.scan(count=10_000) == (None, keys and sorted(
            keys, key=lambda k: (partition_of(k), k)))
        with pytest.raises(BadRequest):
            await client.scan("garbage")
        assert await client.mdelete(["user:0", "user:1", "nope"]) == 2
        assert await client.get("user:0") is None
        assert await client.flush() == 249
        assert await scan_all(client) == []
        assert (await client.stats())["keys"] == 0
        assert await client.set("after", 1) is True
        assert await client.get("after") == 1
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_scan_mdelete_flush_and_stats_across_a_line():
    nodes = await start_swarm(3, [(1, 0), (2, 1)])
    client = await SwarmClient.connect(nodes[2].url)
    try:
        items = {f"k{i}": i for i in range(300)}
        await client.mset(items)
        assert all(n.store.stats()["keys"] > 0 for n in nodes)  # spread over the line
        assert sorted(await scan_all(client, count=25)) == sorted(items)
        assert await client.mdelete([f"k{i}" for i in range(100)]) == 100
        assert sorted(await scan_all(client, count=1000)) == sorted(
            f"k{i}" for i in range(100, 300))
        # stats of another node, through the swarm
        far = await client._call("stats", {"node": "n0"}, lambda r: r["stats"])
        assert far["node"] == "n0" and far["keys"] == nodes[0].store.stats()["keys"]
        with pytest.raises(Unavailable):
            await client._call("stats", {"node": "nobody"}, lambda r: r)
        assert await client.flush() == 200
        assert [n.store.stats()["keys"] for n in nodes] == [0, 0, 0]
    finally:
        await client.close()
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_flush_with_replicas_does_not_come_back():
    nodes = await start_swarm(3, [(1, 0), (2, 1)], replicas=2)
    try:
        await nodes[0].mset({f"k{i}": i for i in range(100)})
        assert sum(n.store.stats()["keys"] for n in nodes) == 200
        assert await nodes[1].flush() == 200
        for n in nodes:  # anti-entropy compares the owners' copies: nothing to bring back
            n.core._anti_entropy()
        await nodes[2].set("fresh", 1)
        await until(lambda: sum(n.store.stats()["keys"] for n in nodes) == 2,
                    what="only the write after the flush, on its two owners")
        assert await nodes[0].get("k1") is None
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_scan_returns_every_key_while_a_node_joins():
    nodes = await start_swarm(2, [(1, 0)])
    client = await SwarmClient.connect(nodes[0].url)
    try:
        keys = {f"key-{i}" for i in range(400)}
        await client.mset({k: 1 for k in keys})
        cursor, seen = await client.scan(count=50)
        seen = set(seen)
        joiner = await start_node(node_id="n2")
        nodes.append(joiner)
        joiner.add_peer(nodes[1].url)
        await until(lambda: len(nodes[0].overlay.membership.reachable) == 3, what="a join")
        while cursor is not None:  # the placement has changed: partitions move now
            cursor, step = await client.scan(cursor, count=50)
            seen.update(step)
        assert keys <= seen
    finally:
        await client.close()
        await stop_all(nodes)


async def ws_call(url: str, frame, headers=None):
    async with websockets.connect(url, additional_headers=headers or {}) as ws:
        await ws.send(json.dumps(frame))
        return json.loads(await ws.recv())


@pytest_twisted.ensureDeferred
async def test_flush_needs_an_admin_token_when_tokens_are_on(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("client-token\nadmin-token admin\n")
    n = await start_node(node_id="t", client_token_file=str(path))
    try:
        await n.set("k", 1)
        plain = {"authorization": "Bearer client-token"}
        reply = await on_asyncio(ws_call(n.url, {"id": 1, "op": "flush"}, plain))
        assert reply["error"]["code"] == Unauthorized.code
        batch = await on_asyncio(ws_call(n.url, [{"id": 1, "op": "get", "key": "k"},
                                                 {"id": 2, "op": "flush"}], plain))
        assert batch[0]["value"] == 1 and batch[1]["error"]["code"] == "unauthorized"
        reply = await on_asyncio(ws_call(n.url + "/?token=client-token", {"id": 3, "op": "flush"}))
        assert reply["error"]["code"] == "unauthorized"
        assert await n.get("k") == 1
        reply = await on_asyncio(ws_call(n.url, {"id": 4, "op": "flush"},
                                         {"authorization": "Bearer admin-token"}))
        assert reply == {"id": 4, "ok": True, "flushed": 1}
        admin = await SwarmClient.connect(n.url, token="admin-token")
        try:
            assert await admin.flush() == 0
        finally:
            await admin.close()
    finally:
        await n.stopService()


@pytest_twisted.ensureDeferred
async def test_a_frozen_node_fails_a_flush_and_a_scan_step_which_say_so(tmp_path):
    async with Swarm(tmp_path, "--request-timeout", "1") as swarm:
        a = await swarm.start("f1")
        await swarm.start("f2", swarm.url("f1"))
        await swarm.until_whole("f1 and f2 linked", 15)
        await a.mset({f"k{i}": i for i in range(50)})
        swarm.freeze("f2")  # SIGSTOP: its link stays up, it answers nothing
        try:
            with pytest.raises(Unavailable, match=r"f2.* ask again") as info:
                await a.scan()
            with pytest.raises(Unavailable, match=r"flushed \d+ entries on 1 of 2 nodes; "
                                                  r"not on f2") as info:
                await a.flush()
        finally:
            swarm.thaw("f2")
        assert (await a.stats())["keys"] == 0
        assert int(str(info.value).split()[1]) < 50  # f2 held some of them
        # f2 read its part once thawed and ran it, late, like a write that timed out
        await eventually(lambda: swarm.clients["f2"].stats(), "f2 answers again", 10)
        assert (await swarm.clients["f2"].stats())["keys"] == 0
        assert await a.flush() == 0
