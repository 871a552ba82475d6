"""A graceful leave closes each peer link in two phases (``bye``), so no request on its
way to the stopping node is caught by the close: in the in-memory simulator, on one
clock, deterministic.

"""

from __future__ import annotations

from twisted.internet.task import LoopingCall

from swarm.node.core import HANDOFF_GRACE
from swarm.simulator import Swarm


def key_owned_by(swarm: Swarm, node_id: str, via: str) -> str:
    placement = swarm[via].core.router.placement
    return next(k for k in (f"k{i}" for i in range(1000)) if placement.primary(k) == node_id)


def test_a_write_on_its_way_to_a_stopping_node_is_served_before_it_closes():
    """n1 writes a key of n0's as n0 begins to leave, over a slow link: the write is on
    the wire when n0 has nothing left to hand over or answer. Waiting only while busy,
    n0 closed under it; its peers' answer to its bye now comes behind the write."""
    swarm = Swarm(latency=0.001)
    for n in ("n0", "n1", "n2"):
        swarm.add(n)
    swarm.link("n0", "n1", latency=0.05)
    swarm.link("n1", "n2")
    swarm.link("n2", "n0")
    swarm.settle()
    key = key_owned_by(swarm, "n0", via="n1")
    leaving = swarm["n0"].core.leave()
    write = swarm["n1"].request("set", key=key, value="v")
    swarm.wait(leaving)
    swarm.close("n0")
    assert swarm.wait(write)["ok"]
    swarm.settle()
    assert [swarm.call(n, "get", key=key)["value"] for n in ("n1", "n2")] == ["v", "v"]


def test_traffic_relayed_through_a_stopping_node_moves_off_it_and_none_is_lost():
    """On a ring, n1 reaches n3 through n0. While n0 stops, n1 keeps reading a key of
    n3's, a read always in flight: the bye reroutes them through n2 at once, so n0 is
    soon quiet and closes with nothing on its links (waiting until it was not busy, it
    sat out the whole grace time and then closed on reads)."""
    swarm = Swarm(latency=0.001)
    swarm.build(4, [(0, 1), (1, 2), (2, 3), (3, 0)])
    assert swarm["n1"].core.overlay.membership.next_hop("n3") == "n0"
    key = key_owned_by(swarm, "n3", via="n1")
    replies: list = []

    def read() -> None:  # without waiting for the answer
        swarm["n1"].request("get", key=key).addBoth(replies.append)

    reads = LoopingCall(read)
    reads.clock = swarm.clock
    reads.start(0.005)
    swarm.run(0.1)
    started = swarm.clock.seconds()
    swarm.wait(swarm["n0"].core.leave(), timeout=2 * HANDOFF_GRACE)
    took = swarm.clock.seconds() - started
    swarm.close("n0")
    swarm.run(0.1)
    reads.stop()
    swarm.run(1.0)  # the last reads come back
    assert took < 0.5, f"the leave took {took:.2f}s"
    assert len(replies) > 20 and all(
        r == {"id": 0, "ok": True, "found": False, "value": None} for r in replies)
    assert swarm["n1"].core.overlay.membership.next_hop("n3") == "n2"
