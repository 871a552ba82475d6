"""swarm.contrib.django.SwarmCache against a real ``twistd swarmcache`` process: the
relevant cases of Django's own ``BaseCacheTests`` (tests/cache/tests.py), ported to
pytest, plus what is particular to this backend.

Each test gets its own caches with a KEY_PREFIX of its own, so tests never see each
other's keys (Django's tests clear the cache after each instead); waits for expiry poll
against a deadline instead of sleeping.
"""

from __future__ import annotations

import itertools
import pickle
import time
import warnings
from zlib import compress, decompress

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402
from django.core.cache import CacheHandler, CacheKeyWarning, InvalidCacheKey  # noqa: E402

from swarm.client.blocking import BlockingSwarmClient  # noqa: E402
from swarm.errors import NotInteger, Unavailable  # noqa: E402
from swarm.protocol.wire import MAX_TTL  # noqa: E402
from twistd_support import start_node  # noqa: E402

BACKEND = "swarm.contrib.django.SwarmCache"
_tests = itertools.count()


def f():
    return 42


class C:
    def m(n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


def custom_key_func(key, key_prefix, version):
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc = start_node(tmp_path_factory.mktemp("django"), "dj")
    yield proc
    proc.kill()


@pytest.fixture
def caches(node):
    """Django's caches of the test: default, prefix, v2, custom_key, as Django's tests
    have them, all on the node, under a prefix of this test's own."""
    base = f"t{next(_tests)}"
    common = {"BACKEND": BACKEND, "LOCATION": node.url, "KEY_PREFIX": base}
    handler = CacheHandler({
        "default": common,
        "prefix": dict(common, KEY_PREFIX=base + "cacheprefix"),
        "v2": dict(common, VERSION=2),
        "custom_key": dict(common, KEY_FUNCTION=custom_key_func),
        "custom_key2": dict(common, KEY_FUNCTION="test_django_cache.custom_key_func"),
        "json": dict(common, OPTIONS={"encoding": "json", "pool_size": 2}),
    })
    return handler


@pytest.fixture
def cache(caches):
    return caches["default"]


def until(condition, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


# -- Django's BaseCacheTests ---------------------------------------------------------


def test_simple(cache):
    cache.set("key", "value")
    assert cache.get("key") == "value"


def test_default_used_when_none_is_set(cache):
    cache.set("key_default_none", None)
    assert cache.get("key_default_none", default="default") is None


def test_add(cache):
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_prefix(caches, cache):
    cache.set("somekey", "value")
    assert caches["prefix"].has_key("somekey") is False
    caches["prefix"].set("somekey", "value2")
    assert cache.get("somekey") == "value"
    assert caches["prefix"].get("somekey") == "value2"


def test_non_existent(cache):
    assert cache.get("does_not_exist") is None
    assert cache.get("does_not_exist", "bang!") == "bang!"


def test_get_many(cache):
    cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set_many({"x": None, "y": 1})
    assert cache.get_many(["x", "y"]) == {"x": None, "y": 1}
    assert cache.get_many([]) == {}


def test_delete(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.get("key1") == "spam"
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"
    assert cache.delete("nonexistent_key") is False


def test_has_key_and_in(cache):
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1") is True
    assert cache.has_key("goodbye1") is False
    cache.set("no_expiry", "here", None)
    assert cache.has_key("no_expiry") is True
    cache.set("null", None)
    assert cache.has_key("null") is True
    assert "hello1" in cache and "null" in cache
    assert "goodbye1" not in cache


def test_incr(cache):
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.get("answer") == 52
    assert cache.incr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    assert cache.has_key("does_not_exist") is False  # not created by the failed incr
    cache.set("null", None)
    with pytest.raises(NotInteger):
        cache.incr("null")


def test_decr(cache):
    cache.set("answer", 43)
    assert cache.decr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.decr("answer", 10) == 32
    assert cache.decr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.decr("does_not_exist")
    cache.set("null", None)
    with pytest.raises(NotInteger):
        cache.decr("null")


def test_close(cache):
    cache.set("k", 1)
    cache.close()
    assert cache.get("k") == 1  # the pool outlives Django's close() after a request


def test_data_types(cache):
    tests = {
        "string": "this is a string",
        "int": 42,
        "bool": True,
        "list": [1, 2, 3, 4],
        "tuple": (1, 2, 3, 4),
        "dict": {"A": 1, "B": 2},
        "function": f,
        "class": C,
        "bigint": 2**80,
        "float": 1.5,
        "set": {1, 2},
        "bytes": b"\x00\xff",
    }
    for key, value in tests.items():
        cache.set(key, value)
        got = cache.get(key)
        assert got == value and type(got) is type(value), key


def test_expiration(cache):
    cache.set("expire1", "very quickly", 0.3)
    cache.set("expire2", "very quickly", 0.3)
    cache.set("expire3", "very quickly", 0.3)
    until(lambda: cache.get("expire1") is None, what="expire1 to expire")
    until(lambda: not cache.has_key("expire3"), what="expire3 to expire")
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"


def test_touch(cache, node):
    cache.set("expire1", "very quickly", timeout=1)
    assert cache.touch("expire1", timeout=60) is True
    raw = BlockingSwarmClient(node.url)
    try:
        found, left = raw.ttl(cache.make_key("expire1"))
        assert found and 50 < left <= 60
        cache.set("expire2", "x", timeout=1)
        assert cache.touch("expire2") is True  # the default timeout: 300 s
        assert 290 < raw.ttl(cache.make_key("expire2"))[1] <= 300
        assert cache.touch("expire2", timeout=None) is True
        assert raw.ttl(cache.make_key("expire2")) == (True, None)
    finally:
        raw.close()
    cache.set("expire3", "x", timeout=10)
    assert cache.touch("expire3", timeout=0.2) is True
    until(lambda: not cache.has_key("expire3"), what="a touched key to expire")
    assert cache.touch("nonexistent") is False


def test_unicode(cache):
    stuff = {
        "ascii": "ascii_value",
        "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
        "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
        "ascii2": {"x": 1},
    }
    for key, value in stuff.items():
        cache.set(key, value)
        assert cache.get(key) == value
    for key, value in stuff.items():
        assert cache.delete(key) is True
        assert cache.add(key, value) is True
        assert cache.get(key) == value
    for key in stuff:
        assert cache.delete(key) is True
    cache.set_many(stuff)
    for key, value in stuff.items():
        assert cache.get(key) == value


@pytest.mark.parametrize("alias", ["default", "json"])
def test_binary_string(caches, alias):
    cache = caches[alias]
    value = "value_to_be_compressed"
    compressed = compress(value.encode())
    cache.set("binary1", compressed)
    assert cache.get("binary1") == compressed
    assert decompress(cache.get("binary1")).decode() == value
    assert cache.add("binary1-add", compressed) is True
    assert cache.get("binary1-add") == compressed
    cache.set_many({"binary1-set_many": compressed})
    assert cache.get("binary1-set_many") == compressed


def test_set_many(cache):
    assert cache.set_many({"key1": "spam", "key2": "eggs"}) == []
    assert cache.get("key1") == "spam"
    assert cache.get("key2") == "eggs"
    assert cache.set_many({}) == []


def test_set_many_expiration(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"}, 0.3)
    until(lambda: cache.get_many(["key1", "key2"]) == {}, what="set_many keys to expire")


def test_delete_many(cache):
    cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
    assert cache.delete_many(["key1", "key2"]) is None
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert cache.get("key3") == "ham"
    assert cache.delete_many([]) is None


def test_clear(cache, caches):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    caches["v2"].set("key3", "ham")
    cache.clear()
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert caches["v2"].get("key3") is None  # the whole swarm, every version


def test_long_timeout(cache, node):
    month = 60 * 60 * 24 * 30 + 1  # relative here, not memcached's absolute time
    cache.set("key1", "eggs", month)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", month) is True
    assert cache.get("key2") == "ham"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, month)
    assert cache.get_many(["key3", "key4"]) == {"key3": "sausage", "key4": "lobster bisque"}
    cache.set("key5", "century", 100 * 365 * 24 * 3600)  # capped at the protocol's max
    with BlockingSwarmClient(node.url) as raw:
        assert MAX_TTL - 60 < raw.ttl(cache.make_key("key5"))[1] <= MAX_TTL


def test_forever_timeout(cache, node):
    cache.set("key1", "eggs", None)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", None) is True
    assert cache.get("key2") == "ham"
    assert cache.add("key1", "new eggs", None) is False
    assert cache.get("key1") == "eggs"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
    assert cache.get_many(["key3", "key4"]) == {"key3": "sausage", "key4": "lobster bisque"}
    with BlockingSwarmClient(node.url) as raw:
        for key in ("key1", "key2", "key3"):
            assert raw.ttl(cache.make_key(key)) == (True, None)


def test_zero_timeout(cache):
    cache.set("key1", "eggs", 0)
    assert cache.get("key1") is None
    assert cache.add("key2", "ham", 0) is True
    assert cache.get("key2") is None
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
    assert cache.get("key3") is None
    assert cache.get("key4") is None
    cache.set("key5", "belgian fries", timeout=5)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None
    cache.set("key6", "old")
    cache.set("key6", "new", -1)  # a negative timeout removes it too
    assert cache.get("key6") is None


def test_float_timeout(cache):
    cache.set("key1", "spam", 100.2)
    assert cache.get("key1") == "spam"


def test_invalid_keys(cache):
    with pytest.warns(CacheKeyWarning):  # Django's portability warning, still stored
        cache.set("key with spaces", 1)
        assert cache.get("key with spaces") == 1
    with pytest.raises(InvalidCacheKey), pytest.warns(CacheKeyWarning):
        cache.set("k" * 1100, 1)  # over the node's 1024-byte keys


def test_cache_versioning_get_set(caches, cache):
    v2 = caches["v2"]
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert v2.get("answer1") is None
    assert v2.get("answer1", version=1) == 42
    cache.set("answer2", 42, version=2)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=2) == 42
    assert v2.get("answer2") == 42
    v2.set("answer4", 42, version=1)
    assert cache.get("answer4") == 42
    assert v2.get("answer4") is None


def test_cache_versioning_add_has_key_delete(caches, cache):
    v2 = caches["v2"]
    assert cache.add("answer1", 42, version=2) is True
    assert cache.add("answer1", 37, version=2) is False
    assert cache.add("answer1", 37, version=1) is True
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) == 42
    assert v2.has_key("answer1") is True
    assert v2.has_key("answer1", version=3) is False
    assert v2.delete("answer1") is True
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) is None


def test_cache_versioning_incr_decr(caches, cache):
    cache.set("answer1", 37, version=1)
    cache.set("answer1", 42, version=2)
    assert cache.incr("answer1") == 38
    assert cache.get("answer1", version=2) == 42
    assert cache.decr("answer1") == 37
    assert caches["v2"].incr("answer1") == 43
    assert caches["v2"].decr("answer1", version=1) == 36


def test_cache_versioning_get_set_many(caches, cache):
    cache.set_many({"ford1": 37, "arthur1": 42})
    assert cache.get_many(["ford1", "arthur1"]) == {"ford1": 37, "arthur1": 42}
    assert cache.get_many(["ford1", "arthur1"], version=2) == {}
    assert caches["v2"].get_many(["ford1", "arthur1"]) == {}
    assert caches["v2"].get_many(["ford1", "arthur1"], version=1) == {"ford1": 37,
                                                                       "arthur1": 42}


def test_incr_version(caches, cache):
    cache.set("answer", 42, version=2)
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    caches["v2"].set("answer2", 42)
    assert caches["v2"].incr_version("answer2") == 3
    assert caches["v2"].get("answer2", version=3) == 42
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")
    cache.set("null", None)
    assert cache.incr_version("null") == 2


def test_decr_version(caches, cache):
    cache.set("answer", 42, version=2)
    assert cache.decr_version("answer", version=2) == 1
    assert cache.get("answer") == 42
    assert cache.get("answer", version=2) is None
    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist", version=2)


def test_custom_key_func(caches, cache):
    cache.set("answer1", 42)
    assert caches["custom_key"].get("answer1") is None
    caches["custom_key"].set("answer2", 42)
    assert cache.get("answer2") is None
    assert caches["custom_key2"].get("answer2") == 42


def test_fail_on_pickleerror(cache):
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())


def test_get_or_set(cache):
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None
    assert cache.get_or_set("mykey", lambda: "value") == "value"
    assert cache.get_or_set("mykey", "other") == "value"
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian", version=1) is None


def test_async_api_goes_through_the_backend(cache):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def body():
        await cache.aset("a", {"x": 1})
        assert await cache.aget("a") == {"x": 1}
        assert await cache.aget_many(["a", "b"]) == {"a": {"x": 1}}
        assert await cache.adelete("a") is True

    # Its own loop in its own thread: the reactor's loop holds this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, body()).result(10)


# -- what is particular to this backend ------------------------------------------------


def test_ints_stay_plain_integers_on_the_node(cache, node):
    cache.set("n", 5)
    cache.set("flag", True)
    with BlockingSwarmClient(node.url) as raw:
        assert raw.get(cache.make_key("n")) == 5
        assert raw.incr(cache.make_key("n"), 2) == 7  # other clients may count too
        assert isinstance(raw.get(cache.make_key("flag")), bytes)  # a pickle
    assert cache.get("n") == 7
    assert cache.get("flag") is True


def test_the_caches_setting_works(node):
    if not settings.configured:
        settings.configure(CACHES={"default": {"BACKEND": BACKEND, "LOCATION": node.url,
                                               "KEY_PREFIX": "settings", "TIMEOUT": 60,
                                               "OPTIONS": {"pool_size": 2, "timeout": 5}}})
    from django.core.cache import cache

    if settings.CACHES["default"]["BACKEND"] != BACKEND:
        pytest.skip("Django settings were configured by another test module")
    cache.set("k", [1, 2])
    assert cache.get("k") == [1, 2]
    with BlockingSwarmClient(node.url) as raw:
        assert 50 < raw.ttl(cache.make_key("k"))[1] <= 60  # TIMEOUT is the default


def test_bad_options_and_an_unreachable_node():
    from swarm.contrib.django import SwarmCache

    with pytest.raises(ValueError, match="unknown OPTIONS"):
        SwarmCache("ws://127.0.0.1:1", {"OPTIONS": {"pool": 3}})
    with pytest.raises(ValueError, match="one LOCATION"):
        SwarmCache(["ws://a:1", "ws://b:1"], {})
    cache = SwarmCache("ws://127.0.0.1:1", {"OPTIONS": {"connect_timeout": 2}})
    with pytest.raises(Unavailable):
        cache.get("k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.make_key("k") == ":1:k"
