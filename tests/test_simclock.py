"""HeapClock runs what task.Clock runs, in the same order, at the same times."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock, LoopingCall

from swarm.simclock import HeapClock

# A script: ("call", delay) schedules, ("cancel", i) / ("reset", i, delay) act on the
# i-th call scheduled so far (if still active), ("advance", amount) moves time; each
# call, when run, may schedule a follow-up (the way timers re-arm).
_steps = st.lists(st.one_of(
    st.tuples(st.just("call"), st.sampled_from([0, 0.5, 1, 1, 2.5, 3])),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("reset"), st.integers(0, 20), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("advance"), st.sampled_from([0, 0.5, 1, 2])),
), max_size=60)


def _play(clock, steps) -> list:
    ran, calls = [], []

    def fire(name, again):
        ran.append((clock.seconds(), name))
        if again:
            clock.callLater(again, fire, f"{name}'", 0)

    for step in steps:
        if step[0] == "call":
            name = len(calls)
            calls.append(clock.callLater(step[1], fire, name, step[1]))
        elif step[0] in ("cancel", "reset") and step[1] < len(calls):
            call = calls[step[1]]
            if call.active():
                call.cancel() if step[0] == "cancel" else call.reset(step[2])
        elif step[0] == "advance":
            clock.advance(step[1])
    clock.advance(100)
    return ran


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_same_calls_in_the_same_order_as_task_clock(steps):
    ours, theirs = _play(HeapClock(), steps), _play(Clock(), steps)
    if any(step[0] == "reset" for step in steps):
        # calls tied after a reset may run in another order (Clock's follows its list)
        ours, theirs = sorted(ours, key=str), sorted(theirs, key=str)
    assert ours == theirs


def test_pending_calls_are_listed_soonest_first_and_leave_when_run_or_cancelled():
    clock = HeapClock()
    late = clock.callLater(5, lambda: None)
    soon = clock.callLater(1, lambda: None)
    gone = clock.callLater(2, lambda: None)
    gone.cancel()
    assert clock.getDelayedCalls() == [soon, late]
    assert clock.next_due() == 1
    clock.advance(1)
    assert not soon.active() and clock.getDelayedCalls() == [late]
    late.reset(10)
    assert clock.next_due() == 11
    clock.advance(10)
    assert clock.getDelayedCalls() == [] and clock.next_due() is None


def test_a_looping_call_runs_on_it():
    clock, ticks = HeapClock(), []
    loop = LoopingCall(lambda: ticks.append(clock.seconds()))
    loop.clock = clock
    loop.start(1.0, now=False)
    for _ in range(3):
        clock.advance(1.0)
    clock.advance(0.5)
    loop.stop()
    assert ticks == [1.0, 2.0, 3.0] and clock.getDelayedCalls() == []


def test_a_simulated_swarm_runs_each_call_at_its_own_time():
    """A frame crossing 100 links of 3 ms arrives 0.3 s later: run() steps to each
    call's time, where steps of 10 ms delayed every hop to the next step (1 s)."""
    from swarm.simulator import Swarm

    swarm, hops = Swarm(), []

    def hop():
        hops.append(swarm.clock.seconds())
        if len(hops) < 100:
            swarm.clock.callLater(0.003, hop)

    swarm.clock.callLater(0.003, hop)
    swarm.run(0.301)
    assert len(hops) == 100 and abs(hops[-1] - 0.3) < 1e-9
