"""Tests for python -m swarm.bench: it measures every mode and prints the comparison."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from swarm import bench, bench_compare
from swarm.bench import MODES, Result, main, parse

REDIS_CSV = '''"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","606060.62","1.087","0.320","0.887","2.207","2.847","3.055"
"GET","1000000.00","0.535","0.160","0.479","0.863","0.959","1.063"
'''


def test_result_gives_rate_percentiles_and_cpu_per_request():
    result = Result(200, 0.5, [i / 1000 for i in range(100, 0, -1)], cpu=0.002)
    assert result.rate == 400
    assert result.percentile(50) == pytest.approx(50.0)
    assert result.percentile(99) == pytest.approx(99.0)
    assert result.cpu_us == pytest.approx(10.0)
    assert Result(1, 1.0, []).percentile(50) is None and Result(1, 1.0, []).cpu_us is None


def test_redis_benchmark_csv_is_read_per_command():
    results = bench_compare.parse_csv(REDIS_CSV, 20000)
    assert set(results) == {"set", "get"}
    assert results["get"].rate == pytest.approx(1_000_000)
    assert results["set"].percentile(50) == pytest.approx(0.887)
    assert results["set"].percentile(99) == pytest.approx(2.847)


def test_report_sets_the_swarm_beside_redis_with_ratios_and_targets(capsys):
    swarm = {
        ("batched", "get", 0): Result(1000, 0.02, [], cpu=0.008),  # 50,000/s, 8 µs/get
        ("batched", "get", 2): Result(1000, 0.04, []),  # 25,000/s
        ("sequential", "get", 0): Result(100, 1.0, [0.0003] * 100),
    }
    redis = bench_compare.parse_csv(REDIS_CSV, 20000)
    bench_compare.report(swarm, {"P16": redis, "c1": redis})
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "0.05x" in lines["get batched at the owner vs -P 16 -c 50, ops/s"]
    assert "0.300" in lines["get sequential p50 at the owner vs -c 1, ms"]
    assert "0.63x" in lines["get sequential p50 at the owner vs -c 1, ms"]
    assert "8.0" in lines["get batched at the owner: nodes' CPU per get, µs"]
    assert "0.50x  >= 0.5x" in lines["get batched 2 hop(s) / at the owner"]


def test_options_are_checked():
    assert parse([]).modes == list(MODES)
    assert parse(["--modes", "auto,batched"]).modes == ["auto", "batched"]
    for bad in (["--modes", "fast"], ["--in-flight", "0"], ["--url", "ws://x", "--compare"]):
        with pytest.raises(SystemExit):
            parse(bad)


@pytest_twisted.ensureDeferred
async def test_the_in_process_bench_measures_every_mode_at_every_distance(capsys, monkeypatch):
    monkeypatch.setattr(bench, "SETTLE", 0.1)
    monkeypatch.setattr(bench.logs, "set_level", lambda level: None)  # global: keep it
    await main(reactor, ["--ops", "40", "--seconds", "2", "--depth", "8", "--batch", "16",
                         "--in-flight", "2", "--connections", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    measured = {(r[0], r[1], r[2], int(r[3])) for r in rows if r and r[0] in ("line-3", "1-node")}
    expected = {("line-3", m, op, hops) for m in MODES for op in ("set", "get")
                for hops in range(3)}
    expected |= {("1-node", m, op, 0) for m in MODES for op in ("set", "get")}
    assert measured == expected
    rates = [float(r[4]) for r in rows if r and r[0] in ("line-3", "1-node")]
    assert all(rate > 0 for rate in rates)


@pytest_twisted.ensureDeferred
async def test_compare_runs_twistd_nodes_and_says_when_redis_is_missing(capsys, monkeypatch):
    monkeypatch.setattr(bench, "SETTLE", 0.1)
    monkeypatch.setattr(bench_compare.shutil, "which", lambda name: None)
    await bench_compare.compare(reactor, parse([
        "--compare", "--ops", "40", "--seconds", "2", "--modes", "sequential,batched",
        "--batch", "16", "--connections", "2"]))
    out = capsys.readouterr().out
    assert "redis-server or redis-benchmark is not installed" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("twistd-3")]
    assert {(r[1], r[2], int(r[3])) for r in rows} == {
        (m, op, hops) for m in ("sequential", "batched") for op in ("set", "get")
        for hops in range(3)}
    assert "get batched 2 hop(s) / at the owner" in out
