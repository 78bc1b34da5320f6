"""`swarm`: run, watch, get, list and cancel swarms, and `swarm up` for a local stack."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarm.v1 import orchestrator_pb2
from swarm_client._client import SwarmClient, SwarmEvent, default_target
from swarm_client._errors import InvalidArgument, SwarmError, Unavailable
from swarm_client._view import SwarmView, describe_provider

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STATE_NAMES = [
    name.removeprefix("SWARM_STATE_").lower()
    for name in orchestrator_pb2.SwarmState.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "SWARM_STATE_UNSPECIFIED"
]

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however narrow the terminal


def as_json(message: Message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False)


def follow(events: Iterator[SwarmEvent], *, json_lines: bool) -> int:
    """Shows a swarm's events (live view, or JSON lines) and gives the exit code of its outcome."""
    view = SwarmView()
    if json_lines:
        for event in events:
            print(as_json(event), flush=True)
            view.apply(event)
    else:
        with Live(view.render(), console=out, refresh_per_second=8, transient=False) as live:
            for event in events:
                view.apply(event)
                live.update(view.render())
        out.print(view.summary())
    if view.outcome is not None and view.outcome.WhichOneof("kind") == "swarm_completed":
        return EXIT_OK
    return EXIT_FAILED


def cmd_run(args: argparse.Namespace, client: SwarmClient) -> int:
    events = client.run(
        args.idea,
        args.agents,
        model=args.model,
        detach=args.detach,
        request_id=args.request_id,
        max_parallel=args.max_parallel,
    )
    try:
        return follow(events, json_lines=args.json)
    except KeyboardInterrupt:
        events.close()
        what = "it keeps running (--detach)" if args.detach else "the swarm is cancelled with it"
        err.print(f"interrupted: {what}")
        return EXIT_INTERRUPTED


def cmd_watch(args: argparse.Namespace, client: SwarmClient) -> int:
    try:
        return follow(client.watch(args.swarm_id, args.after), json_lines=args.json)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _state(value: int) -> str:
    return orchestrator_pb2.SwarmState.Name(value).removeprefix("SWARM_STATE_").lower()  # type: ignore[arg-type]


def cmd_get(args: argparse.Namespace, client: SwarmClient) -> int:
    swarm = client.get(args.swarm_id)
    if args.json:
        print(as_json(swarm))
        return EXIT_OK
    out.print(
        f"[bold]swarm[/] [magenta]{swarm.swarm_id}[/] · {_state(swarm.state)} · {swarm.num_agents} agents · "
        f"{swarm.model} · provider {describe_provider(swarm.provider)}"
    )
    out.print(f"idea: {swarm.idea[:200]}")
    table = Table(box=None, header_style="bold")
    for column in ("subtask", "title", "state", "worker", "tries", "output tokens"):
        table.add_column(column)
    for status in swarm.subtasks:
        table.add_row(
            status.subtask.id,
            status.subtask.title[:48],
            orchestrator_pb2.SubtaskState.Name(status.state).removeprefix("SUBTASK_STATE_").lower(),
            status.worker_id,
            str(status.attempts),
            f"{status.usage.output_tokens:,}",
        )
    if swarm.subtasks:
        out.print(table)
    if swarm.error:
        out.print(f"[red]error:[/] {swarm.error}")
    if swarm.result:
        out.print(swarm.result)
        out.print(
            f"usage: {swarm.usage.input_tokens:,} input / {swarm.usage.output_tokens:,} output tokens · "
            f"${swarm.usage.cost_usd:.4f}"
        )
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: SwarmClient) -> int:
    state = orchestrator_pb2.SwarmState.Value(f"SWARM_STATE_{args.state.upper()}") if args.state else 0
    response = client.list(page_size=args.limit, page_token=args.page_token, state=state)
    if args.json:
        print(as_json(response))
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    for column in ("swarm", "state", "agents", "created", "idea"):
        table.add_column(column)
    for swarm in response.swarms:
        created = swarm.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(swarm.swarm_id, _state(swarm.state), str(swarm.num_agents), created, swarm.idea[:60])
    out.print(table if response.swarms else "no swarms")
    if response.next_page_token:
        out.print(f"more: swarm list --page-token {response.next_page_token}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: SwarmClient) -> int:
    swarm = client.cancel(args.swarm_id, args.reason)
    if args.json:
        print(as_json(swarm))
    else:
        out.print(f"swarm {swarm.swarm_id} is {_state(swarm.state)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run swarms of Claude agents in parallel.")
    parser.add_argument(
        "--target",
        default=default_target(),
        help=f"orchestrator address [env SWARM_TARGET, default {default_target()!r}]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start a swarm and follow it live")
    run.add_argument("idea", help="what the swarm is to work on")
    run.add_argument("--agents", "-n", type=int, default=5, help="parallel agents (subtasks), default 5")
    run.add_argument("--model", default="", help="model override (default: the server's)")
    run.add_argument("--detach", action="store_true", help="the swarm keeps running if this command stops")
    run.add_argument("--request-id", default="", help="idempotency key")
    run.add_argument(
        "--max-parallel", type=int, default=0, help="at most this many subtasks at once (0 = no cap)"
    )
    run.add_argument("--json", action="store_true", help="one JSON object per event, for scripts")
    run.set_defaults(handler=cmd_run)

    watch = commands.add_parser("watch", help="follow a swarm's events (replayed, then live)")
    watch.add_argument("swarm_id")
    watch.add_argument("--after", type=int, default=0, help="only events after this sequence number")
    watch.add_argument("--json", action="store_true", help="one JSON object per event")
    watch.set_defaults(handler=cmd_watch)

    get = commands.add_parser("get", help="a swarm's state, subtasks and result")
    get.add_argument("swarm_id")
    get.add_argument("--json", action="store_true")
    get.set_defaults(handler=cmd_get)

    listing = commands.add_parser("list", help="swarms, newest first")
    listing.add_argument("--state", choices=STATE_NAMES, help="only swarms in this state")
    listing.add_argument("--limit", type=int, default=20, help="swarms per page")
    listing.add_argument("--page-token", default="")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    cancel = commands.add_parser("cancel", help="cancel a running swarm")
    cancel.add_argument("swarm_id")
    cancel.add_argument("--reason", default="")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(handler=cmd_cancel)

    from swarm_client._local_stack import add_up_command

    add_up_command(commands, run_demo=lambda target, idea, agents: _demo(target, idea, agents))
    return parser


def _demo(target: str, idea: str, agents: int) -> int:
    with SwarmClient(target) as client:
        args = argparse.Namespace(
            idea=idea, agents=agents, model="", detach=False, request_id="", max_parallel=0, json=False
        )
        return cmd_run(args, client)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler: Callable[..., int] = args.handler
    sys.exit(dispatch(handler, args))


def dispatch(
    handler: Callable[..., Any], args: argparse.Namespace, *, channel: grpc.Channel | None = None
) -> int:
    """Runs a command and turns its outcome into the exit status; `channel`, when given, is the
    client's instead of one to `--target` (tests pass a fake one)."""
    if args.command == "up":
        return int(handler(args))
    if args.command == "run" and args.agents < 1:
        err.print(f"swarm: --agents must be at least 1, got {args.agents}")
        return EXIT_USAGE
    try:
        with SwarmClient(args.target, channel=channel) as client:
            return int(handler(args, client))
    except InvalidArgument as error:
        fields = "; ".join(f"{field}: {text}" for field, text in error.violations) or error.message
        err.print(f"swarm: invalid request: {fields}")
        return EXIT_USAGE
    except Unavailable as error:
        if "connect" in error.message.lower():  # grpc's long connection-failure text adds nothing
            err.print(
                f"swarm: cannot reach the orchestrator at {args.target}; is it running? "
                "(`swarm up` starts a local stack)"
            )
        else:
            err.print(f"swarm: the orchestrator at {args.target} is unavailable: {error.message}")
        return EXIT_UNREACHABLE
    except SwarmError as error:
        err.print(f"swarm: {error.code.name}: {error.message}")
        return EXIT_FAILED
