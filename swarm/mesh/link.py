"""One live peer link's request/reply correlation, in the manner of Twisted AMP.

Each request goes out tagged with a ``rid`` from the link's
:class:`~swarm.correlate.Correlator`, which waits for its reply, times it out and, on
:meth:`PeerLink.fail_all` when the link goes, settles whatever is pending, so no Deferred
is ever left hanging. What this class adds is the peer wire's ``req`` message and the
rule that a call never fails: every failure becomes an error reply for the caller to
pass on. No I/O: frames go out through the injected ``send``, time comes from the
injected clock.

Calls made in one reactor turn with the same deadline, hops and address go out as one
``breq`` when the peer takes them (its hello said ``batch``): one tag, one deadline and
one message for the whole group, answered by ``brep`` messages that each settle a run of
the group's callers, in order. A client's batch of 256 gets for keys of one owner so
costs each hop one message instead of 256. A lone call still goes as a plain ``req``.

A peer whose hello said ``raw`` answers groups with their replies encoded as one item
(``brep.raw``). A relay asks for them as they came (``passthrough``): a run of replies
that answers callers none of whom has an answer yet is handed over whole, as
:class:`Packed`, and sent on as it came, so the values in it are neither decoded nor
encoded again on the way. Everywhere else the replies are decoded and checked here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from swarm.correlate import Correlator
from twisted.logger import Logger

from swarm.errors import InternalError, SwarmError, Timeout, Unavailable
from swarm.mesh.peer_wire import PeerProtocolError, reply_count, unpack_replies
from swarm.protocol.wire import error_reply, request_id

_log = Logger()

#: The most calls one ``breq`` carries (a client's batch may hold 10,000).
MAX_GROUP = 1024

_Group = tuple[int, int, "str | None"]  # (ms, hops, to)


@dataclass(frozen=True)
class Packed:
    """The replies to ``count`` calls of a group, in order, as a peer encoded them."""

    raw: bytes
    count: int


class _InRun:
    def __repr__(self) -> str:
        return "IN_RUN"


#: Where a group's replies come as :class:`Packed`, what stands for each call after
#: the first of the run (whose place holds the Packed).
IN_RUN = _InRun()


def unpacked(replies: list, requests: list, peer: str) -> list[dict]:
    """``replies`` of :meth:`PeerLink.call_group` with each :class:`Packed` run
    decoded in its place, for a node that reads them."""
    if not any(isinstance(reply, Packed) for reply in replies):
        return replies
    out: list[dict] = []
    for i, reply in enumerate(replies):
        if isinstance(reply, Packed):
            out.extend(_decoded(reply.raw, requests[i:i + reply.count], peer))
        elif reply is not IN_RUN:
            out.append(reply)
    return out


def _decoded(raw: bytes, requests: list, peer: str) -> list[dict]:
    """The replies ``raw`` holds, or an error reply for each of ``requests`` when it
    does not hold as many well-formed replies (the peer, or a node behind it, is
    broken or lying: the callers hear so, the link stays)."""
    try:
        replies = unpack_replies(raw)
        if len(replies) == len(requests):
            return replies
        problem = f"{len(replies)} replies for {len(requests)} requests"
    except PeerProtocolError as e:
        problem = str(e)
    _log.warn("malformed group replies through {peer}: {problem}", peer=peer, problem=problem)
    error = InternalError(f"malformed replies came through {peer}")
    return [error_reply(request_id(request), error) for request in requests]


class PeerLink:
    """One connection to one neighbor; ``peer`` is the neighbor's node id.

    ``batches`` says whether the peer takes ``breq``, ``raw`` whether it takes
    ``brep.raw`` (see the module docstring)."""

    def __init__(
        self, peer: str, send: Callable[[list[dict]], None], clock: IReactorTime,
        batches: bool = False, raw: bool = False,
    ) -> None:
        self.peer = peer
        self.batches = batches
        self.raw = raw
        self._send = send
        self._clock = clock
        self._calls = Correlator(clock)
        #: Calls of this turn not sent yet: (ms, hops, to) -> [(request, Deferred)].
        self._queued: dict[_Group, list[tuple[dict, Deferred]]] = {}
        self._queued_count = 0
        self._flush_call: IDelayedCall | None = None
        #: Groups sent and not fully answered, by rid.
        self._groups: dict[int, _Waiting] = {}

    @property
    def pending(self) -> int:
        return self._calls.pending + self._queued_count

    def send(self, messages: list[dict]) -> None:
        """Send ``messages`` after the calls queued before them (order is kept: no
        request made before a ``bye`` follows it)."""
        self.flush()
        self._send(messages)

    def call(
        self, request: dict, timeout: float, hops: int, to: str | None = None
    ) -> Deferred:
        """Forward ``request``; fires with the reply dict (errors become error replies).

        ``to`` addresses the request to one node rather than to the key's owner. The
        timeout is kept to within :data:`swarm.correlate.SLACK` (late, never early).
        """
        ms = max(0, int(timeout * 1000))
        if not self.batches:
            return self._call_one(request, ms, hops, to)
        d = Deferred()
        self._queued.setdefault((ms, hops, to), []).append((request, d))
        self._queued_count += 1
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """Send the calls queued in this turn: a ``breq`` per group of up to
        :data:`MAX_GROUP`, a plain ``req`` for a call alone in its group."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._queued:
            return
        queued, self._queued, self._queued_count = self._queued, {}, 0
        messages = []
        for (ms, hops, to), calls in queued.items():
            for start in range(0, len(calls), MAX_GROUP):
                part = calls[start:start + MAX_GROUP]
                if len(part) == 1:
                    request, d = part[0]
                    self._call_one(request, ms, hops, to, messages).chainDeferred(d)
                else:
                    callers = [d for _, d in part]
                    messages.append(self._group_message(
                        [request for request, _ in part], ms, hops, to,
                        lambda i, reply, callers=callers: callers[i].callback(reply)))
        self._send(messages)

    def call_group(self, requests: list[dict], timeout: float, hops: int,
                   to: str | None = None, passthrough: bool = False) -> Deferred:
        """Forward ``requests`` as groups of their own (after the calls queued before
        them); fires with their replies in order, errors as error replies. One
        Deferred for them all: a relay passes a group on without one per request.
        With ``passthrough``, runs of replies may come as :class:`Packed` followed
        by :data:`IN_RUN` (:func:`unpacked` decodes them). The peer must take
        ``breq`` (:attr:`batches`)."""
        if not self.batches:
            raise ValueError(f"{self.peer} does not take groups")
        self.flush()
        ms = max(0, int(timeout * 1000))
        done = Deferred()
        replies: list = [None] * len(requests)
        left = [len(requests)]

        def settle(i: int, reply: dict) -> None:
            replies[i] = reply
            left[0] -= 1
            if not left[0]:
                done.callback(replies)

        def settle_run(i: int, packed: Packed) -> None:
            replies[i] = packed
            replies[i + 1:i + packed.count] = [IN_RUN] * (packed.count - 1)
            left[0] -= packed.count
            if not left[0]:
                done.callback(replies)

        self._send([
            self._group_message(
                requests[start:start + MAX_GROUP], ms, hops, to,
                lambda i, reply, start=start: settle(start + i, reply),
                (lambda i, packed, start=start: settle_run(start + i, packed))
                if passthrough else None)
            for start in range(0, len(requests), MAX_GROUP)
        ])
        return done

    def _call_one(self, request: dict, ms: int, hops: int, to: str | None,
                  into: list | None = None) -> Deferred:
        rid, d = self._calls.expect(ms / 1000, self._timed_out)
        d.addErrback(self._error_reply, request)
        msg = {"t": "req", "rid": rid, "ms": ms, "hops": hops, "req": request}
        if to is not None:
            msg["to"] = to
        if into is None:
            self._send([msg])
        else:
            into.append(msg)
        return d

    def _group_message(self, requests: list[dict], ms: int, hops: int, to: str | None,
                       settle: Callable[[int, dict], None],
                       settle_run: Callable[[int, Packed], None] | None = None) -> dict:
        """A ``breq`` of ``requests``; ``settle(i, reply)`` hears each reply once, or
        ``settle_run(i, packed)`` a run of them as they came, when given."""
        rid, d = self._calls.expect(ms / 1000, self._timed_out)
        self._groups[rid] = _Waiting(settle, requests, settle_run)
        d.addErrback(self._group_failed, rid, requests)
        msg = {"t": "breq", "rid": rid, "ms": ms, "hops": hops, "reqs": requests}
        if to is not None:
            msg["to"] = to
        return msg

    def _group_failed(self, failure: Failure, rid: int, requests: list[dict]) -> None:
        """The group timed out or the link went: its callers not yet answered get
        the error."""
        waiting = self._groups.pop(rid, None)
        if waiting is not None:
            for i in waiting.unanswered():
                waiting.answer(i, self._error_reply(failure, requests[i]))

    def _timed_out(self) -> Timeout:
        return Timeout(f"no reply from {self.peer} in time")

    def _error_reply(self, failure: Failure, request: dict) -> dict:
        if failure.check(SwarmError):
            error: SwarmError = failure.value
        else:
            error = Unavailable(f"request to {self.peer} failed: {failure.value}")
        return error_reply(request_id(request), error)

    def on_reply(self, rid: int, reply: dict) -> bool:
        """Deliver a reply; False when nothing waits for it (late or unknown)."""
        return self._calls.resolve(rid, reply)

    def on_group_reply(self, rid: int, at: int, replies: list[dict] | bytes) -> bool:
        """Deliver the replies to calls ``at`` ... of group ``rid`` (a ``brep``'s
        ``reps``, or its ``raw``); False when nothing waits for them (late, unknown,
        or out of the group's range)."""
        waiting = self._groups.get(rid)
        if waiting is None:
            return False
        count = len(replies) if isinstance(replies, list) else reply_count(replies)
        if count is None or at + count > waiting.size:
            return False
        if isinstance(replies, bytes) and not waiting.answer_run(at, Packed(replies, count)):
            replies = _decoded(replies, waiting.requests[at:at + count], self.peer)
        if isinstance(replies, list):
            for i, reply in enumerate(replies, at):
                waiting.answer(i, reply)
        if not waiting.left:
            del self._groups[rid]
            self._calls.resolve(rid, None)
        return True

    def fail_all(self, reason: str) -> None:
        self._drop_queued(reason)
        self._calls.fail_all(Unavailable(reason))

    def _drop_queued(self, reason: str) -> None:
        """Fail the calls still queued (the link went before they left)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        queued, self._queued, self._queued_count = self._queued, {}, 0
        error = Failure(Unavailable(reason))
        for calls in queued.values():
            for request, d in calls:
                d.callback(self._error_reply(error, request))


class _Waiting:
    """The callers of one group sent: who hears each reply, and which are answered
    (a reply is delivered once, however often a peer sends it)."""

    def __init__(self, settle: Callable[[int, dict], None], requests: list[dict],
                 settle_run: Callable[[int, Packed], None] | None) -> None:
        self.settle = settle
        self.settle_run = settle_run
        self.requests = requests
        self.size = len(requests)
        self.left = self.size
        self._answered = [False] * self.size

    def answer(self, i: int, reply: dict) -> None:
        if not self._answered[i]:
            self._answered[i] = True
            self.left -= 1
            self.settle(i, reply)

    def answer_run(self, at: int, packed: Packed) -> bool:
        """Hand ``packed`` over whole, if this group takes runs and none of the
        callers it answers has heard yet; False otherwise (decode it instead)."""
        end = at + packed.count
        if self.settle_run is None or any(self._answered[at:end]):
            return False
        self._answered[at:end] = [True] * packed.count
        self.left -= packed.count
        self.settle_run(at, packed)
        return True

    def unanswered(self) -> list[int]:
        return [i for i, done in enumerate(self._answered) if not done]
