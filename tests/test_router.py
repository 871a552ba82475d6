"""Unit tests of swarm.router.QueryRouter and swarm.rebalance.Rebalancer; no sockets.

The router sits on a real :class:`~swarm.overlay.Overlay` whose membership is fed
hand-made announcements, so placement sees the nodes as reachable. Forwarding goes either
to a fake ``overlay.forward`` that records each call and returns a Deferred the test
fires, or, where the whole path matters, through a real :class:`~swarm.links.PeerLink`
whose frames land in a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import cbor2
import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from swarm.cluster.commands import StoreCommands
from swarm.cluster.placement import Placement
from swarm.cluster.rebalance import CHUNK, SETTLE, Rebalancer
from swarm.cluster.router import MIGRATION_WINDOW, QueryRouter
from swarm.mesh.link import IN_RUN, Packed, PeerLink
from swarm.mesh.membership import Announcement
from swarm.mesh.overlay import Overlay
from swarm.protocol.entry import Entry
from swarm.store.memory import MemoryStore

INC = 1_000_000


def result_of(d):
    """A reply right away, or what a fired Deferred holds; fails if it has not fired."""
    if not isinstance(d, Deferred):
        return d
    results = []
    d.addBoth(results.append)
    assert results, "the reply has not come yet"
    return results[0]


def ok(rid=1, **results):
    return dict({"id": rid, "ok": True}, **results)


def wire(key, value, ttl=None, version=(1, 0, "b"), deleted=False):
    """An entry as a take or restore carries it (an old version unless given)."""
    return Entry(key, value, ttl, version, deleted).to_wire()


def err(rid=1, code="unavailable"):
    return {"id": rid, "ok": False, "error": {"code": code, "message": code}}


def keys_of(owner: str, placement: Placement, n: int = 1, prefix: str = "key",
            where=lambda key: True) -> list[str]:
    """The first ``n`` keys whose primary is ``owner`` (and that satisfy ``where``)."""
    found = []
    for i in count():
        key = f"{prefix}-{i}"
        if placement.primary(key) == owner and where(key):
            found.append(key)
            if len(found) == n:
                return found


@dataclass
class Forwarded:
    node: str
    request: dict
    timeout: float
    hops: int
    addressed: bool
    reply: Deferred


class Node:
    """Node ``a`` at one end of the line a - b - c, with a router on a fed overlay."""

    def __init__(self, settled: bool = True, fake_forward: bool = True, replicas: int = 1):
        self.clock = task.Clock()
        self.overlay = Overlay("a", "test", INC, self.clock)
        self.overlay.membership.set_links(["b"])
        self.overlay.membership.receive([
            Announcement("b", INC, 2, ("a", "c")),
            Announcement("c", INC, 2, ("b",)),
        ])
        assert self.overlay.membership.reachable == {"a", "b", "c"}
        self.store = MemoryStore(self.clock)
        self.router = QueryRouter(
            "a", StoreCommands(self.store), lambda: {"node": "a"}, self.overlay,
            replicas=replicas,
        )
        self.router.view_changed()
        if settled:
            self.clock.advance(MIGRATION_WINDOW + 1)
        self.forwarded: list[Forwarded] = []
        if fake_forward:
            self.overlay.forward = self._forward

    def _forward(self, node, request, timeout, hops, addressed=False) -> Deferred:
        call = Forwarded(node, request, timeout, hops, addressed, Deferred())
        self.forwarded.append(call)
        return call.reply

    @property
    def placement(self) -> Placement:
        return self.router.placement


def test_a_burst_of_view_changes_derives_the_placement_once_on_first_use():
    """A flood changes the view many times in a few ms; only the last view is placed."""
    node = Node()
    derived = []
    inner = node.router._placement_of
    node.router._placement_of = lambda nodes, known: derived.append(nodes) or inner(
        nodes, known)
    membership = node.overlay.membership
    for i in range(5):  # five nodes join behind c, one announcement at a time
        membership.receive([Announcement(f"d{i}", INC, 2, ("c",)),
                            Announcement("c", INC, 3 + i, ("b", *(f"d{j}" for j in range(i + 1))))])
        node.router.view_changed()
    assert derived == []
    everyone = frozenset({"a", "b", "c", *(f"d{i}" for i in range(5))})
    assert node.placement == Placement(everyone, 1) and derived == [everyone]
    assert node.placement is node.placement and len(derived) == 1
    # the views a key may still be in are placed only when a missing key is looked for
    (key,) = keys_of("a", node.placement)
    node.router.route({"id": 1, "op": "get", "key": key}, 3, 5)
    origins = set(node.router._origins)
    assert len(origins) > 1 and set(derived[1:]) == origins


def test_a_view_that_comes_back_gets_the_placement_it_had_without_a_derivation():
    """A healed link or a merged partition brings back a view placed a moment ago: the
    table is taken back as it was, not derived again (at 1,000 nodes, a whole one)."""
    node = Node()
    whole = node.placement
    membership = node.overlay.membership
    membership.receive([Announcement("b", INC, 3, ("a",))])  # the b - c link is cut
    node.router.view_changed()
    assert node.placement.nodes == {"a", "b"}
    membership.receive([Announcement("b", INC, 4, ("a", "c"))])  # and heals
    node.router.view_changed()
    assert node.placement is whole


# -- single keys -------------------------------------------------------------------------


def test_a_key_owned_here_runs_on_the_store():
    node = Node()
    (key,) = keys_of("a", node.placement)
    assert node.router.route({"id": 1, "op": "set", "key": key, "value": [1]}, 5, 3) == ok(
        stored=True)
    assert node.store.get(key) == (True, [1])
    assert node.router.handle({"id": "g", "op": "get", "key": key}) == ok(
        "g", found=True, value=[1])
    (counter,) = keys_of("a", node.placement, prefix="counter")
    assert node.router.route({"id": 2, "op": "incr", "key": counter}, 5, 0) == ok(
        2, value=1)  # no hops needed to run here
    assert node.forwarded == []


@pytest.mark.parametrize("owner", ["b", "c"])
def test_a_key_owned_elsewhere_is_forwarded_with_one_hop_less(owner):
    node = Node()
    (key,) = keys_of(owner, node.placement)
    request = {"id": 7, "op": "get", "key": key}
    d = node.router.route(request, 2.5, 6)
    assert isinstance(d, Deferred) and not d.called
    (call,) = node.forwarded
    assert (call.node, call.request, call.timeout, call.hops, call.addressed) == (
        owner, request, 2.5, 5, False)
    call.reply.callback(ok(7, found=True, value="v"))
    assert result_of(d) == ok(7, found=True, value="v")
    assert node.store.exists(key) is False  # nothing kept on the way


def test_handle_uses_the_configured_timeout_and_hop_limit():
    node = Node()
    node.router.request_timeout, node.router.max_hops = 1.25, 9
    (key,) = keys_of("b", node.placement)
    node.router.handle({"id": 1, "op": "get", "key": key})
    assert (node.forwarded[0].timeout, node.forwarded[0].hops) == (1.25, 8)


def test_no_hops_left_is_unavailable_without_forwarding():
    node = Node()
    (key,) = keys_of("c", node.placement)
    reply = node.router.route({"id": 3, "op": "get", "key": key}, 5, 0)
    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
    assert reply["id"] == 3
    assert node.forwarded == []
    # one hop left is enough to go one hop
    node.router.route({"id": 4, "op": "get", "key": key}, 5, 1)
    assert node.forwarded[0].hops == 0


def test_no_route_is_unavailable():
    node = Node(fake_forward=False)  # the real overlay: no link to b at all
    (key,) = keys_of("b", node.placement)
    reply = node.router.route({"id": 3, "op": "get", "key": key}, 5, 5)
    assert reply == {"id": 3, "ok": False, "error": reply["error"]}
    assert reply["error"]["code"] == "unavailable"
    assert "b" in reply["error"]["message"]


def test_lookup_error_from_forward_is_unavailable():
    node = Node()

    def no_route(node_id, *args, **kw):
        raise LookupError(node_id)

    node.overlay.forward = no_route
    (key,) = keys_of("c", node.placement)
    reply = node.router.route({"id": 3, "op": "delete", "key": key}, 5, 5)
    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"


def test_forwarding_through_a_real_link_and_back():
    node = Node(fake_forward=False)
    node.overlay.handle_request = node.router.route_forwarded  # as NodeCore wires it
    frames: list = []
    link = PeerLink("b", frames.extend, node.clock)
    node.overlay.link_up(link)
    frames.clear()
    (key,) = keys_of("c", node.placement)
    d = node.router.route({"id": 5, "op": "get", "key": key}, 2.0, 4)
    (msg,) = frames
    assert msg == {"t": "req", "rid": msg["rid"], "ms": 2000, "hops": 3,
                   "req": {"id": 5, "op": "get", "key": key}}
    node.overlay.receive_reply(link, {"t": "rep", "rid": msg["rid"],
                                      "rep": ok(5, found=False, value=None)})
    assert result_of(d) == ok(5, found=False, value=None)
    # and when no reply comes: a timeout reply, not an exception
    d = node.router.route({"id": 6, "op": "get", "key": key}, 2.0, 4)
    node.clock.advance(2.0)
    assert result_of(d)["error"]["code"] == "timeout"
    assert link.pending == 0


def test_a_forwarded_request_arriving_on_a_link_is_answered_on_it():
    node = Node(fake_forward=False)
    node.overlay.handle_request = node.router.route_forwarded  # as NodeCore wires it
    frames: list = []
    link = PeerLink("b", frames.extend, node.clock)
    node.overlay.link_up(link)
    frames.clear()
    (key,) = keys_of("a", node.placement)
    node.store.set(key, "here", None)
    node.overlay.receive_request(
        link, {"t": "req", "rid": 9, "ms": 1000, "hops": 3,
               "req": {"id": 5, "op": "get", "key": key}})
    node.overlay.receive_request(
        link, {"t": "req", "rid": 10, "ms": 1000, "hops": 3, "req": {"id": 6, "op": "get"}})
    node.overlay.receive_request(
        link, {"t": "req", "rid": 11, "ms": 0, "hops": 3,
               "req": {"id": 7, "op": "get", "key": key}})
    assert frames[0] == {"t": "rep", "rid": 9, "rep": ok(5, found=True, value="here")}
    assert frames[1]["rid"] == 10 and frames[1]["rep"]["error"]["code"] == "bad_request"
    assert frames[2]["rid"] == 11 and frames[2]["rep"]["error"]["code"] == "timeout"


# -- several keys ------------------------------------------------------------------------


def test_mget_is_split_by_owner_and_merged():
    node = Node()
    ka = keys_of("a", node.placement, 2)
    kb = keys_of("b", node.placement, 2)
    kc = keys_of("c", node.placement, 1)
    node.store.set(ka[0], "A0", None)
    keys = [kb[0], ka[0], kc[0], ka[1], kb[1]]
    d = node.router.route({"id": 8, "op": "mget", "keys": keys}, 3, 5)
    parts = {call.node: call for call in node.forwarded}
    assert set(parts) == {"b", "c"}
    assert parts["b"].request == {"id": 8, "op": "mget", "keys": kb}
    assert parts["c"].request == {"id": 8, "op": "mget", "keys": kc}
    assert all((c.timeout, c.hops, c.addressed) == (3, 4, False) for c in parts.values())
    parts["c"].reply.callback(ok(8, values={kc[0]: "C0"}))
    assert not d.called  # waits for every part
    parts["b"].reply.callback(ok(8, values={kb[1]: "B1"}))
    assert result_of(d) == ok(8, values={ka[0]: "A0", kc[0]: "C0", kb[1]: "B1"})


def test_mget_all_local_answers_at_once():
    node = Node()
    ka = keys_of("a", node.placement, 3)
    node.store.set(ka[1], 1, None)
    assert node.router.route({"id": 1, "op": "mget", "keys": ka}, 3, 5) == ok(
        values={ka[1]: 1})
    assert node.router.route({"id": 2, "op": "mget", "keys": []}, 3, 5) == ok(2, values={})
    assert node.forwarded == []


def test_mset_is_split_by_owner_and_the_counts_added():
    node = Node()
    ka = keys_of("a", node.placement, 2)
    kb = keys_of("b", node.placement, 3)
    items = {k: k.upper() for k in ka + kb}
    d = node.router.route({"id": 9, "op": "mset", "items": items, "ttl": 60}, 3, 5)
    (call,) = node.forwarded
    assert call.node == "b"
    assert call.request == {"id": 9, "op": "mset", "items": {k: k.upper() for k in kb},
                            "ttl": 60}
    assert all(node.store.get(k) == (True, k.upper()) for k in ka)
    assert not any(node.store.exists(k) for k in kb)
    call.reply.callback(ok(9, stored=3))
    assert result_of(d) == ok(9, stored=5)


@pytest.mark.parametrize("op", ["mget", "mset"])
def test_an_error_from_one_part_makes_the_whole_reply_an_error(op):
    node = Node()
    kb = keys_of("b", node.placement, 1)
    kc = keys_of("c", node.placement, 1)
    ka = keys_of("a", node.placement, 1)
    request = ({"id": 4, "op": "mget", "keys": ka + kb + kc} if op == "mget"
               else {"id": 4, "op": "mset", "items": dict.fromkeys(ka + kb + kc, 1)})
    d = node.router.route(request, 3, 5)
    parts = {call.node: call for call in node.forwarded}
    parts["b"].reply.callback(ok(4, values={}, stored=1))
    parts["c"].reply.callback(err(4, "timeout"))
    reply = result_of(d)
    assert reply["id"] == 4 and reply["ok"] is False
    assert reply["error"]["code"] == "timeout"


def test_a_multi_key_request_with_no_hops_left_is_unavailable():
    node = Node()
    keys = keys_of("a", node.placement, 1) + keys_of("b", node.placement, 1)
    reply = node.router.route({"id": 4, "op": "mget", "keys": keys}, 3, 0)
    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
    assert node.forwarded == []


# -- addressed requests ------------------------------------------------------------------


def test_a_request_addressed_here_runs_here_whoever_owns_the_key():
    node = Node()
    (kb,) = keys_of("b", node.placement)
    node.store.set(kb, "stray", None)
    assert node.router.route({"id": 1, "op": "get", "key": kb}, 3, 0, to="a") == ok(
        found=True, value="stray")
    kc = keys_of("c", node.placement, 2)
    assert node.router.route({"id": 2, "op": "mget", "keys": kc}, 3, 5, to="a") == ok(
        2, values={})
    assert node.forwarded == []


def test_a_request_addressed_elsewhere_is_forwarded_addressed_and_not_split():
    node = Node()
    (ka,) = keys_of("a", node.placement)  # owned here, yet addressed to c
    d = node.router.route({"id": 1, "op": "get", "key": ka}, 3, 5, to="c")
    keys = keys_of("a", node.placement, 1) + keys_of("b", node.placement, 1)
    node.router.route({"id": 2, "op": "mget", "keys": keys}, 3, 5, to="b")
    first, second = node.forwarded
    assert (first.node, first.hops, first.addressed, first.timeout) == ("c", 4, True, 3)
    assert (second.node, second.request["keys"], second.addressed) == ("b", keys, True)
    first.reply.callback(ok(found=False, value=None))
    assert result_of(d) == ok(found=False, value=None)
    reply = node.router.route({"id": 3, "op": "get", "key": ka}, 3, 0, to="c")
    assert reply["error"]["code"] == "unavailable"


def test_send_to_addresses_the_node_and_never_raises():
    node = Node()
    d = node.router.send_to("c", {"id": 0, "op": "take", "keys": ["x"]})
    (call,) = node.forwarded
    assert (call.node, call.addressed, call.request["op"]) == ("c", True, "take")
    node.router.max_hops = 0
    reply = result_of(node.router.send_to("c", {"id": 0, "op": "take", "keys": ["x"]}))
    assert reply["error"]["code"] == "unavailable"
    assert not d.called


# -- validation and errors ---------------------------------------------------------------


def test_forwarded_requests_are_validated_again():
    node = Node()
    (ka,) = keys_of("a", node.placement)
    cases = [
        ({"id": 7, "op": "get"}, 7, "bad_request"),
        ({"id": 7, "op": "set", "key": ka}, 7, "bad_request"),
        ({"id": 7, "op": "get", "key": ""}, 7, "bad_request"),
        ({"id": 7, "op": "get", "key": 5}, 7, "bad_request"),
        ({"id": 7, "op": "nope", "key": ka}, 7, "unknown_op"),
        ({"op": "get", "key": ka}, None, "bad_request"),
        ("get", None, "bad_request"),
        ([{"id": 1, "op": "get", "key": ka}], None, "bad_request"),
    ]
    for raw, rid, code in cases:
        reply = node.router.route_forwarded(raw, 3, 5)
        assert reply["ok"] is False and reply["error"]["code"] == code, raw
        assert reply["id"] == rid, raw
    assert node.forwarded == []


def test_forwarded_requests_may_carry_internal_ops():
    node = Node()
    (ka,) = keys_of("a", node.placement)
    node.store.set(ka, "v", None)
    (held,) = node.store.entries()
    assert node.router.route_forwarded(
        {"id": 0, "op": "take", "keys": [ka, "absent"]}, 3, 5, "a") == ok(
        0, entries=[held.to_wire()])
    assert not node.store.exists(ka)
    assert node.router.route_forwarded(
        {"id": 0, "op": "restore", "entries": [wire(ka, "w")]}, 3, 5, "a") == ok(
        0, stored=1)
    # and the ones a client may send are routed on as usual
    (kb,) = keys_of("b", node.placement)
    node.router.route_forwarded({"id": 1, "op": "mget", "keys": [kb], "junk": 1}, 3, 5)
    assert node.forwarded[0].request == {"id": 1, "op": "mget", "keys": [kb]}
    assert node.forwarded[0].hops == 4


def test_a_relay_sends_a_key_op_on_as_it_came_and_what_runs_here_is_checked():
    node = Node()
    (ka,) = keys_of("a", node.placement)
    (kb,) = keys_of("b", node.placement)
    bad = {"op": "set", "value": "v", "ttl": "soon", "junk": 1}
    raw = dict(bad, id=1, key=kb)
    d = node.router.route_forwarded(raw, 3, 5)
    (call,) = node.forwarded
    assert (call.node, call.hops) == ("b", 4)
    assert call.request is raw  # not parsed here: b, the owner, checks it
    reply = node.router.route_forwarded(dict(bad, id=2, key=ka), 3, 5)
    assert reply["error"]["code"] == "bad_request" and not node.store.exists(ka)
    # the way to b is lost and a now owns kb: the request is checked before it runs
    call.reply.callback(err(1))
    node.overlay.membership.set_links([])
    node.router.view_changed()
    node.clock.advance(0)
    assert result_of(d)["error"]["code"] == "bad_request" and not node.store.exists(kb)
    assert len(node.forwarded) == 1


class Groups:
    """Records the groups a router passes on, in place of the overlay's links."""

    def __init__(self, node: Node, takes: bool = True) -> None:
        self.calls: list[tuple[str, list, float, int, bool, Deferred]] = []
        self.takes = takes
        node.overlay.forward_group = self.forward_group

    def forward_group(self, node, requests, timeout, hops, passthrough=False):
        if not self.takes:
            return None
        self.calls.append((node, requests, timeout, hops, passthrough, Deferred()))
        return self.calls[-1][-1]


def test_a_relay_passes_a_group_for_keys_behind_one_neighbor_on_whole():
    node = Node()
    groups = Groups(node)
    (kb,), (kc,) = keys_of("b", node.placement), keys_of("c", node.placement)
    raws = [{"id": 1, "op": "get", "key": kb}, {"id": 2, "op": "set", "key": kc,
                                                 "value": "v", "junk": 1}]
    d = node.router.relay_group(raws, 3, 5)
    ((owner, sent, timeout, hops, passthrough, reply),) = groups.calls
    assert (owner, timeout, hops) == ("b", 3, 4) and sent is raws  # as they came
    assert passthrough  # the replies too may go on as they come
    assert node.forwarded == []
    reply.callback([ok(1, found=False, value=None), ok(2, stored=True)])
    assert result_of(d) == [ok(1, found=False, value=None), ok(2, stored=True)]


def test_a_group_that_cannot_go_on_whole_is_declined():
    node = Node()
    (ka,), (kb,) = keys_of("a", node.placement), keys_of("b", node.placement)
    get_b = {"id": 1, "op": "get", "key": kb}
    relay = node.router.relay_group
    assert relay([get_b, {"id": 2, "op": "get", "key": ka}], 3, 5) is None  # one runs here
    assert relay([get_b, {"id": 2, "op": "mget", "keys": [kb]}], 3, 5) is None
    assert relay([get_b, {"id": 2.5, "op": "get", "key": kb}], 3, 5) is None  # a bad id
    assert relay([get_b], 3, 5, to="b") is None
    assert relay([get_b], 3, 0) is None and relay([], 3, 5) is None
    Groups(node, takes=False)
    assert relay([get_b], 3, 5) is None  # b does not take groups


def test_a_relayed_group_that_meets_no_node_is_routed_anew_once_the_view_changed():
    node = Node()
    groups = Groups(node)
    (kb,), (kb2,) = keys_of("b", node.placement), keys_of("b", node.placement, prefix="n")
    raws = [{"id": 1, "op": "set", "key": kb, "value": "v"},
            {"id": 2, "op": "incr", "key": kb2},  # not sent twice: it could count twice
            {"id": 3, "op": "set", "key": kb, "value": "w", "ttl": "soon"}]
    d = node.router.relay_group(raws, 3, 5)
    node.overlay.membership.set_links([])  # the way to b is lost: a owns every key
    node.router.view_changed()
    groups.calls[0][-1].callback([err(1), err(2), err(3)])
    node.clock.advance(0)
    replies = result_of(d)
    assert replies[0] == ok(1, stored=True) and node.store.get(kb) == (True, "v")
    assert replies[1] == err(2) and not node.store.exists(kb2)
    assert replies[2]["error"]["code"] == "bad_request"  # checked before it runs here
    assert node.router.retried == 2


def test_replies_a_relay_passes_on_packed_are_not_routed_anew():
    node = Node()
    groups = Groups(node)
    (kb,) = keys_of("b", node.placement)
    raws = [{"id": i, "op": "set", "key": kb, "value": i} for i in (1, 2, 3)]
    d = node.router.relay_group(raws, 3, 5)
    node.overlay.membership.set_links([])
    node.router.view_changed()
    packed = Packed(cbor2.dumps([err(1), err(2)]), 2)
    groups.calls[0][-1].callback([packed, IN_RUN, err(3)])
    node.clock.advance(0)
    # the packed replies came from the nodes that ran the requests: kept as they are
    assert result_of(d) == [packed, IN_RUN, ok(3, stored=True)]
    assert node.router.retried == 1 and node.store.get(kb) == (True, 3)


def test_a_relayed_group_answered_unavailable_with_the_same_view_keeps_its_replies():
    node = Node()
    groups = Groups(node)
    (kb,) = keys_of("b", node.placement)
    d = node.router.relay_group([{"id": 1, "op": "get", "key": kb}], 3, 5)
    groups.calls[0][-1].callback([err(1)])
    node.clock.advance(0)
    assert result_of(d) == [err(1)] and node.router.retried == 0


def _filled(replies, waiting):
    for d in waiting:
        assert d.called, "a Deferred of handle_all has not fired"
    return replies


def test_a_clients_batch_sends_its_key_ops_behind_one_neighbor_as_one_group():
    node = Node()
    groups = Groups(node)
    (ka,), (kb,), (kc,) = (keys_of(n, node.placement) for n in "abc")
    node.store.set(ka, "here", None)
    requests = [{"id": 1, "op": "get", "key": kb}, {"id": 2, "op": "set", "key": kc,
                                                     "value": "v"},
                {"id": 3, "op": "get", "key": ka}, {"id": 4, "op": "mget", "keys": [kb]},
                {"id": 5, "op": "incr", "key": kb}]
    replies, waiting = node.router.handle_all(requests)
    assert replies[2] == ok(3, found=True, value="here")  # ran here at once
    ((owner, sent, timeout, hops, passthrough, reply),) = groups.calls
    assert [r["id"] for r in sent] == [1, 2, 5] and owner in ("b", "c")
    assert not passthrough  # the replies go to the client: they are decoded here
    assert (timeout, hops) == (node.router.request_timeout, node.router.max_hops - 1)
    assert "at" in sent[1] and "at" not in sent[0]  # writes are stamped where they enter
    (single,) = node.forwarded  # the mget goes on its own
    assert single.request["id"] == 4
    reply.callback([ok(1, found=False, value=None), ok(2, stored=True), ok(5, value=1)])
    single.reply.callback(ok(4, values={}))
    assert _filled(replies, waiting) == [
        ok(1, found=False, value=None), ok(2, stored=True), ok(3, found=True, value="here"),
        ok(4, values={}), ok(5, value=1)]


def test_a_batch_keeps_hedged_reads_single_and_goes_one_by_one_to_a_peer_without_groups():
    node = Node(replicas=2)
    groups = Groups(node)
    kb = next(k for k in keys_of("b", node.placement, 50) if "a" not in node.placement.owners(k))
    replies, waiting = node.router.handle_all([{"id": 1, "op": "get", "key": kb},
                                               {"id": 2, "op": "set", "key": kb, "value": 1}])
    assert [r["id"] for r in groups.calls[0][1]] == [2]  # the write goes as a group
    assert [c.request["id"] for c in node.forwarded] == [1]  # the read may be hedged
    node = Node()
    Groups(node, takes=False)
    (kb,) = keys_of("b", node.placement)
    replies, waiting = node.router.handle_all([{"id": i, "op": "get", "key": kb}
                                               for i in (1, 2)])
    assert [c.request["id"] for c in node.forwarded] == [1, 2]
    for call in node.forwarded:
        call.reply.callback(ok(call.request["id"], found=False, value=None))
    assert [r["id"] for r in _filled(replies, waiting)] == [1, 2]


def test_an_exception_inside_a_command_is_an_internal_error_reply():
    node = Node()
    (ka,) = keys_of("a", node.placement)

    def boom(request):
        raise RuntimeError("boom")

    node.router.commands.execute = boom
    for raw in ({"id": 1, "op": "get", "key": ka}, {"id": 1, "op": "mget", "keys": [ka]}):
        reply = node.router.route(raw, 3, 5)
        assert reply == {"id": 1, "ok": False, "error": reply["error"]}
        assert reply["error"]["code"] == "internal"
        assert "boom" not in reply["error"]["message"]  # details stay in the log
        assert node.router.route_forwarded(raw, 3, 5)["error"]["code"] == "internal"


def test_a_swarm_error_inside_a_command_keeps_its_code():
    node = Node()
    (ka,) = keys_of("a", node.placement)
    node.store.set(ka, "text", None)
    reply = node.router.route({"id": 2, "op": "incr", "key": ka}, 3, 5)
    assert reply["ok"] is False and reply["error"]["code"] == "not_integer"


def test_node_ops_are_answered_here():
    node = Node()
    r = node.router
    assert r.route({"id": 1, "op": "ping"}, 3, 0) == ok(node="a")
    assert r.route({"id": 1, "op": "stats"}, 3, 0) == ok(stats={"node": "a"})
    nodes = r.route({"id": 1, "op": "nodes"}, 3, 0)
    assert nodes["self"] == "a"
    assert [(n["id"], n["hops"]) for n in nodes["nodes"]] == [("a", 0), ("b", 1), ("c", 2)]
    (kc,) = keys_of("c", node.placement)
    assert r.route({"id": 1, "op": "owner", "key": kc}, 3, 0) == ok(nodes=["c"])
    assert node.forwarded == []


# -- the migration window ----------------------------------------------------------------


def migrating(settled: bool = False):
    """Node a right after it joined b and c: keys it owns now were with b or c."""
    node = Node(settled=settled)
    before = Placement({"b", "c"}, 1)
    return node, before


def test_right_after_a_view_change_a_missing_owned_key_is_taken_from_its_previous_owner():
    node, before = migrating()
    for prev in ("b", "c"):
        node.forwarded.clear()
        (key,) = keys_of("a", node.placement, prefix=f"from-{prev}",
                         where=lambda k: before.primary(k) == prev)
        d = node.router.route({"id": 3, "op": "get", "key": key}, 3, 5)
        assert not d.called
        (take,) = node.forwarded
        assert (take.node, take.addressed) == (prev, True)
        assert take.request == {"id": 0, "op": "take", "keys": [key]}
        take.reply.callback(ok(0, entries=[wire(key, {"moved": prev}, 30.0)]))
        assert result_of(d) == ok(3, found=True, value={"moved": prev})
        assert node.store.get(key) == (True, {"moved": prev})
        assert node.store.ttl(key)[1] == pytest.approx(30.0)


def test_a_take_groups_keys_by_previous_owner_for_a_multi_key_read():
    node, before = migrating()
    from_b = keys_of("a", node.placement, 2, where=lambda k: before.primary(k) == "b")
    from_c = keys_of("a", node.placement, 1, where=lambda k: before.primary(k) == "c")
    node.store.set(from_b[1], "already here", None)
    d = node.router.route({"id": 4, "op": "mget", "keys": from_b + from_c}, 3, 5)
    takes = {call.node: call for call in node.forwarded}
    assert takes["b"].request["keys"] == from_b  # the one present too: b's may be newer
    assert takes["c"].request["keys"] == from_c
    takes["b"].reply.callback(ok(0, entries=[wire(from_b[0], "B")]))
    takes["c"].reply.callback(err(0))  # the previous owner could not answer
    assert result_of(d) == ok(4, values={from_b[0]: "B", from_b[1]: "already here"})


def test_a_taken_entry_never_overwrites_a_newer_local_one():
    node, before = migrating()
    (key,) = keys_of("a", node.placement, where=lambda k: before.primary(k) == "b")
    d = node.router.route({"id": 1, "op": "set", "key": key, "value": "old?", "nx": True},
                          3, 5)
    (take,) = node.forwarded
    node.store.set(key, "newer", None)  # written here while the take was on the way
    take.reply.callback(ok(0, entries=[wire(key, "old")]))
    assert result_of(d) == ok(stored=False)
    assert node.store.get(key) == (True, "newer")


def test_after_the_window_no_take_is_sent():
    node, before = migrating()
    (key,) = keys_of("a", node.placement, where=lambda k: before.primary(k) == "b")
    node.clock.advance(MIGRATION_WINDOW + 0.001)
    assert node.router.route({"id": 3, "op": "get", "key": key}, 3, 5) == ok(
        3, found=False, value=None)
    assert node.forwarded == []


def test_a_plain_set_does_not_take_but_other_ops_on_missing_keys_do():
    node, before = migrating()
    keys = keys_of("a", node.placement, 3, where=lambda k: before.primary(k) == "b")
    assert node.router.route({"id": 1, "op": "set", "key": keys[0], "value": 1}, 3, 5) == ok(
        stored=True)
    assert node.router.route({"id": 2, "op": "mset", "items": {keys[1]: 2}}, 3, 5) == ok(
        2, stored=1)
    assert node.forwarded == []
    d = node.router.route({"id": 3, "op": "delete", "key": keys[2]}, 3, 5)
    (take,) = node.forwarded
    assert take.request["keys"] == [keys[2]]
    take.reply.callback(ok(0, entries=[wire(keys[2], "x")]))
    assert result_of(d) == ok(3, deleted=True)  # the old copy cannot come back later


def test_a_key_already_here_is_still_taken_and_the_newer_copy_wins():
    """This node may have been cut off or frozen while the key was written elsewhere."""
    node, before = migrating()
    old, new = keys_of("a", node.placement, 2, where=lambda k: before.primary(k) == "c")
    node.store.set(old, "stale here", None)
    node.store.set(new, "newest here", None)
    d = node.router.route({"id": 1, "op": "mget", "keys": [old, new]}, 3, 5)
    (take,) = node.forwarded
    assert take.request["keys"] == [old, new]
    later = (node.store.hlc.now()[0] + 1, 0, "c")
    take.reply.callback(ok(0, entries=[wire(old, "written on c meanwhile", version=later),
                                       wire(new, "older on c")]))
    assert result_of(d) == ok(values={old: "written on c meanwhile", new: "newest here"})


def test_a_key_that_stayed_with_this_node_is_not_taken():
    node = Node()
    node.router.view_changed()  # a change that left a's own keys where they were
    (key,) = keys_of("a", node.placement)
    node.store.set(key, 1, None)
    assert node.router.route({"id": 1, "op": "get", "key": key}, 3, 5) == ok(
        found=True, value=1)
    assert node.forwarded == []


def test_an_exception_inside_a_command_after_a_take_is_an_internal_error_reply():
    node, before = migrating()
    (key,) = keys_of("a", node.placement, where=lambda k: before.primary(k) == "b")

    def boom(request):
        raise RuntimeError("boom")

    node.router.commands.execute = boom
    d = node.router.route({"id": 1, "op": "get", "key": key}, 3, 5)
    node.forwarded[0].reply.callback(ok(0, entries=[]))
    reply = result_of(d)
    if isinstance(reply, Failure):
        reply.trap(RuntimeError)  # keep the Deferred from logging an unhandled error
    assert isinstance(reply, dict) and reply["error"]["code"] == "internal"


def test_a_taken_entry_too_large_for_this_node_still_gets_a_reply():
    node, before = migrating()
    node.store.max_value_bytes = 10
    (key,) = keys_of("a", node.placement, where=lambda k: before.primary(k) == "b")
    d = node.router.route({"id": 1, "op": "get", "key": key}, 3, 5)
    node.forwarded[0].reply.callback(ok(0, entries=[wire(key, "x" * 100)]))
    reply = result_of(d)
    if isinstance(reply, Failure):
        reply.trap(Exception)
    assert isinstance(reply, dict) and reply["id"] == 1


# -- Rebalancer --------------------------------------------------------------------------


class Handoff:
    """A rebalancer for node a of a, b, c, whose sends wait for the test to answer."""

    def __init__(self, replicas: int = 1):
        self.clock = task.Clock()
        self.store = MemoryStore(self.clock)
        self.placement = Placement({"a", "b", "c"}, replicas)
        self.sends: list[tuple[str, dict, Deferred]] = []
        self.rebalancer = Rebalancer("a", self.store, lambda: self.placement, self._send,
                                     self.clock)

    def _send(self, owner: str, request: dict) -> Deferred:
        d = Deferred()
        self.sends.append((owner, request, d))
        return d

    def fill(self, owner: str, n: int, prefix: str = "k") -> list[str]:
        keys = keys_of(owner, self.placement, n, prefix=f"{prefix}-{owner}")
        for key in keys:
            self.store.set(key, {"v": key}, None)
        return keys

    def answer_all(self) -> list[tuple[str, dict]]:
        """Answer every send ok, also those the answers let out (at most WINDOW
        chunks go to an owner at a time); every send, in order."""
        for owner, request, d in self.sends:  # grows while it is answered
            if not d.called:
                d.callback(ok(0, stored=len(request["entries"])))
        return [(owner, request) for owner, request, _ in self.sends]


def test_a_rebalancer_with_nothing_to_hand_over_does_not_ask_for_the_placement():
    h = Handoff()
    asked = []
    h.rebalancer._placement = lambda: asked.append(1) or h.placement
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert asked == [] and h.sends == []
    h.fill("b", 1)
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert asked == [1] and [owner for owner, _, _ in h.sends] == ["b"]


def test_run_hands_every_entry_it_does_not_own_to_its_owner_in_chunks():
    h = Handoff()
    mine = h.fill("a", 5)
    to_b = h.fill("b", 2 * CHUNK + 88)
    to_c = h.fill("c", 3)
    h.store.set(to_c[0], "expiring", 100)
    h.clock.advance(10)
    done = h.rebalancer.run(h.placement)
    assert not done.called
    # nothing leaves before its owner has it
    assert all(h.store.exists(k) for k in mine + to_b + to_c)
    by_owner: dict[str, list] = {"b": [], "c": []}
    for owner, request in h.answer_all():
        assert request["id"] == 0 and request["op"] == "restore"
        assert 0 < len(request["entries"]) <= CHUNK
        by_owner[owner].append(request["entries"])
    assert sorted(len(chunk) for chunk in by_owner["b"]) == [88, CHUNK, CHUNK]
    assert len(by_owner["c"]) == 1
    sent_b = [e[0] for chunk in by_owner["b"] for e in chunk]
    assert sorted(sent_b) == sorted(to_b)
    (c_chunk,) = by_owner["c"]
    assert sorted(e[0] for e in c_chunk) == sorted(to_c)
    expiring = next(e for e in c_chunk if e[0] == to_c[0])
    assert expiring[1] == "expiring" and expiring[2] == pytest.approx(90.0)
    assert {e[0]: e[1] for e in c_chunk if e[0] != to_c[0]} == {k: {"v": k} for k in to_c[1:]}
    assert result_of(done) == len(to_b) + len(to_c)
    assert all(h.store.exists(k) for k in mine)
    assert not any(h.store.exists(k) for k in to_b + to_c)
    assert h.rebalancer.moved == len(to_b) + len(to_c)


def test_local_copies_stay_when_the_owner_answers_an_error_or_the_send_fails():
    h = Handoff()
    to_b = h.fill("b", 2 * CHUNK)
    to_c = h.fill("c", 4)
    done = h.rebalancer.run(h.placement)
    b_sends = [(r, d) for o, r, d in h.sends if o == "b"]
    ((c_request, c_d),) = [(r, d) for o, r, d in h.sends if o == "c"]
    (ok_request, ok_d), (bad_request, bad_d) = b_sends
    assert sorted(e[0] for r, _ in b_sends for e in r["entries"]) == sorted(to_b)
    ok_d.callback(ok(0, stored=CHUNK))
    bad_d.callback(err(0, "timeout"))
    c_d.errback(RuntimeError("link lost"))
    assert result_of(done) == CHUNK
    assert not any(h.store.exists(e[0]) for e in ok_request["entries"])
    assert all(h.store.exists(e[0]) for e in bad_request["entries"])
    assert all(h.store.exists(k) for k in to_c)
    assert h.rebalancer.moved == CHUNK


def test_a_send_that_raises_keeps_the_entries():
    h = Handoff()
    to_b = h.fill("b", 3)

    def broken(owner, request):
        raise RuntimeError("no")

    h.rebalancer._send = broken
    assert result_of(h.rebalancer.run(h.placement)) == 0
    assert all(h.store.exists(k) for k in to_b)


def test_with_replicas_every_owner_gets_a_copy_and_a_backup_keeps_its_own():
    h = Handoff(replicas=2)
    placement = h.placement
    backup = keys_of("b", placement, 3, where=lambda k: "a" in placement.owners(k))
    elsewhere = keys_of("b", placement, 3, where=lambda k: "a" not in placement.owners(k))
    for key in backup + elsewhere:
        h.store.set(key, 1, None)
    done = h.rebalancer.run(placement)
    sent = {}
    for owner, request, d in h.sends:
        sent[owner] = sorted(e[0] for e in request["entries"])
        d.callback(ok(0, stored=len(request["entries"])))
    assert sent["b"] == sorted(backup + elsewhere)  # the primary of all six
    assert sent["c"] == sorted(elsewhere)  # the other owner of those a does not hold
    assert result_of(done) == 9
    assert all(h.store.exists(k) for k in backup)
    assert not any(h.store.exists(k) for k in elsewhere)
    # the next run with the same owners sends nothing: they have had every write since
    h.sends.clear()
    assert result_of(h.rebalancer.run(placement)) == 0 and h.sends == []


def test_an_owner_pushed_out_by_a_joiner_sends_its_copies_to_the_joiner_alone():
    """With 2 replicas, a joiner d takes a's place beside an owner that stays: that owner
    had every write a had, so it gets nothing (a 1M-key join sent each copy d needed
    three times, twice from the old owners and once to the one that stays)."""
    h = Handoff(replicas=2)
    before = h.placement
    h.rebalancer.run(before)  # the last complete run: a, b, c
    after = before.with_nodes({"a", "b", "c", "d"})
    pushed = keys_of("d", after, 3, where=lambda k: "a" in before.owners(k)
                     and "a" not in after.owners(k))
    for key in pushed:
        h.store.set(key, 1, None)
    done = h.rebalancer.run(after)
    assert [owner for owner, _, _ in h.sends] == ["d"]
    h.answer_all()
    assert result_of(done) == 3 and not any(h.store.exists(k) for k in pushed)


def test_a_copy_held_by_no_owner_of_the_last_run_goes_to_every_owner():
    h = Handoff(replicas=2)
    h.rebalancer.run(h.placement)
    stray = keys_of("b", h.placement, 2, where=lambda k: "a" not in h.placement.owners(k))
    for key in stray:
        h.store.set(key, 1, None)
    h.rebalancer.run(h.placement)
    assert sorted(owner for owner, _, _ in h.sends) == ["b", "c"]


def test_an_entry_leaves_only_once_every_owner_has_it():
    h = Handoff(replicas=2)
    placement = h.placement
    keys = keys_of("b", placement, 2, where=lambda k: "a" not in placement.owners(k))
    for key in keys:
        h.store.set(key, 1, None)
    done = h.rebalancer.run(placement)
    by_owner = {owner: d for owner, _, d in h.sends}
    by_owner["b"].callback(ok(0, stored=2))
    assert all(h.store.exists(k) for k in keys)  # c does not have them yet
    by_owner["c"].callback(err(0, "timeout"))
    result_of(done)
    assert all(h.store.exists(k) for k in keys)
    h.sends.clear()
    h.rebalancer.run(placement)  # the failed run did not count: both owners again
    assert sorted(owner for owner, _, _ in h.sends) == ["b", "c"]


def test_run_with_nothing_to_move_sends_nothing():
    h = Handoff()
    h.fill("a", 10)
    assert result_of(h.rebalancer.run(h.placement)) == 0
    assert h.sends == []


class CountedRuns:
    """Replaces Rebalancer.run: counts runs, each finishing when the test says."""

    def __init__(self, rebalancer: Rebalancer):
        self.runs: list[tuple[Placement, Deferred]] = []
        rebalancer.run = self
        rebalancer.store.set("k", 1, None)  # a store with nothing in it runs nothing

    def __call__(self, placement):
        d = Deferred()
        self.runs.append((placement, d))
        return d


def test_schedule_coalesces_a_burst_into_one_run_after_settling():
    h = Handoff()
    runs = CountedRuns(h.rebalancer)
    for _ in range(20):
        h.rebalancer.schedule()
        h.clock.advance(SETTLE / 100)
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(SETTLE * 0.7)
    assert runs.runs == []
    later = Placement({"a", "b"}, 1)
    h.placement = later  # the run uses the view of when it starts
    h.clock.advance(SETTLE)
    assert [p for p, _ in runs.runs] == [later]
    runs.runs[0][1].callback(0)
    h.clock.advance(10)
    assert len(runs.runs) == 1
    assert h.clock.getDelayedCalls() == []


def test_a_schedule_during_a_run_causes_exactly_one_more_run():
    h = Handoff()
    runs = CountedRuns(h.rebalancer)
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert len(runs.runs) == 1
    for _ in range(5):
        h.rebalancer.schedule()
    h.clock.advance(10)
    assert len(runs.runs) == 1  # never two at once
    runs.runs[0][1].callback(3)
    h.clock.advance(SETTLE)
    assert len(runs.runs) == 2
    runs.runs[1][1].callback(0)
    h.clock.advance(10)
    assert len(runs.runs) == 2
    assert h.clock.getDelayedCalls() == []


def test_a_failed_run_does_not_stop_later_ones():
    h = Handoff()
    runs = CountedRuns(h.rebalancer)
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    h.rebalancer.schedule()
    runs.runs[0][1].errback(RuntimeError("bad run"))
    h.clock.advance(SETTLE)
    assert len(runs.runs) == 2
    runs.runs[1][1].callback(0)
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert len(runs.runs) == 3


def test_stop_cancels_a_scheduled_run():
    h = Handoff()
    runs = CountedRuns(h.rebalancer)
    h.rebalancer.schedule()
    h.rebalancer.stop()
    h.clock.advance(10)
    assert runs.runs == [] and h.clock.getDelayedCalls() == []


def test_runs_end_to_end_through_the_real_run():
    h = Handoff()
    to_b = h.fill("b", 2)
    h.rebalancer.schedule()
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert len(h.sends) == 1
    h.sends[0][2].callback(ok(0, stored=2))
    assert not any(h.store.exists(k) for k in to_b)
    h.rebalancer.schedule()
    h.clock.advance(SETTLE)
    assert len(h.sends) == 1  # nothing left to hand over


def test_a_large_scan_yields_to_the_reactor_between_slices():
    from swarm.cluster.rebalance import SCAN_SLICE

    h = Handoff()
    h.fill("b", 2 * SCAN_SLICE + 10)
    done = h.rebalancer.run(h.placement)
    # the first slice is scanned (its first chunks already on their way), then the
    # scan waits for the reactor's next turn
    assert not done.called and h.clock.getDelayedCalls()
    assert 0 < sum(len(r["entries"]) for _, r, _ in h.sends) <= SCAN_SLICE
    h.clock.advance(0)  # (a fake clock's turn also runs what it schedules meanwhile)
    assert len(h.answer_all()) == -(-(2 * SCAN_SLICE + 10) // CHUNK)  # all, in chunks
    assert result_of(done) == 2 * SCAN_SLICE + 10


def test_at_most_window_chunks_are_in_flight_to_one_owner():
    from swarm.cluster.rebalance import WINDOW

    h = Handoff()
    h.fill("b", (WINDOW + 2) * CHUNK)
    h.fill("c", (WINDOW + 2) * CHUNK)
    done = h.rebalancer.run(h.placement)
    h.clock.advance(0)
    assert sorted(owner for owner, _, _ in h.sends) == ["b"] * WINDOW + ["c"] * WINDOW
    h.sends[0][2].callback(ok(0, stored=CHUNK))  # one answered: one more goes
    assert len(h.sends) == 2 * WINDOW + 1 and h.sends[-1][0] == h.sends[0][0]
    assert len(h.answer_all()) == 2 * (WINDOW + 2)
    assert result_of(done) == 2 * (WINDOW + 2) * CHUNK


def test_entries_deleted_during_a_paused_scan_go_as_tombstones():
    from swarm.cluster.rebalance import SCAN_SLICE

    h = Handoff()
    keys = h.fill("b", SCAN_SLICE + 10)
    h.rebalancer.run(h.placement)
    for key in keys[SCAN_SLICE:]:  # not scanned yet: the scan paused before them
        h.store.delete(key)
    h.store.take(keys[SCAN_SLICE:SCAN_SLICE + 5])  # and these are gone altogether
    h.clock.advance(0)
    sent = [Entry.from_wire(e) for _, request in h.answer_all() for e in request["entries"]]
    assert {e.key for e in sent if not e.deleted} == set(keys[:SCAN_SLICE])
    assert {e.key for e in sent if e.deleted} == set(keys[SCAN_SLICE + 5:])


def test_while_its_id_is_refused_a_node_answers_key_ops_unavailable_and_node_ops_as_usual():
    node = Node()
    (key,) = keys_of("a", node.placement)
    node.overlay.conflict = "node id 'a' is already live in the swarm"
    for request in ({"id": 1, "op": "set", "key": key, "value": 1},
                    {"id": 1, "op": "get", "key": key},
                    {"id": 1, "op": "mget", "keys": [key]}):
        reply = node.router.handle(request)
        assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
        assert "already live" in reply["error"]["message"]
    assert node.store.exists(key) is False
    assert node.router.handle({"id": 2, "op": "ping"}) == ok(2, node="a")
    node.overlay.conflict = None
    assert node.router.handle({"id": 3, "op": "set", "key": key, "value": 1}) == ok(
        3, stored=True)
