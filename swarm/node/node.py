"""SwarmNode: one cache node as a Twisted MultiService, and its embedding API.

A node owns its store and query router and listens with one twisted.web Site (clients
at ``/``, peers at ``/peer``, ``GET /health``, ``GET /metrics``). It runs under twistd (see
:mod:`swarm.node.tap`) or inside an existing Twisted application::

    node = SwarmNode("tcp:0:interface=127.0.0.1")
    node.setServiceParent(application)
    d = node.set("greeting", "hello")    # Deferred, like swarm.client.SwarmClient

The embedding methods run through the same validation and router as network requests.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure

import swarm
from swarm.edge.protocol import ClientFactory, FrameHandler
from swarm.edge.web import build_metrics_site, build_site
from swarm.logs import logger
from swarm.mesh.dialer import Upstream
from swarm.mesh.protocol import PeerServerFactory
from swarm.node.config import DEFAULT_PORT, NodeConfig
from swarm.node.core import NodeCore
from swarm.node.metrics import metrics_resource, registry_of
from swarm.protocol.api import CacheOps
from swarm.store.interface import IStore

_log = logger(__name__)

#: How often the store's active expiry runs, and how much it may do per run.
SWEEP_INTERVAL = 0.1
SWEEP_LIMIT = 500
#: How long a stopping node waits for clients to acknowledge its close.
CLOSE_GRACE = 2.0
#: How long past --request-timeout a stopping node waits for the replies to requests
#: it has read (each is answered by then, if only with ``timeout``, unless its client
#: does not read what it is sent).
DRAIN_SLACK = 1.0


def endpoint_description(port: str | int) -> str:
    """A bare port number listens on loopback only, like the default; say
    ``tcp:PORT`` to listen on every interface."""
    text = str(port).strip()
    return f"tcp:{text}:interface=127.0.0.1" if text.isdigit() else text


def _endpoint(reactor, port: str | int | IStreamServerEndpoint) -> IStreamServerEndpoint:
    if isinstance(port, (str, int)):
        return serverFromString(reactor, endpoint_description(port))
    return port


class _Listener(Service):
    """Listens on the node's endpoint; on stop, closes the port and every connection.

    A listen that fails at once (a busy port) fails the start. One that fails later (an
    endpoint whose Deferred fails after ``listen`` returns) comes too late for that: it
    is logged as critical and fails :meth:`when_listening`, never taken for success.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, site, factories, clock) -> None:
        self.endpoint = endpoint
        self.site = site
        self.factories = factories
        self.clock = clock
        self.port: IListeningPort | None = None
        #: Why the endpoint does not listen, once it has said so.
        self.failure: Failure | None = None
        self.listening: Deferred | None = None
        self._waiting: list[Deferred] = []

    def privilegedStartService(self) -> None:
        # Listen here, before twistd drops privileges and starts the reactor, so a
        # port already in use fails the start at once with CannotListenError.
        super().privilegedStartService()
        self.failure = None
        self.listening = self.endpoint.listen(self.site)
        self.listening.addCallbacks(self._listened, self._not_listening)
        if self.failure is not None:
            self.failure.raiseException()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        _log.info("listening on {address}", address=port.getHost())
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _not_listening(self, failure: Failure) -> None:
        self.failure = failure
        # Not running yet: the start raises it. Not running any more: a stop cancelled it.
        if self.running:
            address, reason = self.explain(failure)
            _log.critical("cannot listen on {address}: {reason}",
                          address=address or self.endpoint, reason=reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    @staticmethod
    def explain(failure: Failure) -> tuple[str | None, str]:
        """(address, reason) of a failure to listen, as an operator reads them; the
        address is None when the failure names none (tcp:99999 fails in bind())."""
        e = failure.value
        if isinstance(e, CannotListenError):
            address = e.port if e.interface is None else f"{e.interface or '*'}:{e.port}"
            return str(address), str(getattr(e.socketError, "strerror", None) or e.socketError)
        return None, failure.getErrorMessage()

    def when_listening(self) -> Deferred:
        """The port once it listens, or the failure that says it will not."""
        if self.port is not None:
            return succeed(self.port)
        if self.failure is not None:
            return fail(self.failure)
        if self.listening is None:
            raise RuntimeError("the node is not started")
        waiting: Deferred = Deferred()
        self._waiting.append(waiting)
        return waiting

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        if self.listening is not None and self.port is None and self.failure is None:
            self.listening.cancel()  # still trying: the stop ends that
        port, self.port, self.listening, self.failure = self.port, None, None, None
        stopped = maybeDeferred(port.stopListening) if port else succeed(None)
        return DeferredList([stopped, self._close_connections()])

    def _close_connections(self) -> Deferred:
        protocols = [p for f in self.factories for p in list(f.connections)]
        for p in protocols:
            # 1001 "going away" (Autobahn's sendClose only allows 1000 and 3000+). A
            # client connection closes through its session, which reads again (it
            # stopped reading to drain) so that the client's answer arrives.
            going_away = getattr(p, "going_away", None)
            if going_away is not None:
                going_away()
            else:
                p.sendCloseFrame(code=1001, reasonUtf8=b"node shutting down")
        closed = DeferredList([f.when_all_closed() for f in self.factories])

        def abort_stragglers() -> None:
            for p in protocols:
                if p.transport is not None:
                    p.transport.abortConnection()

        timer = self.clock.callLater(CLOSE_GRACE, abort_stragglers)
        closed.addBoth(lambda r: timer.active() and timer.cancel())
        return closed


class SwarmNode(MultiService, CacheOps):
    """A swarmcache node. Give it a parent service, or run it under twistd."""

    def __init__(
        self,
        port: str | int | IStreamServerEndpoint = DEFAULT_PORT,
        *,
        reactor: Any = None,
        store: IStore | None = None,
        config: NodeConfig | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`~swarm.node.config.NodeConfig` fields (``node_id``,
        ``peers``, ``replicas``, ...), or give a whole ``config`` instead."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config = config if config is not None else NodeConfig(port=port, **options)
        self.core = core = NodeCore(config, reactor, store=store, extra_stats=self._node_stats)
        # The parts, by their names (tests and embedding applications look at them).
        self.node_id, self.replicas = config.node_id, config.replicas
        self.store, self.parser = core.store, core.parser
        self.overlay, self.router, self.rebalancer = core.overlay, core.router, core.rebalancer
        self.client_factory = ClientFactory(
            FrameHandler(self.parser, self.router), config, reactor
        )
        self._ping = (config.ping_interval, config.ping_timeout)
        self.peer_factory = PeerServerFactory(self.overlay, *self._ping)
        peer_resource = WebSocketResource(self.peer_factory)
        factories: list = [self.client_factory, self.peer_factory]
        self.upstreams: list[Upstream] = []
        # With a peer port, peers use only that one: the client port can face users
        # while the peer port stays behind a firewall.
        peer_port = config.peer_port
        #: This node's Prometheus registry (GET /metrics), read at scrape time.
        self.metrics = registry_of(self)
        metrics = metrics_resource(self.metrics)
        self._listener = _Listener(
            _endpoint(reactor, config.port),
            build_site(
                self.client_factory, None if peer_port else peer_resource, self._health,
                config, reactor, metrics=metrics,
            ),
            factories, reactor,
        )
        self._listener.setServiceParent(self)
        self._peer_listener = self._listener
        if peer_port is not None:
            self._peer_listener = _Listener(
                _endpoint(reactor, peer_port),
                build_site(None, peer_resource, self._health, config, reactor), [], reactor,
            )
            self._peer_listener.setServiceParent(self)
        self._metrics_listener: _Listener | None = None
        if config.metrics_port is not None:
            self._metrics_listener = _Listener(
                _endpoint(reactor, config.metrics_port),
                build_metrics_site(metrics, config, reactor), [], reactor,
            )
            self._metrics_listener.setServiceParent(self)
        for url in config.peers:
            self.add_peer(url)
        sweeper = TimerService(SWEEP_INTERVAL, self.store.sweep, SWEEP_LIMIT)
        sweeper.clock = reactor
        sweeper.setServiceParent(self)
        self._started_at: float | None = None
        self._stopping = False

    def add_peer(self, url: str) -> Upstream:
        """Keep a link to the node at ``url`` (ws://host:port, or wss:// checked against
        ``peer_ca``), from now on."""
        upstream = Upstream(url, self.overlay, self.reactor, *self._ping,
                            ca_file=self.config.peer_ca)
        self.upstreams.append(upstream)
        self._listener.factories.append(upstream.factory)
        upstream.setServiceParent(self)
        return upstream

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        self._started_at = self.reactor.seconds()
        self._stopping = False
        self.client_factory.draining = False
        self.core.start()  # started again after a stop: an owner once more
        super().startService()
        _log.info(
            "swarmcache {version} node {node} started", version=swarm.__version__,
            node=self.node_id,
        )
        self._peer_listener.when_listening().addCallbacks(self._say_who_may_link,
                                                          lambda _: None)
        self.when_listening().addCallbacks(lambda _: self._say_listening(), lambda _: None)

    def listeners(self) -> dict[str, _Listener]:
        """Each listener by what it serves: ``client`` (peers too, without a
        --peer-port), ``peer`` and ``metrics`` when they have endpoints of their own."""
        found = {"client": self._listener}
        if self._peer_listener is not self._listener:
            found["peer"] = self._peer_listener
        if self._metrics_listener is not None:
            found["metrics"] = self._metrics_listener
        return found

    def _say_listening(self) -> None:
        """One line that says where the node listens, whom it dials, and whether it is
        open or protected."""
        config = self.config
        metrics = [_ws_url(listener, "http") + "/metrics"
                   for listener in (self._listener, self._metrics_listener) if listener]
        _log.info(
            "node {node} listening: clients at {clients}, peers at {peers}, metrics at "
            "{metrics}; dialing {dialing}; client tokens {tokens}, peer secret {secret}, "
            "allowed origins {origins}",
            node=self.node_id, clients=self.url, peers=self.peer_url + "/peer",
            metrics=", ".join(metrics), dialing=", ".join(config.peers) or "no one",
            tokens="on" if config.client_token_file else "off",
            secret="on" if config.peer_secret is not None else "off",
            origins=", ".join(config.allowed_origins) or "none",
        )

    def _say_who_may_link(self, port) -> None:
        """Peer links without a secret: said at start, loudly when others can reach it."""
        if self.config.peer_secret is not None:
            _log.info("peer links need the swarm's secret (--secret-file)")
            return
        host = getattr(port.getHost(), "host", None)
        if host is None or _is_loopback(host):
            _log.info("peer links are not authenticated (no --secret-file); they listen "
                      "on {address} only", address=host or "a local socket")
        else:
            _log.warn(
                "PEER LINKS ARE OPEN TO ANYONE WHO CAN REACH {address}: with no "
                "--secret-file any program can join the swarm, read and change every "
                "key. Give every node the same --secret-file, or listen on loopback "
                "(docs/security.md)", address=host)

    def stopService(self) -> Deferred:
        """Read no more from clients and answer what was read; then hand this node's
        entries to their next owners and close everything."""
        _log.info("node {node} stopping", node=self.node_id)
        self._stopping = True
        return self._drain_clients().addCallback(lambda _: self._leave())

    def _leave(self) -> Deferred:
        self.core.stop()
        return self.core.leave().addCallback(lambda _: MultiService.stopService(self))

    def _drain_clients(self) -> Deferred:
        """Fires once every request read from a client is answered, or after
        --request-timeout + DRAIN_SLACK (a client that does not read its replies)."""
        done: Deferred = Deferred()
        pending = self.client_factory.pending()
        limit = self.config.request_timeout + DRAIN_SLACK

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                if pending:
                    _log.info("answered the {count} client requests read before the stop",
                              count=pending)
                done.callback(None)

        def give_up() -> None:
            _log.warn("stopping with {count} client requests unanswered after {seconds} s "
                      "(their clients do not read)", count=self.client_factory.pending(),
                      seconds=limit)
            done.callback(None)

        timer = self.reactor.callLater(limit, give_up)
        self.client_factory.drain().addCallback(finished)
        return done

    def when_listening(self) -> Deferred:
        """Fires with the client IListeningPort once the node listens on all its
        endpoints (start it first); fails as soon as one cannot, even late."""
        listeners = dict.fromkeys(self.listeners().values())
        every = DeferredList([listener.when_listening() for listener in listeners],
                             fireOnOneErrback=True, consumeErrors=True)
        return every.addCallbacks(lambda ports: ports[0][1], lambda f: f.value.subFailure)

    @property
    def url(self) -> str:
        """ws:// URL of the client endpoint (TCP listeners only)."""
        return _ws_url(self._listener)

    @property
    def peer_url(self) -> str:
        """ws:// URL other nodes dial (``--peer``) to link to this one."""
        return _ws_url(self._peer_listener)

    # -- embedding API ----------------------------------------------------------------

    def request(self, op: str, **args: Any) -> Deferred:
        """Run one op in-process, validated and routed as if it came from a client."""
        return self.core.request(op, **args)

    # -- reports ----------------------------------------------------------------------

    def _node_stats(self) -> dict:
        return {
            "version": swarm.__version__,
            "uptime_s": round(self.reactor.seconds() - (self._started_at or 0), 3),
            "connections": len(self.client_factory.connections),
        }

    def _health(self) -> tuple[bool, dict]:
        """(serving, body): 503 while stopping, or while the swarm refuses this node's
        id because another live node has it (the body says why)."""
        serving = bool(self.running) and not self._stopping and self._listener.port is not None
        conflict = self.overlay.conflict
        body = {
            "status": "stopping" if not serving else "conflict" if conflict else "ok",
            "node": self.node_id,
            "version": swarm.__version__,
        }
        if conflict is not None:
            body["reason"] = conflict
        return serving and conflict is None, body


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ws_url(listener: _Listener, scheme: str = "ws") -> str:
    """The ``scheme``:// URL of a listener (``wss``/``https`` over TLS); a non-TCP
    listener (unix:) is named by its address."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    host = listener.port.getHost()
    if not hasattr(host, "port"):
        return str(host)
    tls = isinstance(getattr(listener.port, "factory", None), TLSMemoryBIOFactory)
    return f"{scheme}{'s' if tls else ''}://{host.host}:{host.port}"
