"""Certificates made on the spot for TLS tests (the ``cryptography`` package).

:func:`make_pki` writes into a directory: a test CA, a second CA that has nothing to do
with it, and two server certificates signed by the test CA, one naming 127.0.0.1 (an IP
SAN) and one naming only ``localhost`` (a DNS SAN), so a test can dial 127.0.0.1 and be
refused for the name alone. EC P-256 keys: quick to make.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write(path: Path, cert: x509.Certificate, key=None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    return path


class _Authority:
    """A self-signed CA that signs server certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        self.cert = (
            _builder(common_name, self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def server(self, common_name: str, names: list[x509.GeneralName]):
        """(certificate, key) for a TLS server known by ``names``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(common_name, self.name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def _escape(path: Path) -> str:
    """A path as a value in a Twisted endpoint description."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True)
class Pki:
    """Where :func:`make_pki` put each file (certificates ``.pem``, keys ``.key``)."""

    ca: Path  # the test CA: signs both server certificates
    other_ca: Path  # an unrelated CA: trusts neither server
    ip_cert: Path  # SAN IP:127.0.0.1
    localhost_cert: Path  # SAN DNS:localhost only

    def server_endpoint(self, cert: Path | None = None, port: int = 0) -> str:
        """``ssl:PORT:interface=127.0.0.1:privateKey=...:certKey=...`` for ``cert``
        (default: the 127.0.0.1 one)."""
        cert = cert or self.ip_cert
        return (f"ssl:{port}:interface=127.0.0.1:privateKey={_escape(cert.with_suffix('.key'))}"
                f":certKey={_escape(cert)}")

    def client_context(self, ca: Path | None = None) -> ssl.SSLContext:
        """A standard-library client context that trusts ``ca`` (default: the test CA)
        and checks host names, for the ``websockets`` client and urllib."""
        return ssl.create_default_context(cafile=str(ca or self.ca))


def make_pki(directory: Path) -> Pki:
    """Make the CAs and server certificates in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = _Authority("swarmcache test CA"), _Authority("some other CA")
    ip_cert, ip_key = ca.server("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    host_cert, host_key = ca.server("localhost", [x509.DNSName("localhost")])
    return Pki(
        ca=_write(directory / "ca.pem", ca.cert),
        other_ca=_write(directory / "other-ca.pem", other.cert),
        ip_cert=_write(directory / "server-ip.pem", ip_cert, ip_key),
        localhost_cert=_write(directory / "server-localhost.pem", host_cert, host_key),
    )
