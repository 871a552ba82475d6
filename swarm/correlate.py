"""Request/reply correlation with one sweeping timer, in the manner of Twisted AMP.

:class:`Correlator` is the part that peer links and the client share: a counter for
tags, ``tag -> Deferred`` for the requests waiting for a reply, a deadline per request
and :meth:`Correlator.fail_all` when the connection goes (AMP's ``failAllOutgoing``).
It does no I/O: callers put the tag on the wire themselves, and time comes from the
injected clock.

Deadlines are swept rather than scheduled one by one: they wait in a heap, and a single
timer per correlator is armed for the earliest. A request answered in time therefore
costs a tuple in a heap instead of a ``callLater``, its cancellation and two callbacks
(what ``Deferred.addTimeout`` does), and a burst of expiries costs one timer firing per
``slack`` instead of one per request. An entry left behind by a reply is dropped when
the sweep reaches it, or when such entries outnumber the live ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from heapq import heapify, heappop, heappush

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

#: How late a request may time out, in seconds, so that expiries close together share
#: one firing of the timer.
SLACK = 0.01

# Settled entries the deadline heap may hold beyond the live ones before it is rebuilt.
_STALE_ALLOWANCE = 256


class Correlator:
    """Matches replies to requests by tag and fails those that go unanswered.

    A request given ``timeout`` seconds fails no earlier than ``timeout`` after
    :meth:`expect` and no later than :data:`SLACK` after that (plus however late the
    clock runs its calls). When nothing is waiting, no timer is left on the clock, so
    requests made one at a time still cost a timer each; pipelined ones share it.
    """

    def __init__(self, clock: IReactorTime, slack: float = SLACK) -> None:
        if not (isinstance(slack, (int, float)) and 0 <= slack < math.inf):
            raise ValueError(f"slack must be a finite number of seconds >= 0, not {slack!r}")
        self._clock = clock
        self._slack = slack
        self._counter = 0
        self._waiting: dict[int, Deferred] = {}
        # (deadline, tag, timed_out): a heap, with entries of settled tags left in it.
        self._deadlines: list[tuple[float, int, Callable[[], BaseException]]] = []
        self._timer: IDelayedCall | None = None
        self._due = 0.0  # when the timer fires

    @property
    def pending(self) -> int:
        """How many requests wait for a reply."""
        return len(self._waiting)

    def expect(
        self,
        timeout: float | None = None,
        timed_out: Callable[[], BaseException] = DeferredTimeout,
    ) -> tuple[int, Deferred]:
        """A new tag to send with a request, and the Deferred its reply will fire.

        Past ``timeout`` seconds the Deferred fails with ``timed_out()`` instead; with no
        timeout it waits for :meth:`resolve`, :meth:`fail_all` or its cancellation, which
        stops the wait (it fails with ``CancelledError``). Tags are never reused, so a
        late reply cannot be taken for the answer to a later request.
        """
        if timeout is not None and math.isnan(timeout):
            raise ValueError("timeout must be a number of seconds or None, not nan")
        self._counter += 1
        tag = self._counter
        d: Deferred = Deferred(lambda _: self._forget(tag))
        self._waiting[tag] = d
        if timeout is not None:
            deadline = self._clock.seconds() + timeout
            heappush(self._deadlines, (deadline, tag, timed_out))
            self._arm(deadline, timeout)
        return tag, d

    def resolve(self, tag: int, reply: object) -> bool:
        """Fire the request waiting for ``tag``; False if none does (late or unknown)."""
        d = self._take(tag)
        if d is None:
            return False
        d.callback(reply)
        return True

    def fail(self, tag: int, reason: BaseException | Failure) -> bool:
        """Fail the request waiting for ``tag`` (it could not be sent); False if none does."""
        d = self._take(tag)
        if d is None:
            return False
        d.errback(reason)
        return True

    def _take(self, tag: int) -> Deferred | None:
        d = self._waiting.pop(tag, None)
        if d is not None:
            self._removed()
        return d

    def fail_all(self, reason: BaseException | Failure) -> None:
        """Fail every waiting request with ``reason``; later requests are unaffected."""
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        waiting = list(self._waiting.values())
        self._waiting.clear()
        self._idle()
        for d in waiting:
            if not d.called:  # a callback of an earlier one may have cancelled it
                d.errback(reason)

    # -- deadlines -----------------------------------------------------------------------

    def _forget(self, tag: int) -> None:
        self._take(tag)

    def _removed(self) -> None:
        waiting, deadlines = self._waiting, self._deadlines
        if not waiting:
            self._idle()
        elif len(deadlines) > 2 * len(waiting) + _STALE_ALLOWANCE:
            deadlines[:] = [entry for entry in deadlines if entry[1] in waiting]
            heapify(deadlines)

    def _idle(self) -> None:
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, deadline: float, delay: float) -> None:
        """Make the timer fire no later than ``slack`` after ``deadline``."""
        if self._timer is None:
            self._timer = self._clock.callLater(max(0.0, delay), self._sweep)
            self._due = deadline
        elif self._due > deadline + self._slack:
            self._timer.reset(max(0.0, delay))
            self._due = deadline

    def _sweep(self) -> None:
        self._timer = None
        # The timer may fire a rounding error before its due time, never really early.
        now = max(self._clock.seconds(), self._due)
        # Callbacks run from here may add, settle or fail requests; both containers
        # are only ever changed in place, and the loop looks at them afresh each time.
        deadlines, waiting = self._deadlines, self._waiting
        while deadlines and deadlines[0][0] <= now:
            _deadline, tag, timed_out = heappop(deadlines)
            d = waiting.pop(tag, None)
            if d is not None:
                try:
                    error: BaseException | Failure = timed_out()
                except Exception:
                    error = Failure()  # a broken factory must not stop the sweep
                d.errback(error)
        while deadlines and deadlines[0][1] not in waiting:
            heappop(deadlines)
        if deadlines:
            due = max(deadlines[0][0], now + self._slack)
            self._arm(due, due - self._clock.seconds())
        elif not waiting:
            self._idle()
