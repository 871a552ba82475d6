"""``--replicas N``: every write reaches the N owners of its key, copies follow the
owners through joins, leaves and crashes, and a crashed node loses nothing. In the
in-memory simulator (swarm.simulator), deterministic."""

from __future__ import annotations

import pytest

from swarm.cluster.router import SUSPECT_AFTER, SUSPECT_FOR
from swarm.node.core import AFTER_CHANGE
from swarm.simulator import Swarm

KEYS = [f"k{i}" for i in range(60)]


def swarm_of(count: int, edges, replicas: int, **config) -> Swarm:
    """A swarm built and past its first refill (until then no node stands in for
    another)."""
    swarm = Swarm(replicas=replicas, **config)
    swarm.build(count, edges)
    swarm.run(AFTER_CHANGE + 1)
    return swarm


def holders(swarm: Swarm, key: str) -> set[str]:
    return {n.id for n in swarm.nodes.values() if n.running and n.store.exists(key)}


def owners(swarm: Swarm, key: str, via: str) -> set[str]:
    return set(swarm.call(via, "owner", key=key)["nodes"])


def write_keys(swarm: Swarm, via: str, value="v") -> None:
    for key in KEYS:
        assert swarm.call(via, "set", key=key, value=value)["stored"]


def assert_held_by_their_owners(swarm: Swarm, via: str) -> None:
    for key in KEYS:
        assert holders(swarm, key) == owners(swarm, key, via), key


def assert_read_everywhere(swarm: Swarm, value="v") -> None:
    for node in swarm.nodes.values():
        if node.running:
            got = {k: swarm.call(node.id, "get", key=k)["value"] for k in KEYS}
            assert got == dict.fromkeys(KEYS, value), node.id


def test_every_write_reaches_each_owner_and_no_other_node():
    swarm = swarm_of(4, [(0, 1), (1, 2), (2, 3)], replicas=2)
    write_keys(swarm, "n0")
    assert_held_by_their_owners(swarm, "n3")
    assert all(len(holders(swarm, k)) == 2 for k in KEYS)
    assert swarm.call("n3", "delete", key=KEYS[0])["deleted"] is True
    assert holders(swarm, KEYS[0]) == set()  # the tombstone reached both owners


def test_one_copy_stays_one_copy():
    swarm = swarm_of(3, [(0, 1), (1, 2)], replicas=1)
    write_keys(swarm, "n0")
    assert all(len(holders(swarm, k)) == 1 for k in KEYS)


@pytest.mark.parametrize("victim", ["n0", "n1", "n2"])
def test_a_crashed_node_loses_nothing_and_the_copies_come_back_to_two(victim):
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2)
    write_keys(swarm, "n0")
    swarm.crash(victim)
    swarm.settle()
    assert_read_everywhere(swarm)
    survivor = next(n for n in swarm.nodes if n != victim)
    assert_held_by_their_owners(swarm, survivor)  # two copies again, on the survivors


def test_three_replicas_on_a_ring_of_five_survive_two_crashes_at_once():
    swarm = swarm_of(5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2)], replicas=3)
    write_keys(swarm, "n0")
    swarm.crash("n3")
    swarm.crash("n4")
    swarm.settle()
    assert_read_everywhere(swarm)
    assert_held_by_their_owners(swarm, "n0")


def test_a_join_and_a_graceful_leave_move_every_copy_to_its_owners():
    swarm = swarm_of(3, [(0, 1), (1, 2)], replicas=2)
    write_keys(swarm, "n0")
    swarm.add("n3")
    swarm.link("n3", "n2")
    swarm.settle()
    assert_read_everywhere(swarm)
    assert_held_by_their_owners(swarm, "n3")
    swarm.stop("n1")
    swarm.link("n0", "n2")  # n1 was the middle of the line
    swarm.settle()
    assert_read_everywhere(swarm)
    assert_held_by_their_owners(swarm, "n0")


def test_increments_through_every_node_stay_exact():
    swarm = swarm_of(3, [(0, 1), (1, 2)], replicas=2)
    for i in range(30):
        swarm.call(f"n{i % 3}", "incr", key="hits")
    for node in swarm.nodes:
        assert swarm.call(node, "get", key="hits")["value"] == 30
    (primary, *_) = swarm.call("n0", "owner", key="hits")["nodes"]
    swarm.crash(primary)
    swarm.settle()
    survivor = next(n for n in swarm.nodes if n != primary)
    assert swarm.call(survivor, "incr", key="hits")["value"] == 31


@pytest.mark.parametrize("ack, waits", [("all", True), ("one", False)])
def test_write_ack_says_whether_a_write_waits_for_the_other_owners(ack, waits):
    swarm = Swarm(replicas=2, write_ack=ack)
    for n in ("n0", "n1"):
        swarm.add(n)
    swarm.link("n0", "n1", latency=0.5)  # the backup is far away
    swarm.settle()
    key = next(k for k in (f"k{i}" for i in range(100))
               if swarm.call("n0", "owner", key=k)["nodes"][0] == "n0")
    started = swarm.clock.seconds()
    swarm.call("n0", "set", key=key, value="v")
    took = swarm.clock.seconds() - started
    assert (took >= 1.0) is waits  # one round trip to the backup, or none
    assert swarm["n1"].store.get(key) == ((True, "v") if waits else (False, None))
    swarm.run(1.1)
    assert swarm["n1"].store.get(key) == (True, "v")


def primary_of(swarm: Swarm, key: str, via: str = "n0") -> str:
    return swarm.call(via, "owner", key=key)["nodes"][0]


def key_elsewhere(swarm: Swarm, via: str, avoid: str | None = None) -> str:
    """A key whose primary is neither ``via`` nor ``avoid``."""
    return next(k for k in (f"key{i}" for i in range(1000))
                if primary_of(swarm, k, via) not in (via, avoid))


@pytest.mark.parametrize("how", ["crash", "freeze"])
def test_a_read_on_its_way_to_a_primary_that_dies_is_answered_by_the_next_owner(how):
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2)
    key = key_elsewhere(swarm, "n0")
    assert swarm.call("n0", "set", key=key, value="v")["stored"]
    primary = primary_of(swarm, key)
    for conn in swarm.open_connections("n0", primary):
        conn.latency = 0.2  # the read is still on its way when the primary goes
    read = swarm["n0"].request("get", key=key)
    swarm.run(0.05)
    started = swarm.clock.seconds()
    if how == "crash":
        swarm.crash(primary)  # its sockets close at once: sent again on the lost link
    else:
        swarm.freeze(primary)  # its links stay up: the backup is asked after a while
    assert swarm.wait(read, timeout=6) == {"id": 0, "ok": True, "found": True, "value": "v"}
    router = swarm["n0"].core.router
    assert (router.retried, router.hedged) == ((1, 0) if how == "crash" else (0, 1))
    if how == "freeze":  # well before the ping timeout drops the frozen node
        assert swarm.clock.seconds() - started < SUSPECT_AFTER + 0.5


def test_reads_pass_a_suspect_primary_over_and_try_it_again_later():
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2, ping_timeout=30)
    key = key_elsewhere(swarm, "n0")
    assert swarm.call("n0", "set", key=key, value="v")["stored"]
    primary = primary_of(swarm, key)
    swarm.freeze(primary)
    first = swarm["n0"].request("get", key=key)
    assert swarm.wait(first, timeout=3)["value"] == "v"
    router = swarm["n0"].core.router
    assert router.hedged == 1
    started = swarm.clock.seconds()
    assert swarm.wait(swarm["n0"].request("get", key=key), timeout=1)["value"] == "v"
    assert swarm.clock.seconds() - started < 0.1 and router.hedged == 1  # passed over
    swarm.thaw(primary)
    swarm.run(SUSPECT_FOR)
    assert swarm.wait(swarm["n0"].request("get", key=key), timeout=1)["value"] == "v"
    assert router.hedged == 1 and primary not in router._suspects  # trusted again


def test_a_backup_still_being_filled_does_not_stand_in_for_a_suspect_primary():
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2, ping_timeout=30)
    key = key_elsewhere(swarm, "n0")
    assert swarm.call("n0", "set", key=key, value="v")["stored"]
    primary, backup = swarm.call("n0", "owner", key=key)["nodes"]
    swarm[backup].core.router.filling = True
    swarm.freeze(primary)
    read = swarm["n0"].request("get", key=key)
    swarm.run(2)
    assert not read.called  # the backup said no: the primary's answer is awaited
    swarm.thaw(primary)
    assert swarm.wait(read, timeout=3)["value"] == "v"


def test_a_read_relayed_through_a_node_that_dies_goes_around_it():
    swarm = swarm_of(4, [(0, 1), (1, 2), (2, 3), (3, 0)], replicas=1)
    key = next(k for k in (f"key{i}" for i in range(1000)) if primary_of(swarm, k) == "n2")
    assert swarm.call("n0", "set", key=key, value="v")["stored"]
    relay = swarm["n0"].core.overlay.membership.next_hop("n2")
    for conn in swarm.open_connections("n0", relay):
        conn.latency = 0.2
    read = swarm["n0"].request("get", key=key)
    swarm.run(0.3)  # past the relay, on its way to n2
    swarm.crash(relay)
    assert swarm.wait(read, timeout=6)["value"] == "v"


@pytest.mark.parametrize("op, args, result", [
    ("set", {"value": "v"}, {"stored": True}),
    ("delete", {}, {"deleted": False}),
])
def test_a_write_that_needs_nothing_stored_is_sent_again_to_the_next_owner(op, args, result):
    """Its version was stamped where it entered: sent twice, it is one write."""
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2)
    key = key_elsewhere(swarm, "n0")
    primary = primary_of(swarm, key)
    for conn in swarm.open_connections("n0", primary):
        conn.latency = 0.2
    write = swarm["n0"].request(op, key=key, **args)
    swarm.run(0.05)
    swarm.crash(primary)
    assert swarm.wait(write, timeout=6) == {"id": 0, "ok": True, **result}
    assert swarm["n0"].core.router.retried == 1
    swarm.settle()
    assert swarm.call("n1" if primary != "n1" else "n2", "get", key=key)["found"] is (op == "set")


def test_a_write_on_its_way_to_a_primary_that_dies_is_not_sent_again():
    """It may have run (a frozen node runs it when it thaws): answered unavailable."""
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2)
    key = key_elsewhere(swarm, "n0")
    primary = primary_of(swarm, key)
    for conn in swarm.open_connections("n0", primary):
        conn.latency = 0.2
    incr = swarm["n0"].request("incr", key=key)
    swarm.run(0.05)
    swarm.crash(primary)
    with pytest.raises(Exception, match="lost"):
        swarm.wait(incr, timeout=6)
    assert swarm["n0"].core.router.retried == 0


def test_stats_count_copies_by_role():
    swarm = swarm_of(3, [(0, 1), (1, 2)], replicas=2)
    write_keys(swarm, "n0")
    stats = {n: swarm.call(n, "stats")["stats"] for n in swarm.nodes}
    for node, s in stats.items():
        primary = sum(swarm.call(node, "owner", key=k)["nodes"][0] == node for k in KEYS)
        assert s["primary_copies"] == primary
        assert s["primary_copies"] + s["replica_copies"] == s["keys"]
        assert s["other_copies"] == 0
    assert sum(s["primary_copies"] for s in stats.values()) == len(KEYS)
    assert sum(s["replica_copies"] for s in stats.values()) == len(KEYS)


def test_a_write_that_timed_out_on_a_slow_way_does_not_overtake_the_next_one():
    """The rebalance bench's wrong value (issue 11): a set times out on its way to its
    old primary (here a link that takes 3 s; there a node frozen by work), a node joins
    and takes the key, the client's next set goes straight to it and is acknowledged;
    then the first set arrives at the old primary, which sends it on to the new one.
    It was made earlier by the same node's clock, so the acknowledged set stays."""
    from swarm.cluster.placement import Placement

    nodes = ["n0", "n1", "n2", "n3"]
    before, after = Placement(nodes, 2), Placement([*nodes, "n4"], 2)
    key = next(k for k in (f"k{i}" for i in range(1000))
               if "n0" not in before.owners(k) and after.primary(k) == "n4")
    old = before.primary(key)
    swarm = Swarm(replicas=2, request_timeout=1.0)
    for node in nodes:
        swarm.add(node)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            swarm.link(a, b, latency=3.0 if {a, b} == {"n0", old} else None)
    swarm.settle()
    swarm.run(10)  # the slow link is up too
    assert swarm.call("n1", "set", key=key, value="first")["stored"]
    late = swarm["n0"].request("set", key=key, value="timed out")
    outcome: list = []
    late.addBoth(outcome.append)
    swarm.add("n4")
    for node in nodes:
        swarm.link("n4", node)
    swarm.until(lambda: outcome and "n4" in swarm["n0"].view)
    assert "no reply" in str(outcome[0].value)
    assert swarm.call("n0", "set", key=key, value="acknowledged")["stored"]
    swarm.run(20)  # the late set arrives, handoffs and refills are over
    assert {n: swarm.call(n, "get", key=key)["value"] for n in swarm.nodes} == \
        dict.fromkeys(swarm.nodes, "acknowledged")


def test_a_handoff_that_timed_out_is_run_again_without_a_change_of_view():
    """The joiner freezes for less than the ping timeout while its copies are on their
    way: the chunks time out, and the old owners send them again a moment later."""
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2, request_timeout=1.0)
    write_keys(swarm, "n0")
    swarm.add("n3")
    for node in ("n0", "n1", "n2"):
        swarm.link("n3", node)
    swarm.until(lambda: all(len(swarm[n].view) == 4 for n in swarm.nodes))
    swarm.freeze("n3")
    swarm.run(1.5)
    swarm.thaw("n3")
    assert all(len(swarm[n].view) == 4 for n in swarm.nodes)  # no change of view
    swarm.run(10)
    assert_held_by_their_owners(swarm, "n3")
    assert_read_everywhere(swarm)


def test_a_join_after_loading_a_swarm_that_formed_empty_hands_copies_only_toward_it():
    """Runs that found nothing to hand over (the swarm formed empty) still count as
    complete: the first run after the load sends no copy to an owner that already had
    it, only toward the joiner (from each old owner of its partitions, and from the one
    that drops out to the one that stays: three sends per copy it gets)."""
    swarm = swarm_of(3, [(0, 1), (1, 2), (2, 0)], replicas=2)
    keys = [f"k{i}" for i in range(600)]
    assert swarm.call("n0", "mset", items=dict.fromkeys(keys, "v"))["stored"] == len(keys)
    swarm.add("n3")
    swarm.link("n3", "n0")
    swarm.settle()
    swarm.run(AFTER_CHANGE + 1)
    joined = len(swarm["n3"].store)
    assert joined == sum("n3" in owners(swarm, k, "n3") for k in keys)
    assert sum(swarm[n].core.rebalancer.moved for n in swarm.nodes) <= 3 * joined


def test_a_handoff_whose_link_is_lost_under_hundreds_of_chunks_sends_no_more():
    """The link to an owner is lost while the first chunks are on it and hundreds
    more are queued: those fail, and so would every other send at once. The run ends
    (no recursion through the queue), sends nothing after the failures, and counts as
    incomplete, so it runs again."""
    from twisted.internet.defer import Deferred, succeed
    from twisted.internet.task import Clock

    from swarm.cluster.placement import Placement
    from swarm.cluster.rebalance import WINDOW, Rebalancer
    from swarm.store.memory import MemoryStore

    clock, pending, lost = Clock(), [], {"ok": False, "error": {"code": "unavailable"}}
    store = MemoryStore(clock, max_memory=10 ** 9)
    store.set_many({f"k{i}": "v" for i in range(60_000)}, None)

    def send(owner, request):
        if pending and pending[-1].called:  # the link is gone
            return succeed(lost)
        pending.append(Deferred())
        return pending[-1]

    placement = Placement(["b"], 1)
    run = Rebalancer("a", store, lambda: placement, send, clock).run(placement)
    while not pending or len(pending) < WINDOW:
        clock.advance(0)
    for _ in range(100):  # the scan queues every chunk
        clock.advance(0)
    for d in pending:
        d.callback(lost)
    while not run.called:
        clock.advance(0)
    assert run.result == 0 and len(pending) == WINDOW and len(store) == 60_000
