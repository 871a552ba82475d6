"""Unit tests of swarm.correlate.Correlator on a task.Clock: tags, replies, deadlines swept
by one timer, fail_all and cancellation. Every path must end with nothing waiting and no
timer left on the clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure

from swarm.correlate import SLACK, Correlator


def make(slack: float = SLACK) -> tuple[Correlator, task.Clock]:
    clock = task.Clock()
    return Correlator(clock, slack), clock


def outcome(d: Deferred) -> list:
    """Filled with the Deferred's result (a Failure if it failed) once it fires."""
    out: list = []
    d.addBoth(out.append)
    return out


def assert_nothing_left(core: Correlator, clock: task.Clock) -> None:
    assert core.pending == 0
    assert clock.getDelayedCalls() == []


class Refused(Exception):
    pass


# -- tags and replies --------------------------------------------------------------------


def test_tags_count_up_from_one_and_replies_are_matched_out_of_order():
    core, clock = make()
    calls = [core.expect(5.0) for _ in range(5)]
    assert [tag for tag, _ in calls] == [1, 2, 3, 4, 5]
    outs = [outcome(d) for _, d in calls]
    for i in (3, 0, 4, 1, 2):
        assert core.resolve(calls[i][0], f"reply {i}") is True
    assert outs == [[f"reply {i}"] for i in range(5)]
    assert_nothing_left(core, clock)


def test_an_unknown_duplicate_or_late_tag_is_refused_and_changes_nothing():
    core, clock = make()
    assert core.resolve(1, "nobody asked") is False
    tag, d = core.expect(1.0)
    out = outcome(d)
    assert core.resolve(tag + 1, "not yet issued") is False
    assert out == [] and core.pending == 1
    assert core.resolve(tag, "first") is True
    assert core.resolve(tag, "duplicate") is False
    assert out == ["first"]
    late_tag, late = core.expect(1.0)
    late_out = outcome(late)
    clock.advance(1.0)
    assert late_out[0].check(DeferredTimeout)
    assert core.resolve(late_tag, "too late") is False
    assert len(late_out) == 1
    assert_nothing_left(core, clock)


def test_fail_fails_one_request_with_its_reason_and_refuses_its_reply():
    core, clock = make()
    (tag, d), (other, d2) = core.expect(5.0), core.expect(5.0)
    out, out2 = outcome(d), outcome(d2)
    assert core.fail(tag, Refused("not sent")) is True
    assert out[0].check(Refused) and out2 == []
    assert core.fail(tag, Refused("again")) is False
    assert core.resolve(tag, "late") is False
    assert core.resolve(other, "fine") is True and out2 == ["fine"]
    assert_nothing_left(core, clock)


def test_tags_are_never_reused_after_fail_all_or_timeouts():
    core, clock = make()
    seen = {core.expect(1.0)[0]}
    core.fail_all(Refused("gone"))
    seen.add(core.expect(1.0)[0])
    clock.advance(1.0)
    tag, _ = core.expect(1.0)
    assert tag not in seen
    assert core.resolve(tag, "fresh") is True
    assert_nothing_left(core, clock)


# -- deadlines ---------------------------------------------------------------------------


def test_a_request_times_out_exactly_at_its_deadline_with_the_error_it_was_given():
    core, clock = make()
    _, plain = core.expect(2.0)
    _, named = core.expect(2.0, lambda: Refused("no reply in 2s"))
    outs = outcome(plain), outcome(named)
    clock.advance(1.999)
    assert outs == ([], [])
    clock.advance(0.001)
    assert outs[0][0].check(DeferredTimeout)
    assert outs[1][0].check(Refused) and str(outs[1][0].value) == "no reply in 2s"
    assert_nothing_left(core, clock)


def test_no_timeout_waits_for_ever_without_a_timer():
    core, clock = make()
    tag, d = core.expect()
    out = outcome(d)
    assert clock.getDelayedCalls() == []
    clock.advance(10_000)
    assert out == [] and core.pending == 1
    assert core.resolve(tag, "at last") is True
    assert out == ["at last"]
    assert_nothing_left(core, clock)


def test_one_timer_serves_every_request_in_flight():
    core, clock = make()
    for timeout in (3.0, 1.0, 2.0, 5.0, 1.5):
        core.expect(timeout)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == 1.0  # moved up for the 1 s request


def test_a_shorter_timeout_than_the_armed_timer_is_not_kept_waiting():
    core, clock = make()
    _, slow = core.expect(10.0)
    _, fast = core.expect(1.0)
    slow_out, fast_out = outcome(slow), outcome(fast)
    clock.advance(1.0)
    assert fast_out[0].check(DeferredTimeout)
    assert slow_out == []
    clock.advance(8.999)
    assert slow_out == []
    clock.advance(0.001)
    assert slow_out[0].check(DeferredTimeout)
    assert_nothing_left(core, clock)


def test_every_request_times_out_within_slack_after_its_deadline_never_before():
    """Seeded random timeouts, replies and new requests, the clock in 1 ms steps."""
    rng = random.Random(6)
    step = 0.001
    core, clock = make(slack=0.01)
    deadline_of: dict[int, float] = {}
    fired_at: dict[int, float] = {}
    answered = 0
    for i in range(5000):
        for _ in range(rng.randrange(3) if i < 3000 else 0):
            timeout = rng.choice([0.0, 0.003, 0.05, 0.2, 1.0]) * rng.random()
            tag, d = core.expect(timeout)
            deadline_of[tag] = clock.seconds() + timeout
            d.addErrback(lambda f, tag=tag: fired_at.setdefault(tag, clock.seconds()))
        if deadline_of and rng.random() < 0.3:
            answered += core.resolve(rng.choice(list(deadline_of)[-20:]), "reply")
        clock.advance(step)
        assert len(clock.getDelayedCalls()) <= 1
    assert answered > 300 and len(fired_at) > 2000
    for tag, when in fired_at.items():
        assert deadline_of[tag] <= when + 1e-9, "timed out early"
        assert when <= deadline_of[tag] + 0.01 + step + 1e-9, "timed out too late"
    assert_nothing_left(core, clock)


def test_expiries_close_together_share_one_firing_of_the_timer():
    core, clock = make(slack=0.01)
    fired = []
    for timeout in (1.0, 1.002, 1.004, 1.5):
        tag, d = core.expect(timeout)
        d.addErrback(lambda _, tag=tag: fired.append((tag, clock.seconds())))
    clock.advance(1.0)
    assert fired == [(1, 1.0)]
    # the next two are due within the slack: one firing takes both
    assert [call.getTime() for call in clock.getDelayedCalls()] == [pytest.approx(1.01)]
    clock.advance(0.01)
    assert [tag for tag, _ in fired] == [1, 2, 3]
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(1.5)
    clock.advance(0.49)
    assert [tag for tag, _ in fired] == [1, 2, 3, 4]
    assert_nothing_left(core, clock)


def test_a_zero_or_negative_timeout_fails_on_the_next_turn_of_the_clock():
    core, clock = make()
    outs = [outcome(core.expect(timeout)[1]) for timeout in (0, -5.0)]
    assert outs == [[], []]
    clock.advance(0)
    assert all(out[0].check(DeferredTimeout) for out in outs)
    assert_nothing_left(core, clock)


def test_settled_requests_do_not_pile_up_in_the_deadline_heap():
    core, _ = make()
    core.expect(60.0)  # one request that stays, so the heap is never simply cleared
    for _ in range(10_000):
        tag, _ = core.expect(30.0)
        core.resolve(tag, "reply")
    assert core.pending == 1
    assert len(core._deadlines) <= 2 * core.pending + 256


def test_a_broken_timeout_factory_still_fails_its_request_and_the_sweep_goes_on():
    core, clock = make()

    def broken() -> BaseException:
        raise RuntimeError("factory bug")

    out = outcome(core.expect(1.0, broken)[1])
    later = outcome(core.expect(2.0)[1])
    clock.advance(1.0)
    assert out[0].check(RuntimeError)
    clock.advance(1.0)
    assert later[0].check(DeferredTimeout)
    assert_nothing_left(core, clock)


# -- fail_all and cancellation -----------------------------------------------------------


def test_fail_all_fails_everything_waiting_with_the_reason_and_then_carries_on():
    core, clock = make()
    calls = [core.expect(timeout) for timeout in (1.0, None, 5.0)]
    outs = [outcome(d) for _, d in calls]
    core.resolve(calls[2][0], "answered first")
    core.fail_all(Refused("link lost"))
    assert outs[2] == ["answered first"]
    for out in outs[:2]:
        assert out[0].check(Refused) and str(out[0].value) == "link lost"
    assert_nothing_left(core, clock)
    core.fail_all(Refused("again"))  # nothing waits: nothing happens
    tag, _ = core.expect(1.0)
    assert core.resolve(tag, "works") is True
    assert_nothing_left(core, clock)


def test_fail_all_takes_a_failure_as_it_is():
    core, _ = make()
    reason = Failure(Refused("closed"))
    out = outcome(core.expect()[1])
    core.fail_all(reason)
    assert out == [reason]


def test_a_cancelled_request_stops_waiting_and_its_reply_is_refused():
    core, clock = make()
    tag, d = core.expect(5.0)
    _, other = core.expect(5.0)
    out = outcome(d)
    d.cancel()
    assert out[0].check(CancelledError)
    assert core.pending == 1 and len(clock.getDelayedCalls()) == 1
    assert core.resolve(tag, "late") is False
    other.cancel()
    other.addErrback(lambda _: None)
    assert_nothing_left(core, clock)


# -- callbacks that act on the correlator while it fires ---------------------------------


def test_a_request_made_from_a_timeout_callback_gets_its_own_deadline():
    core, clock = make()
    retried: list = []

    def retry(_: Failure) -> None:
        retried.append(outcome(core.expect(0.5)[1]))

    core.expect(1.0)[1].addErrback(retry)
    _, slow = core.expect(3.0)
    slow_out = outcome(slow)
    clock.advance(1.0)
    assert retried == [[]]
    clock.advance(0.5)
    assert retried[0][0].check(DeferredTimeout)
    assert slow_out == []
    clock.advance(1.5)
    assert slow_out[0].check(DeferredTimeout)
    assert_nothing_left(core, clock)


def test_fail_all_from_a_timeout_callback_fails_the_rest_once():
    core, clock = make()
    core.expect(1.0)[1].addErrback(lambda _: core.fail_all(Refused("give up")))
    outs = [outcome(core.expect(timeout)[1]) for timeout in (1.0, 2.0)]
    clock.advance(1.0)
    assert all(len(out) == 1 and out[0].check(Refused) for out in outs)
    assert_nothing_left(core, clock)


def test_a_request_cancelled_by_another_ones_callback_during_fail_all_fires_once():
    core, clock = make()
    _, first = core.expect(5.0)
    _, second = core.expect(5.0)
    first.addErrback(lambda _: second.cancel())
    out = outcome(second)
    core.fail_all(Refused("gone"))
    assert len(out) == 1 and out[0].check(CancelledError)
    assert_nothing_left(core, clock)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("slack", [-0.1, float("nan"), float("inf"), "0.01"])
def test_a_bad_slack_is_refused(slack):
    with pytest.raises(ValueError, match="slack"):
        Correlator(task.Clock(), slack)


def test_a_nan_timeout_is_refused_and_nothing_waits():
    core, clock = make()
    with pytest.raises(ValueError, match="timeout"):
        core.expect(float("nan"))
    assert_nothing_left(core, clock)
