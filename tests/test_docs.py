"""Every Python example in README.md and docs/ runs exactly as written (Sybil).

The examples talk to a node on ws://127.0.0.1:8765, as a reader's would: each
document's examples run in order, in one namespace, in a fresh Python process (they
start event loops and reactors of their own), against a real ``twistd swarmcache`` on
that port, flushed between documents. A block meant only to be read is fenced as
something other than ``python``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twistd_support import start_node

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PORT = 8765

RUNNER = """
import sys
from pathlib import Path
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

document = Sybil([PythonCodeBlockParser()]).parse(Path(sys.argv[1]))
for example in document:
    print(f"--- line {example.line}", flush=True)
    example.evaluate()
"""


def python_blocks(path: Path) -> int:
    return path.read_text().count("```python")


def test_the_docs_have_python_examples_to_run():
    assert python_blocks(ROOT / "README.md") >= 3  # the three kinds of client
    assert sum(map(python_blocks, DOCS)) >= 12


def test_every_python_example_runs_as_written(tmp_path):
    """One test for all documents: the node's port is fixed, so the documents must not
    run side by side (as under pytest-xdist) against two nodes."""
    node = start_node(tmp_path, "docs", port=PORT)
    try:
        env = {k: v for k, v in os.environ.items() if k != "SWARMCACHE_URL"}
        failures = []
        for path in DOCS:
            if not python_blocks(path):
                continue
            flushed = subprocess.run([sys.executable, "-m", "swarm.cli", "flush", "--yes"],
                                     env=env, capture_output=True, text=True, timeout=30)
            assert flushed.returncode == 0, flushed.stderr
            done = subprocess.run([sys.executable, "-c", RUNNER, str(path)], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                failures.append(f"{path.relative_to(ROOT)}:\n{done.stdout[-2000:]}"
                                f"\n{done.stderr[-3000:]}")
        assert not failures, "\n\n".join(failures)
    finally:
        node.kill()
