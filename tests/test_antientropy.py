"""Anti-entropy: owners compare partition digests and exchange only what differs.
Unit tests of swarm.cluster.antientropy, then rounds in the simulator."""

from __future__ import annotations

from twisted.internet.task import Clock

from swarm.cluster import antientropy, commands
from swarm.cluster.antientropy import INTERVAL, compare, digests, entry_hash, fingerprint
from swarm.cluster.placement import PARTITIONS, partition_of
from swarm.node.core import AFTER_CHANGE
from swarm.protocol.entry import Entry
from swarm.simulator import Swarm
from swarm.store.memory import MemoryStore


def entry(key, version, deleted=False):
    return Entry(key, None if deleted else "v", None, version, deleted)


def test_a_digest_covers_keys_versions_and_tombstones_and_not_the_order():
    a, b = entry("a", (1, 0, "n")), entry("b", (2, 0, "n"))
    p = {partition_of("a"), partition_of("b")}
    assert digests([a, b], p) == digests([b, a], p)
    assert digests([a], p) != digests([entry("a", (1, 1, "n"))], p)
    assert entry_hash(entry("a", (1, 0, "n"))) != entry_hash(entry("a", (1, 0, "n"), True))
    assert digests([], [7]) == {7: 0}


def test_compare_names_the_partitions_that_differ_and_returns_their_entries():
    store = MemoryStore(Clock())
    store.set("same", 1, None)
    store.set("differs", 2, None)
    theirs = digests(store.entries(), {partition_of("same"), partition_of("differs")})
    theirs[partition_of("differs")] ^= 1  # the other owner's copy is another version
    differ, more, entries, _ = compare(store, theirs)
    assert (differ, more) == ([partition_of("differs")], [])
    assert [e.key for e in entries] == ["differs"]
    assert compare(store, digests(store.entries(), theirs)) == ([], [], [], [])


def test_a_compare_answer_is_bounded_and_names_the_partitions_left_to_ask_for():
    store = MemoryStore(Clock())
    for i in range(300):
        store.set(f"k{i}", i, None)
    everything = range(PARTITIONS)
    empty = dict.fromkeys(everything, 0)  # an owner that holds nothing yet
    answered, more, entries, _ = compare(store, empty, max_entries=50)
    assert 0 < len(entries) <= 50 and more
    assert {partition_of(e.key) for e in entries} == set(answered)
    assert not set(answered) & set(more)
    assert len(answered) + len(more) == len({partition_of(f"k{i}") for i in range(300)})
    one, _, alone, _ = compare(store, empty, max_entries=0)  # still one partition's worth
    assert len(one) == 1 and alone


def digest_store(clock=None, **config) -> MemoryStore:
    """A store as a node makes it: digests per partition kept on every change."""
    return MemoryStore(clock or Clock(), partition=partition_of, fingerprint=fingerprint,
                       **config)


def test_a_store_keeps_its_digests_equal_to_a_scan_through_every_kind_of_change():
    clock = Clock()
    store = digest_store(clock, max_memory=40_000)
    for i in range(200):  # more than fits: the first ones are evicted
        store.set(f"k{i}", "x" * 50, 5 if i % 3 else None)
    store.set("k150", "again", None)
    store.delete("k151")
    store.delete("never-held")
    store.expire("k152", 1)
    store.incr("n", 2, None)
    store.put(Entry("k153", "merged", None, (store.hlc.now()[0] + 9, 0, "x")))
    store.take(["k154"])
    store.discard("k155", store.read(["k155"])[0].version)
    clock.advance(2)  # k152 expired, not swept yet
    everything = range(PARTITIONS)
    assert store.digests(everything) == digests(store.entries(), everything)
    assert {e.key for p in everything for e in store.partition_entries(p)} == \
        {e.key for e in store.entries()}
    clock.advance(4)  # the entries with a ttl, then the tombstone's clear
    store.clear(store.hlc.now())
    assert store.digests(everything) == dict.fromkeys(everything, 0)


def test_compare_with_a_store_that_keeps_digests_scans_nothing(monkeypatch):
    store = digest_store()
    for i in range(300):
        store.set(f"k{i}", i, None)
    theirs = store.digests(range(PARTITIONS))
    theirs[partition_of("k7")] ^= 1
    monkeypatch.setattr(store, "entries", None)  # a scan would fail
    differ, more, entries, _ = compare(store, theirs)
    assert (differ, more) == ([partition_of("k7")], [])
    assert {e.key for e in entries} == {f"k{i}" for i in range(300)
                                        if partition_of(f"k{i}") == partition_of("k7")}


def test_a_compare_answer_is_bounded_by_bytes_too():
    store = digest_store(max_memory=10 ** 8)
    for i in range(100):
        store.set(f"k{i}", "x" * 10_000, None)
    answered, more, entries, _ = compare(store, dict.fromkeys(range(PARTITIONS), 0),
                                      max_bytes=100_000)
    assert 1 <= len(entries) <= 10 and len(answered) + len(more) == \
        len({partition_of(f"k{i}") for i in range(100)})


def test_anti_entropy_asks_again_until_every_differing_partition_is_answered(monkeypatch):
    monkeypatch.setattr(antientropy, "COMPARE_ENTRIES", 5)
    monkeypatch.setattr(commands.compare, "__defaults__", (5, antientropy.COMPARE_BYTES))
    swarm, keys = two_owners()
    for key in keys:  # n1 misses every copy, as a backup that restarted would
        swarm["n1"].store.take([key])
    swarm["n1"].core.anti_entropy.run(everything=True)
    swarm.settle()
    assert all(swarm["n1"].store.get(k) == (True, "v1") for k in keys)
    assert swarm["n1"].core.anti_entropy.repairs == len(keys)


def test_after_a_restart_a_node_is_filling_until_its_partners_filled_it():
    swarm = Swarm(replicas=2)
    swarm.build(3, [(0, 1), (1, 2), (2, 0)])
    keys = [f"k{i}" for i in range(200)]
    assert swarm.call("n0", "mset", items=dict.fromkeys(keys, "v"))["stored"] == len(keys)
    links = swarm.crash("n2")
    swarm.settle()
    swarm.nodes["n2"].start()  # afresh, with the same id
    for a, b in links:
        swarm.link(a, b)
    router = swarm["n2"].core.router
    swarm.run(0.2)  # linked again, not filled yet
    assert router.filling
    owned = [k for k in keys if "n2" in swarm.call("n2", "owner", key=k)["nodes"]]
    swarm.run(AFTER_CHANGE + 1)
    assert not router.filling
    assert all(swarm["n2"].store.get(k) == (True, "v") for k in owned)


def test_a_refill_asked_for_during_a_round_runs_after_it():
    swarm, _ = two_owners()
    ae = swarm["n0"].core.anti_entropy
    rounds = ae.rounds
    first = ae.run()
    assert ae.run() is first  # a periodic round joins the one under way
    refill = ae.run(everything=True)
    assert refill is not first and ae.run(everything=True) is refill
    swarm.wait(refill, timeout=5)
    assert first.called and ae.rounds == rounds + 2


def two_owners():
    swarm = Swarm(replicas=2)
    swarm.build(2, [(0, 1)])
    keys = [f"k{i}" for i in range(40)]
    for key in keys:
        swarm.call("n0", "set", key=key, value="v1")
    # the refill after the link came up is over: what follows is the periodic rounds
    swarm.until(lambda: not any(swarm[n].core.router.filling for n in ("n0", "n1")),
                what="both owners to be filled")
    return swarm, keys


def test_an_idle_round_between_equal_owners_moves_no_entry():
    swarm, keys = two_owners()
    rounds = [swarm[n].core.anti_entropy.rounds for n in ("n0", "n1")]
    swarm.run(INTERVAL + 1)
    assert [swarm[n].core.anti_entropy.rounds for n in ("n0", "n1")] == [r + 1 for r in rounds]
    assert all(swarm[n].core.anti_entropy.repairs == 0 for n in ("n0", "n1"))
    assert swarm.call("n0", "stats")["stats"]["anti_entropy_rounds"] >= 1


def test_copies_that_diverged_converge_to_the_newer_within_one_round():
    swarm, keys = two_owners()
    newer = swarm["n1"].core.store.hlc.now()[0] + 1000
    # as if each side had missed a write while apart: n1 has newer copies of some keys,
    # n0 of others, and a delete only n0 saw
    for i, key in enumerate(keys[:10]):
        swarm["n1"].store.put(Entry(key, "n1 newer", None, (newer, i, "n1")))
    for i, key in enumerate(keys[10:20]):
        swarm["n0"].store.put(Entry(key, "n0 newer", None, (newer, i, "n0")))
    swarm["n0"].store.put(Entry(keys[20], None, 300, (newer, 0, "n0"), deleted=True))
    swarm.run(INTERVAL + 1)
    for node in ("n0", "n1"):
        store = swarm[node].store
        assert [store.get(k)[1] for k in keys[:10]] == ["n1 newer"] * 10, node
        assert [store.get(k)[1] for k in keys[10:20]] == ["n0 newer"] * 10, node
        assert store.exists(keys[20]) is False, node
        assert [store.get(k)[1] for k in keys[21:]] == ["v1"] * 19, node
    assert sum(swarm[n].core.anti_entropy.repairs for n in ("n0", "n1")) == 21


def test_a_round_follows_each_change_of_view():
    swarm, _ = two_owners()
    swarm.add("n2")
    before = swarm["n0"].core.anti_entropy.rounds + swarm["n1"].core.anti_entropy.rounds
    swarm.link("n2", "n1")
    swarm.settle()
    swarm.run(AFTER_CHANGE)
    after = sum(swarm[n].core.anti_entropy.rounds for n in ("n0", "n1", "n2"))
    assert after > before


def test_one_replica_runs_no_round():
    swarm = Swarm(replicas=1)
    swarm.build(2, [(0, 1)])
    swarm.run(INTERVAL + 1)
    assert all(swarm[n].core.anti_entropy.rounds == 0 for n in ("n0", "n1"))


def test_compare_leaves_out_the_partitions_still_being_handed_over():
    store = digest_store()
    for i in range(300):
        store.set(f"k{i}", i, None)
    empty = dict.fromkeys(range(PARTITIONS), 0)
    held = {partition_of(f"k{i}") for i in range(300)}
    handed = set(sorted(held)[::2])
    answer = compare(store, empty, handing=handed.__contains__)
    assert set(answer.pending) == handed
    assert set(answer.differ) | set(answer.more) == held - handed
    assert {partition_of(e.key) for e in answer.entries} <= held - handed


def test_a_joiners_refill_leaves_to_the_handoffs_what_they_bring():
    """Handoffs over slow links take longer than AFTER_CHANGE: the joiner's refill
    waits for them instead of taking the same entries through compare (issue 11)."""
    swarm = Swarm(replicas=2)
    swarm.build(3, [(0, 1), (1, 2), (2, 0)])
    keys = [f"k{i}" for i in range(8000)]
    for i in range(0, len(keys), 500):
        swarm.call("n0", "mset", items=dict.fromkeys(keys[i:i + 500], "v"))
    swarm.add("n3")
    for node in ("n0", "n1", "n2"):
        swarm.link("n3", node, latency=1.0)
    swarm.until(lambda: len(swarm["n3"].view) == 4)
    swarm.run(AFTER_CHANGE + 1)
    assert swarm["n3"].core.router.filling  # the handoffs are still on their way
    swarm.until(lambda: not swarm["n3"].core.router.filling, timeout=60)
    owned = [k for k in keys if "n3" in swarm.call("n3", "owner", key=k)["nodes"]]
    assert all(swarm["n3"].store.get(k) == (True, "v") for k in owned)
    assert swarm["n3"].core.anti_entropy.rounds >= 1
    assert [swarm[n].core.anti_entropy.repairs for n in swarm.nodes] == [0] * 4
