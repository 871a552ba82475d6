"""Start-up figures (issue 11): how soon N real ``twistd swarmcache`` nodes, started
together, all see each other, on a quiet or a busy machine.

Run it::

    python -m swarm.bench_startup [--nodes 20] [--busy] [--stagger 0] [--runs 3] [--json]

Each run links the nodes n00, n01... in a random tree (seeded: run r uses ``--seed`` +
r) plus ``--cross`` extra links, each link dialled by one of its ends (``--peer``), and
starts every process at once in a random order (or ``--stagger`` seconds apart, as a
start script or a machine whose load comes and goes spreads them), so some dial peers
that do not listen yet. With ``--busy`` one CPU-burning process per core runs from just before the start
until the run ends (each at most ``--busy-seconds``). Each node logs JSON
(``--log-format json``); the time of its "listening on" event says when it listened,
and a client polls its ``nodes`` view from then on until the view holds every node.

Printed per run: from the first start to the last node listening, and from then until
every view is complete (the issue's target: at most 5 s, busy or not); the most log
lines about dialling (retries, unreachable and reached peers) that one node wrote until
then; and the maximum of each over the runs. A run that misses ``--deadline`` prints the nodes' log tails and
exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from swarm import logs
from swarm.bench_failover import Missed, Node, sleep
from swarm.client.connection import SwarmClient

POLL = 0.05
#: Seconds between two looks at a node's view (20 nodes, a busy machine: not too often).
VIEW_POLL = 0.1
#: One process burning CPU until its time is up, for --busy.
BURNER = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\n" \
         "while time.monotonic() < end:\n    pass\n"


# -- the shape of the swarm (pure; the tests use it too) ---------------------------------


def topology(count: int, cross: int, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """(ids in a random start order, id -> the ids it dials): a random tree over
    ``count`` nodes plus ``cross`` extra links, each dialled by a random end of it."""
    rng = random.Random(seed)
    ids = [f"n{i:02d}" for i in range(count)]
    placed = rng.sample(ids, count)
    links = {frozenset((node, rng.choice(placed[:i]))) for i, node in
             enumerate(placed) if i}
    pairs = count * (count - 1) // 2
    while len(links) < min(pairs, count - 1 + cross):
        links.add(frozenset(rng.sample(ids, 2)))
    dials: dict[str, list[str]] = {i: [] for i in ids}
    for link in sorted(links, key=sorted):
        a, b = rng.sample(sorted(link), 2)
        dials[a].append(b)
    return rng.sample(ids, count), dials


def neighbours(dials: dict[str, list[str]]) -> dict[str, set[str]]:
    """Each node's neighbours, whichever end dials."""
    found: dict[str, set[str]] = defaultdict(set)
    for a, targets in dials.items():
        found.setdefault(a, set())
        for b in targets:
            found[a].add(b)
            found[b].add(a)
    return found


def connected(nodes: Iterable[str], dials: dict[str, list[str]]) -> bool:
    """Whether ``nodes`` stay linked to each other over links between them only."""
    nodes = set(nodes)
    if not nodes:
        return True
    links = neighbours(dials)
    start = next(iter(nodes))
    seen, todo = {start}, deque([start])
    while todo:
        for other in links[todo.popleft()] & nodes:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen == nodes


# -- one run -----------------------------------------------------------------------------


def events(node: Node) -> list[dict]:
    """The JSON log events the node wrote so far (other lines skipped)."""
    found = []
    for line in node.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass  # a line cut short while being written
    return found


def listened_at(node: Node) -> float | None:
    """When (epoch seconds) the node logged that it listens, if it did."""
    for event in events(node):
        if event.get("namespace") == "swarm.node.node" and event.get(
                "message", "").startswith("listening on "):
            return datetime.fromisoformat(event["time"]).timestamp()
    return None


def dial_lines(node: Node, until: float) -> int:
    """How many log lines the node wrote about dialling its peers (at info or above)
    until ``until`` (epoch seconds: not those of the links lost as the run ends)."""
    return sum(1 for e in events(node) if e.get("namespace", "").startswith(
        ("swarm.mesh.dialer", "twisted.application"))
        and datetime.fromisoformat(e["time"]).timestamp() <= until)


async def watch(node: Node, everyone: set[str], deadline: float) -> tuple[float, float]:
    """(when it listened, when its view first held ``everyone``), epoch seconds."""
    listening = None
    while listening is None:
        if node.proc is not None and node.proc.poll() is not None:
            raise Missed(f"{node.node_id} exited with {node.proc.returncode}")
        if time.time() > deadline:
            raise Missed(f"{node.node_id} not listening")
        listening = listened_at(node)
        if listening is None:
            await sleep(POLL)
    client = None
    try:
        while True:
            if time.time() > deadline:
                raise Missed(f"{node.node_id}'s view incomplete")
            try:
                if client is None:
                    client = await SwarmClient.connect(node.url, timeout=5, connect_timeout=2)
                view = await client.nodes()
            except Exception:  # noqa: BLE001  a slow node: ask again
                view = {"nodes": []}
            if {n["id"] for n in view["nodes"]} == everyone:
                return listening, time.time()
            await sleep(VIEW_POLL)
    finally:
        if client is not None:
            await client.close()


def burn(seconds: float) -> list[subprocess.Popen]:
    """One CPU burner per core, each ending by itself after ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", BURNER, str(seconds)])
            for _ in range(os.cpu_count() or 1)]


def kill(processes: list[subprocess.Popen]) -> None:
    """SIGKILL and reap every process of ``processes`` (and forget them)."""
    while processes:
        process = processes.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def run(args: argparse.Namespace, seed: int, workdir: Path,
              processes: list[subprocess.Popen]) -> dict[str, Any]:
    """Start the swarm of one run, wait for every view, kill everything: its figures.
    ``processes`` holds what runs meanwhile, for a stop before the end."""
    order, dials = topology(args.nodes, args.cross, seed)
    options = ["--log-format", "json"]
    nodes = {i: Node(workdir / f"seed{seed}", i, [], options) for i in order}
    for i, node in nodes.items():
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.peers = [nodes[p].url for p in dials[i]]
    if args.busy:
        processes.extend(burn(args.busy_seconds))
    try:
        started = time.time()
        deadline = started + args.deadline
        watching = {}
        for n, i in enumerate(order):
            if n and args.stagger:
                await sleep(args.stagger)
            nodes[i].start()
            processes.append(nodes[i].proc)
            watching[i] = Deferred.fromCoroutine(watch(nodes[i], set(order), deadline))
        times = await gatherResults([watching[i] for i in nodes], consumeErrors=True)
    except Exception as e:
        failure = getattr(e, "subFailure", None)
        print(f"FAILED (seed {seed}): {failure.value if failure else e!r}", file=sys.stderr)
        for node in nodes.values():
            print(node.tail(1500), file=sys.stderr)
        raise SystemExit(1)
    finally:
        kill(processes)
    per_node = dict(zip(nodes, times))
    last_listening = max(t[0] for t in times)
    complete = max(t[1] for t in times)
    lines = {i: dial_lines(n, complete) for i, n in nodes.items()}
    return {
        "seed": seed,
        "to_last_listening": round(last_listening - started, 3),
        "to_complete": round(complete - last_listening, 3),
        "dial_log_lines_max": max(lines.values()),
        "dial_log_lines_total": sum(lines.values()),
        "nodes": {i: {"dials": dials[i], "listening": round(t[0] - started, 3),
                      "complete": round(t[1] - started, 3), "dial_log_lines": lines[i]}
                  for i, t in per_node.items()},
    }


def describe(result: dict[str, Any]) -> str:
    return (f"first start to last listening {result['to_last_listening']:6.2f} s; "
            f"last listening to every view complete {result['to_complete']:6.2f} s; "
            f"dial log lines per node up to {result['dial_log_lines_max']}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swarm.bench_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20, help="twistd nodes (at least 2)")
    parser.add_argument("--cross", type=int, default=3, help="links besides the tree's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="run r uses seed + r")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between one node's start and the next")
    parser.add_argument("--busy", action="store_true", help="a CPU burner per core")
    parser.add_argument("--busy-seconds", type=float, default=120.0,
                        help="the longest a burner runs")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds a run may take from the first start")
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep the nodes' logs in this directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.runs < 1 or args.cross < 0:
        parser.error("--nodes must be at least 2, --runs at least 1, --cross at least 0")
    return args


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    import twisted

    args = parse(argv)
    logs.set_level("warn")
    setup = (f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
             f"{os.cpu_count()} CPUs; {args.nodes} nodes in a random tree + {args.cross} "
             f"cross links; " + (f"busy ({os.cpu_count()} CPU burners)" if args.busy
                                 else "no burners"))
    if not args.json:
        print(setup, flush=True)
    workdir = args.logs or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    results = []
    processes: list[subprocess.Popen] = []
    reactor.addSystemEventTrigger("before", "shutdown", kill, processes)  # on ^C too
    try:
        for r in range(args.runs):
            results.append(await run(args, args.seed + r, workdir, processes))
            if not args.json:
                print(f"run {r + 1} (seed {args.seed + r}): {describe(results[-1])}", flush=True)
    finally:
        if args.logs is None:
            shutil.rmtree(workdir, ignore_errors=True)
    worst = {k: max(r[k] for r in results) for k in
             ("to_last_listening", "to_complete", "dial_log_lines_max")}
    if args.json:
        print(json.dumps({"setup": setup, "busy": args.busy, "runs": results, "max": worst}))
    else:
        print(f"max over {args.runs} runs: {describe(worst)}", flush=True)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
