"""When a worker's replies leave: those of one ExecuteSubtasks stream, or of one ExecuteSubtask
call, each subtask's text held to the delta window its caller asked for.

A model streams a chunk every few tens of milliseconds, and the orchestrator shows a subtask's
output as one event per window (`--delta-window-ms`) anyway. Sent a message per chunk, 100 agents
streaming 50 chunks a second cost the orchestrator 5,000 messages a second to take in and gather
again: most of its CPU. So the orchestrator names its window in each start, and here:

- a subtask's text goes at most once per window: every chunk since the last send, joined, in order;
- text that comes after a quiet window goes at once: the window runs from the last send, not on a
  clock, so a slow stream is not held back;
- the subtasks of a stream share its messages: held text is sent at most once per window for the
  whole stream, every subtask whose window is over in the same message. A stream of 125 subtasks
  that each stream 5 chunks a second sends about 20 messages a second, not 625;
- a result or an error goes at once, just after the text its subtask still held; a cancelled
  subtask's held text is dropped, since its caller left it.

What waits here is bounded: each reply waiting, and each subtask's held text, takes one of `limit`
places until it is sent, and a subtask waits for a place while every one is taken.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from swarm.v1 import worker_pb2

# A timer may run this much before its time; a window that ends within it is over.
_EARLY_S = 1e-6


class _Tick:
    """Wakes the sender: some held text's window is over."""


_TICK: Final = _Tick()


@dataclass(slots=True, eq=False)
class _Call:
    swarm_id: str
    window_s: float
    held: list[str] = field(default_factory=list)
    sent_at: float = -math.inf  # loop time of its last text sent

    @property
    def due(self) -> float:
        return self.sent_at + self.window_s


class Outbox:
    def __init__(self, worker_id: str, limit: int) -> None:
        self._worker_id = worker_id
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Queue[worker_pb2.SubtaskReply | _Tick | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(limit)
        self._calls: dict[int, _Call] = {}
        self._holding: dict[int, _Call] = {}  # the calls with text held, in the order it came
        self._flushed_at = -math.inf  # loop time of the stream's last held text sent
        self._timer: asyncio.TimerHandle | None = None

    def open(self, call_id: int, swarm_id: str, window_s: float) -> None:
        self._calls[call_id] = _Call(swarm_id, window_s)

    def set_window(self, swarm_id: str, window_s: float) -> None:
        """A new window for the swarm's calls open here."""
        for call_id, call in self._calls.items():
            if call.swarm_id == swarm_id and call.window_s != window_s:
                call.window_s = window_s
                if call_id in self._holding:
                    self._wake_by(self._sendable_at(call))

    async def text(self, call_id: int, text: str) -> None:
        """Holds a chunk of the call's output until its window is over."""
        call = self._calls[call_id]
        if not call.held and call.window_s <= 0:
            await self.reply(self._text_reply(call_id, call, text))
            return
        if not call.held:
            await self._room.acquire()
            self._holding[call_id] = call
            self._wake_by(self._sendable_at(call))
        call.held.append(text)

    async def reply(self, reply: worker_pb2.SubtaskReply) -> None:
        """Sends a reply as soon as it can go, after the text its call holds."""
        self._release_held(reply.call_id)
        await self._room.acquire()
        self._ready.put_nowait(reply)

    def close(self, call_id: int, *, cancelled: bool) -> None:
        """The call is over. A cancelled one's held text is dropped and `cancelled` is sent (at
        once: there is at most one per call, so it takes no place); any other's goes out."""
        call = self._calls.pop(call_id, None)
        if cancelled:
            if call is not None and self._holding.pop(call_id, None) is not None:
                call.held.clear()
                self._room.release()
            self._ready.put_nowait(
                worker_pb2.SubtaskReply(call_id=call_id, cancelled=worker_pb2.SubtaskCancelled())
            )
        elif call is not None:
            self._release_held(call_id, call)

    def finish(self) -> None:
        """Nothing more is to be sent: `messages` ends, after what is waiting and held."""
        self._ready.put_nowait(None)

    async def messages(self) -> AsyncIterator[list[worker_pb2.SubtaskReply]]:
        """Each message's replies: what is ready, with the held text whose window is over."""
        ready = self._ready
        while True:
            replies: list[worker_pb2.SubtaskReply] = []
            item = await ready.get()
            while item is not None:
                if not isinstance(item, _Tick):
                    replies.append(item)
                if ready.empty():
                    break
                item = ready.get_nowait()
            replies += self._take_held(everything=item is None)
            for reply in replies:
                if not reply.HasField("cancelled"):
                    self._room.release()
            if replies:
                yield replies
            if item is None:
                return

    # ---- held text ------------------------------------------------------------------------

    def _sendable_at(self, call: _Call) -> float:
        """When the call's held text may go: its own window over, and the stream's."""
        return max(call.due, self._flushed_at + call.window_s)

    def _wake_by(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._ready.put_nowait(_TICK)

    def _release_held(self, call_id: int, call: _Call | None = None) -> None:
        """The call's held text goes out now, ahead of whatever the call sends next."""
        call = call or self._calls.get(call_id)
        if call is not None and self._holding.pop(call_id, None) is not None:
            self._ready.put_nowait(self._text_reply(call_id, call))  # its place moves with it

    def _take_held(self, *, everything: bool) -> list[worker_pb2.SubtaskReply]:
        """The held text whose window is over (or all of it), as replies; wakes the sender again
        for what is still held."""
        now = self._loop.time()
        replies = [
            self._text_reply(call_id, call, sent_at=now)
            for call_id, call in self._holding.items()
            if everything or call.due <= now + _EARLY_S
        ]
        if replies:
            self._flushed_at = now
            for reply in replies:
                del self._holding[reply.call_id]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._holding:
            self._wake_by(min(self._sendable_at(call) for call in self._holding.values()))
        return replies

    def _text_reply(
        self, call_id: int, call: _Call, text: str = "", *, sent_at: float | None = None
    ) -> worker_pb2.SubtaskReply:
        """A reply of the call's held text, and `text` after it. The calls sent together share
        one `sent_at`: stamped one by one, each would be due a little after the stream's next
        flush, miss it, and wait a whole window more."""
        text = "".join(call.held) + text
        call.held.clear()
        call.sent_at = self._loop.time() if sent_at is None else sent_at
        output = worker_pb2.ExecuteSubtaskResponse(worker_id=self._worker_id, text=text)
        return worker_pb2.SubtaskReply(call_id=call_id, output=output)
