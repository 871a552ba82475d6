"""The op table: every op of the protocol declared once.

Like a Twisted AMP ``Command``, an :class:`Op` says what its arguments are and how each
is checked, what kind of op it is, which keys it touches, how a multi-key request is
cut into parts per owner and how the parts' results merge. The request parser, the
router, the node's commands, the embedding API and the CLI all read this table, so
adding an op is one entry here and one ``handle_<op>`` method where it runs
(:class:`~swarm.cluster.commands.StoreCommands` for key ops,
:class:`~swarm.cluster.router.QueryRouter` for node ops).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable


class Kind(enum.Enum):
    #: Answered by the node that receives it (ping, stats, nodes, owner), which may
    #: ask others (scan, flush, stats of another node).
    NODE = "node"
    #: Reads keys: runs where the keys are held.
    READ = "read"
    #: Writes keys: runs where the keys are held, and gets a new version.
    WRITE = "write"
    #: Sent only between nodes, always addressed to one node (never from clients).
    INTERNAL = "internal"


@dataclass(frozen=True)
class Arg:
    """One argument: its name, the validator that checks it (a name the request
    parser knows: key, keys, value, items, ttl, flag, delta, entries, digests, node,
    cursor, match, count, position, version) and whether it must be given."""

    name: str
    check: str
    required: bool = True


def _one_key(request: dict) -> list[str]:
    return [request["key"]]


def _keys_arg(request: dict) -> list[str]:
    return request["keys"]


def _items_keys(request: dict) -> list[str]:
    return list(request["items"])


def _part_of_keys(request: dict, keys: list[str]) -> dict:
    return dict(request, keys=keys)


def _part_of_items(request: dict, keys: list[str]) -> dict:
    items = request["items"]
    return dict(request, items={k: items[k] for k in keys})


def _merge_values(results: list[dict]) -> dict:
    values: dict[str, Any] = {}
    for r in results:
        values.update(r["values"])
    return {"values": values}


def _sum_of(field: str) -> Callable[[list[dict]], dict]:
    return lambda results: {field: sum(r[field] for r in results)}


def _never(request: dict) -> bool:
    return False


def _plain_set(request: dict) -> bool:
    return not (request.get("nx") or request.get("xx"))


def _always(request: dict) -> bool:
    return True


def _not_nx_and_xx(request: dict) -> str | None:
    return "set takes nx or xx, not both" if request.get("nx") and request.get("xx") else None


@dataclass(frozen=True)
class Op:
    name: str
    kind: Kind
    summary: str
    args: tuple[Arg, ...] = ()
    #: The keys a request touches (key ops only).
    keys: Callable[[dict], list[str]] | None = None
    #: For a multi-key op: the request for a subset of its keys, and how the results
    #: of the parts (one per owner) merge into one.
    part: Callable[[dict, list[str]], dict] | None = None
    merge: Callable[[list[dict]], dict] | None = None
    #: Whether a request's result needs nothing already stored (a plain set): then
    #: no older copy is fetched first during a migration.
    blind: Callable[[dict], bool] = _never
    #: Whether a node may send the request again when the way to the node running it
    #: is lost (reads; writes whose outcome does not depend on what is stored, which
    #: the version stamped where they entered makes idempotent).
    resend: Callable[[dict], bool] = _never
    #: A check across arguments: the reason a valid-looking request is refused.
    check: Callable[[dict], str | None] | None = None

    @property
    def multi_key(self) -> bool:
        return self.merge is not None


KEY = Arg("key", "key")
TTL = Arg("ttl", "ttl", required=False)

OPS: dict[str, Op] = {op.name: op for op in [
    Op("ping", Kind.NODE, "the id of the node that answers"),
    Op("stats", Kind.NODE, "a node's counters: the answering node's, or those of `node`",
       (Arg("node", "node", False),)),
    Op("nodes", Kind.NODE, "the swarm as the answering node sees it"),
    Op("owner", Kind.NODE, "the nodes that hold a key, primary first", (KEY,)),
    Op("get", Kind.READ, "a key's value", (KEY,), _one_key, resend=_always),
    Op("exists", Kind.READ, "whether a key holds a live entry", (KEY,), _one_key,
       resend=_always),
    Op("ttl", Kind.READ, "seconds before a key expires", (KEY,), _one_key, resend=_always),
    Op("set", Kind.WRITE, "store a value",
       (KEY, Arg("value", "value"), TTL, Arg("nx", "flag", False), Arg("xx", "flag", False)),
       _one_key, blind=_plain_set, resend=_plain_set, check=_not_nx_and_xx),
    Op("delete", Kind.WRITE, "delete a key", (KEY,), _one_key, resend=_always),
    Op("expire", Kind.WRITE, "give a key a new ttl (null: never expires)",
       (KEY, Arg("ttl", "ttl")), _one_key, resend=_always),
    Op("incr", Kind.WRITE, "add to an integer (a missing key counts from 0)",
       (KEY, Arg("delta", "delta", False)), _one_key),
    Op("mget", Kind.READ, "the values of the keys that exist", (Arg("keys", "keys"),),
       _keys_arg, _part_of_keys, _merge_values, resend=_always),
    Op("mset", Kind.WRITE, "store several values", (Arg("items", "items"), TTL),
       _items_keys, _part_of_items, _sum_of("stored"), blind=_always, resend=_always),
    Op("mdelete", Kind.WRITE, "delete several keys", (Arg("keys", "keys"),),
       _keys_arg, _part_of_keys, _sum_of("deleted"), resend=_always),
    Op("scan", Kind.NODE, "one step of a scan over the swarm's keys",
       (Arg("cursor", "cursor", False), Arg("match", "match", False),
        Arg("count", "count", False))),
    Op("flush", Kind.NODE, "remove every entry in the swarm (an admin token's op)"),
    # Handing entries to their new owner (Entry.to_wire forms); each is kept only
    # where it is newer than what the owner holds, so the last write wins.
    Op("restore", Kind.INTERNAL, "merge entries handed over by another node",
       (Arg("entries", "entries"),)),
    # Anti-entropy: partition -> digest of the asker's copies; the answer names the
    # partitions that differ and carries this node's entries in them.
    Op("compare", Kind.INTERNAL, "compare partition digests with another owner",
       (Arg("digests", "digests"),)),
    # Moving entries from their previous owner on demand, right after a change.
    Op("take", Kind.INTERNAL, "remove and return entries for their new owner",
       (Arg("keys", "keys"),)),
    # A scan's step on one node: its live keys after a position, in scan order.
    Op("keys_after", Kind.INTERNAL, "this node's keys after a scan position",
       (Arg("after", "position"), Arg("match", "match", False), Arg("count", "count"))),
    # A flush on one node: entries older than `before` go, and none older comes back.
    Op("clear", Kind.INTERNAL, "remove the entries written before a version",
       (Arg("before", "version"),)),
]}

#: Ops that need an admin token when client tokens are on.
ADMIN_OPS = frozenset({"flush"})

#: What a client may send.
CLIENT_OPS: dict[str, Op] = {n: op for n, op in OPS.items() if op.kind is not Kind.INTERNAL}


def ops_of(*kinds: Kind) -> Iterable[Op]:
    return (op for op in OPS.values() if op.kind in kinds)
