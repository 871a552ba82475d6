"""``python -m swarm.bench_attacks`` runs end to end on real twistd nodes (the cheap
attacks here, every one in the docs' command), and each outcome carries the verdict
issue 8's fixes promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "swarm.bench_attacks", *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                          text=True, timeout=180)


def test_the_cheap_attacks_run_and_are_refused_or_bounded(tmp_path):
    done = run("--quick", "--only", "1,3,7,9", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    verdicts = {row.split(" | ")[0][2:].split()[0]: row.split(" | ")[1] for row in rows}
    assert sorted(verdicts) == ["1", "3", "7", "9"], done.stdout
    assert verdicts["1"].startswith("refused: no proof: closed 4004"), done.stdout
    assert verdicts["3"].startswith("refused: closed 1009"), done.stdout
    assert verdicts["7"].startswith("delivered: 5.0 MiB"), done.stdout
    assert verdicts["9"].startswith("refused: HTTP 403"), done.stdout
    assert "ERROR" not in done.stdout and "NOT" not in done.stdout, done.stdout


def test_an_unknown_attack_number_is_a_usage_error(tmp_path):
    done = run("--only", "12", cwd=tmp_path)
    assert done.returncode == 2 and "attack numbers from 1 to 11" in done.stderr
