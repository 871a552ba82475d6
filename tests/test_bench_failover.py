"""``python -m swarm.bench_failover`` runs end to end in a tiny configuration, so the
command the docs give keeps working and prints every figure issue 7 asks for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIGURES = (
    "load (mset batches of 1000, through p2):",
    "failover: first good read after SIGKILL:",
    "failover: reads failed:",
    "failover: writes failed:",
    "failover: first acknowledged write after kill:",
    "failover: longest write wait:",
    "restore: SIGKILL to p2, p3 holding all keys:",
    "refill: p1 restarted empty, start to refilled:",
    "refill: copies kept by nodes not owning them:",
    "anti-entropy: bytes per round, whole swarm:",
    "anti-entropy: measured:",
)


def test_bench_failover_prints_every_figure(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "swarm.bench_failover", "--keys", "300"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Python ") and "--ping-interval 1" in lines[0]
    for figure in FIGURES:
        assert any(line.startswith(figure) for line in lines), (figure, done.stdout)
    assert "WARNING" not in done.stdout, done.stdout
