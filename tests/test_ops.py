"""Unit tests of swarm.protocol.ops: one table that the parser, router, commands, the
embedding API and the CLI all follow; no sockets."""

from __future__ import annotations

import io

import pytest
from twisted.internet.task import Clock

from swarm import cli
from swarm.cluster.commands import StoreCommands
from swarm.cluster.router import QueryRouter
from swarm.errors import SwarmError
from swarm.mesh.overlay import Overlay
from swarm.protocol.api import CacheOps
from swarm.protocol.ops import CLIENT_OPS, OPS, Kind
from swarm.protocol.wire import RequestParser
from swarm.store.memory import MemoryStore


def router() -> QueryRouter:
    clock = Clock()
    return QueryRouter("a", StoreCommands(MemoryStore(clock)), dict, Overlay("a", "s", 1, clock))


def test_every_op_runs_where_its_kind_says():
    r = router()
    assert set(r._node_ops) == {op.name for op in OPS.values() if op.kind is Kind.NODE}
    assert set(r.commands._handlers) == {op.name for op in OPS.values() if op.kind is not Kind.NODE}


def test_clients_may_not_send_internal_ops_but_peers_may():
    internal = [op.name for op in OPS.values() if op.kind is Kind.INTERNAL]
    assert internal == ["restore", "compare", "take", "keys_after", "clear"]
    assert not set(internal) & set(CLIENT_OPS)
    peer_parser = RequestParser(internal=True)
    assert peer_parser.parse({"id": 0, "op": "take", "keys": ["k"]})["keys"] == ["k"]


@pytest.mark.parametrize("raw", [
    {"id": 0, "op": "take", "keys": ["k"]},
    {"id": 0, "op": "compare", "digests": {0: 1}},
    {"id": 0, "op": "restore", "entries": [["k", "v", None, [1, 0, "b"], False]]},
])
def test_an_internal_op_that_names_no_node_is_a_bad_request_not_a_crash(raw):
    reply = router().route_forwarded(raw, 3, 5)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "addressed" in reply["error"]["message"]


def test_every_key_op_says_which_keys_it_touches_and_multi_key_ops_split_and_merge():
    for op in OPS.values():
        if op.kind in (Kind.READ, Kind.WRITE):
            assert op.keys is not None, op.name
    mset = OPS["mset"]
    request = {"id": 1, "op": "mset", "items": {"a": 1, "b": 2, "c": 3}, "ttl": 5}
    assert mset.keys(request) == ["a", "b", "c"]
    assert mset.part(request, ["c", "a"]) == {"id": 1, "op": "mset", "items": {"c": 3, "a": 1},
                                              "ttl": 5}
    assert mset.merge([{"stored": 2}, {"stored": 1}]) == {"stored": 3}
    mget = OPS["mget"]
    assert mget.merge([{"values": {"a": 1}}, {"values": {"b": 2}}]) == {"values": {"a": 1, "b": 2}}


def test_only_a_plain_write_skips_fetching_older_copies():
    blind = {name for name, op in OPS.items() if op.blind({"nx": False})}
    assert blind == {"set", "mset"}
    assert OPS["set"].blind({"nx": True}) is False and OPS["set"].blind({"xx": True}) is False


def test_the_embedding_api_has_a_method_for_every_client_op():
    assert all(callable(getattr(CacheOps, name, None)) for name in CLIENT_OPS)


def test_the_cli_describes_its_commands_as_the_table_does():
    out = io.StringIO()
    with pytest.raises(SystemExit):
        cli.build_parser(out, io.StringIO()).parse_args(["--help"])
    for name in ("get", "incr", "owner"):
        assert CLIENT_OPS[name].summary in " ".join(out.getvalue().split())


def test_only_peers_may_give_a_write_its_version_and_it_must_be_one():
    write = {"id": 0, "op": "set", "key": "k", "value": 1, "at": [5, 0, "b"]}
    assert "at" not in RequestParser().parse(write)  # a client cannot forge an age
    assert RequestParser(internal=True).parse(write)["at"] == (5, 0, "b")
    with pytest.raises(SwarmError, match="at: a version"):
        RequestParser(internal=True).parse({**write, "at": "yesterday"})
    read = {"id": 0, "op": "get", "key": "k", "at": [5, 0, "b"]}
    assert "at" not in RequestParser(internal=True).parse(read)


def test_reads_and_writes_that_need_nothing_stored_may_be_sent_again_and_no_other():
    again = {name for name, op in OPS.items()
             if op.resend({"id": 0, "op": name, "key": "k", "value": 1})}
    assert again == {"get", "exists", "ttl", "mget", "set", "delete", "expire", "mset",
                     "mdelete"}
    assert not OPS["set"].resend({"id": 0, "op": "set", "key": "k", "value": 1, "nx": True})
