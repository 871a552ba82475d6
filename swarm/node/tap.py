"""``twistd swarmcache``: command-line options and the service they build."""

from __future__ import annotations

import math

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.python import usage

from swarm import logs
from swarm.mesh.dialer import peer_endpoint_description
from swarm.node.node import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_VALUE_SIZE,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SWARM,
    SwarmNode,
    endpoint_description,
)

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


def _number(kind: type, what: str, low: float, high: float):
    """A coercer for usage.Options: ``text`` -> ``kind`` within [low, high]."""

    def coerce(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"not {what}: {text!r}") from None
        if not low <= value <= high:
            bound = f"at least {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise usage.UsageError(f"{what} must be {bound}: {text!r}")
        return value

    return coerce


_positive_int = _number(int, "a whole number", 1, math.inf)
_seconds = _number(float, "a number of seconds", 0, 1e9)


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
        ["swarm", None, DEFAULT_SWARM,
         "Swarm name; links between nodes of different swarms are refused."],
        ["replicas", None, 1, "How many nodes hold each key.", _positive_int],
        ["request-timeout", None, DEFAULT_REQUEST_TIMEOUT,
         "Seconds a request may take end to end, hops included.", _seconds],
        ["log-level", None, "info", "One of: " + ", ".join(logs.LEVELS) + "."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []

    def opt_peer(self, url: str) -> None:
        """URL of a node to keep a link to (ws://host:port); repeatable."""
        try:
            peer_endpoint_description(url)
        except ValueError as e:
            raise usage.UsageError(f"--peer: {e}") from None
        self["peer"].append(url)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for option in ("port", "peer-port"):
            if self[option] is None:
                continue
            try:
                serverFromString(reactor, endpoint_description(self[option]))
            except (ValueError, TypeError) as e:
                raise usage.UsageError(
                    f"--{option} {self[option]!r} is not an endpoint: {e}"
                ) from None
        if self["request-timeout"] <= 0:
            raise usage.UsageError("--request-timeout must be more than 0")
        if self["log-level"] not in logs.LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(logs.LEVELS)}"
            )


class _TwistdNode(SwarmNode):
    """Under twistd, a port that cannot be bound ends the process with a clear line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            raise SystemExit(
                f"swarmcache: cannot listen on {e.interface or '*'}:{e.port}: {reason}"
            ) from None
        except OverflowError as e:  # tcp:99999
            raise SystemExit(f"swarmcache: cannot listen: {e}") from None


def makeService(options: Options) -> SwarmNode:
    logs.set_level(options["log-level"])
    return _TwistdNode(
        options["port"],
        node_id=options["node-id"],
        max_memory=options["max-memory"],
        max_value_size=options["max-value-size"],
        max_message_size=options["max-message-size"],
        default_ttl=options["default-ttl"],
        swarm=options["swarm"],
        peers=tuple(options["peer"]),
        peer_port=options["peer-port"],
        replicas=options["replicas"],
        request_timeout=options["request-timeout"],
    )
