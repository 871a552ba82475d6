"""WebSocket URLs -> Twisted client endpoints, for clients and peer dialers.

``ws://`` dials plain TCP. ``wss://`` verifies the server's certificate against the CA
certificates of a PEM file, or the system's trust store without one, and checks that the
certificate names the host of the URL (a DNS name, or an IP address as an IP SAN). The
``tls:`` endpoint string can only take a directory of CAs, so ``wss://`` endpoints are
built in code.
"""

from __future__ import annotations

import math
import re
from typing import Any

from autobahn.websocket.util import parse_url
from twisted.internet.interfaces import IStreamClientEndpoint

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _target(url: str) -> tuple[bool, str, int]:
    """(secure, host, port) of a ``ws://`` or ``wss://`` URL; brackets off IPv6 hosts."""
    is_secure, host, port, _resource, _path, _params = parse_url(url)
    if host == "unix":
        raise ValueError("unix socket URLs are not supported")
    return is_secure, host, port


def ws_client_endpoint(url: str, timeout: float) -> str:
    """The Twisted client endpoint string for a ``ws://`` or ``wss://`` URL (for
    ``wss://``, verified against the system's trust store only)."""
    is_secure, host, port = _target(url)
    host = host.replace("\\", "\\\\").replace(":", "\\:")
    kind = "tls" if is_secure else "tcp"
    # Endpoint strings take whole seconds; connect() enforces the exact deadline itself.
    return f"{kind}:host={host}:port={port}:timeout={max(1, math.ceil(timeout))}"


def trust_root(ca_file: str | None):
    """What ``wss://`` servers are verified against: every certificate of the PEM file
    ``ca_file``, or the system's trust store when it is None. Raises ValueError for a
    file with no certificate in it, so a wrong path or file fails at start, not on
    every dial."""
    from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

    if ca_file is None:
        return platformTrust()
    with open(ca_file, "rb") as f:
        blocks = _PEM_CERTIFICATE.findall(f.read())
    if not blocks:
        raise ValueError(f"no PEM certificate in the CA file {ca_file!r}")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except Exception as e:  # OpenSSL's errors say little alone
        raise ValueError(f"cannot read the CA file {ca_file!r}: {e}") from None


def client_endpoint(reactor: Any, url: str, timeout: float,
                    ca_file: str | None = None) -> IStreamClientEndpoint:
    """The endpoint a client of ``url`` connects through; for ``wss://`` it checks the
    server's certificate against ``ca_file`` (see :func:`trust_root`) and its name
    against the URL's host."""
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
    from twisted.internet.ssl import optionsForClientTLS

    is_secure, host, port = _target(url)
    if not is_secure:
        return clientFromString(reactor, ws_client_endpoint(url, timeout))
    tls = optionsForClientTLS(host, trustRoot=trust_root(ca_file))
    return wrapClientTLS(tls, HostnameEndpoint(reactor, host, port, timeout=timeout))
