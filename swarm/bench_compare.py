"""``python -m swarm.bench --compare``: the swarm beside Redis, on this machine, in one run.

Three ``twistd swarmcache`` processes in a line A <- B <- C (default options, one copy
per key), measured once their views are complete and settled, the benchmark's client
on A; every mode of :mod:`swarm.bench`, with the nodes'
CPU time per request read from ``/proc``. Then a ``redis-server`` on a free port (no
persistence) and ``redis-benchmark`` with the same value size and the same kinds of load:
``-P 16 -c 50`` beside the batched mode, ``-P 1 -c 50`` beside 50 connections one request
at a time, ``-P 1 -c 1`` beside sequential requests. Last, the ratios and the targets of
issue 9. Without ``redis-server`` and ``redis-benchmark`` on the PATH it says so and
prints the swarm's figures alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from swarm import bench
from swarm.bench import VALUE, Result, remote_table
from swarm.bench_failover import Missed, Node, free_port, sleep, until

#: The nodes of the line, each dialling the one before it.
LINE = ("A", "B", "C")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_line(workdir: Path) -> list[Node]:
    nodes: list[Node] = []
    for name in LINE:
        peers = [nodes[-1].url] if nodes else []
        node = Node(workdir, name, peers, options=["--log-level", "warn"])
        node.start()
        nodes.append(node)
    for node in nodes:
        await node.connect()

    async def complete() -> bool:
        for node in nodes:
            if len((await node.client.nodes())["nodes"]) != len(LINE):
                return False
        return True

    await until(complete, "a complete view on every node", 30)
    for node in nodes:
        await node.client.close()
    await sleep(bench.SETTLE)
    return nodes


class Redis:
    """A throwaway ``redis-server`` on 127.0.0.1 and ``redis-benchmark`` against it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )

    def connect(self, timeout: float = 10) -> socket.socket:
        """A connection to the server once it listens (it has just been started)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise Missed(f"redis-server exited with {self.proc.returncode}")
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except OSError:
                if time.monotonic() > deadline:
                    raise Missed(f"redis-server not listening within {timeout:g} s") from None
                time.sleep(0.05)

    def bench(self, requests: int, pipeline: int, clients: int) -> dict[str, Result]:
        """``redis-benchmark`` of SET and GET: a Result per command (rate, p50, p99)."""
        out = subprocess.run(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.port), "-t", "set,get",
             "-n", str(requests), "-d", str(len(VALUE)), "-r", "100000",
             "-P", str(pipeline), "-c", str(clients), "--csv"],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout
        return parse_csv(out, requests)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def parse_csv(text: str, requests: int) -> dict[str, Result]:
    """``redis-benchmark --csv`` output: a Result per command (rate, p50 and p99)."""
    results = {}
    for row in csv.DictReader(io.StringIO(text)):
        p50, p99 = (float(row[f"p{p}_latency_ms"]) / 1000 for p in (50, 99))
        # a hundred latencies whose nearest-rank p50 and p99 are redis-benchmark's
        latencies = [p50] * 50 + [p99] * 50
        results[row["test"].split()[0].lower()] = Result(
            requests, requests / float(row["rps"]), latencies)
    return results


async def compare(reactor: Any, args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    nodes: list[Node] = []
    redis: Redis | None = None
    try:
        nodes = await start_line(workdir)
        pids = [n.proc.pid for n in nodes if n.proc is not None]
        swarm = await remote_table(
            "twistd-3", nodes[0].url, reactor, args,
            cpu=lambda: sum(cpu_seconds(pid) for pid in pids),
        )
        for node in nodes:  # now, so they take no CPU from Redis's run
            node.kill()
        if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
            print("\nredis-server or redis-benchmark is not installed: no comparison "
                  "(on Debian: apt-get install redis-server)")
            report(swarm, {})
            return
        redis = Redis(workdir)
        redis.connect().close()
        big = max(args.ops, 200_000)
        loads = {
            "P16": redis.bench(big, 16, 50),
            "P1": redis.bench(big // 2, 1, 50),
            "c1": redis.bench(args.ops, 1, 1),
        }
        report(swarm, loads)
    finally:
        for node in nodes:
            node.kill()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(swarm: dict, redis: dict[str, dict[str, Result]]) -> None:
    """The comparison table: each swarm figure beside Redis's and the targets."""
    print()
    header = f"{'comparison':<44} {'swarm':>10} {'redis':>10} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))

    def row(what: str, ours: float | None, theirs: float | None, target: str,
            digits: int = 0) -> None:
        ratio = f"{ours / theirs:6.2f}x" if ours is not None and theirs else f"{'':>7}"
        fmt = f"{{:>10,.{digits}f}}"
        print(f"{what:<44} {fmt.format(ours) if ours is not None else '':>10} "
              f"{fmt.format(theirs) if theirs is not None else '':>10} {ratio}  {target}")

    def at(mode: str, op: str, hops: int) -> Result | None:
        return swarm.get((mode, op, hops))

    def redis_at(load: str, op: str) -> Result | None:
        return redis.get(load, {}).get(op)

    for op in ("get", "set"):
        ours, theirs = at("batched", op, 0), redis_at("P16", op)
        row(f"{op} batched at the owner vs -P 16 -c 50, ops/s",
            ours and ours.rate, theirs and theirs.rate, ">= 0.15x" if op == "get" else "")
    for op in ("get", "set"):
        ours, theirs = at("conns", op, 0), redis_at("P1", op)
        row(f"{op}, 50 connections, 1 per frame vs -P 1 -c 50",
            ours and ours.rate, theirs and theirs.rate, ">= 15,000/s" if op == "get" else "")
    for p in (50, 99):
        ours, theirs = at("sequential", "get", 0), redis_at("c1", "get")
        row(f"get sequential p{p} at the owner vs -c 1, ms",
            ours and ours.percentile(p), theirs and theirs.percentile(p),
            "p50 <= 0.250 ms" if p == 50 else "", digits=3)
    owner = at("batched", "get", 0)
    cpu = owner.cpu_us if owner else None
    row("get batched at the owner: nodes' CPU per get, µs", cpu, None, "<= 8 µs", digits=1)
    for hops, target in ((1, ">= 0.7x"), (2, ">= 0.5x")):
        far = at("batched", "get", hops)
        if far and owner and owner.rate:
            print(f"{f'get batched {hops} hop(s) / at the owner':<44} "
                  f"{far.rate:>10,.0f} {owner.rate:>10,.0f} "
                  f"{far.rate / owner.rate:6.2f}x  {target}")
