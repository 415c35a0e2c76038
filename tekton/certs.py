"""TLS material for `tekton up --tls`: a private CA and a server certificate it signs (``cryptography``).

Kept in the data dir's ``tls/`` (keys 0600). Clients verify the server against ``ca.pem``; a user who has
their own CA and certificate passes them instead (--tls-cert/--tls-key/--tls-ca).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bus.server import TlsFiles

VALID_DAYS = 825


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def server_names(extra: list[str] | None = None) -> list[str]:
    """Names the certificate is valid for: loopback, this host's name, and any asked for."""
    return list(dict.fromkeys(["localhost", "127.0.0.1", "::1", socket.gethostname(), *(extra or [])]))


def generate(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """A new CA and a server certificate for ``hosts`` (plus loopback and this host), written to
    ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Tekton local CA"))
        .issuer_name(_name("Tekton local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in server_names(hosts):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tekton nats-server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Client auth too: on routes and leaf connections a node is the other's client, and nats-server
        # verifies route certificates both ways.
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(cert=directory / "server.pem", key=directory / "server-key.pem", ca=directory / "ca.pem")
    _write_key(directory / "ca-key.pem", ca_key)
    _write_key(files.key, key)
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def names_in(cert: Path) -> list[str]:
    """The host names and addresses a certificate (PEM) is valid for."""
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    alt = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [
        *alt.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress)),
    ]


def ensure(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The generated files in ``directory``, made on first use."""
    files = TlsFiles(cert=directory / "server.pem", key=directory / "server-key.pem", ca=directory / "ca.pem")
    if all(p.exists() for p in (files.cert, files.key, files.ca)):
        return files
    return generate(directory, hosts)
