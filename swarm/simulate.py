"""What a change costs as the swarm grows: ``python -m swarm.simulate``.

Builds in-memory swarms (:mod:`swarm.simulator`: real node cores and peer sessions, one
simulated clock, a latency on every link) in the shapes people deploy, then applies the
changes a swarm lives through, one after another, and measures each:

* ``converge``: simulated seconds from the change until the last view change on any node,
  with every node's view then equal to the nodes its links reach (checked);
* ``msgs`` and ``bytes``: membership messages (everything but requests and replies) and
  their encoded size, in total and on the busiest link (both directions);
* ``placement`` and ``routes``: CPU milliseconds one node spent recomputing key placement
  and next hops for the change (mean over the nodes that were there before it, and the
  most any of them spent; a joining node's first table, built whole, is ``joiner ms``);
* ``moved``: the fraction of partitions whose owners changed.

Shapes: ``tree`` (random), ``ring``, ``hubs`` (a full mesh of site hubs, each the root of
a random tree of leaves) and ``line`` (always ``--line`` nodes long). Changes: ``join``
(a new node links to one node), ``leave`` (it stops gracefully), ``crash`` (a node whose
loss splits nothing), ``cut``/``heal`` (one link; in a tree that splits the swarm in
two) and ``partition``/``merge`` (about a third of the swarm loses every link to the
rest, then gets them back).

Everything is seeded: the same arguments give the same figures but for the CPU times.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from swarm.cluster.placement import PARTITIONS, Placement
from swarm.mesh.peer_wire import encode_peer_frame
from swarm.simulator import SimConnection, Swarm

SHAPES = ("tree", "ring", "hubs", "line")
CHANGES = ("join", "leave", "crash", "cut", "heal", "partition", "merge")
#: Messages that carry requests and their replies; everything else is membership.
_REQUEST_TYPES = frozenset({"req", "rep", "breq", "brep"})
#: Simulated seconds without a membership message that count as quiet.
QUIET = 1.0
#: Simulated seconds a change may take before the run gives up on it.
LIMIT = 120.0


def edges_of(shape: str, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """The links of a swarm of ``n`` nodes (indexes 0..n-1) in ``shape``."""
    if shape == "tree":
        return [(i, rng.randrange(i)) for i in range(1, n)]
    if shape == "line":
        return [(i - 1, i) for i in range(1, n)]
    if shape == "ring":
        return [(i, (i + 1) % n) for i in range(n)] if n > 2 else edges_of("line", n, rng)
    if shape == "hubs":
        hubs = max(2, round(n ** 0.5 / 2))
        edges = [(a, b) for a in range(hubs) for b in range(a + 1, hubs)]
        sites: dict[int, list[int]] = {h: [h] for h in range(hubs)}
        for leaf in range(hubs, n):
            site = sites[leaf % hubs]
            edges.append((leaf, rng.choice(site)))
            site.append(leaf)
        return edges
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


@dataclass
class Row:
    shape: str
    nodes: int
    change: str
    converge_s: float
    messages: int
    bytes: int
    busiest_link_bytes: int
    placement_ms_mean: float
    placement_ms_max: float
    routes_ms_mean: float
    routes_ms_max: float
    moved: float
    #: CPU ms of a joining node's first, whole placement (0 for other changes)
    newcomer_placement_ms: float = 0.0


class Meter:
    """Counts membership traffic on every connection and the CPU each node spends on
    its view, by wrapping the swarm's connections and nodes as they appear."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.messages = 0
        self.bytes = 0
        self.per_link: dict[frozenset, int] = defaultdict(int)
        self.placement_cpu: dict[str, float] = defaultdict(float)
        self.routes_cpu: dict[str, float] = defaultdict(float)
        self.last_change = 0.0  # simulated time of the latest view change anywhere
        self.last_message = 0.0
        self._wrapped: set[int] = set()
        self._connections = 0

    def reset(self) -> None:
        self.messages = self.bytes = 0
        self.per_link.clear()
        self.placement_cpu.clear()
        self.routes_cpu.clear()
        self.last_change = self.last_message = self.swarm.clock.seconds()

    def watch(self) -> None:
        """Wrap what appeared since the last call (new nodes, restarts, new links)."""
        for node in self.swarm.nodes.values():
            core = node.core
            if core is not None and id(core) not in self._wrapped:
                self._wrapped.add(id(core))
                self._time(core.router, "_placement_of", self.placement_cpu, node.id)
                self._time(core.overlay.membership, "_recompute", self.routes_cpu, node.id)
                self._time(core.router, "view_changed", None, node.id)
        for conn in self.swarm.connections[self._connections:]:
            self._count(conn)
        self._connections = len(self.swarm.connections)

    def _time(self, obj, name: str, into: dict | None, node: str) -> None:
        """Add the CPU time of each call of ``obj.name`` to ``into[node]``; with
        ``into`` None, note when it was last called (a view change)."""
        inner = getattr(obj, name)
        clock = self.swarm.clock

        def timed(*args, **kwargs):
            if into is None:
                self.last_change = clock.seconds()
                return inner(*args, **kwargs)
            collecting = gc.isenabled()
            gc.disable()  # a collection of the whole simulation's heap is no node's CPU
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                into[node] += time.process_time() - started
                if collecting:
                    gc.enable()

        setattr(obj, name, timed)

    def _count(self, conn: SimConnection) -> None:
        inner, key = conn._send, frozenset(conn.nodes)

        def send(i: int, messages: list[dict]) -> None:
            membership = [m for m in messages if m.get("t") not in _REQUEST_TYPES]
            if membership and not conn.ends[i].closed and not conn.ends[i].node.frozen:
                size = len(encode_peer_frame(membership))
                self.messages += len(membership)
                self.bytes += size
                self.per_link[key] += size
                self.last_message = self.swarm.clock.seconds()
            inner(i, messages)

        conn._send = send


class Simulation:
    """One swarm of one shape, and the changes applied to it in turn."""

    def __init__(self, shape: str, n: int, latency: float, replicas: int, seed: int):
        self.shape, self.rng = shape, random.Random(seed)
        self.swarm = Swarm(latency=latency, replicas=replicas)
        self.edges = [(f"n{a}", f"n{b}") for a, b in edges_of(shape, n, self.rng)]
        self.meter = Meter(self.swarm)
        for i in range(n):
            self.swarm.add(f"n{i}")
        self.meter.watch()
        for a, b in self.edges:
            self.swarm.link(a, b)
        self.settle("the swarm to form")
        self._share_first_placement(replicas)
        self._joined: str | None = None
        self._cut: list[tuple[str, str]] = []

    def _share_first_placement(self, replicas: int) -> None:
        """Give every node the placement of its formed view, built once for all nodes
        with the same view: what is measured is what each change costs each node
        after that (its first table, built whole, is the joiner's figure)."""
        shared: dict[frozenset[str], Placement] = {}
        for node in self._running():
            owners = node.core.overlay.membership.owners
            if owners not in shared:
                shared[owners] = Placement(owners, replicas)
            node.core.router.placement = shared[owners]

    # -- measuring --------------------------------------------------------------------

    def settle(self, what: str) -> float:
        """Run until membership is quiet and every view agrees; the time of the last
        view change since :meth:`Meter.reset` (or the start)."""
        swarm, meter, clock = self.swarm, self.meter, self.swarm.clock
        deadline = clock.seconds() + LIMIT
        while True:
            meter.watch()
            quiet_since = max(meter.last_message, meter.last_change)
            if clock.seconds() - quiet_since >= QUIET and self._agreed():
                return meter.last_change
            if clock.seconds() > deadline:
                raise AssertionError(f"not within {LIMIT}s of simulated time: {what}")
            swarm.run(0.05)

    def _agreed(self) -> bool:
        live = [n for n in self.swarm.nodes.values() if n.running and not n.frozen]
        seen: dict[str, frozenset] = {}
        for node in live:
            if node.id not in seen:
                component = self.swarm._component(node)
                for other in component:
                    seen[other] = component
            if node.view != seen[node.id]:
                return False
        return True

    def measure(self, change: str, act: Callable[[], None]) -> Row:
        before = {n.id: n.core.router.placement for n in self._running()}
        touched = self._touched()
        self.meter.reset()
        started = self.swarm.clock.seconds()
        act()
        last = self.settle(change)
        for node in self._running():  # each node places its new view (counted)
            node.core.router.placement
        # what moved, as a node that was there throughout and whose links stayed sees it
        touched |= self._touched()
        reference = next(n for n in self._running() if n.id in before and n.id not in touched)
        old, new = before[reference.id], reference.core.router.placement
        moved = sum(old.owners_of_partition(p) != new.owners_of_partition(p)
                    for p in range(PARTITIONS)) / PARTITIONS
        meter = self.meter
        # a node new to the swarm builds its first table whole: that is shown apart
        nodes = [n for n in self._running() if n.id in before]
        placement = [meter.placement_cpu.get(n.id, 0.0) * 1000 for n in nodes]
        routes = [meter.routes_cpu.get(n.id, 0.0) * 1000 for n in nodes]
        newcomers = [meter.placement_cpu.get(n.id, 0.0) * 1000 for n in self._running()
                     if n.id not in before]
        return Row(
            self.shape, len(self._running()), change, round(max(0.0, last - started), 3),
            meter.messages, meter.bytes, max(meter.per_link.values(), default=0),
            round(sum(placement) / len(nodes), 3), round(max(placement), 3),
            round(sum(routes) / len(nodes), 3), round(max(routes), 3), round(moved, 4),
            round(max(newcomers, default=0.0), 3),
        )

    def _touched(self) -> set[str | None]:
        return {self._joined, *(node for link in self._cut for node in link)}

    def _running(self) -> list:
        return [n for n in self.swarm.nodes.values() if n.running]

    # -- changes ----------------------------------------------------------------------

    def join(self) -> None:
        self._joined = "joiner"
        anchor = self.rng.choice(sorted(n.id for n in self._running()))
        self.swarm.add(self._joined)
        self.swarm.link(self._joined, anchor)

    def leave(self) -> None:
        self.swarm.stop(self._joined)

    def crash(self) -> None:
        """Crash a node whose loss leaves the rest connected (a leaf of a tree)."""
        graph = self._graph()
        victims = [n for n in sorted(graph) if _connected(graph, without=n)]
        self.swarm.crash(self.rng.choice(victims))

    def cut(self) -> None:
        links = sorted({tuple(sorted(c.nodes)) for n in self.swarm.nodes
                        for c in self.swarm.open_connections(n)})
        self._cut = [self.rng.choice(links)]
        self.swarm.cut(*self._cut[0])

    def heal(self) -> None:
        for a, b in self._cut:
            self.swarm.link(a, b)
        self._cut = []

    def partition(self) -> None:
        """Cut every link between about a third of the swarm (a connected part of it)
        and the rest."""
        graph = self._graph()
        start = self.rng.choice(sorted(graph))
        part, frontier = {start}, [start]
        while frontier and len(part) < len(graph) // 3:
            here = frontier.pop(0)
            for other in sorted(graph[here]):
                if other not in part and len(part) < len(graph) // 3:
                    part.add(other)
                    frontier.append(other)
        self._cut = sorted({tuple(sorted((a, b))) for a in part for b in graph[a]
                            if b not in part})
        for a, b in self._cut:
            self.swarm.cut(a, b)

    merge = heal

    def _graph(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {n.id: set() for n in self._running()}
        for node in graph:
            for conn in self.swarm.open_connections(node):
                graph[node].update(set(conn.nodes) - {node})
        return graph


def _connected(graph: dict[str, set[str]], without: str) -> bool:
    rest = set(graph) - {without}
    if not rest:
        return False
    start = next(iter(rest))
    seen, todo = {start}, [start]
    while todo:
        for other in graph[todo.pop()]:
            if other != without and other not in seen:
                seen.add(other)
                todo.append(other)
    return seen == rest


def simulate(shapes: Iterable[str], sizes: Iterable[int], changes: Iterable[str],
             latency: float = 0.01, replicas: int = 2, seed: int = 1, line: int = 50,
             progress: Callable[[str], None] = lambda _: None) -> list[Row]:
    """The rows of every (shape, size, change); a line's size is always ``line``."""
    rows = []
    for shape in shapes:
        for n in sorted({line} if shape == "line" else set(sizes)):
            started = time.monotonic()
            sim = Simulation(shape, n, latency, replicas, seed)
            progress(f"{shape} of {n}: formed in {time.monotonic() - started:.1f} s")
            # A thousand nodes in one process make a heap no node has: leave what the
            # formed swarm holds out of the collections that follow (faster runs).
            gc.collect()
            gc.freeze()
            try:
                for change in changes:
                    rows.append(sim.measure(change, getattr(sim, change)))
                    progress(_format([rows[-1]], header=False))
            finally:
                del sim
                gc.unfreeze()
                gc.collect()
    return rows


_COLUMNS = (("shape", "shape", "{}"), ("nodes", "nodes", "{}"), ("change", "change", "{}"),
            ("converge s", "converge_s", "{:.3f}"), ("msgs", "messages", "{}"),
            ("bytes", "bytes", "{}"), ("busiest link B", "busiest_link_bytes", "{}"),
            ("placement ms", "placement_ms_mean", "{:.2f}"),
            ("(max)", "placement_ms_max", "{:.2f}"),
            ("routes ms", "routes_ms_mean", "{:.2f}"), ("(max)", "routes_ms_max", "{:.2f}"),
            ("moved", "moved", "{:.1%}"), ("joiner ms", "newcomer_placement_ms", "{:.1f}"))


def _format(rows: list[Row], header: bool = True) -> str:
    cells = [[fmt.format(getattr(r, attr)) for _, attr, fmt in _COLUMNS] for r in rows]
    heads = [title for title, _, _ in _COLUMNS]
    widths = [max(len(c) for c in col) for col in zip(heads, *cells)]
    lines = [heads] if header else []
    lines += cells
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


#: What the plot shows against the swarm's size, one panel each.
_PANELS = (("converge_s", "simulated s until every view agrees"),
           ("messages", "membership messages per change"),
           ("placement_ms_mean", "CPU ms per node: placement"),
           ("routes_ms_mean", "CPU ms per node: next hops"))


#: How the plot draws each shape (line style) and change (colour).
_STYLES = {"tree": "-", "hubs": "--", "ring": ":", "line": "-."}
_COLOURS = dict(zip(CHANGES, ("C0", "C1", "C3", "C4", "C5", "C2", "C6")))


def plot(rows: list[Row], path: str, changes: Iterable[str] = CHANGES) -> None:
    """Each panel of :data:`_PANELS` against the swarm's size, a line per shape (its
    style) and change (its colour) among ``changes``, log-log; needs matplotlib
    (``pip install matplotlib``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    lines: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        if row.change in changes:
            lines[row.shape, row.change].append(row)
    for ax, (attr, title) in zip(axes.flat, _PANELS):
        for (shape, change), points in sorted(lines.items()):
            points.sort(key=lambda r: r.nodes)
            ax.plot([r.nodes for r in points], [max(getattr(r, attr), 1e-3) for r in points],
                    _STYLES[shape], marker="o", color=_COLOURS[change],
                    label=f"{shape} {change}")
        ax.set(title=title, xlabel="nodes", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize="x-small", ncol=2)
    figure.savefig(path)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,30,100",
                        help="swarm sizes, comma-separated (default: 10,30,100)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"shapes, comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--changes", default=",".join(CHANGES),
                        help=f"changes in the order applied, of {', '.join(CHANGES)}")
    parser.add_argument("--line", type=int, default=50, help="a line's length (50)")
    parser.add_argument("--latency", type=float, default=0.01,
                        help="seconds each frame takes over a link (0.01)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas (2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--plot", metavar="FILE",
                        help="also plot cost against size to FILE (.png, .svg; matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        shapes, changes = args.shapes.split(","), args.changes.split(",")
        for name, given, known in (("shape", shapes, SHAPES), ("change", changes, CHANGES)):
            unknown = set(given) - set(known)
            if unknown:
                raise ValueError(f"unknown {name} {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(known)}")
        if min(sizes) < 3 or args.line < 3:
            raise ValueError("a swarm here has at least 3 nodes")
    except ValueError as e:
        parser.error(str(e))
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (before hours of simulation, not after)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")
    progress = (lambda _: None) if args.quiet else (
        lambda line: print(line, file=sys.stderr, flush=True))
    rows = simulate(shapes, sizes, changes, args.latency, args.replicas, args.seed,
                    args.line, progress)
    print(_format(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
