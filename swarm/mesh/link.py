"""One live peer link's request/reply correlation, in the manner of Twisted AMP.

Each request goes out tagged with a ``rid`` from the link's
:class:`~swarm.correlate.Correlator`, which waits for its reply, times it out and, on
:meth:`PeerLink.fail_all` when the link goes, settles whatever is pending, so no Deferred
is ever left hanging. What this class adds is the peer wire's ``req`` message and the
rule that a call never fails: every failure becomes an error reply for the caller to
pass on. No I/O: frames go out through the injected ``send``, time comes from the
injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from swarm.correlate import Correlator
from swarm.errors import SwarmError, Timeout, Unavailable
from swarm.protocol.wire import error_reply


class PeerLink:
    """One connection to one neighbor; ``peer`` is the neighbor's node id."""

    def __init__(
        self, peer: str, send: Callable[[list[dict]], None], clock: IReactorTime
    ) -> None:
        self.peer = peer
        self._send = send
        self._calls = Correlator(clock)

    @property
    def pending(self) -> int:
        return self._calls.pending

    def send(self, messages: list[dict]) -> None:
        self._send(messages)

    def call(
        self, request: dict, timeout: float, hops: int, to: str | None = None
    ) -> Deferred:
        """Forward ``request``; fires with the reply dict (errors become error replies).

        ``to`` addresses the request to one node rather than to the key's owner. The
        timeout is kept to within :data:`swarm.correlate.SLACK` (late, never early).
        """
        rid, d = self._calls.expect(timeout, self._timed_out)
        d.addErrback(self._error_reply, request)
        msg = {"t": "req", "rid": rid, "ms": max(0, int(timeout * 1000)), "hops": hops,
               "req": request}
        if to is not None:
            msg["to"] = to
        self._send([msg])
        return d

    def _timed_out(self) -> Timeout:
        return Timeout(f"no reply from {self.peer} in time")

    def _error_reply(self, failure: Failure, request: dict) -> dict:
        if failure.check(SwarmError):
            error: SwarmError = failure.value
        else:
            error = Unavailable(f"request to {self.peer} failed: {failure.value}")
        return error_reply(request.get("id"), error)

    def on_reply(self, rid: int, reply: dict) -> bool:
        """Deliver a reply; False when nothing waits for it (late or unknown)."""
        return self._calls.resolve(rid, reply)

    def fail_all(self, reason: str) -> None:
        self._calls.fail_all(Unavailable(reason))
