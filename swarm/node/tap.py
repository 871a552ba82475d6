"""``twistd swarmcache``: command-line options and the service they build."""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys

from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.python.failure import Failure

from swarm import logs
from swarm.cluster.router import WRITE_ACKS
from swarm.mesh.dialer import peer_endpoint_description
from swarm.mesh.peer_wire import MAX_REQUEST_MS
from swarm.node.config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_VALUE_SIZE,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SWARM,
    NodeConfig,
)
from swarm.node.node import SwarmNode, endpoint_description

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
          "g": 1024**3, "gb": 1024**3}


def parse_size(text: str) -> int:
    """``"64mb"`` -> 67108864; a plain number is bytes."""
    t = text.strip().lower()
    digits = t.rstrip("kmgb")
    unit = t[len(digits):]
    if unit not in _UNITS or not digits:
        raise usage.UsageError(f"not a size: {text!r} (try 65536, 512kb, 64mb, 1gb)")
    try:
        size = int(float(digits) * _UNITS[unit])
    except ValueError:
        raise usage.UsageError(f"not a size: {text!r}") from None
    if size <= 0:
        raise usage.UsageError(f"a size must be positive: {text!r}")
    return size


def _number(kind: type, what: str, low: float, high: float, *, above: bool = False):
    """A coercer for usage.Options: ``text`` -> ``kind`` within [low, high], or within
    (low, high] when the value must be ``above`` low."""

    def coerce(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"not {what}: {text!r}") from None
        if not ((low < value) if above else (low <= value)) or not value <= high:
            bound = (f"at least {low:g}" if high == math.inf and not above
                     else f"in {'(' if above else '['}{low:g}, {high:g}]")
            raise usage.UsageError(f"{what} must be {bound}: {text!r}")
        return value

    return coerce


_positive_int = _number(int, "a whole number", 1, math.inf)
_seconds = _number(float, "a number of seconds", 0, 1e9)
#: A request's time left travels to peers in ms, at most a day (peer_wire.MAX_REQUEST_MS).
_request_seconds = _number(float, "a number of seconds", 0, MAX_REQUEST_MS / 1000, above=True)
#: Autobahn times its pings with txaio's batched timer, which cuts each deadline down
#: to a whole second: a ping timeout under 1 s gives up before the pong can come back,
#: and an interval under 1 s sends pings back to back for part of every second.
_ping_seconds = _number(float, "a number of seconds", 1, 1e9)
_timeout_seconds = _number(float, "a number of seconds", 0, 1e6, above=True)
#: The shortest secret accepted: a short one can be guessed offline from one handshake.
MIN_SECRET_BYTES = 16


def read_secret(path: str) -> bytes:
    """The secret in ``path``, surrounding whitespace removed; a clear error if the
    file cannot be read or holds too little."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise usage.UsageError(f"--secret-file: cannot read {path!r}: {e.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise usage.UsageError(
            f"--secret-file: {path!r} holds {len(secret)} bytes; a secret needs at least "
            f"{MIN_SECRET_BYTES} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


def _token_file(path: str) -> str:
    """A client token file that holds at least one token (read again by the node)."""
    from swarm.edge.admission import TokenFile

    try:
        TokenFile(path)
    except ValueError as e:
        raise usage.UsageError(f"--client-token-file: {e}") from None
    return path


def _ca_file(path: str) -> str:
    """A PEM file holding at least one CA certificate."""
    from swarm.protocol.urls import trust_root

    try:
        trust_root(path)
    except OSError as e:
        raise usage.UsageError(f"--peer-ca: cannot read {path!r}: {e.strerror}") from None
    except ValueError as e:
        raise usage.UsageError(f"--peer-ca: {e}") from None
    return path


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run one swarmcache node: a key=>value cache that clients reach over "
        "WebSocket (JSON or CBOR frames) and that links to other nodes with --peer."
    )
    optParameters = [
        ["port", "p", DEFAULT_PORT,
         "Endpoint to listen on: a Twisted endpoint description "
         "(tcp:8765:interface=0.0.0.0, ssl:..., unix:/path) or a bare port number "
         "(loopback only)."],
        ["node-id", None, None, "This node's id in the swarm (default: random)."],
        ["max-memory", None, DEFAULT_MAX_MEMORY,
         "Memory budget for entries; LRU eviction keeps within it (e.g. 256mb).",
         parse_size],
        ["max-value-size", None, DEFAULT_MAX_VALUE_SIZE,
         "Largest value accepted (e.g. 1mb).", parse_size],
        ["max-message-size", None, DEFAULT_MAX_MESSAGE_SIZE,
         "Largest WebSocket message accepted from clients; larger ones close the "
         "connection with status 1009.", parse_size],
        ["default-ttl", None, 0.0,
         "Seconds to keep entries written without a ttl (0: no expiry).", _seconds],
        ["peer-port", None, None,
         "Endpoint for peer links (at /peer); when given, --port serves clients only. "
         "Default: peers use /peer on --port."],
        ["metrics-port", None, None,
         "Endpoint that serves GET /metrics alone, with no client token, e.g. for an "
         "internal interface (/metrics on --port checks tokens like /)."],
        ["swarm", None, DEFAULT_SWARM,
         "Swarm name; links between nodes of different swarms are refused."],
        ["replicas", None, 1,
         "How many nodes hold each key: every write goes to each of them.", _positive_int],
        ["write-ack", None, "all",
         "With --replicas above 1, acknowledge a write once every reachable owner has "
         "applied it (all) or once the primary has (one)."],
        ["request-timeout", None, DEFAULT_REQUEST_TIMEOUT,
         "Seconds a request may take end to end, hops included (at most a day).",
         _request_seconds],
        ["ping-interval", None, DEFAULT_PING_INTERVAL,
         "Seconds between pings on each peer link, at least 1; a peer silent for "
         "ping-interval + ping-timeout is dropped.", _ping_seconds],
        ["ping-timeout", None, DEFAULT_PING_TIMEOUT,
         "Seconds a peer may take to answer a ping; at least 1.", _ping_seconds],
        ["peer-ca", None, None,
         "PEM file of CA certificates that wss:// peers are verified against "
         "(default: the system's trust store).", _ca_file],
        ["client-token-file", None, None,
         "File of client tokens, one a line (blank lines and # comments ignored), reread "
         "on SIGHUP; clients then present one (Authorization: Bearer, or ?token=) or are "
         "refused.",
         _token_file],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "TCP connections held at once on each listening endpoint (clients, peers and "
         "/health); past it new ones are closed at once.", _positive_int],
        ["handshake-timeout", None, DEFAULT_HANDSHAKE_TIMEOUT,
         "Seconds a connection may take to complete its HTTP request or WebSocket "
         "handshake, and may idle between HTTP requests; a peer has as long again "
         "to say hello and prove the secret.", _timeout_seconds],
        ["idle-timeout", None, DEFAULT_IDLE_TIMEOUT,
         "Seconds a client connection may stay quiet (no frame from it, no reply to it, "
         "nothing being worked on) before it is closed with status 1000 'idle' (0: never).",
         _seconds],
        ["max-in-flight", None, DEFAULT_MAX_IN_FLIGHT,
         "Requests of one client connection worked on at once; past it the node reads "
         "no more from that connection until replies drain.", _positive_int],
        ["log-level", None, "info", "One of: " + ", ".join(logs.LEVELS) + "."],
        ["log-format", None, "text",
         "How log lines are written: text, or json (one JSON object a line, for log "
         "shippers)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []
        self["allowed-origin"] = []

    def opt_secret_file(self, path: str) -> None:
        """File of the swarm's shared secret (16+ bytes) that peers must prove to link."""
        self["peer-secret"] = read_secret(path)

    def opt_allowed_origin(self, origin: str) -> None:
        """Browser Origin allowed without a token (https://app.example, *; never null)."""
        self["allowed-origin"].append(origin.rstrip("/"))

    def opt_peer(self, url: str) -> None:
        """URL of a node to keep a link to (ws://host:port or wss://); repeatable."""
        try:
            peer_endpoint_description(url)
        except ValueError as e:
            raise usage.UsageError(f"--peer: {e}") from None
        self["peer"].append(url)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for option in ("port", "peer-port", "metrics-port"):
            if self[option] is None:
                continue
            try:
                serverFromString(reactor, endpoint_description(self[option]))
            except (ValueError, TypeError) as e:
                raise usage.UsageError(
                    f"--{option} {self[option]!r} is not an endpoint: {e}"
                ) from None
        if self["write-ack"] not in WRITE_ACKS:
            raise usage.UsageError(f"--write-ack must be one of {', '.join(WRITE_ACKS)}")
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(logs.LEVELS)}"
            )
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(logs.FORMATS)}"
            )


class NotListening(SystemExit, Exception):
    """An endpoint that twistd cannot listen on, said in one line.

    An Exception, so that twistd's runner reports it to a daemon's waiting parent (which
    then prints it and exits 1) and removes the pidfile; a SystemExit, so that the
    process then ends with status 1 and this line rather than a traceback.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.code = f"swarmcache: {self}"


def _exit_failed() -> None:
    """End the process with status 1, once what it wrote is flushed."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(1)


class _TwistdNode(SwarmNode):
    """Under twistd, an endpoint that cannot listen ends the process with status 1 and
    one line that names it, whether it fails at once or once the reactor runs."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception:
            # Each listener and what it was asked to listen on (without a --peer-port,
            # one listener: --port's).
            asked = {self._metrics_listener: self.config.metrics_port,
                     self._peer_listener: self.config.peer_port,
                     self._listener: self.config.port}
            for listener, description in asked.items():
                if listener is not None and listener.failure is not None:
                    address, reason = listener.explain(listener.failure)
                    address = address or endpoint_description(description)
                    raise NotListening(address, reason) from None
            raise

    def __init__(self, config: NodeConfig, log_observer=None) -> None:
        super().__init__(config=config)
        self._log_observer = log_observer

    def setServiceParent(self, parent) -> None:
        """twistd's application: with ``--log-format json`` it logs through this
        node's observer, which twistd installs in place of its own text one."""
        if self._log_observer is not None:
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self.when_listening().addErrback(self._failed_late)
        # twistd leaves SIGHUP to its default (end the process): reread tokens instead
        signal.signal(signal.SIGHUP,
                      lambda *_: self.reactor.callFromThread(self.reload_tokens))

    def reload_tokens(self) -> None:
        """Read ``--client-token-file`` again (SIGHUP); a bad file keeps the old tokens."""
        for listener in {self._listener, self._peer_listener}:
            listener.site.admission.reload()

    def _failed_late(self, failure: Failure) -> None:
        """An endpoint failed once the reactor ran (the node logged why): stop, and end
        with status 1 after twistd's own cleanup (pidfile, last log lines), as twistd
        cannot set an exit status itself (twisted/twisted#11335)."""
        if self._stopping:
            return  # a stop cancelled the listen
        atexit.register(_exit_failed)
        self.reactor.stop()


def _log_file(twistd: usage.Options | None):
    """Where twistd would write its log (``--logfile``, or stdout with ``-n``)."""
    name = twistd.get("logfile") if twistd is not None else "-"
    if name == "-" or (not name and twistd.get("nodaemon")):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(name or "twistd.log")


def makeService(options: Options) -> SwarmNode:
    logs.set_level(options["log-level"])
    observer = None
    if options["log-format"] == "json":
        observer = logs.json_observer(_log_file(options.parent))
    return _TwistdNode(NodeConfig.from_options(options), observer)

