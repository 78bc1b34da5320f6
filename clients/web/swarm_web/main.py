"""`swarm-web`: serves the console (`swarm_web.app`) over HTTP, as a client of one orchestrator.

It keeps nothing of its own: every page and every event comes from the orchestrator, so any number
of consoles may serve the same orchestrator, and one may be restarted at any time.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvicorn

from swarm_client import AsyncSwarmClient, ClientTls, TlsOptionError, default_target
from swarm_client.cli import add_connection_options, tls_of
from swarm_web.app import create_app

DEFAULT_LISTEN = "127.0.0.1:8080"
# Open event streams never end by themselves: on SIGTERM they get this long, then are closed.
SHUTDOWN_GRACE_S = 3


def connect(target: str, tls: ClientTls | None = None, token: str = "") -> AsyncSwarmClient:
    """The console's one way to the orchestrator: the place where its channel is made. Whoever
    reaches the console acts with its token, as its tenant: keep it where only they can."""
    return AsyncSwarmClient(target, tls=tls, token=token)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swarm-web",
        description="A browser console for the orchestrator: start, watch and cancel swarms.",
    )
    parser.add_argument(
        "--listen",
        default=os.environ.get("SWARM_WEB_LISTEN") or DEFAULT_LISTEN,
        help=f"HOST:PORT to serve HTTP on; port 0 picks a free one [env SWARM_WEB_LISTEN, default {DEFAULT_LISTEN}]",
    )
    parser.add_argument(
        "--target",
        default=default_target(),
        help=f"the orchestrator's address [env SWARM_TARGET, default {default_target()!r}]",
    )
    add_connection_options(parser)
    return parser.parse_args(argv)


def bind(listen: str) -> socket.socket:
    """A listening socket for HOST:PORT; bound here, so that port 0 can be told as the real port."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {listen}: {error.strerror}") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        tls = tls_of(args)
        if tls is not None:
            tls.credentials()  # files that cannot be read stop the start, not the first request
        sock = bind(args.listen)
    except (ValueError, TlsOptionError) as error:
        print(f"swarm-web: {error}", file=sys.stderr)
        sys.exit(2)
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
    config = uvicorn.Config(
        create_app(lambda: connect(args.target, tls, args.token)),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    print(
        f"swarm-web: listening on {host}:{port}; open {url} (orchestrator {args.target})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])
