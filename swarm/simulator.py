"""An in-memory swarm on one clock: real node cores and peer sessions, no sockets.

Each :class:`SimNode` is a :class:`~swarm.node.core.NodeCore`, the same one a real node
runs, and each link is a pair of :class:`~swarm.mesh.session.PeerSession`\\ s whose
messages cross as encoded peer frames after a per-link latency. Everything runs on one
``task.Clock``, so a test of a join, a leave, a handoff, a freeze, a cut and a heal is
deterministic and takes milliseconds. What the network would do is modelled:

* a cut closes both ends of a link at once (as a killed process's sockets close);
* a frozen node receives and sends nothing; its neighbors drop their links to it after
  ``ping_interval + ping_timeout``, as Autobahn's pings do; when it thaws it finds those
  connections closed, and its links are dialled again (:meth:`Swarm.thaw`);
* each node has its own wall clock (an offset from the shared one), which feeds its
  hybrid logical clock only: TTLs and timers run on the shared monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, LoopingCall
from twisted.python.failure import Failure

from swarm.mesh.peer_wire import decode_peer_frame, encode_peer_frame
from swarm.mesh.session import PeerSession
from swarm.node.config import NodeConfig
from swarm.node.core import NodeCore
from swarm.simclock import HeapClock

#: The shared wall clock starts here (seconds since the epoch), so versions look real.
EPOCH = 1_800_000_000.0
#: Simulated time between steps while waiting for something.
STEP = 0.01
SWEEP_INTERVAL = 0.1


class SimNode:
    """One node of the simulated swarm: its core, its wall-clock offset, its state."""

    def __init__(self, swarm: "Swarm", config: NodeConfig) -> None:
        self.swarm = swarm
        self.config = config
        self.id = config.node_id
        self.wall_offset = 0.0
        self.frozen = False
        self.running = False
        self.core: NodeCore | None = None
        self._sweeper: LoopingCall | None = None

    def wall(self) -> float:
        return EPOCH + self.swarm.clock.seconds() + self.wall_offset

    def start(self) -> None:
        """Start afresh: an empty store and a new incarnation (a process restart)."""
        clock = self.swarm.clock
        self.core = NodeCore(self.config, clock, wall=self.wall, monotonic=clock)
        self.core.start()
        self.running = True
        self._sweeper = LoopingCall(self.core.store.sweep, 500)
        self._sweeper.clock = clock
        self._sweeper.start(SWEEP_INTERVAL, now=False)

    def halt(self) -> None:
        """Stop at once, with nothing handed over (a crash)."""
        self.running = False
        self.core.stop()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()

    def request(self, op: str, **args: Any) -> Deferred:
        return self.core.request(op, **args)

    @property
    def store(self):
        return self.core.store

    @property
    def view(self) -> frozenset[str]:
        return self.core.overlay.membership.reachable

    def __repr__(self) -> str:
        return f"<SimNode {self.id}{' frozen' if self.frozen else ''}>"


@dataclass
class _End:
    """One side of a connection: the session of ``node`` talking to ``peer``."""

    node: SimNode
    peer: SimNode
    session: PeerSession | None = None
    closed: bool = False
    held: list[bytes] = field(default_factory=list)  # frames waiting while frozen


class SimConnection:
    """A connection between two nodes: frames cross after ``latency`` seconds."""

    def __init__(self, swarm: "Swarm", a: SimNode, b: SimNode, latency: float) -> None:
        self.swarm = swarm
        self.latency = latency
        self.ends = (_End(a, b), _End(b, a))
        for i, end in enumerate(self.ends):
            end.session = PeerSession(
                end.node.core.overlay,
                lambda messages, i=i: self._send(i, messages),
                lambda code, reason, i=i: self._close(i, code, reason),
                address=f"sim:{end.peer.id}",
            )
        for end in self.ends:
            end.session.start()

    @property
    def nodes(self) -> tuple[str, str]:
        return (self.ends[0].node.id, self.ends[1].node.id)

    @property
    def open(self) -> bool:
        return not any(end.closed for end in self.ends)

    @property
    def gone(self) -> bool:
        """Both ends have seen the close (a frozen end has not, until it thaws)."""
        return all(end.closed for end in self.ends)

    def _send(self, i: int, messages: list[dict]) -> None:
        if self.ends[i].closed or self.ends[i].node.frozen:
            return  # a frozen process sends nothing
        frame = encode_peer_frame(messages)
        self.swarm.clock.callLater(self.latency, self._arrive, 1 - i, frame)

    def _arrive(self, i: int, frame: bytes) -> None:
        end = self.ends[i]
        if end.closed:
            return
        if end.node.frozen:
            end.held.append(frame)
            return
        end.session.received(decode_peer_frame(frame, True))

    def _close(self, i: int, code: int, reason: str) -> None:
        """End ``i`` closes: both ends see the connection go, the other with the code."""
        self.swarm.clock.callLater(0, self.lose, reason, code, i)

    def close_after_flight(self, reason: str) -> None:
        """A WebSocket close: the frames already sent arrive first, then the close
        (frames and close both take ``latency``, and the clock keeps their order)."""
        self.swarm.clock.callLater(self.latency, self.lose, reason)

    def lose(self, reason: str, code: int | None = None, closer: int | None = None) -> None:
        """The connection is gone; each end not frozen learns it now."""
        for i, end in enumerate(self.ends):
            if not end.closed and not end.node.frozen:
                end.closed = True
                end.held.clear()
                end.session.connection_lost(reason, None if i == closer else code)

    def thawed(self, node: SimNode) -> None:
        """``node`` thaws: it reads what arrived meanwhile (TCP delivers buffered data
        before the close), then finds the connection closed if the peer dropped it."""
        for i, end in enumerate(self.ends):
            if end.node is node and not end.closed:
                held, end.held = end.held, []
                for frame in held:
                    if not end.closed:
                        end.session.received(decode_peer_frame(frame, True))
                if self.ends[1 - i].closed and not end.closed:
                    end.closed = True
                    end.session.connection_lost("connection lost while frozen")


class Swarm:
    """Nodes and connections on one clock. Build, change, then wait for conditions."""

    def __init__(self, latency: float = 0.001, clock: Clock | None = None, **config: Any) -> None:
        self.clock = clock or HeapClock()
        self.latency = latency
        self.defaults = config
        self.nodes: dict[str, SimNode] = {}
        self.connections: list[SimConnection] = []
        #: Each node's connections until both ends have seen them close.
        self._attached: dict[str, list[SimConnection]] = {}

    # -- building ---------------------------------------------------------------------

    def add(self, node_id: str, **config: Any) -> SimNode:
        node = SimNode(self, NodeConfig(node_id=node_id, **{**self.defaults, **config}))
        self.nodes[node_id] = node
        node.start()
        return node

    def link(self, a: str, b: str, latency: float | None = None) -> SimConnection:
        conn = SimConnection(self, self.nodes[a], self.nodes[b],
                             self.latency if latency is None else latency)
        self.connections.append(conn)
        for node_id in {a, b}:
            self._attached.setdefault(node_id, []).append(conn)
        return conn

    def build(self, count: int, edges, settle: bool = True) -> list[SimNode]:
        """Nodes n0..n{count-1} linked by ``edges`` (pairs of indexes); waits until
        every node sees all of them, unless ``settle`` is False."""
        nodes = [self.add(f"n{i}") for i in range(count)]
        for a, b in edges:
            self.link(f"n{a}", f"n{b}")
        if settle:
            self.settle()
        return nodes

    def __getitem__(self, node_id: str) -> SimNode:
        return self.nodes[node_id]

    # -- changes ----------------------------------------------------------------------

    def open_connections(self, a: str, b: str | None = None) -> list[SimConnection]:
        attached = self._attached.get(a, [])
        attached[:] = [c for c in attached if not c.gone]
        return [c for c in attached if c.open and (b is None or b in c.nodes)]

    def cut(self, a: str, b: str) -> None:
        """Cut every connection between ``a`` and ``b``, both ends at once."""
        for conn in self.open_connections(a, b):
            conn.lose("link cut")

    def freeze(self, node_id: str) -> None:
        """SIGSTOP: the node does nothing; its neighbors drop it after the ping
        timeout, as their pings go unanswered."""
        node = self.nodes[node_id]
        node.frozen = True
        silence = node.config.ping_interval + node.config.ping_timeout
        conns = self.open_connections(node_id)
        self.clock.callLater(silence, self._drop_silent, node, conns)

    def _drop_silent(self, node: SimNode, conns: list[SimConnection]) -> None:
        if node.frozen:
            for conn in conns:
                conn.lose("peer did not answer pings")

    def thaw(self, node_id: str, redial: bool = True) -> None:
        """SIGCONT: the node reads what is left, finds dropped connections closed, and
        (with ``redial``) every link that was dropped is dialled again."""
        node = self.nodes[node_id]
        node.frozen = False
        dropped = []
        for conn in list(self._attached.get(node_id, [])):
            was_open_here = any(e.node is node and not e.closed for e in conn.ends)
            conn.thawed(node)
            if was_open_here and not conn.open:
                dropped.append(conn)
        if redial:
            for conn in dropped:
                self.link(*conn.nodes, latency=conn.latency)

    def heal(self, a: str, b: str) -> SimConnection:
        return self.link(a, b)

    def crash(self, node_id: str) -> list[tuple[str, str]]:
        """SIGKILL: the node stops and its connections close; the links it had."""
        node = self.nodes[node_id]
        links = [c.nodes for c in self.open_connections(node_id)]
        node.halt()
        for conn in self.open_connections(node_id):
            conn.lose("connection lost")
        return links

    def stop(self, node_id: str) -> list[tuple[str, str]]:
        """A graceful stop: leave, hand everything over, drain, then close each
        connection behind what it carries; the links it had."""
        node = self.nodes[node_id]
        self.wait(node.core.leave(), timeout=30)
        links = self.close(node_id)
        node.halt()
        return links

    def close(self, node_id: str) -> list[tuple[str, str]]:
        """Close the node's connections as a stopping node does, each behind the frames
        it carries; the links it had."""
        conns = self.open_connections(node_id)
        for conn in conns:
            conn.close_after_flight("node shutting down")
        self.until(lambda: not any(c.open for c in conns), what="the connections to close")
        return [c.nodes for c in conns]

    def restart(self, node_id: str, links=None, graceful: bool = True) -> SimNode:
        """Stop (or crash) the node, start it again afresh, and link it as before."""
        links = self.stop(node_id) if graceful else self.crash(node_id)
        self.nodes[node_id].start()
        for a, b in links if links is not None else ():
            self.link(a, b)
        return self.nodes[node_id]

    def step_wall_clock(self, node_id: str, seconds: float) -> None:
        self.nodes[node_id].wall_offset += seconds

    # -- waiting ----------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (on a HeapClock, call by call, each
        at its own time)."""
        clock = self.clock
        end = clock.seconds() + seconds
        if isinstance(clock, HeapClock):
            while (due := clock.next_due()) is not None and due <= end:
                clock.advance_to(due)
            clock.advance_to(end)
            return
        while clock.seconds() < end:
            clock.advance(min(STEP, end - clock.seconds()))

    def until(self, condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        """Advance time until ``condition()`` holds; fail after ``timeout`` simulated s."""
        deadline = self.clock.seconds() + timeout
        while not (result := condition()):
            if self.clock.seconds() >= deadline:
                raise AssertionError(f"not within {timeout}s of simulated time: "
                                     f"{what or condition}")
            self.run(STEP)
        return result

    def wait(self, d: Deferred, timeout: float = 30.0) -> Any:
        """The result of ``d``, advancing time until it fires (raises its failure)."""
        results: list = []
        d.addBoth(results.append)
        self.until(lambda: results, timeout, "a Deferred to fire")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def call(self, node_id: str, op: str, **args: Any) -> dict:
        """Run one op through ``node_id`` as a client would; the success reply."""
        return self.wait(self.nodes[node_id].request(op, **args))

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every running node that is not frozen sees all the others that
        its connections can reach, then let handoffs finish."""
        def agreed() -> bool:
            live = [n for n in self.nodes.values() if n.running and not n.frozen]
            return all(n.view == self._component(n) for n in live)

        self.until(agreed, timeout, "the views to agree")
        self.run(1.0)  # rebalancing settles after a change, then hands over

    def _component(self, node: SimNode) -> frozenset[str]:
        """The nodes joined to ``node`` by open connections (what its view should be)."""
        seen, todo = {node.id}, [node.id]
        while todo:
            here = todo.pop()
            for conn in self.open_connections(here):
                for other in conn.nodes:
                    peer = self.nodes[other]
                    if other not in seen and peer.running and not peer.frozen:
                        seen.add(other)
                        todo.append(other)
        return frozenset(seen)
