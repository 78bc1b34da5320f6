"""TLS for both services and their health probe: one loader of PEM files, one reload rule, and
one reading of a failed handshake.

- **Serving.** `ServerTls` gives a server TLS credentials from a certificate, its key and,
  for mTLS, the CA that client certificates must be signed by. grpc asks it before every new
  connection whether the certificate changed; it looks at the files (a `stat`, nothing more
  unless they changed), so a renewed certificate is served from the next connection on, without
  a restart. A renewal caught half-written (a key that does not match its certificate yet) keeps
  the old pair until both files agree. Kubernetes swaps a mounted Secret's files at once, and
  `swarm certs` renames whole files into place.
- **Calling.** `ClientTls` reads a CA and, for mTLS, a client certificate and key, and again when
  they change, so that a channel made after a renewal presents the renewed certificate.
- **Failures.** grpc tells a failed handshake in OpenSSL's words; `explain_tls_failure` says
  what it means in one line.

The client library (`swarm_client`) carries its own small copy of the calling side: a client alone
installs none of the services' packages.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509


class TlsConfigError(ValueError):
    """A TLS file cannot be used; the message names the flag and the file."""


@dataclass(frozen=True, slots=True)
class _Pair:
    cert: bytes
    key: bytes
    ca: bytes | None
    expires: datetime.datetime


def read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsConfigError(f"cannot read {flag} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{flag} {path} is not a PEM file")
    return data


def _load(cert_path: str, key_path: str, ca_path: str | None) -> _Pair:
    """Reads and checks the files: the key must be the certificate's."""
    cert = read_pem(cert_path, "--tls-cert")
    key = read_pem(key_path, "--tls-key")
    ca = read_pem(ca_path, "--tls-client-ca") if ca_path else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as error:
        raise TlsConfigError(
            f"--tls-key {key_path} is not the key of --tls-cert {cert_path} ({error.reason})"
        ) from None
    try:
        expires = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    except ValueError:
        raise TlsConfigError(f"--tls-cert {cert_path} holds no certificate") from None
    return _Pair(cert, key, ca, expires)


def _signature(paths: tuple[str | None, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced or rewritten."""
    stamps = []
    for path in paths:
        if not path:
            continue
        try:
            stat = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


class ServerTls:
    """A server's certificate and key, and the CA of its clients (mTLS) when given, reloaded when
    the files change."""

    def __init__(self, cert: str, key: str, client_ca: str = "", *, log: logging.Logger) -> None:
        self._paths = (cert, key, client_ca or None)
        self._log = log
        self._lock = threading.Lock()  # grpc asks from its own threads
        self._seen = _signature(self._paths)
        self._pair = _load(*self._paths)  # a bad file at start stops the start
        self._warn_if_expired(self._pair)

    @property
    def mutual(self) -> bool:
        return self._paths[2] is not None

    @property
    def expires(self) -> datetime.datetime:
        return self._pair.expires

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._pair),
            self._renewed,  # type: ignore[arg-type]  # grpc takes None for "no change"; its stubs do not say so
            require_client_authentication=self.mutual,
        )

    @staticmethod
    def _configuration(pair: _Pair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)], pair.ca)

    def _renewed(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question before each new connection: a new configuration, or None for no change."""
        with self._lock:
            seen = _signature(self._paths)
            if seen == self._seen:
                return None
            self._seen = seen
            try:
                pair = _load(*self._paths)
            except TlsConfigError as error:
                # Mid-renewal, or broken: the old certificate serves until the files agree.
                self._log.warning(
                    f"the renewed TLS files cannot be used yet, the previous ones serve on: {error}"
                )
                return None
            if pair == self._pair:
                return None
            self._pair = pair
        self._log.info(f"serving a renewed TLS certificate, valid until {pair.expires:%Y-%m-%d %H:%M} UTC")
        self._warn_if_expired(pair)
        return self._configuration(pair)

    def _warn_if_expired(self, pair: _Pair) -> None:
        if pair.expires <= datetime.datetime.now(datetime.UTC):
            self._log.warning(
                f"the TLS certificate {self._paths[0]} expired on {pair.expires:%Y-%m-%d %H:%M} UTC: "
                "clients will refuse it"
            )


class ClientTls:
    """Credentials to call a TLS server: its certificate checked against `ca`, and, for mTLS, the
    client certificate `cert` with its `key`; read again when the files change (`version` counts
    the readings). `flags` names the options in errors (`--worker-tls`)."""

    def __init__(self, ca: str, cert: str = "", key: str = "", *, flags: str = "--tls") -> None:
        if bool(cert) != bool(key):
            raise TlsConfigError(f"{flags}-cert and {flags}-key go together: give both or neither")
        self._paths = (ca, cert, key)
        self._flags = flags
        self._seen = _signature(self._paths)
        self._credentials = self._read()  # a file that cannot be read stops the start
        self.version = 1

    @property
    def client_certificate(self) -> bool:
        return bool(self._paths[1])

    def _read(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._paths
        flags = self._flags
        return grpc.ssl_channel_credentials(
            read_pem(ca, f"{flags}-ca"),
            read_pem(key, f"{flags}-key") if key else None,
            read_pem(cert, f"{flags}-cert") if cert else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """The credentials as the files are now (the previous ones while the files cannot be read)."""
        seen = _signature(self._paths)
        if seen != self._seen:
            try:
                self._credentials = self._read()
            except TlsConfigError:
                return self._credentials  # mid-renewal: the next call looks again
            self._seen = seen
            self.version += 1
        return self._credentials


# What OpenSSL's words in grpc's error details mean, checked in this order.
_MEANINGS = (
    ("certificate has expired", "the server's certificate has expired"),
    ("certificate is not yet valid", "the server's certificate is not valid yet"),
    ("Hostname Verification", "the server's certificate is not for this host name"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (is it serving plaintext?)"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the CA given"),
    ("TSI_PROTOCOL_FAILURE", "the TLS handshake failed"),
)


def explain_tls_failure(details: str, *, client_certificate: bool) -> str | None:
    """One line on why a TLS connection failed, from grpc's error details; None when they do not
    look like a TLS failure. A server that refuses a client's certificate (or its lack of one)
    closes the connection after the handshake, which the client sees as `Socket closed` alone."""
    for words, meaning in _MEANINGS:
        if words in details:
            return meaning
    if "Socket closed" in details:
        if client_certificate:
            return "the server closed the TLS connection: it refused the client certificate (expired, or not signed by the CA it trusts)"
        return "the server closed the connection: it may require a client certificate (mTLS), or TLS"
    return None
