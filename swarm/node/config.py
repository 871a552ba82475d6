"""NodeConfig: every setting of one node in one frozen object.

``twistd swarmcache`` builds it from its options (:meth:`NodeConfig.from_options`), an
embedding application from keyword arguments (``SwarmNode(port, node_id=..., peers=...)``),
and the in-memory simulator directly, so the settings are declared once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from swarm.cluster.router import DEFAULT_REQUEST_TIMEOUT
from swarm.protocol.wire import Limits

DEFAULT_PORT = "tcp:8765:interface=127.0.0.1"
DEFAULT_MAX_MEMORY = 128 * 1024 * 1024
DEFAULT_MAX_VALUE_SIZE = 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
DEFAULT_SWARM = "swarmcache"
#: Peer links are pinged this often; a peer silent for interval + timeout is dropped.
DEFAULT_PING_INTERVAL = 1.0
DEFAULT_PING_TIMEOUT = 2.0
#: TCP connections a listener holds at once (clients, peers and /health together).
DEFAULT_MAX_CONNECTIONS = 1024
#: Seconds a connection may take from TCP accept to an open WebSocket (or an HTTP reply).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds a client connection may stay open with no frame from the client (0: never).
DEFAULT_IDLE_TIMEOUT = 300.0
#: Requests of one client connection being worked on at once; past it, the node stops
#: reading that connection until replies drain.
DEFAULT_MAX_IN_FLIGHT = 1024


def new_node_id() -> str:
    return "node-" + os.urandom(4).hex()


#: twistd options whose NodeConfig field has another name.
_RENAMED = {"peer": "peers", "allowed-origin": "allowed_origins"}


@dataclass(frozen=True)
class NodeConfig:
    """A node's settings; see ``twistd swarmcache --help`` for what each one does."""

    node_id: str = field(default_factory=new_node_id)
    swarm: str = DEFAULT_SWARM
    port: Any = DEFAULT_PORT  # an endpoint description, a port number or an endpoint
    peer_port: Any = None
    #: Where GET /metrics is served alone, with no token (None: on the client port only).
    metrics_port: Any = None
    peers: tuple[str, ...] = ()
    replicas: int = 1
    write_ack: str = "all"
    max_memory: int = DEFAULT_MAX_MEMORY
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    default_ttl: float | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    limits: Limits = Limits()
    #: The swarm's shared secret: peers prove they hold it before they link (None: open).
    peer_secret: bytes | None = field(default=None, repr=False)
    #: CA certificates (PEM file) that wss:// peers are verified against (None: the
    #: system's trust store).
    peer_ca: str | None = None
    #: A file of client tokens, one a line, read at start and on SIGHUP (None: no tokens).
    client_token_file: str | None = None
    #: Browser origins allowed without a token (``*``: any); others are refused.
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if not self.node_id:  # None or "" from an option left out
            object.__setattr__(self, "node_id", new_node_id())
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        if self.peer_secret is not None and not self.peer_secret:
            raise ValueError("peer_secret must not be empty")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or (
            self.replicas < 1
        ):
            raise ValueError(f"replicas must be a whole number of at least 1: {self.replicas!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "NodeConfig":
        """From ``twistd swarmcache`` options (dashed names; ``peer`` is the list of
        ``--peer`` URLs); options it does not know are left out."""
        names = {f.name for f in fields(cls)}
        given = {}
        for option, value in options.items():
            name = _RENAMED.get(option, option.replace("-", "_"))
            if name in names:
                given[name] = value
        return cls(**given)
