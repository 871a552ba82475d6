"""The cache's operations as methods, written once for every kind of transport.

Each method builds one request and says what to pick out of its success reply; the
transport decides what the method returns. :class:`CacheOps` is the Twisted face (a
Deferred): the in-process embedding API (:class:`swarm.service.SwarmNode`) and the
network client (:class:`swarm.client.SwarmClient`) inherit it, so a program can switch
from one to the other without changing a line; each only supplies :meth:`request`.
The asyncio and blocking clients inherit :class:`Ops` with a ``_call`` of their own
(a coroutine, or the value itself), so every client has the same methods, arguments
and exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the asyncio and blocking clients do without Twisted
    from twisted.internet.defer import Deferred


def _pick(name: str) -> Callable[[dict], Any]:
    return lambda results: results[name]


def _ttl_args(args: dict[str, Any], ttl: float | None) -> dict[str, Any]:
    if ttl is not None:
        args["ttl"] = ttl
    return args


class Ops:
    """Convenience methods over ``_call(op, args, pick)``, which runs one op and
    returns, in the transport's own way, ``pick(success reply)``, or fails with the
    :class:`~swarm.errors.SwarmError` the error reply carries."""

    def _call(self, op: str, args: dict[str, Any], pick: Callable[[dict], Any]) -> Any:
        raise NotImplementedError

    def ping(self) -> Any:
        """The id of the node that answers."""
        return self._call("ping", {}, _pick("node"))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when the swarm does not hold it."""
        return self._call("get", {"key": key},
                          lambda r: r["value"] if r["found"] else default)

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Any:
        """Store ``value``; whether it was stored (``nx``/``xx`` may refuse).

        ``ttl`` None leaves it to the node's default ttl (none, unless configured).
        """
        args = _ttl_args({"key": key, "value": value}, ttl)
        if nx:
            args["nx"] = True
        if xx:
            args["xx"] = True
        return self._call("set", args, _pick("stored"))

    def delete(self, key: str) -> Any:
        """Delete ``key``; whether there was one to delete."""
        return self._call("delete", {"key": key}, _pick("deleted"))

    def exists(self, key: str) -> Any:
        return self._call("exists", {"key": key}, _pick("exists"))

    def expire(self, key: str, ttl: float | None) -> Any:
        """Set a new ttl on ``key``; None removes its expiry. Whether it exists."""
        return self._call("expire", {"key": key, "ttl": ttl}, _pick("updated"))

    def ttl(self, key: str) -> Any:
        """(found, seconds left or None when it does not expire)."""
        return self._call("ttl", {"key": key}, lambda r: (r["found"], r["ttl"]))

    def incr(self, key: str, delta: int = 1) -> Any:
        """Add ``delta`` to the integer at ``key`` (missing counts as 0); the new value."""
        return self._call("incr", {"key": key, "delta": delta}, _pick("value"))

    def mget(self, keys: list[str]) -> Any:
        """The values of those ``keys`` that exist, as a dict."""
        return self._call("mget", {"keys": list(keys)}, _pick("values"))

    def mset(self, items: dict[str, Any], ttl: float | None = None) -> Any:
        """Store every item (all or none); how many were stored."""
        return self._call("mset", _ttl_args({"items": dict(items)}, ttl), _pick("stored"))

    def mdelete(self, keys: list[str]) -> Any:
        """Delete ``keys``; how many of them existed."""
        return self._call("mdelete", {"keys": list(keys)}, _pick("deleted"))

    def scan(self, cursor: str | None = None, match: str | None = None,
             count: int | None = None) -> Any:
        """One step of a scan over the swarm's keys: (next cursor or None when the
        scan is complete, keys). ``match`` is a glob (``*``, ``?``, ``[abc]``),
        ``count`` a hint of how many keys a step returns (default 100)."""
        args: dict[str, Any] = {}
        for name, value in (("cursor", cursor), ("match", match), ("count", count)):
            if value is not None:
                args[name] = value
        return self._call("scan", args, lambda r: (r["cursor"], r["keys"]))

    def flush(self) -> Any:
        """Empty the whole swarm; how many entries were removed. With client tokens
        on, only an admin token may."""
        return self._call("flush", {}, _pick("flushed"))

    def stats(self) -> Any:
        """The answering node's counters (keys, memory_bytes, hits, misses, ...)."""
        return self._call("stats", {}, _pick("stats"))

    def nodes(self) -> Any:
        """{"self": id, "nodes": [{"id", "neighbors", "hops"}, ...]}."""
        return self._call("nodes", {}, lambda r: {"self": r["self"], "nodes": r["nodes"]})

    def owner(self, key: str) -> Any:
        """The ids of the nodes that hold ``key``, primary first."""
        return self._call("owner", {"key": key}, _pick("nodes"))


class CacheOps(Ops):
    """:class:`Ops` returning Deferreds, over ``request(op, **args) -> Deferred``."""

    def request(self, op: str, **args: Any) -> Deferred:
        """Run one op; fires with the success reply, or fails with a SwarmError."""
        raise NotImplementedError

    def _call(self, op: str, args: dict[str, Any], pick: Callable[[dict], Any]) -> Deferred:
        return self.request(op, **args).addCallback(pick)
