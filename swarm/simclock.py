"""A ``task.Clock`` whose pending calls live in a heap, for swarms of a thousand nodes.

``twisted.internet.task.Clock`` keeps its calls in a list that it sorts again on every
``callLater`` and after every call it runs: fine for a unit test with a few timers, but a
simulated swarm of a thousand nodes keeps tens of thousands pending (pings, deadlines,
frames in flight), and sorting them on each of millions of events is most of the run.

:class:`HeapClock` runs calls as ``Clock`` does — by time, and calls due at the same time
in the order they were scheduled — at O(log n) a call. (Only the order of calls tied
after a ``reset`` may differ: ``Clock``'s depends on its list's history.) A cancelled or reset
call's old heap entry stays where it is and is skipped when it comes up (its call is no
longer pending, or is due at another time).
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Any, Callable, Sequence

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock


class HeapClock(Clock):
    """Drop-in for ``task.Clock`` (same ``callLater``, ``advance``, ``seconds``)."""

    def __init__(self) -> None:
        super().__init__()
        #: (time, order scheduled, call): an entry counts while its call is pending
        #: and still due at that time.
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = count()
        #: Each pending call and the order it was scheduled in (ties run in that order).
        self._pending: dict[DelayedCall, int] = {}

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        call = DelayedCall(self.seconds() + delay, callable, args, kw,
                           self._pending.pop, self._push, self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        """Schedule ``call`` at its time, after the calls already due then; ``reset``
        to an earlier time comes here too."""
        order = self._pending[call] = next(self._order)
        heapq.heappush(self._heap, (call.time, order, call))

    def _soonest(self) -> tuple[float, int, DelayedCall] | None:
        """The entry of the call due first, dropping stale entries and moving calls
        that ``reset`` or ``delay`` put later (they say so with ``delayed_time``)."""
        heap, pending = self._heap, self._pending
        while heap:
            when, _, call = heap[0]
            if call not in pending or when != call.time:
                heapq.heappop(heap)
            elif call.delayed_time:
                call.activate_delay()
                heapq.heapreplace(heap, (call.time, pending[call], call))
            else:
                return heap[0]
        return None

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return sorted(self._pending, key=lambda c: (c.getTime(), self._pending[c]))

    @property
    def calls(self) -> list[DelayedCall]:  # type: ignore[override]
        """The pending calls, soonest first (what ``Clock.calls`` holds)."""
        return list(self.getDelayedCalls())

    @calls.setter
    def calls(self, _value: Any) -> None:
        """``Clock.__init__`` sets a list; this clock keeps its heap instead."""

    def advance(self, amount: float) -> None:
        self.advance_to(self.rightNow + amount)

    def advance_to(self, when: float) -> None:
        """Move time to exactly ``when`` (not before now) and run what is due by then.
        Stepping to each call's own time (:meth:`next_due`) runs it when it is due,
        where steps of a fixed size, summed in floating point, can overshoot it."""
        self.rightNow = max(self.rightNow, when)
        while (entry := self._soonest()) is not None and entry[0] <= self.rightNow:
            call = heapq.heappop(self._heap)[2]
            del self._pending[call]
            call.called = 1
            call.func(*call.args, **call.kw)

    def next_due(self) -> float | None:
        """When the soonest pending call is due (None: nothing is pending)."""
        entry = self._soonest()
        return entry[0] if entry is not None else None
