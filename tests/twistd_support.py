"""Real ``twistd swarmcache`` processes for the tests, on 127.0.0.1 only.

The plugin is found where ``swarm`` is: the installed package (reinstall it with
``pip install .`` after changing ``swarm/``), or the source tree when the tests run with
``PYTHONPATH`` set to it (an absolute path: twistd runs in the tests' directories). Output goes to files, never a pipe that could fill up; every wait
polls a condition against a deadline, nothing sleeps blindly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from swarm.client import SwarmClient

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: How long a node may take to answer /health after the process starts.
START_DEADLINE = 15.0
#: How long a node may take to exit after SIGTERM, or a doomed twistd to give up.
EXIT_DEADLINE = 15.0
POLL = 0.05


#: After a clean shutdown on SIGTERM, twistd (Twisted >= 20.3, twisted/scripts/twistd.py
#: ``app._exitWithSignal``) re-sends itself the signal, so the status is -SIGTERM rather
#: than 0; supervisors such as systemd count that as a clean stop. Either is accepted.
CLEAN_SIGTERM_STATUS = (0, -signal.SIGTERM)

def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> tuple[int, Any]:
    """``GET /health``: (status, parsed body), or (0, error text) when it cannot connect."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


class Twistd:
    """One ``twistd`` process, its stdout and stderr captured in files in ``workdir``."""

    def __init__(self, workdir: Path, args: list[str], name: str = "twistd",
                 port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.port = port
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines reach the files if killed
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [TWISTD, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                cwd=workdir, env=env,
            )

    @property
    def url(self) -> str:
        """Where a node started with a ``port`` takes WebSocket clients."""
        return f"ws://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything it wrote so far: stdout, then stderr."""
        return (self.out_path.read_text(errors="replace")
                + self.err_path.read_text(errors="replace"))

    def describe(self) -> str:
        """Its command line, exit status and the last 4000 characters of its output."""
        return (f"twistd {' '.join(self.args)} (exit {self.proc.poll()}):\n"
                + self.output()[-4000:])

    def wait(self, timeout: float = EXIT_DEADLINE) -> int:
        """Block until it exits; its status. Fails if it still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            msg = f"still running after {timeout}s; {self.describe()}"
            raise AssertionError(msg) from None

    async def exited(self, timeout: float = EXIT_DEADLINE) -> int:
        """Like :meth:`wait`, polling on the reactor instead of blocking it."""

        async def gone() -> bool:
            return self.proc.poll() is not None

        await eventually(gone, "twistd to exit", timeout, self.describe)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL it unless it has already exited."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def spawn(workdir: Path, node_id: str, *options: str, port: int, name: str) -> Twistd:
    """``twistd -n --pidfile= swarmcache --port P --node-id ID *options``, not waiting
    for it to answer (see :func:`named_by_health`)."""
    return Twistd(
        workdir,
        ["-n", "--pidfile=", "swarmcache", "--port", str(port), "--node-id", node_id,
         *options],
        name=name,
        port=port,
    )


def named_by_health(t: Twistd, node_id: str) -> tuple[bool, Any]:
    """(whether /health answers 200 with ``node_id``, what it answered)."""
    code, body = health(t.port)  # type: ignore[arg-type]
    return code == 200 and isinstance(body, dict) and body.get("node") == node_id, \
        (code, body)


def start_node(workdir: Path, node_id: str, *options: str, port: int | None = None,
               name: str | None = None, attempts: int = 5) -> Twistd:
    """``twistd -n --pidfile= swarmcache --port P --node-id ID *options``, once /health
    names it. Without a fixed ``port`` a free one is picked, and another when twistd
    loses the race for it ("cannot listen"); a process that fails to start is killed."""
    for attempt in range(1 if port is not None else attempts):
        p = port or free_port()
        t = spawn(workdir, node_id, *options, port=p, name=f"{name or node_id}-{attempt}")
        try:
            deadline = time.monotonic() + START_DEADLINE
            while t.proc.poll() is None:
                named, (code, body) = named_by_health(t, node_id)
                if named:
                    return t
                if time.monotonic() > deadline:
                    raise AssertionError(f"no healthy /health within {START_DEADLINE}s "
                                         f"(last: {code} {body!r}); {t.describe()}")
                time.sleep(POLL)
        except BaseException:
            t.kill()
            raise
        if "cannot listen" not in t.output():
            raise AssertionError(f"the node exited while starting; {t.describe()}")
    raise AssertionError(f"could not start {node_id}; {t.describe()}")


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float,
                     logs: Callable[[], str] = lambda: "") -> Any:
    """Await ``check()`` every POLL seconds until it returns something true; its
    exceptions count as "not yet". Fails with ``logs()`` after ``timeout`` seconds."""
    from twisted.internet import reactor  # after pytest-twisted installs asyncio's
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
        except Exception as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                 f"(last: {last!r})\n{logs()}")
        await deferLater(reactor, POLL, lambda: None)


# -- swarms of processes, and a link the test can cut ------------------------------------


#: Quick peer pings (interval, timeout) for tests that freeze nodes: the shortest
#: twistd takes (Autobahn's ping timers tick in whole seconds).
FAST_PINGS = (1.0, 1.0)


def ping_options() -> tuple[list[str], float]:
    """(twistd options for quick peer pings, seconds a silent peer takes to be dropped)."""
    interval, timeout = FAST_PINGS
    return ["--ping-interval", str(interval), "--ping-timeout", str(timeout)], \
        interval + timeout


class _Relayed(Protocol):
    """One end of a relayed connection: what it receives goes out of the other end."""

    def __init__(self, forwarder: TcpForwarder) -> None:
        self.forwarder = forwarder
        self.other: _Relayed | None = None

    def pair(self, other: _Relayed) -> None:
        self.other, other.other = other, self
        # a full write buffer on one side pauses reading on the other
        self.transport.registerProducer(other.transport, True)
        other.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.other is not None:
            self.other.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.forwarder.open.discard(self)
        if self.other is not None:
            self.other.transport.loseConnection()


class _Inbound(_Relayed):
    """A connection to the forwarder: dials the target, or is closed at once when cut."""

    def connectionMade(self) -> None:
        forwarder = self.forwarder
        if forwarder.is_cut:
            forwarder.refused += 1
            self.transport.abortConnection()
            return
        forwarder.open.add(self)
        self.transport.pauseProducing()  # nothing is read before the target answers
        outbound = _Relayed(forwarder)
        endpoint = TCP4ClientEndpoint(forwarder.reactor, "127.0.0.1", forwarder.target, 5)
        d = connectProtocol(endpoint, outbound)
        d.addCallbacks(self._connected, lambda _: self.transport.abortConnection())

    def _connected(self, outbound: _Relayed) -> None:
        if self.forwarder.is_cut or self not in self.forwarder.open:
            outbound.transport.abortConnection()
            return
        self.forwarder.open.add(outbound)
        self.pair(outbound)
        self.transport.resumeProducing()


class TcpForwarder:
    """A TCP relay from 127.0.0.1 (port 0) to ``127.0.0.1:target`` in the test process.

    A node dials it instead of its peer (``--peer ws://127.0.0.1:{port}``), so the test
    can cut that one link and restore it without stopping or freezing anybody.
    :meth:`cut` aborts every relayed connection; while cut, new connections are accepted
    and aborted at once, which the node counts as a failed attempt and backs off from
    (up to 30 s), so keep cuts short or wait ~40 s for the link to return.
    """

    def __init__(self, reactor: Any, target: int) -> None:
        self.reactor = reactor
        self.target = target
        self.is_cut = False
        self.refused = 0  # connections aborted because the link was cut
        self.open: set[_Relayed] = set()
        self._port: Any = None

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def url(self) -> str:
        """What a node gives as ``--peer`` to dial the target through this forwarder."""
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> TcpForwarder:
        factory = Factory.forProtocol(lambda: _Inbound(self))
        self._port = await TCP4ServerEndpoint(
            self.reactor, 0, interface="127.0.0.1").listen(factory)
        return self

    def cut(self) -> None:
        """Abort every relayed connection and every new one until :meth:`restore`."""
        self.is_cut = True
        for end in list(self.open):
            end.transport.abortConnection()

    def restore(self) -> None:
        """Relay new connections again (the node redials on its own backoff)."""
        self.is_cut = False

    async def stop(self) -> None:
        self.cut()
        if self._port is not None:
            await self._port.stopListening()
            self._port = None


class Swarm:
    """The named ``twistd`` nodes of one test, a client on each, and the forwarders
    between them; :meth:`close` ends them all.

    Every node gets ``options`` (e.g. ``--replicas 1``) and keeps its port and
    ``--peer``s across :meth:`stop` and :meth:`start` again, as an operator's restart does.
    """

    def __init__(self, workdir: Path, *options: str) -> None:
        self.workdir = workdir
        self.options = list(options)
        self.nodes: dict[str, Twistd] = {}
        self.clients: dict[str, SwarmClient] = {}
        self._peers: dict[str, list[str]] = {}
        self._started: list[Twistd] = []
        self._forwarders: list[TcpForwarder] = []

    def port(self, name: str) -> int:
        return self.nodes[name].port  # type: ignore[return-value]

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def _options(self, name: str, peers: tuple[str, ...]) -> list[str]:
        """The options of node ``name`` dialling ``peers`` (default: those it had)."""
        if peers or name not in self._peers:
            self._peers[name] = list(peers)
        old = self.nodes.get(name)
        assert old is None or old.proc.poll() is not None, f"{name} is still running"
        return [*self.options, *(f"--peer={p}" for p in self._peers[name])]

    def _started_as(self, name: str, proc: Twistd) -> None:
        self._started.append(proc)
        self.nodes[name] = proc

    async def start(self, name: str, *peers: str) -> SwarmClient:
        """Start node ``name`` dialling ``peers`` (URLs; default: those it had), on the port
        it had if it ran before; once /health names it, connect a client to it."""
        options = self._options(name, peers)
        old = self.nodes.get(name)
        self._started_as(name, start_node(
            self.workdir, name, *options, port=old.port if old else None,
            name=f"{name}-{len(self._started)}"))
        return await self.connect(name)

    def launch(self, name: str, *peers: str, port: int | None = None) -> None:
        """Start node ``name`` like :meth:`start`, on ``port`` (default: the one it had,
        else a free one), without waiting: many nodes start at once, each dialling
        peers that may not listen yet. :meth:`until_up` waits for them."""
        options = self._options(name, peers)
        old = self.nodes.get(name)
        port = port or (old.port if old else free_port())
        self._started_as(name, spawn(self.workdir, name, *options, port=port,
                                     name=f"{name}-{len(self._started)}"))

    async def until_up(self, names: list[str], timeout: float = 4 * START_DEADLINE) -> None:
        """Wait until /health names each node of ``names``, and connect a client to each;
        fails at once if one of them exits."""
        waiting = set(names)

        async def up() -> bool | str:
            for name in sorted(waiting):
                proc = self.nodes[name]
                if proc.proc.poll() is not None:
                    return f"{name} exited while starting; {proc.describe()}"
                if named_by_health(proc, name)[0]:
                    waiting.discard(name)
            return not waiting

        answered = await eventually(up, f"{len(names)} nodes to answer /health", timeout,
                                    self.logs)
        assert answered is True, answered
        for name in names:
            await self.connect(name)

    async def connect(self, name: str) -> SwarmClient:
        """A new client connection to ``name`` (a restarted node needs one)."""
        client = await SwarmClient.connect(self.url(name), timeout=10, connect_timeout=5)
        self.clients[name] = client
        return client

    async def stop(self, name: str) -> None:
        """SIGTERM: the node leaves gracefully (hands its entries on); wait until it exits."""
        self.clients.pop(name, None)
        self.nodes[name].proc.send_signal(signal.SIGTERM)
        await self.nodes[name].exited()

    def freeze(self, name: str) -> None:
        """SIGSTOP: its sockets stay open, only the peers' pings can tell."""
        self.nodes[name].proc.send_signal(signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self.nodes[name].proc.send_signal(signal.SIGCONT)

    async def forwarder(self, to: str) -> TcpForwarder:
        """A :class:`TcpForwarder` to node ``to``'s port, stopped by :meth:`close`."""
        from twisted.internet import reactor

        forwarder = await TcpForwarder(reactor, self.port(to)).start()
        self._forwarders.append(forwarder)
        return forwarder

    async def view(self, name: str) -> set[str]:
        """The ids of the nodes that ``name`` can reach, itself included."""
        return {n["id"] for n in (await self.clients[name].nodes())["nodes"]}

    async def until_views(self, views: dict[str, set[str]], what: str,
                          timeout: float) -> None:
        """Wait until each named node reaches exactly the nodes given for it."""

        async def agree() -> bool:
            return all([await self.view(name) == ids for name, ids in views.items()])

        await eventually(agree, what, timeout, self.logs)

    async def until_whole(self, what: str, timeout: float) -> None:
        """Wait until every node reaches every node."""
        everyone = set(self.nodes)
        await self.until_views({n: everyone for n in self.nodes}, what, timeout)

    def logs(self) -> str:
        return "\n".join(p.describe() for p in self._started)

    async def __aenter__(self) -> Swarm:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            for forwarder in self._forwarders:
                await forwarder.stop()
            for client in self.clients.values():
                await close_quietly(client)
        finally:
            for proc in self._started:
                proc.kill()


async def close_quietly(client: SwarmClient, timeout: float = 2.0) -> None:
    """Close ``client``, giving up after ``timeout`` seconds and ignoring errors: its
    node may be frozen or gone, and the processes are killed next anyway."""
    from twisted.internet import reactor

    d = client.close()
    d.addTimeout(timeout, reactor)
    d.addErrback(lambda _: None)
    await d


# -- load while the swarm changes --------------------------------------------------------


class Writer:
    """Overwrites ``keys`` keys in turn with ever larger integers, one write at a time,
    through whichever of ``clients()`` comes next, until :meth:`stop` or ``limit``
    writes. It records the highest value each key was *acknowledged* with and the
    highest it was *sent* with, so :meth:`problems` can tell a lost or stale key (below
    the acknowledged value) from a write that failed but applied (allowed)."""

    def __init__(self, clients: Callable[[], dict[str, SwarmClient]], keys: int = 200,
                 prefix: str = "w", limit: int = 100_000) -> None:
        self.keys = [f"{prefix}{i}" for i in range(keys)]
        self._clients = clients
        self._limit = limit
        self.acked: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.failures: dict[str, int] = {}  # error type or code -> count
        self.acknowledged = 0
        self._stopping = False
        self._done: Any = None

    def start(self) -> Writer:
        from twisted.internet.defer import Deferred

        self._done = Deferred.fromCoroutine(self._run())
        return self

    async def _run(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for n in range(1, self._limit + 1):
            if self._stopping:
                return
            clients = list(self._clients().values())
            if not clients:
                await deferLater(reactor, POLL, lambda: None)
                continue
            key = self.keys[n % len(self.keys)]
            self.sent[key] = n
            try:
                await clients[n % len(clients)].set(key, n)
            except Exception as e:
                name = getattr(e, "code", None) or type(e).__name__
                self.failures[name] = self.failures.get(name, 0) + 1
                await deferLater(reactor, 0.01, lambda: None)  # a dead node: move on
            else:
                self.acked[key] = n
                self.acknowledged += 1

    async def until(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` more writes have been acknowledged."""
        target = self.acknowledged + count

        async def enough() -> bool:
            return self.acknowledged >= target

        await eventually(enough, f"{count} acknowledged writes", timeout)

    async def stop(self) -> None:
        self._stopping = True
        await self._done

    async def problems(self, client: SwarmClient) -> list[str]:
        """What ``client`` reads that breaks the rules: a key missing or older than its
        last acknowledged write, or a value never sent."""
        acked = dict(self.acked)  # before the read: what it must see at least
        values = await client.mget(self.keys)
        sent = dict(self.sent)  # after the read: a write sent meanwhile may show
        found = []
        for key, least in acked.items():
            value = values.get(key)
            if value is None:
                found.append(f"{key} missing (acknowledged {least})")
            elif not least <= value <= sent[key]:
                found.append(f"{key} = {value} (acknowledged {least}, sent up to "
                             f"{sent[key]})")
        return found
