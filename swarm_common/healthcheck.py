"""A gRPC health probe for container HEALTHCHECKs: exit 0 when the server says SERVING, else 1.

    python -m swarm_common.healthcheck [HOST:PORT] [--service NAME] [--timeout SECONDS]
        [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]]

The address defaults to 127.0.0.1 on the port of SWARM_LISTEN (the same variable the service
reads), else 127.0.0.1:50051. A TLS service is probed over TLS: `--tls-ca` checks its
certificate, `--tls-server-name` is the name on it (a probe dials 127.0.0.1, the certificate names
the service), and an mTLS service wants a client certificate: the service's own will do when it
may be presented as a client's. It asks `grpc.health.v1.Health/Check`; any answer other than
SERVING, and any failure to get one within the timeout, exits 1 with one line on standard error.
Bad arguments exit 1 too: Docker reserves exit code 2 in a HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swarm_common.tls import ClientTls, TlsConfigError, explain_tls_failure

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 3.0
PROG = "swarm-healthcheck"

# A probe of a local port must never go through an HTTP proxy taken from the environment.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class Unhealthy(Exception):
    """The server is not SERVING, or did not answer; the message is one line saying which."""


def _port_of(address: str) -> int:
    _, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else 0


def default_address(environ: dict[str, str] | None = None) -> str:
    """127.0.0.1 on SWARM_LISTEN's port, so the probe follows the service's own setting."""
    port = _port_of((os.environ if environ is None else environ).get("SWARM_LISTEN", ""))
    return f"127.0.0.1:{port}" if port > 0 else DEFAULT_ADDRESS


def _channel(address: str, tls: argparse.Namespace | None) -> grpc.Channel:
    if tls is None or not tls.tls_ca:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    credentials = ClientTls(tls.tls_ca, tls.tls_cert, tls.tls_key).credentials()
    name = [("grpc.ssl_target_name_override", tls.tls_server_name)] if tls.tls_server_name else []
    return grpc.secure_channel(address, credentials, options=[*_CHANNEL_OPTIONS, *name])


def check(
    address: str,
    *,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_S,
    tls: argparse.Namespace | None = None,
) -> None:
    """Returns when `service` at `address` is SERVING; raises `Unhealthy` otherwise. `tls`: the
    parsed TLS options (none: plaintext)."""
    what = f"service {service!r} at {address}" if service else address
    try:
        opened = _channel(address, tls)
    except TlsConfigError as error:
        raise Unhealthy(str(error)) from None
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise Unhealthy(f"{what}: the server does not know this service") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Unhealthy(f"{what}: no answer within {timeout:g}s") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise Unhealthy(f"{address}: the server does not serve grpc.health.v1.Health") from None
            detail = " ".join(str(error.details() or "").split())
            secure = tls is not None and bool(tls.tls_ca)
            meaning = explain_tls_failure(detail, client_certificate=secure and bool(tls and tls.tls_cert))
            if code == grpc.StatusCode.UNAVAILABLE and meaning is not None:
                raise Unhealthy(f"{what}: TLS: {meaning}") from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Unhealthy(f"{what} is unreachable ({detail})") from None
            raise Unhealthy(f"{what}: {code.name}: {detail}") from None
    status: int = response.status
    if status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        raise Unhealthy(f"{what} is {name}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def seconds(raw: str) -> float:
    value = float(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{raw} is not a positive number of seconds")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Exits 0 when a gRPC server's health service says SERVING.")
    parser.add_argument(
        "address",
        nargs="?",
        default=None,
        help=f"HOST:PORT to probe (default: 127.0.0.1 on SWARM_LISTEN's port, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--service", default="", help="service to ask about (default: '', the whole server)")
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT_S,
        type=seconds,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    for flag, meaning in [
        ("--tls-ca", "PEM CA to check the server's certificate with; set = TLS"),
        ("--tls-cert", "PEM client certificate, for a server that requires one (mTLS)"),
        ("--tls-key", "PEM key of --tls-cert"),
        ("--tls-server-name", "the name on the server's certificate (default: the address's host)"),
    ]:
        parser.add_argument(flag, default="", help=meaning)
    args = parser.parse_args(argv)
    if (args.tls_cert or args.tls_key or args.tls_server_name) and not args.tls_ca:
        parser.error("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
    address = args.address
    if address is not None and not (
        _port_of(address) or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:"))
    ):
        parser.error(f"{address!r} is not HOST:PORT")
    return args


def run(argv: list[str] | None = None) -> int:
    """The probe as a function: prints one line and returns the exit code."""
    args = parse_args(argv)
    address: str = args.address or default_address()
    try:
        check(address, service=args.service, timeout=args.timeout, tls=args)
    except Unhealthy as error:
        print(f"{PROG}: unhealthy: {error}", file=sys.stderr)
        return 1
    print(f"{PROG}: {address}{f' {args.service}' if args.service else ''} is SERVING")
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
