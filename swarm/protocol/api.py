"""The cache's operations as Deferred-returning methods, for any request transport.

Both the in-process embedding API (:class:`swarm.service.SwarmNode`) and the network
client (:class:`swarm.client.SwarmClient`) inherit these, so a program can switch from
one to the other without changing a line: each only supplies :meth:`request`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def _pick(name: str):
    return lambda results: results[name]


class CacheOps:
    """Convenience methods over ``request(op, **args) -> Deferred[results]``."""

    def request(self, op: str, **args: Any) -> Deferred:
        """Run one op; fires with the success reply, or fails with a SwarmError."""
        raise NotImplementedError

    def ping(self) -> Deferred:
        """The id of the node that answers."""
        return self.request("ping").addCallback(_pick("node"))

    def get(self, key: str, default: Any = None) -> Deferred:
        """The value of ``key``, or ``default`` when the swarm does not hold it."""
        return self.request("get", key=key).addCallback(
            lambda r: r["value"] if r["found"] else default
        )

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Deferred:
        """Store ``value``; fires with whether it was stored (``nx``/``xx`` may refuse).

        ``ttl`` None leaves it to the node's default ttl (none, unless configured).
        """
        args: dict[str, Any] = {"key": key, "value": value}
        if ttl is not None:
            args["ttl"] = ttl
        if nx:
            args["nx"] = True
        if xx:
            args["xx"] = True
        return self.request("set", **args).addCallback(_pick("stored"))

    def delete(self, key: str) -> Deferred:
        """Delete ``key``; fires with whether there was one to delete."""
        return self.request("delete", key=key).addCallback(_pick("deleted"))

    def exists(self, key: str) -> Deferred:
        return self.request("exists", key=key).addCallback(_pick("exists"))

    def expire(self, key: str, ttl: float | None) -> Deferred:
        """Set a new ttl on ``key``; None removes its expiry."""
        return self.request("expire", key=key, ttl=ttl).addCallback(_pick("updated"))

    def ttl(self, key: str) -> Deferred:
        """Fires with (found, seconds left or None when it does not expire)."""
        return self.request("ttl", key=key).addCallback(
            lambda r: (r["found"], r["ttl"])
        )

    def incr(self, key: str, delta: int = 1) -> Deferred:
        """Add ``delta`` to the integer at ``key`` (missing counts as 0); the new value."""
        return self.request("incr", key=key, delta=delta).addCallback(_pick("value"))

    def mget(self, keys: list[str]) -> Deferred:
        """The values of those ``keys`` that exist, as a dict."""
        return self.request("mget", keys=list(keys)).addCallback(_pick("values"))

    def mset(self, items: dict[str, Any], ttl: float | None = None) -> Deferred:
        """Store every item (all or none); fires with how many were stored."""
        args: dict[str, Any] = {"items": dict(items)}
        if ttl is not None:
            args["ttl"] = ttl
        return self.request("mset", **args).addCallback(_pick("stored"))

    def stats(self) -> Deferred:
        """The answering node's counters (keys, memory_bytes, hits, misses, ...)."""
        return self.request("stats").addCallback(_pick("stats"))

    def nodes(self) -> Deferred:
        """Fires with {"self": id, "nodes": [{"id", "neighbors", "hops"}, ...]}."""
        return self.request("nodes").addCallback(
            lambda r: {"self": r["self"], "nodes": r["nodes"]}
        )

    def owner(self, key: str) -> Deferred:
        """The ids of the nodes that hold ``key``, primary first."""
        return self.request("owner", key=key).addCallback(_pick("nodes"))
