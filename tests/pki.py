"""A throw-away PKI for TLS tests: a CA, a server certificate for localhost/127.0.0.1,
a client certificate, and a second CA with a "rogue" client certificate.

Generated at test time with ``cryptography`` (the ``pki`` fixture of conftest.py); no
key is committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def make_pki(d: Path) -> Pki:
    """Write a throw-away PKI into the directory ``d``."""
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _cert("esmsearch test CA", ca_key, "esmsearch test CA", ca_key, ca=True)
    other = _cert("other CA", other_key, "other CA", other_key, ca=True)
    s_key, c_key, r_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", s_key, "esmsearch test CA", ca_key, san=san)
    client = _cert("client", c_key, "esmsearch test CA", ca_key)
    rogue = _cert("rogue", r_key, "other CA", other_key)
    _write(d / "ca.pem", ca)
    _write(d / "other.pem", other)
    _write(d / "server.pem", server, s_key)
    _write(d / "client.pem", client, c_key)
    _write(d / "rogue.pem", rogue, r_key)
    return Pki(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
        d / "other.pem", d / "rogue.pem", d / "rogue.key",
    )  # fmt: skip
