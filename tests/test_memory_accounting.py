"""Issue 8: what ``--max-memory`` charges (``measure`` and ENTRY_OVERHEAD) is within
25 % of what values of every shape really cost, measured by tracemalloc on values
decoded from their frames and stored in a MemoryStore (``python -m swarm.bench_memory``
prints the same per shape, with RSS growth too)."""

from __future__ import annotations

import time

import pytest

from swarm.bench_memory import SHAPES, measure_shape
from swarm.store.memory import measure


@pytest.mark.parametrize("shape", list(SHAPES))
def test_accounted_entry_is_within_25_percent_of_what_it_costs(shape):
    result = measure_shape(shape, 2000)
    ratio = result["entry_accounted"] / result["entry_measured"]
    assert 0.75 <= ratio <= 1.25, result
    if result["value_measured"] >= 16:  # a value alone, where it is not all singletons
        ratio = result["value_accounted"] / result["value_measured"]
        assert 0.75 <= ratio <= 1.25, result


def test_shared_singletons_cost_only_their_slot():
    assert measure([None, True, False, 0, 256, "", "a", b"", b"x"]) == measure([None] * 9)
    assert measure(257) > 0 and measure(-6) > 0


def test_measure_stays_cheap():
    value = {f"f{k}": [k, "text", 1.5, None, {"x": k}] for k in range(100)}  # 800 elements
    started = time.perf_counter()
    for _ in range(100):
        measure(value)
    per_element_us = (time.perf_counter() - started) / 100 / 800 * 1e6
    assert per_element_us < 5  # about 0.3 us on an idle core; generous for a busy one
