"""`swarm`: run, watch, get, list and cancel swarms, `swarm up` for a local stack, and `swarm certs`
for development certificates.

What the orchestrator sends is shown as text, never as markup (see `_terminal`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from swarm.v1 import orchestrator_pb2
from swarm_client._client import LEFT_REASON, Budget, Spending, Swarm, SwarmClient, SwarmEvent, default_target
from swarm_client._errors import (
    InvalidArgument,
    ResumeFailed,
    SwarmError,
    TlsFailed,
    Unauthenticated,
    Unavailable,
)
from swarm_client._resume import DEFAULT_RESUME_WITHIN_S, Reconnecting
from swarm_client._terminal import escape_json_controls, safe_text, strip_controls
from swarm_client._tls import ENV_CA, ENV_CERT, ENV_KEY, ENV_SERVER_NAME, ENV_TOKEN, ClientTls, TlsOptionError
from swarm_client._view import CUT_OFF, SwarmView, describe_provider, ending

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STATE_NAMES = [
    name.removeprefix("SWARM_STATE_").lower()
    for name in orchestrator_pb2.SwarmState.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "SWARM_STATE_UNSPECIFIED"
]

# Neither console reads markup or emoji codes: untrusted text must not become either (`_terminal`).
out = Console(markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)  # an error stays one line


def as_json(message: Message) -> str:
    document = json.dumps(MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False)
    return escape_json_controls(document)


class Display:
    """Shows one swarm's events as they come (the live view, or JSON lines) and the reconnections
    between them, and tells the exit status of how the swarm ended."""

    def __init__(self, *, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.view = SwarmView()
        self._live: Live | None = None

    def reconnecting(self, attempt: Reconnecting) -> None:
        self.view.reconnect(attempt)
        if self._live is not None:
            self._live.update(self.view.render(), refresh=True)  # at once: no event will redraw it
        elif attempt.attempt == 1:
            err.print(
                safe_text(
                    f"swarm: the stream broke after event {attempt.after_sequence} ({attempt.cause}); "
                    "reconnecting…"
                )
            )

    def follow(self, events: Iterator[SwarmEvent]) -> None:
        if self.json_lines:
            for event in events:
                print(as_json(event), flush=True)
                self.view.apply(event)
            return
        with Live(self.view.render(), console=out, refresh_per_second=8, transient=False) as live:
            self._live = live
            try:
                for event in events:
                    self.view.apply(event)
                    live.update(self.view.render())
            finally:
                self._live = None
                if not self.view.swarm_id:  # no event came: no empty view is left behind
                    live.update(Group(), refresh=True)

    def finish(self) -> int:
        if not self.json_lines:
            out.print(self.view.summary())
        outcome = self.view.outcome
        return (
            EXIT_OK
            if outcome is not None and outcome.WhichOneof("kind") == "swarm_completed"
            else EXIT_FAILED
        )

    def finish_from(self, swarm: Swarm, after: int) -> int:
        """A swarm that had ended by `after` has no events left to show: its end, as GetSwarm tells."""
        state = _state(swarm.state)
        note = safe_text(
            f"swarm {swarm.swarm_id} is {state}; it has no events after {after} (its last is "
            f"{swarm.last_sequence})"
        )
        if self.json_lines:
            err.print(note)
        else:
            done = sum(1 for s in swarm.subtasks if s.state == orchestrator_pb2.SUBTASK_STATE_COMPLETED)
            detail = swarm.result if swarm.state == orchestrator_pb2.SWARM_STATE_COMPLETED else swarm.error
            out.print(note)
            out.print(ending(state, detail, swarm.usage, f"· {done}/{len(swarm.subtasks)} subtasks"))
        return EXIT_OK if swarm.state == orchestrator_pb2.SWARM_STATE_COMPLETED else EXIT_FAILED


def _spending(args: argparse.Namespace) -> Spending:
    budget = None
    if args.budget_usd or args.budget_tokens:
        budget = Budget(
            max_cost_usd=args.budget_usd,
            max_tokens=args.budget_tokens,
            synthesize_partial=args.synthesize_partial,
        )
    return Spending(
        budget=budget,
        worker_model=args.worker_model,
        hedging=args.hedge,
        hedge_max_extra=args.hedge_max_extra,
    )


def cmd_estimate(args: argparse.Namespace, client: SwarmClient) -> int:
    estimate = client.estimate(
        args.idea,
        args.agents,
        model=args.model,
        answer_max_tokens=args.answer_max_tokens,
        spending=_spending(args),
    )
    if args.json:
        print(as_json(estimate))
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    for column in ("model", "for", "tokens", "cost"):
        table.add_column(column)

    def row(model: str, role: str, cost: orchestrator_pb2.CostRange) -> None:
        table.add_row(
            safe_text(model),
            role,
            f"{cost.low_tokens:,} - {cost.high_tokens:,}",
            f"${cost.low_cost_usd:.4f} - ${cost.high_cost_usd:.4f}",
        )

    for model in estimate.models:
        row(model.model, model.role, model.range)
    row("", "total", estimate.total)
    out.print(table)
    out.print(Text(f"({estimate.assumptions}; nothing was started)", style="dim"))
    if args.budget_usd or args.budget_tokens:
        covers = (
            "covers"
            if estimate.budget_covers_high
            else "may not cover"
            if estimate.budget_covers_low
            else "does not cover"
        )
        out.print(f"the budget {covers} this swarm")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, client: SwarmClient) -> int:
    if args.estimate:
        return cmd_estimate(args, client)
    display = Display(json_lines=args.json)
    events = client.run(
        args.idea,
        args.agents,
        model=args.model,
        detach=args.detach,
        request_id=args.request_id,
        max_parallel=args.max_parallel,
        answer_max_tokens=args.answer_max_tokens,
        on_reconnect=display.reconnecting,
        spending=_spending(args),
    )
    try:
        display.follow(events)
    except KeyboardInterrupt:
        events.close()
        what = "it keeps running (--detach)" if args.detach else "the swarm is cancelled with it"
        err.print(f"interrupted: {what}")
        return EXIT_INTERRUPTED
    status = display.finish()
    outcome = display.view.outcome
    if display.view.reconnects and outcome and outcome.swarm_cancelled.reason == LEFT_REASON:
        err.print(
            "swarm: the connection to the orchestrator broke, and a swarm is cancelled when the "
            "`swarm run` that started it goes away; `--detach` lets a swarm outlive its connection"
        )
    return status


def cmd_watch(args: argparse.Namespace, client: SwarmClient) -> int:
    display = Display(json_lines=args.json)
    try:
        display.follow(client.watch(args.swarm_id, args.after, on_reconnect=display.reconnecting))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if display.view.outcome is None:  # it had ended by --after: nothing was left to replay
        return display.finish_from(client.get(args.swarm_id), args.after)
    return display.finish()


def _state(value: int) -> str:
    return orchestrator_pb2.SwarmState.Name(value).removeprefix("SWARM_STATE_").lower()  # type: ignore[arg-type]


def cmd_get(args: argparse.Namespace, client: SwarmClient) -> int:
    swarm = client.get(args.swarm_id)
    if args.json:
        print(as_json(swarm))
        return EXIT_OK
    out.print(
        Text.assemble(
            ("swarm", "bold"),
            " ",
            (strip_controls(swarm.swarm_id), "magenta"),
            f" · {_state(swarm.state)} · {swarm.num_agents} agents · ",
            strip_controls(f"{swarm.model} · provider {describe_provider(swarm.provider)}"),
        )
    )
    out.print(safe_text(f"idea: {strip_controls(swarm.idea)[:200]}"))
    if swarm.trace_id:  # the orchestrator traces: look the swarm up in the tracing backend
        out.print(safe_text(f"trace: {strip_controls(swarm.trace_id)}"))
    table = Table(box=None, header_style="bold")
    for column in ("subtask", "title", "state", "worker", "tries", "output tokens"):
        table.add_column(column)
    cut_off = 0
    for status in swarm.subtasks:
        state = Text(orchestrator_pb2.SubtaskState.Name(status.state).removeprefix("SUBTASK_STATE_").lower())
        if status.stop_reason in CUT_OFF:
            cut_off += 1
            state.append(" (cut off)", style="yellow")
        table.add_row(
            safe_text(status.subtask.id),
            Text(strip_controls(status.subtask.title)[:48]),
            state,
            safe_text(status.worker_id),
            str(status.attempts),
            f"{status.usage.output_tokens:,}",
        )
    if swarm.subtasks:
        out.print(table)
    if cut_off:
        out.print(
            Text(
                f"{cut_off} answer(s) cut off at their answer budget (stop_reason max_tokens): "
                "swarm run --answer-max-tokens raises it",
                style="yellow",
            )
        )
    if swarm.error:
        out.print(Text.assemble(("error:", "red"), " ", strip_controls(swarm.error)))
    if swarm.result:
        out.print(safe_text(swarm.result))
        out.print(
            f"usage: {swarm.usage.input_tokens:,} input / {swarm.usage.output_tokens:,} output tokens · "
            f"${swarm.usage.cost_usd:.4f}"
        )
    out.print(spending_lines(swarm))
    return EXIT_OK


def spending_lines(swarm: Swarm) -> Text:
    """The budget, what is spent (cache reads and writes apart), per model, and the hedges."""
    spent = swarm.spent
    lines = [
        f"spent: ${spent.cost_usd:.4f} · {spent.input_tokens:,} input + {spent.cache_creation_input_tokens:,} "
        f"cache-write + {spent.cache_read_input_tokens:,} cache-read / {spent.output_tokens:,} output tokens"
    ]
    if swarm.HasField("budget"):
        caps = [f"${swarm.budget.max_cost_usd:g}"] if swarm.budget.max_cost_usd else []
        caps += [f"{swarm.budget.max_tokens:,} tokens"] if swarm.budget.max_tokens else []
        lines.append(f"budget: {' and '.join(caps)}")
    for model in swarm.usage_by_model:
        lines.append(f"  {strip_controls(model.model)} ({model.role}): ${model.usage.cost_usd:.4f}")
    if swarm.hedging or swarm.hedges:
        lines.append(f"hedges: {swarm.hedges}")
    return Text("\n".join(lines))


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
        table.add_row(
            safe_text(swarm.swarm_id),
            _state(swarm.state),
            str(swarm.num_agents),
            created,
            Text(strip_controls(swarm.idea)[:60]),
        )
    out.print(table if response.swarms else "no swarms")
    if response.next_page_token:
        out.print(safe_text(f"more: swarm list --page-token {response.next_page_token}"))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: SwarmClient) -> int:
    swarm = client.cancel(args.swarm_id, args.reason)
    if args.json:
        print(as_json(swarm))
    else:
        out.print(safe_text(f"swarm {swarm.swarm_id} is {_state(swarm.state)}"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `swarm up --tls` is up's own flag, not a short --tls-ca.
    parser = argparse.ArgumentParser(
        prog="swarm", description="Run swarms of Claude agents in parallel.", allow_abbrev=False
    )
    parser.add_argument(
        "--target",
        default=default_target(),
        help=f"orchestrator address [env SWARM_TARGET, default {default_target()!r}]",
    )
    parser.add_argument(
        "--resume-within",
        type=float,
        default=os.environ.get("SWARM_RESUME_WITHIN_S") or DEFAULT_RESUME_WITHIN_S,  # a string is parsed
        metavar="SECONDS",
        help="how long run and watch try to resume a broken stream; 0 = not at all "
        f"[env SWARM_RESUME_WITHIN_S, default {DEFAULT_RESUME_WITHIN_S:g}]",
    )
    add_connection_options(parser)
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
    run.add_argument(
        "--answer-max-tokens",
        type=int,
        default=0,
        help="most output tokens each agent's answer may have (0 = the server's default)",
    )
    run.add_argument(
        "--budget-usd", type=float, default=0.0, help="the most the swarm may cost, in US dollars"
    )
    run.add_argument("--budget-tokens", type=int, default=0, help="the most tokens the swarm may use")
    run.add_argument(
        "--synthesize-partial",
        action="store_true",
        help="when the budget runs out, synthesize the subtasks that completed (the swarm still fails)",
    )
    run.add_argument(
        "--worker-model", default="", help="the model the subtasks run on (default: the server's)"
    )
    run.add_argument(
        "--hedge",
        dest="hedge",
        action="store_const",
        const=True,
        default=None,
        help="hedge straggling subtasks",
    )
    run.add_argument("--no-hedge", dest="hedge", action="store_const", const=False, help="never hedge")
    run.add_argument(
        "--hedge-max-extra",
        type=float,
        default=0.0,
        help="most extra attempts hedges may add, as a fraction of the agents (0 = the server's)",
    )
    run.add_argument(
        "--estimate", action="store_true", help="print the expected tokens and cost, and start nothing"
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

    certs = commands.add_parser(
        "certs",
        help="write a development CA and server and client certificates (for 127.0.0.1 and localhost)",
    )
    certs.add_argument(
        "directory", help="where to write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem"
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or address the server certificate is for (repeatable; default 127.0.0.1 and localhost)",
    )
    certs.set_defaults(handler=cmd_certs)

    from swarm_client._local_stack import add_up_command

    add_up_command(commands, run_demo=_demo)
    return parser


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """How a client reaches a TLS orchestrator that wants a token (the CLI and the web console)."""
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get(ENV_CA, ""),
        metavar="PEM",
        help=f"the CA the orchestrator's certificate is checked against; set = TLS [env {ENV_CA}]",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get(ENV_CERT, ""),
        metavar="PEM",
        help=f"this client's certificate, for an orchestrator that requires one (mTLS) [env {ENV_CERT}]",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get(ENV_KEY, ""),
        metavar="PEM",
        help=f"the key of --tls-cert [env {ENV_KEY}]",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get(ENV_SERVER_NAME, ""),
        metavar="NAME",
        help=f"the name the orchestrator's certificate must carry, when not the target's host [env {ENV_SERVER_NAME}]",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(ENV_TOKEN, ""),
        help=f"sent as `authorization: Bearer TOKEN`; the variable keeps it out of `ps` [env {ENV_TOKEN}]",
    )


def tls_of(args: argparse.Namespace) -> ClientTls | None:
    if not args.tls_ca:
        if args.tls_cert or args.tls_key or args.tls_server_name:
            raise TlsOptionError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def cmd_certs(args: argparse.Namespace) -> int:
    from swarm_client._certs import DEFAULT_HOSTS, write_development_certificates

    written = write_development_certificates(Path(args.directory), args.host or DEFAULT_HOSTS)
    out.print(safe_text("wrote " + ", ".join(str(path) for path in written)))
    out.print(
        safe_text(
            "development certificates only: a CA made here, trusted by nothing else; keep the -key.pem files private"
        )
    )
    return EXIT_OK


def _demo(target: str, idea: str, agents: int, tls: ClientTls | None, token: str) -> int:
    with SwarmClient(target, tls=tls, token=token) as client:
        args = argparse.Namespace(
            idea=idea,
            agents=agents,
            model="",
            detach=False,
            request_id="",
            max_parallel=0,
            answer_max_tokens=0,
            budget_usd=0.0,
            budget_tokens=0,
            synthesize_partial=False,
            worker_model="",
            hedge=None,
            hedge_max_extra=0.0,
            estimate=False,
            json=False,
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
    if args.command in ("up", "certs"):
        return int(handler(args))
    if args.command == "run" and args.agents < 1:
        err.print(f"swarm: --agents must be at least 1, got {args.agents}")
        return EXIT_USAGE
    if args.resume_within < 0:
        err.print(f"swarm: --resume-within must not be negative, got {args.resume_within:g}")
        return EXIT_USAGE
    try:
        tls = tls_of(args)
        with SwarmClient(
            args.target, resume_within_s=args.resume_within, channel=channel, tls=tls, token=args.token
        ) as client:
            return int(handler(args, client))
    except TlsOptionError as error:
        err.print(safe_text(f"swarm: {error}"))
        return EXIT_USAGE
    except TlsFailed as error:
        err.print(
            safe_text(
                f"swarm: the TLS connection to the orchestrator at {args.target} failed: {error.message}"
            )
        )
        return EXIT_UNREACHABLE
    except Unauthenticated as error:
        hint = "" if args.token else " (give --token or SWARM_TOKEN)"
        err.print(
            safe_text(
                f"swarm: UNAUTHENTICATED: the orchestrator at {args.target} refused the call: {error.message}{hint}"
            )
        )
        return EXIT_FAILED
    except InvalidArgument as error:
        fields = "; ".join(f"{field}: {text}" for field, text in error.violations) or error.message
        err.print(safe_text(f"swarm: invalid request: {fields}"))
        return EXIT_USAGE
    except ResumeFailed as error:
        how = (
            "resuming is off (--resume-within 0)"
            if args.resume_within <= 0
            else f"could not be resumed within {args.resume_within:g}s ({_unreachable(error.cause, args.target)})"
        )
        err.print(
            safe_text(
                f"swarm: the stream of swarm {error.swarm_id} broke after event {error.last_sequence} and "
                f"{how}; `swarm watch {error.swarm_id} --after {error.last_sequence}` goes on from there"
            )
        )
        return EXIT_UNREACHABLE
    except Unavailable as error:
        if "connect" in error.message.lower():
            err.print(
                f"swarm: {_unreachable(error.message, args.target)}; is it running? "
                "(`swarm up` starts a local stack)"
            )
        else:
            err.print(safe_text(f"swarm: the orchestrator at {args.target} is unavailable: {error.message}"))
        return EXIT_UNREACHABLE
    except SwarmError as error:
        err.print(safe_text(f"swarm: {error.code.name}: {error.message}"))
        return EXIT_FAILED


def _unreachable(cause: str, target: str) -> str:
    """grpc's long connection-failure text adds nothing to the target's name."""
    return f"cannot reach the orchestrator at {target}" if "connect" in cause.lower() else cause
