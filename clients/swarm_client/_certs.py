"""Development certificates for `swarm certs DIR` and `swarm up --tls`: a CA of its own, and a
server and a client certificate that it signed. For a laptop and for tests, not for production,
where certificates come from your own CA or cert-manager.

Keys are ECDSA P-256 (quick to make, and every gRPC stack takes them). Private keys are written
readable by their owner alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
# What `swarm certs DIR` writes (the contract's names).
CA, SERVER, SERVER_KEY, CLIENT, CLIENT_KEY = (
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


class Authority:
    """A certificate authority that signs server and client certificates."""

    def __init__(self, name: str = "swarm development CA", *, days: int = DEFAULT_DAYS) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self._name = subject
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        hosts: Sequence[str] = (),
        client: bool = False,
        server: bool = True,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Issued:
        """A certificate for `hosts` (DNS names or IP addresses), for serving, for presenting as a
        client, or both. `not_before`/`not_after` default to now (less a few minutes) and a year on."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + datetime.timedelta(days=DEFAULT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )


def write_development_certificates(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> list[Path]:
    """`swarm certs DIR`: a new CA, a server certificate for `hosts` and a client certificate, in
    DIR (created if missing). The server certificate may also be presented as a client's, so one
    service can call another with it. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority()
    server = authority.issue("swarm server", hosts=hosts, client=True)
    client = authority.issue("swarm client", client=True, server=False)
    files = [
        _write(directory / CA, authority.pem, private=False),
        _write(directory / SERVER, server.cert, private=False),
        _write(directory / SERVER_KEY, server.key, private=True),
        _write(directory / CLIENT, client.cert, private=False),
        _write(directory / CLIENT_KEY, client.key, private=True),
    ]
    return files


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    """Written whole under a temporary name, then renamed: a service that reloads its certificate
    never reads half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
    return path


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
