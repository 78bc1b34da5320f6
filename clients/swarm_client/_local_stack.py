"""`swarm up`: one orchestrator, K workers and the web console as child processes; Ctrl-C stops them all.

The services are started by `swarm_client.stack`, as programs (their console scripts), never
imported: a client does not depend on the services' code. With `--tls` every hop is mTLS, with
development certificates (`swarm certs`), and the orchestrator wants a token, made for the
tenant `local` with `swarm-orchestrator add-token`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from swarm_client._certs import CA, CLIENT, CLIENT_KEY, SERVER, SERVER_KEY, write_development_certificates
from swarm_client._tls import ENV_CA, ENV_CERT, ENV_KEY, ENV_TOKEN, ClientTls
from swarm_client.stack import Process, StackError, program, start

DEMO_IDEA = (
    "Plan the launch of a community bike-sharing service in a mid-sized city: demand, stations, "
    "bikes, pricing, partnerships, operations and risks."
)
DEMO_SIM_LATENCY_MS = "2500"

err = Console(stderr=True)
LOCAL_TENANT = "local"
RunDemo = Callable[[str, str, int, ClientTls | None, str], int]


@dataclass
class Security:
    """What each process of a `--tls` stack is given; all empty for a plaintext stack."""

    worker: list[str] = field(default_factory=list)
    orchestrator: list[str] = field(default_factory=list)
    web_env: dict[str, str] = field(default_factory=dict)
    tls: ClientTls | None = None
    token: str = ""


def secure(directory: Path) -> Security:
    """Development certificates and an auth file with one token, in `directory`: every service
    serves mTLS, the orchestrator presents its certificate to the workers, and clients present the
    client certificate and the token."""
    write_development_certificates(directory)
    ca, server, server_key = (str(directory / name) for name in (CA, SERVER, SERVER_KEY))
    client, client_key = str(directory / CLIENT), str(directory / CLIENT_KEY)
    auth_file = directory / "auth.json"
    made = subprocess.run(
        [program("swarm-orchestrator"), "add-token", "--auth-file", str(auth_file), "--tenant", LOCAL_TENANT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        raise StackError(f"cannot make a token: {made.stderr.strip()}")
    serving = ["--tls-cert", server, "--tls-key", server_key, "--tls-client-ca", ca]
    return Security(
        worker=serving,
        orchestrator=[
            *serving,
            *("--worker-tls-ca", ca, "--worker-tls-cert", server, "--worker-tls-key", server_key),
            *("--auth-file", str(auth_file)),
        ],
        web_env={ENV_CA: ca, ENV_CERT: client, ENV_KEY: client_key, ENV_TOKEN: made.stdout.strip()},
        tls=ClientTls(ca, client, client_key),
        token=made.stdout.strip(),
    )


def up(args: argparse.Namespace, run_demo: RunDemo) -> int:
    # The services get the user's environment (the model key, SWARM_ settings), as they would if
    # started by hand; a demo is slower than the simulated default, so a person can follow it.
    env = {}
    if args.demo and "SWARM_SIM_LATENCY_MS" not in os.environ:
        env["SWARM_SIM_LATENCY_MS"] = DEMO_SIM_LATENCY_MS
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="swarm-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[Process] = []

    def start_child(
        name: str, program: str, child_args: list[str], child_env: dict[str, str] | None = None
    ) -> Process:
        child = start(
            name,
            program,
            child_args,
            {**env, **(child_env or {})},
            30.0,
            inherit=True,
            log=log_dir / f"{name}.log",
            new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        children.append(child)
        return child

    listen = args.listen or ("127.0.0.1:0" if args.demo else "127.0.0.1:50051")
    # A demo's swarms go with its logs; a stack's outlive it, in .swarm/ where it was started.
    db = Path(args.db) if args.db else (log_dir / "swarms.db" if args.demo else Path(".swarm") / "swarms.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        security = secure(log_dir / "tls") if args.tls else Security()
        workers = [
            start_child(f"worker-{i}", "swarm-worker", ["--worker-id", f"worker-{i}", *security.worker])
            for i in range(1, args.workers + 1)
        ]
        orchestrator = start_child(
            "orchestrator",
            "swarm-orchestrator",
            [
                *("--listen", listen, "--workers", ",".join(w.address for w in workers), "--db", str(db)),
                *security.orchestrator,
            ],
        )
        web_listen = args.web_listen or ("127.0.0.1:0" if args.demo else "127.0.0.1:8080")
        console = start_child(
            "web", "swarm-web", ["--listen", web_listen, "--target", orchestrator.address], security.web_env
        )
        provider = (
            "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "simulated (no ANTHROPIC_API_KEY set)"
        )
        err.print(
            f"[bold green]local stack up[/]: orchestrator {orchestrator.address}, "
            f"{len(workers)} workers ({', '.join(w.address for w in workers)}), provider {provider}; "
            f"logs in {log_dir}"
        )
        err.print(f"[bold]web console[/]: http://{console.address}/")
        if security.tls is not None:
            err.print(
                f"mTLS on every hop, and a token for tenant {LOCAL_TENANT}; for the CLI:\n"
                + " ".join(f"{name}={value}" for name, value in security.web_env.items()),
                markup=False,
            )
        if args.demo:
            status = run_demo(orchestrator.address, args.idea, args.agents, security.tls, security.token)
            if not args.stay:
                return status
            err.print(
                f"the stack stays up: open http://{console.address}/ to run more swarms; Ctrl-C stops it"
            )
            _wait_for_signal_or_exit(children)
            return status
        err.print(
            f"try: swarm --target {orchestrator.address} run 'your idea' --agents 5   (Ctrl-C stops the stack)",
            markup=False,
        )
        _wait_for_signal_or_exit(children)
        return 0
    except StackError as error:
        err.print(f"swarm up: {error}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        err.print("stopping the local stack…")
        # The orchestrator first (it drains), then the workers.
        for child in reversed(children):
            child.stop()


def _wait_for_signal_or_exit(children: list[Process]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    while all(child.popen.poll() is None for child in children):
        time.sleep(0.5)
    gone = [child.name for child in children if child.popen.poll() is not None]
    raise StackError(f"{', '.join(gone)} exited; see the logs")


def add_up_command(commands: Any, run_demo: RunDemo) -> None:
    parser = commands.add_parser("up", help="run a local stack: one orchestrator and K workers")
    parser.add_argument("--workers", "-k", type=int, default=3, help="workers to start (default 3)")
    parser.add_argument(
        "--listen", default="", help="orchestrator address (default 127.0.0.1:50051; a free port with --demo)"
    )
    parser.add_argument("--log-dir", default="", help="where the services' logs go (default: a new temp dir)")
    parser.add_argument(
        "--db",
        default="",
        help="the orchestrator's database (default .swarm/swarms.db; with --demo, in the log dir)",
    )
    parser.add_argument(
        "--web-listen",
        default="",
        help="the web console's address (default 127.0.0.1:8080; a free port with --demo)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mTLS on every hop and a token for the orchestrator, with development certificates in the log dir",
    )
    parser.add_argument("--demo", action="store_true", help="run a demo swarm with live progress, then stop")
    parser.add_argument(
        "--stay", action="store_true", help="demo: keep the stack and its console up afterwards, until Ctrl-C"
    )
    parser.add_argument("--agents", type=int, default=5, help="demo: agents (default 5)")
    parser.add_argument("--idea", default=DEMO_IDEA, help="demo: the idea")
    parser.set_defaults(handler=lambda args: up(args, run_demo))
