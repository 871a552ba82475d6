"""Unit tests of swarm.commands.StoreCommands on a MemoryStore with a fake clock."""

from __future__ import annotations

import pytest

from swarm.cluster.commands import StoreCommands

# The ``clock`` and ``store`` fixtures come from conftest.py.


def run(commands, op, **args):
    return commands.execute({"id": 1, "op": op, **args})


@pytest.fixture
def with_default(store):
    """Commands whose node has --default-ttl 30."""
    return StoreCommands(store, default_ttl=30)


# -- default ttl --------------------------------------------------------------------------


def test_set_without_ttl_takes_the_default(with_default, store):
    assert run(with_default, "set", key="k", value=1) == {"stored": True}
    assert store.ttl("k") == (True, 30)


def test_set_with_explicit_null_ttl_never_expires(with_default, store):
    run(with_default, "set", key="k", value=1, ttl=None)
    assert store.ttl("k") == (True, None)


def test_set_with_a_ttl_uses_it(with_default, store):
    run(with_default, "set", key="k", value=1, ttl=5)
    assert store.ttl("k") == (True, 5)


def test_mset_without_ttl_takes_the_default(with_default, store):
    run(with_default, "mset", items={"a": 1, "b": 2})
    assert [store.ttl(k) for k in "ab"] == [(True, 30), (True, 30)]


def test_mset_with_explicit_null_ttl_never_expires(with_default, store):
    run(with_default, "mset", items={"a": 1, "b": 2}, ttl=None)
    assert [store.ttl(k) for k in "ab"] == [(True, None), (True, None)]


def test_incr_creating_a_key_without_ttl_takes_the_default(with_default, store):
    assert run(with_default, "incr", key="n") == {"value": 1}
    assert store.ttl("n") == (True, 30)


def test_incr_with_explicit_null_ttl_never_expires(with_default, store):
    run(with_default, "incr", key="n", delta=2, ttl=None)
    assert store.ttl("n") == (True, None)


def test_incr_keeps_the_ttl_of_an_existing_counter(with_default, store, clock):
    run(with_default, "set", key="n", value=1, ttl=100)
    clock.advance(10)
    assert run(with_default, "incr", key="n", delta=4) == {"value": 5}
    assert store.ttl("n") == (True, 90)


def test_default_ttl_expires_entries(with_default, store, clock):
    run(with_default, "set", key="k", value=1)
    clock.advance(30)
    assert run(with_default, "get", key="k") == {"found": False, "value": None}


@pytest.mark.parametrize("default", [None, 0, 0.0])
def test_no_default_ttl_means_no_expiry(store, default):
    commands = StoreCommands(store, default_ttl=default)
    run(commands, "set", key="k", value=1)
    run(commands, "mset", items={"m": 1})
    run(commands, "incr", key="n")
    assert [store.ttl(k) for k in ("k", "m", "n")] == [(True, None)] * 3


# -- replies ------------------------------------------------------------------------------


def test_ttl_rounds_to_milliseconds(store, clock):
    commands = StoreCommands(store)
    run(commands, "set", key="k", value=1, ttl=10)
    clock.advance(1.23456)
    reply = run(commands, "ttl", key="k")
    assert reply == {"found": True, "ttl": 8.765}
    assert store.ttl("k")[1] != 8.765  # the rounding is the command's


def test_ttl_of_an_entry_without_expiry_and_of_a_missing_key(store):
    commands = StoreCommands(store)
    run(commands, "set", key="k", value=1, ttl=None)
    assert run(commands, "ttl", key="k") == {"found": True, "ttl": None}
    assert run(commands, "ttl", key="nope") == {"found": False, "ttl": None}


def test_mget_returns_only_found_keys(store, clock):
    commands = StoreCommands(store)
    store.set("a", 1, None)
    store.set("b", None, None)  # a stored null is found
    store.set("gone", 3, 1)
    clock.advance(1)
    reply = run(commands, "mget", keys=["a", "b", "missing", "gone"])
    assert reply == {"values": {"a": 1, "b": None}}
    assert (store.hits, store.misses) == (2, 2)


def test_mset_returns_the_count(store):
    commands = StoreCommands(store)
    assert run(commands, "mset", items={"a": 1, "b": [2], "c": "x"}) == {"stored": 3}
    assert [store.get(k) for k in "abc"] == [(True, 1), (True, [2]), (True, "x")]


def test_set_nx_xx_replies(store):
    commands = StoreCommands(store)
    assert run(commands, "set", key="k", value=1, xx=True) == {"stored": False}
    assert run(commands, "set", key="k", value=1, nx=True) == {"stored": True}
    assert run(commands, "set", key="k", value=2, nx=True) == {"stored": False}
    assert run(commands, "set", key="k", value=3, xx=True) == {"stored": True}
    assert store.get("k") == (True, 3)


def test_get_delete_exists_expire_replies(store):
    commands = StoreCommands(store)
    store.set("k", "v", None)
    assert run(commands, "get", key="k") == {"found": True, "value": "v"}
    assert run(commands, "exists", key="k") == {"exists": True}
    assert run(commands, "expire", key="k", ttl=5) == {"updated": True}
    assert store.ttl("k") == (True, 5)
    assert run(commands, "expire", key="k", ttl=None) == {"updated": True}
    assert store.ttl("k") == (True, None)
    assert run(commands, "delete", key="k") == {"deleted": True}
    assert run(commands, "delete", key="k") == {"deleted": False}
    assert run(commands, "exists", key="k") == {"exists": False}
    assert run(commands, "expire", key="k", ttl=5) == {"updated": False}


def test_a_take_moves_a_key_this_node_no_longer_owns_and_copies_one_it_still_holds(store):
    commands = StoreCommands(store, keeps=lambda key: key == "still-mine")
    store.set("still-mine", 1, None)
    store.set("moving", 2, None)
    reply = commands.execute({"id": 0, "op": "take", "keys": ["still-mine", "moving"]})
    assert sorted(e[0] for e in reply["entries"]) == ["moving", "still-mine"]
    assert store.exists("still-mine") and not store.exists("moving")
