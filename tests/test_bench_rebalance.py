"""``python -m swarm.bench_rebalance`` runs end to end on a small store, so the command
docs/scaling.md gives keeps working, prints every figure, and loses no key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("replicas", [1, 2])
def test_bench_rebalance_prints_its_figures_and_loses_nothing(tmp_path, replicas):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "swarm.bench_rebalance", "--keys", "5000",
         "--replicas", str(replicas), "--json"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
        text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert figures["keys"] == 5000 and figures["replicas"] == replicas
    assert figures["rebalance_seconds"] > 0
    # a join moves copies to the new node only, exactly its share
    assert figures["entries_moved"] == figures["entries_expected"] > 0
    for window in ("before", "during"):
        assert {"requests", "per_second", "failed", "p50_ms", "p99_ms", "max_ms"} <= \
            set(figures[window])
    assert figures["before"]["requests"] > 0
    # (a read that finds nothing mid-rebalance is reported, in missed_reads: rare, and
    # not yet explained; see docs/scaling.md)
    assert figures["wrong_reads"] == 0
    assert figures["check"] == {**figures["check"], "missing": 0, "wrong": 0}
