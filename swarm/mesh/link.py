"""One live peer link's request/reply correlation, in the manner of Twisted AMP.

A counter tags each outgoing request, ``rid -> Deferred`` waits for its reply, every
request carries a timeout, and :meth:`PeerLink.fail_all` settles whatever is pending
when the link goes, so no Deferred is ever left hanging. No I/O: frames go out through
the injected ``send`` and time comes from the injected clock.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure

from swarm.errors import SwarmError, Timeout, Unavailable
from swarm.protocol.wire import error_reply


class PeerLink:
    """One connection to one neighbor; ``peer`` is the neighbor's node id."""

    def __init__(self, peer: str, send: Callable[[list[dict]], None], clock) -> None:
        self.peer = peer
        self._send = send
        self._clock = clock
        self._next_rid = 0
        self._pending: dict[int, Deferred] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, messages: list[dict]) -> None:
        self._send(messages)

    def call(
        self, request: dict, timeout: float, hops: int, to: str | None = None
    ) -> Deferred:
        """Forward ``request``; fires with the reply dict (errors become error replies).

        ``to`` addresses the request to one node rather than to the key's owner.
        """
        self._next_rid += 1
        rid = self._next_rid
        d: Deferred = Deferred()
        self._pending[rid] = d
        msg = {"t": "req", "rid": rid, "ms": max(0, int(timeout * 1000)), "hops": hops,
               "req": request}
        if to is not None:
            msg["to"] = to
        self._send([msg])
        d.addTimeout(timeout, self._clock)
        d.addErrback(self._settle_failure, rid, request)
        return d

    def _settle_failure(self, failure: Failure, rid: int, request: dict) -> dict:
        self._pending.pop(rid, None)
        if failure.check(DeferredTimeout):
            error: SwarmError = Timeout(f"no reply from {self.peer} in time")
        elif failure.check(SwarmError):
            error = failure.value
        else:
            error = Unavailable(f"request to {self.peer} failed: {failure.value}")
        return error_reply(request.get("id"), error)

    def on_reply(self, rid: int, reply: dict) -> bool:
        """Deliver a reply; False when nothing waits for it (late or unknown)."""
        d = self._pending.pop(rid, None)
        if d is None:
            return False
        d.callback(reply)
        return True

    def fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Unavailable(reason))
