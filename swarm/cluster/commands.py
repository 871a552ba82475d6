"""Key commands executed against this node's :class:`~swarm.store.IStore`.

Requests arrive here already validated by :mod:`swarm.protocol.wire`; each ``handle_<op>`` maps
one op onto the store and returns the op's results. ``ttl`` absent from a write means the
node's default ttl; an explicit null means the entry never expires.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from swarm.cluster.antientropy import compare
from swarm.errors import SwarmError
from swarm.logs import logger
from swarm.protocol.entry import Entry
from swarm.protocol.ops import Kind, ops_of
from swarm.protocol.scan import matcher
from swarm.store.interface import IStore

_log = logger(__name__)


class StoreCommands:
    """Runs the ops that read or write keys, on the local store."""

    def __init__(
        self,
        store: IStore,
        default_ttl: float | None = None,
        keeps: Callable[[str], bool] = lambda key: False,
        handing: Callable[[int], bool] = lambda partition: False,
    ) -> None:
        """``keeps(key)``: whether this node still holds ``key`` as one of its owners,
        so a ``take`` from a new owner copies it rather than moving it.
        ``handing(partition)``: whether this node's handoff is still bringing the
        partition's copies to their owners (a ``compare`` leaves it to that)."""
        self.store = store
        self.default_ttl = default_ttl or None
        self._keeps = keeps
        self._handing = handing
        self._handlers: dict[str, Callable[[dict], dict]] = {
            op.name: getattr(self, "handle_" + op.name)
            for op in ops_of(Kind.READ, Kind.WRITE, Kind.INTERNAL)
        }

    def execute(self, request: dict) -> dict:
        return self._handlers[request["op"]](request)

    def _ttl(self, request: dict) -> float | None:
        return request.get("ttl", self.default_ttl)

    def handle_get(self, r: dict) -> dict:
        found, value = self.store.get(r["key"])
        return {"found": found, "value": value}

    def handle_set(self, r: dict) -> dict:
        stored = self.store.set(
            r["key"], r["value"], self._ttl(r), r.get("nx", False), r.get("xx", False),
            r.get("at"),
        )
        return {"stored": stored}

    def handle_delete(self, r: dict) -> dict:
        return {"deleted": self.store.delete(r["key"], r.get("at"))}

    def handle_exists(self, r: dict) -> dict:
        return {"exists": self.store.exists(r["key"])}

    def handle_expire(self, r: dict) -> dict:
        return {"updated": self.store.expire(r["key"], r["ttl"], r.get("at"))}

    def handle_ttl(self, r: dict) -> dict:
        found, left = self.store.ttl(r["key"])
        return {"found": found, "ttl": None if left is None else round(left, 3)}

    def handle_incr(self, r: dict) -> dict:
        return {"value": self.store.incr(r["key"], r.get("delta", 1), self._ttl(r), r.get("at"))}

    def handle_mget(self, r: dict) -> dict:
        values: dict[str, Any] = {}
        for key in r["keys"]:
            found, value = self.store.get(key)
            if found:
                values[key] = value
        return {"values": values}

    def handle_mset(self, r: dict) -> dict:
        return {"stored": self.store.set_many(r["items"], self._ttl(r), r.get("at"))}

    def handle_mdelete(self, r: dict) -> dict:
        at = r.get("at")
        return {"deleted": sum(self.store.delete(key, at) for key in r["keys"])}

    def handle_keys_after(self, r: dict) -> dict:
        pattern = r.get("match")
        keys, upto = self.store.keys_after(
            r["after"], r["count"], None if pattern is None else matcher(pattern))
        return {"keys": keys, "upto": None if upto is None else list(upto)}

    def handle_clear(self, r: dict) -> dict:
        flushed = self.store.clear(r["before"])
        _log.info("flushed {flushed} entries", flushed=flushed)
        return {"flushed": flushed}

    def handle_restore(self, r: dict) -> dict:
        return {"stored": self.merge(r["entries"])}

    def handle_take(self, r: dict) -> dict:
        kept = [k for k in r["keys"] if self._keeps(k)]
        moved = [k for k in r["keys"] if not self._keeps(k)]
        entries = self.store.read(kept) + self.store.take(moved)
        return {"entries": [e.to_wire() for e in entries]}

    def handle_compare(self, r: dict) -> dict:
        answer = compare(self.store, r["digests"], handing=self._handing)
        reply = {"differ": answer.differ, "entries": [e.to_wire() for e in answer.entries]}
        if answer.more:
            reply["more"] = answer.more
        if answer.pending:  # peers before issue 11 ignore it: the handoff brings them
            reply["pending"] = answer.pending
        return reply

    def merge(self, entries: Iterable[Any]) -> int:
        """Keep each entry (in its wire form) that is newer than what is held; how many
        were kept.

        An entry that is malformed, or that this node's limits refuse (they may differ
        between nodes), is logged and skipped, so the others still land."""
        kept = 0
        for obj in entries:
            try:
                kept += self.store.put(Entry.from_wire(obj))
            except (ValueError, SwarmError) as e:
                _log.warn("cannot keep an entry from another node: {e}", e=e)
        return kept
