"""Unit tests of swarm.store.memory: TTL, LRU eviction, accounting, sweep, stats; no sockets.

Time comes from ``task.Clock``, so every expiry is exact and nothing sleeps.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from swarm.errors import BadRequest, NotInteger, TooLarge
from swarm.protocol.entry import Entry, HybridClock
from swarm.protocol.wire import INT64_MAX, INT64_MIN
from swarm.store.memory import (
    _DELETED,
    _EXPIRES,
    _VALUE,
    BIG_INT_SIZE,
    BYTES_SIZE,
    DICT_EMPTY_SIZE,
    DICT_SIZE,
    ENTRY_OVERHEAD,
    FLOAT_SIZE,
    INT_SIZE,
    LIST_SIZE,
    SCALAR_SIZE,
    STR_ASCII_SIZE,
    STR_LATIN1_SIZE,
    STR_UCS2_SIZE,
    STR_UCS4_SIZE,
    TOMBSTONE_TTL,
    IStore,
    MemoryStore,
    measure,
)


def entry_size(key, value):
    """The documented accounting rule, computed independently of the store."""
    return ENTRY_OVERHEAD + len(key.encode("utf-8")) + measure(value)


def held_size(store):
    """Sum of the accounted sizes of every entry and tombstone the store holds
    (white-box): a tombstone costs the overhead and its key."""
    return sum(
        ENTRY_OVERHEAD + len(k.encode("utf-8")) if e[_VALUE] is _DELETED
        else entry_size(k, e[_VALUE])
        for k, e in store._entries.items()
    )


# The ``clock`` and ``store`` fixtures come from conftest.py.


# -- interface and basic operations -------------------------------------------------------


def test_memory_store_provides_istore(store):
    assert verifyObject(IStore, store)


def test_defaults_are_128_mib_budget_and_1_mib_values(store):
    assert store.max_memory == 128 * 1024 * 1024
    assert store.max_value_bytes == 1024 * 1024


def test_get_set_delete_exists(store):
    assert store.get("k") == (False, None)
    assert store.exists("k") is False
    assert store.set("k", {"a": [1, 2]}, None) is True
    assert store.get("k") == (True, {"a": [1, 2]})
    assert store.exists("k") is True
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.get("k") == (False, None)
    assert store.exists("k") is False


def test_stored_null_is_found(store):
    store.set("k", None, None)
    assert store.get("k") == (True, None)


def test_set_overwrites(store):
    store.set("k", "one", None)
    store.set("k", "two", None)
    assert store.get("k") == (True, "two")
    assert len(store) == 1


def test_nx_stores_only_when_absent(store):
    assert store.set("k", 1, None, nx=True) is True
    assert store.set("k", 2, None, nx=True) is False
    assert store.get("k") == (True, 1)


def test_xx_stores_only_when_present(store):
    assert store.set("k", 1, None, xx=True) is False
    assert store.exists("k") is False
    store.set("k", 1, None)
    assert store.set("k", 2, None, xx=True) is True
    assert store.get("k") == (True, 2)


def test_hits_and_misses(store):
    store.set("k", 1, None)
    store.get("k")
    store.get("k")
    store.get("nope")
    stats = store.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


# -- TTL: lazy expiry ---------------------------------------------------------------------


def test_entry_lives_until_its_deadline(store, clock):
    store.set("k", "v", 10)
    clock.advance(9.999)
    assert store.get("k") == (True, "v")
    clock.advance(0.001)
    assert store.get("k") == (False, None)


def _expired(store, clock):
    store.set("k", 1, 5)
    clock.advance(5)
    return store


@pytest.mark.parametrize(
    "access, expected",
    [
        (lambda s: s.get("k"), (False, None)),
        (lambda s: s.exists("k"), False),
        (lambda s: s.ttl("k"), (False, None)),
        (lambda s: s.expire("k", 100), False),
        (lambda s: s.delete("k"), False),
        (lambda s: s.set("k", 2, None, nx=True), True),
        (lambda s: s.set("k", 2, None, xx=True), False),
        (lambda s: s.incr("k", 3, None), 3),
    ],
    ids=["get", "exists", "ttl", "expire", "delete", "set-nx", "set-xx", "incr"],
)
def test_each_access_expires_lazily_and_counts_it(store, clock, access, expected):
    _expired(store, clock)
    assert store.expirations == 0
    assert access(store) == expected
    assert store.expirations == 1
    assert store.memory_bytes == held_size(store)


def test_lazy_expiry_frees_memory(store, clock):
    _expired(store, clock)
    assert store.memory_bytes == entry_size("k", 1)
    store.exists("k")
    assert store.memory_bytes == 0
    assert len(store) == 0


def test_expired_entry_is_a_miss(store, clock):
    _expired(store, clock)
    store.get("k")
    assert (store.hits, store.misses) == (0, 1)


def test_set_nx_after_expiry_takes_the_new_ttl(store, clock):
    _expired(store, clock)
    assert store.set("k", 2, None, nx=True)
    clock.advance(1000)
    assert store.get("k") == (True, 2)


def test_ttl_reports_seconds_left(store, clock):
    store.set("k", 1, 10)
    clock.advance(2.5)
    assert store.ttl("k") == (True, 7.5)


def test_ttl_without_expiry_is_none(store):
    store.set("k", 1, None)
    assert store.ttl("k") == (True, None)


def test_ttl_missing_key(store):
    assert store.ttl("nope") == (False, None)


def test_set_replaces_the_ttl(store, clock):
    store.set("k", 1, 5)
    store.set("k", 2, None)
    clock.advance(100)
    assert store.get("k") == (True, 2)
    store.set("k", 3, 1)
    assert store.ttl("k") == (True, 1)


def test_expire_sets_a_ttl(store, clock):
    store.set("k", 1, None)
    assert store.expire("k", 3) is True
    assert store.ttl("k") == (True, 3)
    clock.advance(3)
    assert store.exists("k") is False


def test_expire_none_removes_the_expiry(store, clock):
    store.set("k", 1, 3)
    assert store.expire("k", None) is True
    assert store.ttl("k") == (True, None)
    clock.advance(100)
    assert store.sweep(None) == 0
    assert store.get("k") == (True, 1)


def test_expire_can_shorten_a_ttl(store, clock):
    store.set("k", 1, 100)
    store.expire("k", 1)
    clock.advance(1)
    assert store.sweep(None) == 1
    assert store.exists("k") is False


def test_expire_missing_key(store):
    assert store.expire("nope", 10) is False
    assert store.expire("nope", None) is False
    assert store.exists("nope") is False


# -- incr ---------------------------------------------------------------------------------


def test_incr_from_missing_counts_from_zero(store):
    assert store.incr("n", 5, None) == 5
    assert store.incr("n", -7, None) == -2
    assert store.get("n") == (True, -2)


@pytest.mark.parametrize("value", ["5", 1.0, [1], {"a": 1}, None, b"1"])
def test_incr_non_integer(store, value):
    store.set("k", value, None)
    with pytest.raises(NotInteger):
        store.incr("k", 1, None)
    assert store.get("k") == (True, value)


@pytest.mark.parametrize("value", [True, False])
def test_incr_bool_is_not_an_integer(store, value):
    store.set("k", value, None)
    with pytest.raises(NotInteger):
        store.incr("k", 1, None)
    assert store.get("k")[1] is value


@pytest.mark.parametrize(
    "start, delta", [(INT64_MAX, 1), (INT64_MIN, -1), (INT64_MAX, INT64_MAX)]
)
def test_incr_overflow_leaves_value(store, start, delta):
    store.set("k", start, None)
    with pytest.raises(NotInteger, match="overflow"):
        store.incr("k", delta, None)
    assert store.get("k") == (True, start)


def test_incr_reaches_the_int64_bounds(store):
    store.set("k", INT64_MAX - 1, None)
    assert store.incr("k", 1, None) == INT64_MAX
    store.set("k", INT64_MIN + 1, None)
    assert store.incr("k", -1, None) == INT64_MIN


def test_incr_keeps_the_existing_ttl(store, clock):
    store.set("n", 1, 10)
    clock.advance(4)
    assert store.incr("n", 1, 1000) == 2
    assert store.ttl("n") == (True, 6)
    clock.advance(6)
    assert store.exists("n") is False


def test_incr_keeps_no_expiry(store, clock):
    store.set("n", 1, None)
    store.incr("n", 1, 5)
    assert store.ttl("n") == (True, None)


def test_incr_on_a_new_key_takes_the_given_ttl(store, clock):
    store.incr("n", 1, 5)
    assert store.ttl("n") == (True, 5)
    clock.advance(5)
    assert store.exists("n") is False


def test_incr_on_a_new_key_without_ttl_never_expires(store, clock):
    store.incr("n", 1, None)
    assert store.ttl("n") == (True, None)


# -- accounting ---------------------------------------------------------------------------


def _list(n):
    """An array of n elements as the rule counts it: 56, then n slots plus CPython's
    over-allocation (n // 8, and 3 for a non-empty list grown by appends)."""
    return LIST_SIZE + SCALAR_SIZE * (n + (n >> 3) + (3 if n else 0))


#: A map of one to five entries: header, 8 index bytes and 5 table entries of 16.
ONE_KEY_MAP = DICT_SIZE + 8 + 5 * 16


@pytest.mark.parametrize(
    "value, size",
    [
        ("", 0),  # "" and one-character latin-1 strings are CPython's shared objects
        ("é", 0),
        ("abc", STR_ASCII_SIZE + 3),
        ("\x00\x01\x02", STR_ASCII_SIZE + 3),
        ("ÿé", STR_LATIN1_SIZE + 2),  # one byte per character below 256
        ("日本", STR_UCS2_SIZE + 4),  # two bytes per character below 65536
        ("🙂", STR_UCS4_SIZE + 4),  # four beyond; not shared
        (b"", 0),
        (b"x", 0),
        (b"\x00\x01\x02", BYTES_SIZE + 3),
        (0, 0),  # -5..256 are shared small ints
        (-5, 0),
        (256, 0),
        (257, INT_SIZE),
        (-6, INT_SIZE),
        (2**60 - 1, INT_SIZE),
        (2**60, BIG_INT_SIZE),
        (INT64_MAX, BIG_INT_SIZE),
        (INT64_MIN, BIG_INT_SIZE),
        (1.5, FLOAT_SIZE),
        (True, 0),
        (False, 0),
        (None, 0),
        ([], LIST_SIZE),
        ([1, 2], _list(2)),
        ([1000, 2000], _list(2) + 2 * INT_SIZE),
        (list(range(16)), _list(16)),
        ({}, DICT_EMPTY_SIZE),
        ({"a": 1}, ONE_KEY_MAP),
        ({"name": "Ada"}, ONE_KEY_MAP + 2 * (STR_ASCII_SIZE + 3) + 1),
        ({"é": "ü"}, ONE_KEY_MAP),
        # six keys outgrow eight slots: sixteen, ten entries, and the keys' strings
        ({f"k{i}": i for i in range(6)}, DICT_SIZE + 16 + 10 * 16 + 6 * (STR_ASCII_SIZE + 2)),
        (
            [[1], {"k": [None, "xy"]}],
            _list(2) + _list(1) + ONE_KEY_MAP + _list(2) + STR_ASCII_SIZE + 2,
        ),
    ],
)
def test_measure(value, size):
    assert measure(value) == size


def test_measure_refuses_lone_surrogates():
    with pytest.raises(BadRequest, match="lone surrogates"):
        measure("a\ud800")


def test_measure_deep_nesting_does_not_recurse():
    value = 0
    for _ in range(10_000):
        value = [value]
    assert measure(value) == 10_000 * _list(1)


def test_memory_bytes_follows_the_accounting_rule(store):
    # overhead + 6 ("user:7" in UTF-8) + the map, its key "name" and its value "Ada"
    store.set("user:7", {"name": "Ada"}, None)
    first = ENTRY_OVERHEAD + 6 + ONE_KEY_MAP + (STR_ASCII_SIZE + 4) + (STR_ASCII_SIZE + 3)
    assert store.memory_bytes == first == 567
    # the key counts in UTF-8 bytes: "clé" is 4 bytes; "été" is a latin-1 str of 3
    store.set("clé", "été", None)
    assert store.memory_bytes == first + ENTRY_OVERHEAD + 4 + STR_LATIN1_SIZE + 3


def test_overwrite_replaces_the_size(store):
    store.set("k", "x" * 100, None)
    assert store.memory_bytes == entry_size("k", "x" * 100)
    store.set("k", "y", None)
    assert store.memory_bytes == entry_size("k", "y")
    store.incr("n", 1, None)
    store.incr("n", 1, None)
    assert store.memory_bytes == entry_size("k", "y") + entry_size("n", 2)


def test_memory_returns_to_zero(store, clock):
    for i in range(50):
        store.set(f"k{i}", ["v"] * i, 10 if i % 2 else None)
    store.set_many({"m1": "a", "m2": {"x": 1}}, None)
    store.incr("n", 3, None)
    assert store.memory_bytes == held_size(store) > 0
    for key in list(store._entries):
        store.delete(key)
    assert store.stats()["keys"] == 0
    assert store.memory_bytes == held_size(store) == 53 * ENTRY_OVERHEAD + sum(
        len(k) for k in store._entries
    )  # the tombstones, until they expire
    clock.advance(TOMBSTONE_TTL)
    assert store.stats()["tombstones"] == 0
    assert store.memory_bytes == 0


def test_memory_after_expiry_is_zero(store, clock):
    for i in range(20):
        store.set(f"k{i}", "v" * i, 1)
    clock.advance(1)
    store.sweep(None)
    assert store.memory_bytes == 0


# -- LRU eviction -------------------------------------------------------------------------


def small_store(clock, entries=3):
    """A store whose budget holds exactly ``entries`` one-byte keys with int values."""
    return MemoryStore(clock, max_memory=entries * entry_size("a", 0))


def test_writes_beyond_budget_evict_least_recently_used(clock):
    store = small_store(clock)
    for key in "abc":
        store.set(key, 0, None)
    store.set("d", 0, None)
    assert [k for k in "abcd" if store.exists(k)] == ["b", "c", "d"]
    assert store.evictions == 1
    assert store.memory_bytes == store.max_memory


def test_get_refreshes_recency(clock):
    store = small_store(clock)
    for key in "abc":
        store.set(key, 0, None)
    store.get("a")
    store.set("d", 0, None)
    assert store.exists("a") is True
    assert store.exists("b") is False
    assert store.exists("c") is True


def test_overwrite_refreshes_recency(clock):
    store = small_store(clock)
    for key in "abc":
        store.set(key, 0, None)
    store.set("a", 1, None)
    store.incr("b", 1, None)
    store.set("d", 0, None)
    assert [k for k in "abcd" if store.exists(k)] == ["a", "b", "d"]


def test_a_big_write_evicts_several(clock):
    store = small_store(clock, entries=4)
    for key in "abcd":
        store.set(key, 0, None)
    # costs exactly two small entries: overhead, key "e", then the str header
    big = "x" * (2 * entry_size("a", 0) - ENTRY_OVERHEAD - 1 - STR_ASCII_SIZE)
    store.set("e", big, None)
    assert [k for k in "abcde" if store.exists(k)] == ["c", "d", "e"]
    assert store.evictions == 2
    assert store.stats()["evictions"] == 2


def test_memory_never_exceeds_budget(clock):
    store = MemoryStore(clock, max_memory=1000)
    for i in range(500):
        store.set(f"key{i}", "v" * (i % 300), None)
        assert store.memory_bytes <= 1000
        assert store.memory_bytes == held_size(store)
        store.incr(f"n{i % 7}", 1, None)
        assert store.memory_bytes <= 1000
    assert store.evictions > 0


def test_set_many_beyond_budget_evicts(clock):
    store = small_store(clock)
    store.set("a", 0, None)
    assert store.set_many({"b": 0, "c": 0, "d": 0}, None) == 3
    assert store.exists("a") is False
    assert store.memory_bytes <= store.max_memory


# -- size limits --------------------------------------------------------------------------


def test_value_over_max_value_bytes_is_too_large(clock):
    limit = measure("x" * 100)
    store = MemoryStore(clock, max_value_bytes=limit)
    store.set("k", "x" * 100, None)  # exactly at the limit is fine
    with pytest.raises(TooLarge) as e:
        store.set("k", "x" * 101, None)
    assert str(limit + 1) in e.value.message and str(limit) in e.value.message
    assert store.get("k") == (True, "x" * 100)


def test_value_limit_uses_measure(clock):
    store = MemoryStore(clock, max_value_bytes=STR_LATIN1_SIZE + 10)
    store.set("k", "é" * 10, None)  # latin-1: one byte a character
    with pytest.raises(TooLarge, match=f"{STR_LATIN1_SIZE + 11} bytes"):
        store.set("k", "é" * 11, None)
    # an array of three small ints: 56 + 8 * (3 slots + 3 spare), the ints shared
    with pytest.raises(TooLarge, match=f"{LIST_SIZE + 6 * SCALAR_SIZE} bytes"):
        store.set("k", [1, 2, 3], None)


def test_entry_over_the_whole_budget_is_too_large_and_changes_nothing(clock):
    store = MemoryStore(clock, max_memory=1000)
    store.set("a", "x", None)
    store.set("b", "y", 5)
    before = (dict(store._entries), store.memory_bytes)
    # the value fits max_value_bytes; the entry is one byte over the budget
    too_big = "z" * (1000 - ENTRY_OVERHEAD - 1 - STR_ASCII_SIZE + 1)
    with pytest.raises(TooLarge, match=r"entry of 1001 bytes exceeds the memory budget of 1000"):
        store.set("c", too_big, None)
    with pytest.raises(TooLarge):
        store.set("a", too_big, None, xx=True)
    assert (dict(store._entries), store.memory_bytes) == before
    assert store.get("a") == (True, "x")
    assert store.get("b") == (True, "y")
    assert store.exists("c") is False
    assert store.evictions == 0


def test_entry_exactly_the_budget_fits(clock):
    store = MemoryStore(clock, max_memory=1000)
    store.set("a", "x", None)
    store.set("c", "z" * (1000 - ENTRY_OVERHEAD - 1 - STR_ASCII_SIZE), None)
    assert store.memory_bytes == 1000
    assert store.exists("a") is False
    assert store.evictions == 1


def test_set_many_is_all_or_nothing(clock):
    store = MemoryStore(clock, max_value_bytes=STR_ASCII_SIZE + 10)
    store.set("a", "old", None)
    with pytest.raises(TooLarge, match=f"{STR_ASCII_SIZE + 11} bytes"):
        store.set_many({"a": "new", "b": "x" * 11, "c": "ok"}, None)
    assert store.get("a") == (True, "old")
    assert store.exists("b") is False
    assert store.exists("c") is False
    assert store.memory_bytes == entry_size("a", "old")


def test_set_many_entry_over_budget_is_all_or_nothing(clock):
    store = MemoryStore(clock, max_memory=200)
    with pytest.raises(TooLarge):
        store.set_many({"a": 1, "b": "x" * 200}, None)
    assert len(store) == 0
    assert store.memory_bytes == 0


def test_set_many_stores_all_with_the_ttl(store, clock):
    assert store.set_many({"a": 1, "b": [2], "c": None}, 5) == 3
    assert [store.ttl(k) for k in "abc"] == [(True, 5)] * 3
    assert store.memory_bytes == sum(entry_size(k, v) for k, v in [("a", 1), ("b", [2]), ("c", None)])
    clock.advance(5)
    assert store.sweep(None) == 3


# -- active expiry ------------------------------------------------------------------------


def test_sweep_removes_at_most_limit_and_only_due_entries(store, clock):
    for i in range(10_000):
        store.set(f"due{i}", i, 1)
    for i in range(1_000):
        store.set(f"late{i}", i, 2)
    store.set("forever", 0, None)
    clock.advance(1.5)
    assert store.sweep(limit=100) == 100
    assert len(store) == 11_001 - 100
    assert store.expirations == 100
    removed = 100
    while n := store.sweep(limit=100):
        assert n <= 100
        removed += n
    assert removed == 10_000
    assert sorted(store._entries) == sorted([f"late{i}" for i in range(1_000)] + ["forever"])
    assert store.memory_bytes == held_size(store)


def test_sweep_goes_in_deadline_order(store, clock):
    for i in reversed(range(1_000)):
        store.set(f"k{i}", i, 1 + i / 1000)
    clock.advance(10)
    assert store.sweep(limit=10) == 10
    assert sorted(store._entries) == sorted(f"k{i}" for i in range(10, 1_000))


def test_sweep_with_nothing_due(store, clock):
    store.set("k", 1, 10)
    store.set("n", 1, None)
    assert store.sweep(limit=100) == 0
    clock.advance(9.99)
    assert store.sweep(limit=100) == 0
    assert len(store) == 2


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda s: s.set("k", 2, 10),
        lambda s: s.set("k", 2, None),
        lambda s: (s.set("k", 2, None), s.expire("k", 10)),
        lambda s: (s.expire("k", 10), s.set("k", 2, 10, xx=True), s.expire("k", None)),
        lambda s: (s.delete("k"), s.set("k", 2, None)),
        lambda s: (s.delete("k"), s.set("k", 2, 10)),
        lambda s: s.set_many({"k": 2}, 10),
    ],
    ids=["set-longer", "set-no-ttl", "expire-longer", "expire-none",
         "delete-reset-no-ttl", "delete-reset-longer", "set-many-longer"],
)
def test_sweep_ignores_stale_heap_items(store, clock, rewrite):
    store.set("k", 1, 1)
    rewrite(store)
    clock.advance(1)
    assert store.sweep(None) == 0
    assert store.expirations == 0
    assert store.get("k") == (True, 2)


def test_sweep_skips_deleted_keys(store, clock):
    store.set("k", 1, 1)
    store.delete("k")
    clock.advance(1)
    assert store.sweep(None) == 0
    assert store.expirations == 0


def test_sweep_after_a_shorter_ttl_rewrite(store, clock):
    store.set("k", 1, 10)
    store.set("k", 2, 1)
    clock.advance(1)
    assert store.sweep(None) == 1
    clock.advance(10)
    assert store.sweep(None) == 0
    assert store.expirations == 1


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda s, i: s.set("k", i, 1000),
        lambda s, i: s.expire("k", 1000 + i),
        lambda s, i: s.incr("k", 1, 1000),
    ],
    ids=["set", "expire", "incr"],
)
def test_deadline_heap_stays_bounded_under_rewrites(store, clock, rewrite):
    store.set("k", 0, 1000)
    largest = 0
    for i in range(100_000):
        rewrite(store, i)
        largest = max(largest, len(store._deadlines))
    assert largest < 5_000
    assert store.exists("k")


def test_heap_rebuild_keeps_every_live_deadline(store, clock):
    for i in range(100):
        store.set(f"k{i}", i, 5)
    for i in range(5_000):
        store.set("hot", i, 1000)
    clock.advance(5)
    assert store.sweep(None) == 100
    assert len(store) == 1


def test_sweep_work_is_bounded_even_with_many_stale_items(store, clock, monkeypatch):
    for i in range(10_000):
        store.set(f"k{i}", i, 1)
    for i in range(10_000):
        store.set(f"k{i}", i, 100)  # every first heap item is now stale
    clock.advance(1)
    pops = 0
    real_pop = heapq.heappop

    def counting_pop(heap):
        nonlocal pops
        pops += 1
        return real_pop(heap)

    monkeypatch.setattr(heapq, "heappop", counting_pop)
    store.sweep(limit=100)
    assert pops <= 4 * 100


def test_heap_rebuild_does_not_scan_permanent_entries(store):
    class CountingEntries(OrderedDict):
        scanned = 0

        def items(self):
            for item in super().items():
                CountingEntries.scanned += 1
                yield item

    for i in range(100_000):
        store.set(f"p{i}", i, None)
    store._entries = CountingEntries(store._entries)
    for i in range(10_000):
        store.set("hot", i, 1000)
    # amortized O(1) per write: at most a few entries looked at per rewrite
    assert CountingEntries.scanned <= 4 * 10_000


# -- stats --------------------------------------------------------------------------------


def test_stats_reports_every_counter(clock):
    store = small_store(clock, entries=2)
    store.set("a", 0, None)
    store.set("b", 0, 1)
    store.get("a")
    store.get("zz")
    store.get("zz")
    store.set("c", 0, None)  # evicts "b" (least recently used)
    store.set("d", 0, 1)  # evicts "a"
    clock.advance(1)
    assert store.stats() == {
        "keys": 1,
        "memory_bytes": entry_size("c", 0),
        "max_memory_bytes": 2 * entry_size("a", 0),
        "hits": 1,
        "misses": 2,
        "evictions": 2,
        "expirations": 1,
        "tombstones": 0,
        "merged": 0,
        "outdated": 0,
    }


def test_stats_counts_only_live_keys(store, clock):
    for i in range(5):
        store.set(f"t{i}", i, 1)
    for i in range(3):
        store.set(f"p{i}", i, None)
    assert store.stats()["keys"] == 8
    clock.advance(1)
    stats = store.stats()
    assert stats["keys"] == 3
    assert stats["memory_bytes"] == sum(entry_size(f"p{i}", i) for i in range(3))
    assert stats["expirations"] == 5


# -- properties ---------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "é", "日"])
TTLS = st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]))
ADVANCES = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])
DELTAS = st.one_of(st.integers(-5, 5), st.sampled_from([INT64_MAX, INT64_MIN]))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


class StoreAgainstModel(RuleBasedStateMachine):
    """A large budget (nothing is evicted): the store behaves like a dict of
    value + deadline, and the accounting matches its entries."""

    @initialize()
    def setup(self):
        self.clock = Clock()
        self.store = MemoryStore(self.clock, max_memory=10**9, partition=len)
        self.model: dict[str, tuple[object, float | None]] = {}
        self.hits = self.misses = 0

    def now(self):
        return self.clock.seconds()

    def live(self, key):
        """The model entry unless absent or expired (expired ones stay in the model)."""
        if key not in self.model:
            return None
        value, deadline = self.model[key]
        if deadline is not None and deadline <= self.now():
            return None
        return value, deadline

    def deadline(self, ttl):
        return None if ttl is None else self.now() + ttl

    @rule(key=KEYS, value=VALUES, ttl=TTLS, mode=st.sampled_from(["", "nx", "xx"]))
    def set(self, key, value, ttl, mode):
        present = self.live(key) is not None
        expected = not ((mode == "nx" and present) or (mode == "xx" and not present))
        got = self.store.set(key, value, ttl, nx=mode == "nx", xx=mode == "xx")
        assert got == expected
        if expected:
            self.model[key] = (value, self.deadline(ttl))

    @rule(items=st.dictionaries(KEYS, VALUES, max_size=3), ttl=TTLS)
    def set_many(self, items, ttl):
        assert self.store.set_many(items, ttl) == len(items)
        for key, value in items.items():
            self.model[key] = (value, self.deadline(ttl))

    @rule(key=KEYS)
    def delete(self, key):
        assert self.store.delete(key) == (self.live(key) is not None)
        self.model.pop(key, None)

    @rule(key=KEYS, delta=DELTAS, ttl=TTLS)
    def incr(self, key, delta, ttl):
        entry = self.live(key)
        if entry is None:
            current, deadline = 0, self.deadline(ttl)
        else:
            current, deadline = entry
        ok = (
            isinstance(current, int)
            and not isinstance(current, bool)
            and INT64_MIN <= current + delta <= INT64_MAX
        )
        if not ok:
            with pytest.raises(NotInteger):
                self.store.incr(key, delta, ttl)
            return
        assert self.store.incr(key, delta, ttl) == current + delta
        self.model[key] = (current + delta, deadline)

    @rule(key=KEYS, ttl=TTLS)
    def expire(self, key, ttl):
        entry = self.live(key)
        assert self.store.expire(key, ttl) == (entry is not None)
        if entry is not None:
            self.model[key] = (entry[0], self.deadline(ttl))

    @rule(seconds=ADVANCES)
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule(limit=st.one_of(st.none(), st.integers(1, 3)))
    def sweep(self, limit):
        due = [k for k in self.model if self.live(k) is None]
        removed = self.store.sweep(limit)
        assert removed <= len(due) and (limit is None or removed <= limit)
        if limit is None:
            assert not any(
                e[_EXPIRES] is not None and e[_EXPIRES] <= self.now()
                for e in self.store._entries.values()
            )

    @rule(key=KEYS)
    def get(self, key):
        entry = self.live(key)
        if entry is None:
            self.misses += 1
            assert self.store.get(key) == (False, None)
        else:
            self.hits += 1
            assert self.store.get(key) == (True, entry[0])

    @rule(key=KEYS)
    def exists(self, key):
        assert self.store.exists(key) == (self.live(key) is not None)

    @rule(key=KEYS)
    def ttl(self, key):
        entry = self.live(key)
        if entry is None:
            assert self.store.ttl(key) == (False, None)
        elif entry[1] is None:
            assert self.store.ttl(key) == (True, None)
        else:
            assert self.store.ttl(key) == (True, entry[1] - self.now())

    @precondition(lambda self: hasattr(self, "store"))
    @invariant()
    def accounting(self):
        store = self.store
        assert store.memory_bytes == held_size(store)
        assert store.memory_bytes <= store.max_memory
        for key in list(self.model):
            if self.live(key) is not None:
                assert key in store._entries
        assert (store.hits, store.misses, store.evictions) == (self.hits, self.misses, 0)
        by_partition: dict[int, int] = {}
        for key in self.model:
            if self.live(key) is not None:  # partition=len: a key's length
                by_partition[len(key)] = by_partition.get(len(key), 0) + 1
        assert store.partition_counts() == by_partition


TestStoreAgainstModel = StoreAgainstModel.TestCase
TestStoreAgainstModel.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES, TTLS),
        st.tuples(st.just("set_many"), st.dictionaries(KEYS, VALUES, max_size=3), TTLS),
        st.tuples(st.just("get"), KEYS),
        st.tuples(st.just("delete"), KEYS),
        st.tuples(st.just("incr"), KEYS, DELTAS, TTLS),
        st.tuples(st.just("expire"), KEYS, TTLS),
        st.tuples(st.just("advance"), ADVANCES),
        st.tuples(st.just("sweep"), st.integers(1, 3)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(64, 400), ops=OPS)
def test_tiny_budget_is_never_exceeded(budget, ops):
    clock = Clock()
    store = MemoryStore(clock, max_memory=budget)
    for op, *args in ops:
        try:
            getattr(clock if op == "advance" else store, op)(*args)
        except (TooLarge, NotInteger):
            pass
        assert store.memory_bytes == held_size(store)
        assert store.memory_bytes <= budget


def test_discard_removes_only_the_same_version():
    store = MemoryStore(Clock())
    store.set("k", ["handed", "over"], None)
    (handed,) = store.entries()
    store.set("k", ["rewritten"], None)
    assert store.discard("k", handed.version) is False  # written again meanwhile
    assert store.get("k") == (True, ["rewritten"])
    (current,) = store.entries()
    assert store.discard("k", current.version) is True
    assert store.exists("k") is False and store.memory_bytes == 0
    assert store.discard("missing", current.version) is False


# -- versions, merges and tombstones ------------------------------------------------------


def entry(key, value, version, ttl=None, deleted=False):
    return Entry(key, value, ttl, version, deleted)


def test_every_write_gets_a_newer_version(store):
    versions = []
    for write in (
        lambda: store.set("k", 1, None),
        lambda: store.incr("k", 1, None),
        lambda: store.expire("k", 50),
        lambda: store.set_many({"k": 5, "j": 6}, None),
        lambda: store.delete("k"),
    ):
        write()
        versions.append({e.key: e.version for e in store.entries()}["k"])
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def version_of(store, key):
    return {e.key: e.version for e in store.entries()}[key]


@pytest.mark.parametrize("key, write", [
    ("k", lambda s, at: s.set("k", "new", None, at=at)),
    ("k", lambda s, at: s.set_many({"k": "new"}, None, at=at)),
    ("n", lambda s, at: s.incr("n", 1, None, at=at)),
    ("k", lambda s, at: s.delete("k", at=at)),
    ("k", lambda s, at: s.expire("k", 50, at=at)),
])
def test_a_write_stamped_where_it_entered_keeps_that_age(store, key, write):
    """So a write run late (its node frozen with it) cannot overtake later ones."""
    store.put(entry("k", "old", (1000, 0, "a")))
    store.put(entry("n", 1, (1000, 0, "a")))
    write(store, (2000, 3, "b"))
    assert version_of(store, key) == (2000, 3, "b")
    assert store.hlc.now() > (2000, 3, "b")  # observed: later writes here outrank it


def test_a_stamped_write_older_than_the_copy_still_applies_just_above_it(store):
    """Writes to one key are ordered as they reach the node that runs them."""
    store.put(entry("k", "held", (5000, 7, "a")))
    assert store.set("k", "later arrival", None, at=(4000, 0, "b")) is True
    assert store.get("k") == (True, "later arrival")
    assert version_of(store, "k") == (5000, 8, store.hlc.node_id)


def test_a_late_overwrite_loses_to_a_later_one_from_the_same_node(store):
    """Stamped earlier by the clock of the node that stamped the copy held, a plain
    set or a delete arrives late (issue 11): the later write stays. An incr still
    runs, just above it."""
    store.put(entry("k", "held", (5000, 7, "a")))
    store.put(entry("n", 1, (5000, 7, "a")))
    assert store.set("k", "late", None, at=(4000, 0, "a")) is True
    store.set_many({"k": "late"}, None, at=(4000, 1, "a"))
    store.delete("k", at=(4000, 2, "a"))
    assert store.get("k") == (True, "held")
    assert store.incr("n", 1, None, at=(4000, 3, "a")) == 2


def test_a_write_sent_again_with_its_stamp_is_not_applied_twice(store):
    assert store.incr("n", 5, None, at=(3000, 0, "b")) == 5
    assert store.incr("n", 5, None, at=(3000, 0, "b")) == 5  # the same increment
    assert store.set("k", "v", None, at=(3000, 1, "b")) is True
    store.set("k", "v", None, at=(3000, 1, "b"))
    assert version_of(store, "k") == (3000, 1, "b")


def test_a_newer_entry_replaces_an_older_one_and_an_older_one_is_refused(store):
    assert store.put(entry("k", "v1", (1000, 0, "a"))) is True
    assert store.put(entry("k", "v0", (999, 5, "b"))) is False
    assert store.get("k") == (True, "v1")
    assert store.put(entry("k", "v2", (1000, 0, "b"))) is True  # node id breaks the tie
    assert store.get("k") == (True, "v2")
    assert store.put(entry("k", "again", (1000, 0, "b"))) is False  # same version
    assert (store.merged, store.outdated) == (2, 2)


def test_a_merge_advances_the_clock_so_the_next_local_write_wins(store):
    future = (store.hlc.now()[0] + 60_000, 7, "elsewhere")
    store.put(entry("k", "from a node whose clock is ahead", future))
    store.set("k", "written here after it", None)
    assert store.get("k") == (True, "written here after it")
    (held,) = store.entries()
    assert held.version > future


def test_a_tombstone_keeps_an_older_copy_from_coming_back(store):
    store.set("k", "v1", None)
    (old,) = store.entries()
    assert store.delete("k") is True
    assert store.put(old) is False  # the handoff of the copy from before the delete
    assert store.get("k") == (False, None)
    assert store.exists("k") is False and store.stats()["keys"] == 0
    assert store.stats()["tombstones"] == 1


def test_deleting_an_absent_key_still_leaves_a_tombstone(store):
    assert store.delete("k") is False
    assert store.put(entry("k", "stale copy", (1, 0, "frozen-node"))) is False
    assert store.exists("k") is False


def test_a_write_after_a_delete_is_newer_than_the_tombstone(store):
    store.delete("k")
    assert store.set("k", "back", None, nx=True) is True
    assert store.get("k") == (True, "back")
    assert store.stats()["tombstones"] == 0


def test_tombstones_expire_after_their_lifetime_and_give_their_memory_back(store, clock):
    store.delete("k")
    assert store.memory_bytes == ENTRY_OVERHEAD + 1
    clock.advance(TOMBSTONE_TTL - 1)
    assert store.put(entry("k", "old", (1, 0, "x"))) is False
    clock.advance(1)
    store.sweep(None)
    assert store.memory_bytes == 0 and store.stats()["tombstones"] == 0
    assert store.expirations == 0  # tombstones are not entries that expired
    assert store.put(entry("k", "old", (1, 0, "x"))) is True  # nothing left to stop it


def test_a_tombstone_of_an_expiring_entry_lives_no_longer_than_the_entry_would(store, clock):
    store.put(entry("k", None, (5, 0, "x"), ttl=3, deleted=True))
    clock.advance(3)
    assert store.put(entry("k", "a copy that expired too", (1, 0, "x"), ttl=0.5)) is True


def test_take_and_entries_carry_tombstones_with_their_versions(store, clock):
    store.set("live", 1, 60)
    store.delete("gone")
    by_key = {e.key: e for e in store.entries()}
    assert by_key["live"].deleted is False and by_key["live"].ttl == 60
    assert by_key["gone"].deleted is True and by_key["gone"].value is None
    clock.advance(10)
    taken = store.take(["live", "gone", "missing"])
    assert [(e.key, e.deleted, e.ttl) for e in taken] == [
        ("live", False, 50), ("gone", True, TOMBSTONE_TTL - 10)]
    assert list(store.entries()) == [] and store.memory_bytes == 0


def test_a_merged_tombstone_replaces_an_older_value(store):
    store.set("k", "v1", None)
    later = (store.hlc.now()[0] + 1, 0, "other")
    assert store.put(entry("k", None, later, ttl=TOMBSTONE_TTL, deleted=True)) is True
    assert store.get("k") == (False, None)


def test_an_expired_entry_does_not_stop_an_older_live_copy(store, clock):
    store.set("k", "short", 1)
    clock.advance(1)
    assert store.put(entry("k", "older but alive", (1, 0, "x"), ttl=60)) is True
    assert store.get("k") == (True, "older but alive")


def test_ttls_follow_the_store_clock_not_the_wall_clock():
    """The node gives the store a monotonic clock and the HLC the wall clock: stepping
    the wall an hour either way changes no ttl."""
    monotonic, wall_offset = Clock(), [0.0]
    hlc = HybridClock("n", wall=lambda: 1_700_000_000 + wall_offset[0])
    store = MemoryStore(monotonic, hlc=hlc)
    store.set("k", "v", 5)
    for step in (-3600, 7200):
        wall_offset[0] += step
        assert store.ttl("k") == (True, 5)
    (before,) = store.entries()
    wall_offset[0] -= 7200
    store.set("k", "written while the wall clock is behind", None)
    (after,) = store.entries()
    assert after.version > before.version
    monotonic.advance(5)
    assert store.get("k") == (True, "written while the wall clock is behind")
    store.expire("k", 5)
    monotonic.advance(5)
    assert store.get("k") == (False, None)


def test_read_copies_entries_and_tombstones_and_leaves_them(store):
    store.set("live", 1, 60)
    store.delete("gone")
    read = store.read(["live", "gone", "missing"])
    assert [(e.key, e.value, e.deleted) for e in read] == [
        ("live", 1, False), ("gone", None, True)]
    assert store.read(["live"]) == read[:1] and store.exists("live")
    assert (store.hits, store.misses) == (0, 0)


def test_the_worked_example_of_docs_store_md(store):
    store.set("user:7", {"name": "Zoë", "tags": ["admin", "ops"], "age": 36}, None)
    assert store.memory_bytes == 930
    store.incr("hits", 1, None)
    assert store.memory_bytes == 1190
