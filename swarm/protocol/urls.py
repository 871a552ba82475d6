"""WebSocket URLs -> Twisted client endpoint descriptions, for clients and peer dialers."""

from __future__ import annotations

import math

from autobahn.websocket.util import parse_url


def ws_client_endpoint(url: str, timeout: float) -> str:
    """The Twisted client endpoint string for a ``ws://`` or ``wss://`` URL."""
    is_secure, host, port, _resource, _path, _params = parse_url(url)
    if host == "unix":
        raise ValueError("unix socket URLs are not supported")
    host = host.replace("\\", "\\\\").replace(":", "\\:")
    kind = "tls" if is_secure else "tcp"
    # Endpoint strings take whole seconds; connect() enforces the exact deadline itself.
    return f"{kind}:host={host}:port={port}:timeout={max(1, math.ceil(timeout))}"
