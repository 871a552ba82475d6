"""python -m swarm.simulate: swarms of each shape go through each change and converge,
and the figures it reports are the ones the swarm produced."""

import json
import random

import pytest

from swarm.cluster.placement import Placement
from swarm.simulate import CHANGES, SHAPES, Simulation, edges_of, main, simulate


@pytest.mark.parametrize("shape", ["tree", "ring", "hubs", "line"])
def test_each_shape_is_connected_with_the_links_it_promises(shape):
    edges = edges_of(shape, 40, random.Random(3))
    graph = {i: set() for i in range(40)}
    for a, b in edges:
        graph[a].add(b)
        graph[b].add(a)
    seen, todo = {0}, [0]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    assert seen == set(graph)
    expected = {"tree": 39, "line": 39, "ring": 40}
    if shape in expected:
        assert len(edges) == expected[shape]
    else:  # a full mesh of 3 hubs, and a tree of leaves under each
        assert len(edges) == 3 + 37 and {(0, 1), (0, 2), (1, 2)} <= set(edges)


def test_every_change_converges_and_is_measured():
    rows = {r.change: r for r in simulate(["tree"], [12], CHANGES, latency=0.01, seed=5)}
    assert list(rows) == list(CHANGES)
    join, leave, crash = rows["join"], rows["leave"], rows["crash"]
    assert (join.nodes, leave.nodes, crash.nodes) == (13, 12, 11)
    # a join reaches a tree's far side a few 10 ms hops later, not at once, not seconds
    assert 0.01 <= join.converge_s <= 0.5
    # with 2 replicas, a 13th node takes about 2/13 of the partitions, and gives them
    # back when it leaves
    assert 0.10 <= join.moved <= 0.21 and leave.moved == join.moved
    for row in rows.values():
        assert row.messages > 0 and row.bytes >= row.busiest_link_bytes > 0
        assert row.placement_ms_max >= row.placement_ms_mean > 0
    # a partition and its merge move most of a third's partitions for those cut off
    assert rows["partition"].moved > 0.3 and rows["merge"].moved == rows["partition"].moved


def test_membership_traffic_of_a_join_grows_with_the_links_not_faster():
    """A join floods a few announcements over every link once: messages per link stay
    about the same from 10 to 40 nodes."""
    per_link = []
    for n in (10, 40):
        (row,) = simulate(["tree"], [n], ["join"], seed=2)
        per_link.append(row.messages / n)  # a tree of n + 1 nodes has n links
    assert per_link[1] <= 1.5 * per_link[0]


def test_the_moved_fraction_is_what_placement_says():
    sim = Simulation("ring", 8, latency=0.01, replicas=2, seed=1)
    row = sim.measure("join", sim.join)
    before = Placement([f"n{i}" for i in range(8)], 2)
    after = Placement([*before.nodes, "joiner"], 2)
    changed = sum(before.owners_of_partition(p) != after.owners_of_partition(p)
                  for p in range(4096))
    assert row.moved == round(changed / 4096, 4)


def test_command_line_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--sizes", "5", "--shapes", "ring", "--changes", "join,crash",
                 "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["shape", "nodes", "change", "converge"]
    assert [line.split()[:3] for line in table[1:]] == [
        ["ring", "6", "join"], ["ring", "5", "crash"]]
    rows = json.loads(out.read_text())
    assert [(r["shape"], r["change"]) for r in rows] == [("ring", "join"), ("ring", "crash")]


def test_the_plot_is_an_image_of_each_panel(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cost.svg"
    assert main(["--sizes", "4,6", "--shapes", "line,ring", "--line", "5",
                 "--changes", "join", "--plot", str(out), "--quiet"]) == 0
    svg = out.read_text()
    assert svg.startswith("<?xml") and "membership messages per change" in svg
    assert "ring join" in svg and "line join" in svg


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "star"], "unknown shape star"),
    (["--changes", "join,explode"], "unknown change explode"),
    (["--sizes", "2"], "at least 3 nodes"),
    (["--sizes", "ten"], "invalid literal"),
])
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_shapes_and_changes_are_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in (*SHAPES, *CHANGES))
