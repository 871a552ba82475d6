"""Ops that every node of the swarm takes part in: ``scan`` and ``flush``.

The node a client asks sends one addressed internal request to each node it can reach
(``keys_after`` for a scan step, ``clear`` for a flush), runs its own part on its own
store, and combines the answers. A node that does not answer fails the whole op with
``unavailable`` naming it: a scan step can be asked again with the same cursor, and a
flush that reached only part of the swarm says how much it removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from swarm.cluster.commands import StoreCommands
from swarm.cluster.placement import partition_of
from swarm.errors import SwarmError, Unavailable, error_from_wire
from swarm.logs import logger
from swarm.protocol import scan
from swarm.protocol.wire import RequestParser

_log = logger(__name__)


class SwarmWide:
    """``scan`` and ``flush`` over the nodes ``reachable()`` returns.

    ``send_to(node, request)`` runs an addressed request on another node and fires
    with its reply (an error reply when it cannot get there).
    """

    def __init__(
        self,
        node_id: str,
        commands: StoreCommands,
        reachable: Callable[[], frozenset[str]],
        send_to: Callable[[str, dict], Deferred],
    ) -> None:
        self.node_id = node_id
        self.commands = commands
        self._reachable = reachable
        self._send_to = send_to
        self._parser = RequestParser(internal=True)

    def _everywhere(self, request: dict) -> Deferred:
        """Run an internal ``request`` on every reachable node: fires with
        [(node, results)], or fails with Unavailable naming the nodes that failed."""
        nodes = sorted(self._reachable() | {self.node_id})

        def on(node: str) -> Deferred:
            if node == self.node_id:  # parsed as a peer's would be
                return maybeDeferred(lambda: self.commands.execute(
                    self._parser.parse(dict(request, id=0))))
            return self._send_to(node, dict(request, id=0)).addCallback(_results)

        def failed(node: str, failure: Any) -> str:
            if failure.check(SwarmError):
                return f"{node}: {failure.value.message}"
            _log.failure("{op} failed here", failure, op=request["op"])
            return f"{node}: internal error"

        answers = [on(n).addCallbacks(lambda r, n=n: (n, r), lambda f, n=n: failed(n, f))
                   for n in nodes]

        def combine(results: list) -> list[tuple[str, dict]]:
            missing = [r for r in results if isinstance(r, str)]
            if missing:
                raise _Partial(results, "; ".join(missing), len(missing), len(nodes))
            return results

        return gatherResults(answers).addCallback(combine)

    # -- flush ------------------------------------------------------------------------

    def flush(self) -> Deferred:
        """Remove every entry written before now, on every reachable node."""
        before = self.commands.store.hlc.now()

        def total(results: list[tuple[str, dict]]) -> dict:
            return {"flushed": sum(r["flushed"] for _, r in results)}

        def partly(failure: Any) -> None:
            failure.trap(_Partial)
            partial = failure.value
            done = sum(r[1]["flushed"] for r in partial.results if not isinstance(r, str))
            raise Unavailable(
                f"flushed {done} entries on {partial.nodes - partial.failed} of "
                f"{partial.nodes} nodes; not on {partial.why} (it may still run there)")

        return self._everywhere({"op": "clear", "before": list(before)}).addCallbacks(
            total, partly)

    # -- scan -------------------------------------------------------------------------

    def scan(self, request: dict) -> Deferred:
        """One scan step (see :mod:`swarm.protocol.scan`)."""
        after = request.get("cursor", scan.START)
        count = request.get("count", scan.DEFAULT_COUNT)
        step: dict[str, Any] = {"op": "keys_after", "after": list(after), "count": count}
        if "match" in request:
            step["match"] = request["match"]

        def merged(results: list[tuple[str, dict]]) -> dict:
            answers = [_step_answer(node, r) for node, r in results]
            keys, upto = scan.merge_step(answers, count, partition_of)
            return {"cursor": None if upto is None else scan.encode_cursor(upto),
                    "keys": keys}

        def partly(failure: Any) -> None:
            failure.trap(_Partial)
            raise Unavailable(f"this scan step did not reach every node ({failure.value.why});"
                              " ask again with the same cursor")

        return self._everywhere(step).addCallbacks(merged, partly)


class _Partial(Exception):
    def __init__(self, results: list, why: str, failed: int, nodes: int) -> None:
        super().__init__(why)
        self.results, self.why, self.failed, self.nodes = results, why, failed, nodes


def _results(reply: dict) -> dict:
    if isinstance(reply, dict) and reply.get("ok"):
        return reply
    raise error_from_wire(reply.get("error") if isinstance(reply, dict) else None)


def _step_answer(node: str, results: dict) -> tuple[list[str], scan.Position | None]:
    """A node's ``keys_after`` answer, checked: a peer that lies gets an error, not a
    crash."""
    keys, upto = results.get("keys"), results.get("upto")
    try:
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("keys is not a list of keys")
        return keys, None if upto is None else scan.position_from_wire(upto)
    except ValueError as e:
        raise Unavailable(f"{node} answered a scan step wrongly: {e}") from None
