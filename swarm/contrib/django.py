"""A Django cache backend on a swarm, through the blocking client.

``CACHES = {"default": {"BACKEND": "swarm.contrib.django.SwarmCache",
"LOCATION": "ws://127.0.0.1:8765"}}``. Values are pickled to bytes (any picklable
object round-trips, as with Django's own Redis backend), except integers that fit the
node's signed 64-bit counters: they are stored as plain integers, so ``incr`` works on
a value stored with ``set``. Django timeouts become ttls: None never expires, 0 or less
is not kept at all, anything above the protocol's 1e9 s is capped there.
"""

from __future__ import annotations

import base64
import pickle
import threading
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey

from swarm.client.blocking import BlockingSwarmClient
from swarm.protocol.wire import INT64_MAX, INT64_MIN, MAX_TTL, Limits

#: The blocking clients in use, one per LOCATION and OPTIONS: Django makes a backend
#: object per thread, but one thread-safe pool serves them all.
_clients: dict[tuple, BlockingSwarmClient] = {}
_clients_lock = threading.Lock()

_OPTIONS = {"token", "encoding", "pool_size", "timeout", "connect_timeout", "retries"}


def _client(url: str, options: dict[str, Any]) -> BlockingSwarmClient:
    key = (url, tuple(sorted(options.items())))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = BlockingSwarmClient(url, **options)
        return client


def dumps(value: Any) -> Any:
    """What is stored for ``value``: a plain int for counters, else its pickle."""
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:
        return value
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def loads(stored: Any) -> Any:
    """The value back from what :func:`dumps` stored (bytes reach a JSON connection
    as ``{"$base64": ...}``)."""
    if isinstance(stored, dict) and set(stored) == {"$base64"}:
        stored = base64.b64decode(stored["$base64"])
    if isinstance(stored, bytes):
        return pickle.loads(stored)
    return stored


class SwarmCache(BaseCache):
    """Django's cache API on a swarm. OPTIONS: ``token``, ``encoding`` ("cbor", the
    default, or "json"), ``pool_size`` (connections, default 4), ``timeout`` (seconds
    per request, default 10), ``connect_timeout``, ``retries``."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, (list, tuple)):
            if len(server) != 1:
                raise ValueError("SwarmCache takes one LOCATION: any node of the swarm")
            server = server[0]
        options = dict(params.get("OPTIONS") or {})
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"SwarmCache: unknown OPTIONS {sorted(unknown)}; "
                             f"known: {sorted(_OPTIONS)}")
        self._url = server
        self._options = options

    @property
    def client(self) -> BlockingSwarmClient:
        return _client(self._url, self._options)

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        """The ttl for a Django timeout: None never expires, 0 means not kept."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        return min(max(0, timeout), MAX_TTL)

    def validate_key(self, key: str) -> None:
        super().validate_key(key)  # Django's portability warnings
        if len(key.encode("utf-8", "surrogatepass")) > Limits.max_key_bytes:
            raise InvalidCacheKey(
                f"Cache key is longer than {Limits.max_key_bytes} UTF-8 bytes: {key!r}"
            )

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self.get_backend_timeout(timeout)
        if ttl == 0:  # added and gone at once: say whether it would have been added
            return not self.client.exists(key)
        return self.client.request("set", key=key, value=dumps(value), ttl=ttl,
                                   nx=True)["stored"]

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        reply = self.client.request("get", key=key)
        return loads(reply["value"]) if reply["found"] else default

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        ttl = self.get_backend_timeout(timeout)
        if ttl == 0:
            self.client.delete(key)
        else:
            self.client.request("set", key=key, value=dumps(value), ttl=ttl)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
              version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self.get_backend_timeout(timeout)
        if ttl == 0:
            return self.client.delete(key)
        return self.client.expire(key, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self.client.delete(key)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self.client.exists(key)

    def get_many(self, keys: Any, version: int | None = None) -> dict:
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        if not made:
            return {}
        values = self.client.mget(list(made))
        return {made[k]: loads(v) for k, v in values.items()}

    def set_many(self, data: dict, timeout: Any = DEFAULT_TIMEOUT,
                 version: int | None = None) -> list:
        """Store every item; the list of keys that failed, always empty: ``mset``
        stores all or raises."""
        items = {self.make_and_validate_key(k, version=version): dumps(v)
                 for k, v in data.items()}
        if not items:
            return []
        ttl = self.get_backend_timeout(timeout)
        if ttl == 0:
            self.client.mdelete(list(items))
        else:
            self.client.request("mset", items=items, ttl=ttl)
        return []

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            self.client.mdelete(made)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """Add ``delta``; ValueError if the key is missing, as in Django (the node's
        ``incr`` would count it from 0). The entry keeps its ttl."""
        key = self.make_and_validate_key(key, version=version)
        if not self.client.exists(key):
            raise ValueError(f"Key '{key}' not found.")
        return self.client.incr(key, delta)

    def clear(self) -> None:
        """Empty the whole swarm, every key prefix and version (with client tokens on,
        the token must be an admin one)."""
        self.client.flush()

    def close(self, **kwargs: Any) -> None:
        """Nothing: Django calls this after every request, and the pool is shared
        and kept for the next one (as Django's Redis backend keeps its pool)."""
