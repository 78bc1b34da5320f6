"""The live progress view of a swarm: a row per agent, an overall bar, the synthesis as it streams.

Every string an event carries is untrusted and reaches the terminal only through `_terminal`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from swarm.v1 import events_pb2
from swarm_client._resume import Reconnecting
from swarm_client._terminal import safe_text, strip_controls

_STATE_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "retrying": "yellow",
    "done": "green",
    "cut off": "yellow",
    "failed": "red",
}
# Stop reasons that mean an answer was cut off rather than finished.
CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})


@dataclass
class AgentRow:
    subtask: events_pb2.Subtask
    state: str = "queued"
    worker_id: str = ""
    attempt: int = 0
    chars: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def tokens(self) -> str:
        return (
            f"{self.output_tokens:,}"
            if self.output_tokens
            else (f"~{self.chars // 4:,}" if self.chars else "")
        )


def describe_provider(provider: str) -> str:
    if provider == "simulated":
        return "simulated: no model is called (set ANTHROPIC_API_KEY and restart the services to use Claude)"
    return provider


class SwarmView:
    """Folds events into what the user sees; `render()` draws it."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.swarm_id = ""
        self.accepted = events_pb2.SwarmAccepted()
        self.rows: dict[str, AgentRow] = {}
        self.synthesis: list[str] = []
        self.synthesis_attempt = 0
        # Partial syntheses done, by level: how many the level has, and which are done.
        self.partials: dict[int, tuple[int, set[str]]] = {}
        self.resumed = 0
        self.outcome: events_pb2.SwarmEvent | None = None
        self.last_sequence = 0
        self.reconnecting: Reconnecting | None = None  # until the next event
        self.reconnects = 0  # breaks of the stream that were resumed or are being resumed

    @property
    def done(self) -> int:
        return sum(1 for row in self.rows.values() if row.state in ("done", "cut off"))

    @property
    def cut_off(self) -> int:
        return sum(1 for row in self.rows.values() if row.state == "cut off")

    def _row(self, subtask_id: str) -> AgentRow:
        """A watch that starts after plan_created never saw the plan: such rows are made as met."""
        row = self.rows.get(subtask_id)
        if row is None:
            row = self.rows[subtask_id] = AgentRow(events_pb2.Subtask(id=subtask_id, title=subtask_id))
        return row

    def reconnect(self, attempt: Reconnecting) -> None:
        self.reconnecting = attempt
        if attempt.attempt == 1:
            self.reconnects += 1

    def apply(self, event: events_pb2.SwarmEvent) -> None:
        self.reconnecting = None
        self.swarm_id = event.swarm_id
        self.last_sequence = event.sequence
        kind = event.WhichOneof("kind")
        if kind == "accepted":
            self.accepted = event.accepted
        elif kind == "plan_created":
            self.rows = {s.id: AgentRow(s) for s in event.plan_created.subtasks}
        elif kind == "subtask_started":
            row = self._row(event.subtask_started.subtask_id)
            row.state, row.worker_id, row.attempt = (
                "running",
                event.subtask_started.worker_id,
                event.subtask_started.attempt,
            )
            row.chars = 0
        elif kind == "subtask_delta":
            self._row(event.subtask_delta.subtask_id).chars += len(event.subtask_delta.text)
        elif kind == "subtask_completed":
            completed = event.subtask_completed
            row = self._row(completed.subtask_id)
            row.state = "cut off" if completed.stop_reason in CUT_OFF else "done"
            row.output_tokens = completed.usage.output_tokens
        elif kind == "partial_synthesis":
            partial = event.partial_synthesis
            _, done = self.partials.get(partial.level, (0, set()))
            self.partials[partial.level] = (partial.count, done | {partial.id})
        elif kind == "subtask_failed":
            failed = event.subtask_failed
            row = self._row(failed.subtask_id)
            row.state, row.error = ("retrying" if failed.will_retry else "failed"), failed.error
        elif kind == "synthesis_delta":
            if event.synthesis_delta.attempt != self.synthesis_attempt:  # a resumed swarm synthesizes afresh
                self.synthesis_attempt = event.synthesis_delta.attempt
                self.synthesis = []
            self.synthesis.append(event.synthesis_delta.text)
        elif kind == "swarm_resumed":
            self.resumed += 1
        elif kind in ("swarm_completed", "swarm_failed", "swarm_cancelled"):
            self.outcome = event

    def header(self) -> Text:
        text = Text()
        text.append("swarm ", style="bold")
        text.append(strip_controls(self.swarm_id) or "…", style="bold magenta")
        if self.accepted.num_agents:
            text.append(f" · {self.accepted.num_agents} agents · {strip_controls(self.accepted.model)}")
            if self.resumed:
                text.append(" · resumed after an orchestrator restart", style="yellow")
            text.append(
                f"\nprovider: {strip_controls(describe_provider(self.accepted.provider))}",
                style="yellow" if self.accepted.provider == "simulated" else "dim",
            )
        return text

    def connection(self) -> Text | None:
        attempt = self.reconnecting
        if attempt is None:
            return None
        cause = strip_controls(attempt.cause)
        return Text(
            f"reconnecting… attempt {attempt.attempt}, after event {attempt.after_sequence}, "
            f"{attempt.remaining_s:.0f}s left: {cause[:100]}",
            style="bold yellow",
        )

    def render(self) -> RenderableType:
        parts: list[RenderableType] = [self.header()]
        connection = self.connection()
        if connection is not None:
            parts.append(connection)
        if not self.rows:
            parts.append(Text("planning…", style="cyan"))
            return Group(*parts)
        table = Table(expand=False, box=None, padding=(0, 1), header_style="bold")
        for column in ("#", "subtask", "state", "worker", "try", "tokens"):
            table.add_column(column, justify="right" if column in ("#", "try", "tokens") else "left")
        for index, row in enumerate(self.rows.values(), start=1):
            title = strip_controls(row.subtask.title)
            title = title if len(title) <= 48 else title[:47] + "…"
            state = Text(row.state, style=_STATE_STYLE[row.state])
            table.add_row(
                str(index), Text(title), state, safe_text(row.worker_id), str(row.attempt or ""), row.tokens
            )
        parts.append(table)
        total = len(self.rows)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=total, completed=self.done, width=40),
            Text(f"{self.done}/{total} subtasks · {time.monotonic() - self.started:.1f}s"),
        )
        parts.append(bar)
        if self.partials and not self.synthesis and self.outcome is None:
            levels = " · ".join(
                f"level {level}: {len(done)}/{count}"
                for level, (count, done) in sorted(self.partials.items())
            )
            parts.append(Text(f"synthesis in parts, partial syntheses done: {levels}", style="cyan"))
        if self.synthesis and self.outcome is None:
            tail = strip_controls("".join(self.synthesis))[-1500:]
            parts.append(Panel(Text(tail), title="synthesis (streaming)", border_style="cyan"))
        return Group(*parts)

    def summary(self) -> RenderableType:
        """The final result and its cost, or why there is none."""
        elapsed = time.monotonic() - self.started
        if self.outcome is None:
            return Text("the stream ended before the swarm did", style="red")
        progress = f"in {elapsed:.1f}s · {self.done}/{len(self.rows)} subtasks"
        kind = self.outcome.WhichOneof("kind")
        if kind == "swarm_completed":
            completed = self.outcome.swarm_completed
            return ending("completed", completed.result, completed.usage, progress, cut_off=self.cut_off)
        if kind == "swarm_failed":
            return ending("failed", self.outcome.swarm_failed.error)
        return ending("cancelled", self.outcome.swarm_cancelled.reason)


def ending(
    state: str, detail: str, usage: events_pb2.Usage | None = None, progress: str = "", *, cut_off: int = 0
) -> RenderableType:
    """How a swarm ended: the result and its cost (links shown with their address, not hidden in
    the terminal), or why there is none; `cut_off` answers stopped at their answer budget."""
    if state == "completed":
        usage = usage or events_pb2.Usage()
        line = Text(
            " ".join(filter(None, ("completed", progress)))
            + f" · {usage.input_tokens:,} input / {usage.output_tokens:,} output tokens · ${usage.cost_usd:.4f}",
            style="bold green",
        )
        if cut_off:
            line.append(
                f"\n{cut_off} answer(s) cut off at their answer budget (stop_reason max_tokens)",
                style="bold yellow",
            )
        return Group(Panel(Markdown(strip_controls(detail), hyperlinks=False), title="result"), line)
    return Text(
        f"swarm {state}: {strip_controls(detail)}", style="bold red" if state == "failed" else "bold yellow"
    )
