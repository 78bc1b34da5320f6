"""How a client reaches a TLS orchestrator, and what a failed handshake means.

The client library's own, small copy of the calling side of `swarm_common.tls`: a client alone
installs nothing of the services. Options come as arguments or from the environment, as the
target does: SWARM_CLIENT_TLS_CA, SWARM_CLIENT_TLS_CERT, SWARM_CLIENT_TLS_KEY,
SWARM_CLIENT_TLS_SERVER_NAME, and SWARM_TOKEN for the bearer token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_CA, ENV_CERT, ENV_KEY = "SWARM_CLIENT_TLS_CA", "SWARM_CLIENT_TLS_CERT", "SWARM_CLIENT_TLS_KEY"
ENV_SERVER_NAME = "SWARM_CLIENT_TLS_SERVER_NAME"
ENV_TOKEN = "SWARM_TOKEN"


class TlsOptionError(ValueError):
    """A TLS option cannot be used; the message names it and its file."""


@dataclass(frozen=True, slots=True)
class ClientTls:
    """PEM files: the CA the orchestrator's certificate is checked against and, for mTLS, this
    client's certificate and key. `server_name`: the name the certificate must carry when it is
    not the target's host (a port-forward to `localhost`, say)."""

    ca: str
    cert: str = ""
    key: str = ""
    server_name: str = ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ClientTls | None:
        env = os.environ if environ is None else environ
        if not env.get(ENV_CA):
            return None
        return cls(env[ENV_CA], env.get(ENV_CERT, ""), env.get(ENV_KEY, ""), env.get(ENV_SERVER_NAME, ""))

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise TlsOptionError("--tls-cert and --tls-key go together: give both or neither")
        return grpc.ssl_channel_credentials(
            _read(self.ca, "--tls-ca"),
            _read(self.key, "--tls-key") if self.key else None,
            _read(self.cert, "--tls-cert") if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsOptionError(f"cannot read {flag} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsOptionError(f"{flag} {path} is not a PEM file")
    return data


def token_from_environment() -> str:
    return os.environ.get(ENV_TOKEN, "")


# OpenSSL's words in grpc's error details, and what they mean, checked in this order.
_MEANINGS = (
    ("certificate has expired", "the orchestrator's certificate has expired"),
    ("certificate is not yet valid", "the orchestrator's certificate is not valid yet"),
    ("Hostname Verification", "the orchestrator's certificate is not for this host name (--tls-server-name)"),
    ("WRONG_VERSION_NUMBER", "the orchestrator does not speak TLS: leave out --tls-ca"),
    ("CERTIFICATE_VERIFY_FAILED", "the orchestrator's certificate is not signed by --tls-ca"),
    ("TSI_PROTOCOL_FAILURE", "the TLS handshake failed"),
)


def explain_tls_failure(details: str, tls: ClientTls | None) -> str | None:
    """One line on why a connection failed, when TLS is why; None otherwise. A server that
    refuses a client's certificate (or its lack of one) closes the connection after the
    handshake, which a client sees as `Socket closed` alone."""
    if tls is not None:
        for words, meaning in _MEANINGS:
            if words in details:
                return meaning
    if "Socket closed" not in details:
        return None
    if tls is None:
        return "the orchestrator closed the connection: does it serve TLS? (--tls-ca)"
    if tls.cert:
        return (
            "the orchestrator closed the TLS connection: it refused this client's certificate "
            "(expired, or not signed by the CA it trusts)"
        )
    return (
        "the orchestrator closed the TLS connection: it requires a client certificate (--tls-cert, --tls-key)"
    )
