"""QueryRouter: where each validated request runs, and its reply.

Every request, from a client connection or from the embedding API, goes through
:meth:`QueryRouter.handle`, which answers with a reply dict, or with a Deferred of one
when the answer must come from elsewhere. Key ops run on the store of the node that owns
the key; node ops (ping, stats, nodes, owner) describe this node and its view of the
swarm. Errors never escape: a :class:`SwarmError` becomes its error reply, anything else
is logged and answered as ``internal``.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred

from swarm.commands import StoreCommands
from swarm.errors import InternalError, SwarmError
from swarm.logs import logger
from swarm.wire import error_reply, ok_reply

_log = logger(__name__)


class QueryRouter:
    def __init__(
        self,
        node_id: str,
        commands: StoreCommands,
        node_stats: Callable[[], dict],
    ) -> None:
        self.node_id = node_id
        self.commands = commands
        self._node_stats = node_stats
        self._node_ops: dict[str, Callable[[dict], dict]] = {
            "ping": self.handle_ping,
            "stats": self.handle_stats,
            "nodes": self.handle_nodes,
            "owner": self.handle_owner,
        }

    def handle(self, request: dict) -> dict | Deferred:
        """The reply to one validated request (a Deferred when it is not ready yet)."""
        rid = request["id"]
        try:
            node_op = self._node_ops.get(request["op"])
            if node_op is not None:
                return ok_reply(rid, node_op(request))
            return ok_reply(rid, self.commands.execute(request))
        except SwarmError as e:
            return error_reply(rid, e)
        except Exception:
            _log.failure("internal error handling {op}", op=request["op"])
            return error_reply(rid, InternalError("internal error"))

    def handle_ping(self, request: dict) -> dict:
        return {"node": self.node_id}

    def handle_stats(self, request: dict) -> dict:
        return {"stats": self._node_stats()}

    def handle_nodes(self, request: dict) -> dict:
        return {
            "self": self.node_id,
            "nodes": [{"id": self.node_id, "neighbors": [], "hops": 0}],
        }

    def handle_owner(self, request: dict) -> dict:
        return {"nodes": [self.node_id]}
