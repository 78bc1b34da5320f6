"""One long-lived ExecuteSubtasks stream to a worker, carrying many subtasks at once.

A gRPC call costs far more than a message on a call already open (about 190 µs of CPU a side
against 20 µs, measured in the dispatch benchmark), so the orchestrator opens one stream per
worker and runs every subtask it gives that worker on it, each call and reply tagged with a call
id, and each message carrying whatever was ready to send. The stream opens on first use and again
after it breaks; a break fails every subtask on it, as if each had been a call of its own to a
worker that went away.

A swarm's plan context (every subtask's title) is in all of its subtasks' prompts, and grows with
the swarm: carried by each start, a swarm of N sent N times its plan, the most bytes of any part of
a start. So it goes to the worker once, under a key that the starts name, for as long as calls on
the stream use it.

A subtask left before its end is cancelled on the worker, which frees its slot only once the model
call's cleanup is done, and says so. Until then, or for at most `cancel_timeout_s`, the slot counts
as taken (`stopping`), so a subtask sent next is not refused for want of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from swarm.v1 import worker_pb2, worker_pb2_grpc
from swarm_common.batches import batches
from swarm_common.status import CallFailure

log = logging.getLogger("swarm.orchestrator.session")


@dataclass(frozen=True, slots=True)
class _Forget:
    """No start names this plan context key any more."""

    key: str


@dataclass(slots=True)
class _HeldContext:
    """A plan context the worker holds for a stream: its key, and the calls using it."""

    key: str
    users: int = 0


# What goes to the worker: calls, changes of a swarm's delta window, and the plan contexts the
# starts name.
Sendable = worker_pb2.SubtaskCall | worker_pb2.DeltaWindow | worker_pb2.PlanContext | _Forget
Outbox = asyncio.Queue[Sendable | None]
Reply = worker_pb2.ExecuteSubtaskResponse | CallFailure

# A worker confirms a cancel within milliseconds (its model stream closes); one that does not is
# stuck or predates the confirmation, and its slot is counted free after this long regardless.
CANCEL_TIMEOUT_S = 5.0


class Inbox:
    """One subtask's replies, in order, for the one task that reads them: lighter than an
    asyncio.Queue, which a subtask would make and feed once per reply."""

    def __init__(self) -> None:
        self._replies: collections.deque[Reply] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._waiting: asyncio.Future[None] | None = None

    def put(self, reply: Reply) -> None:
        self._replies.append(reply)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    async def get(self) -> Reply:
        while not self._replies:
            self._waiting = self._loop.create_future()
            await self._waiting
        return self._replies.popleft()


class SubtaskCallFailed(Exception):
    def __init__(self, failure: CallFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _Stream:
    """One ExecuteSubtasks call and the subtasks on it: when it ends, it fails its own subtasks,
    never those of a stream opened after it."""

    def __init__(self, on_slot_freed: Callable[[], None]) -> None:
        self.outbox: Outbox = asyncio.Queue()
        self.inboxes: dict[int, Inbox] = {}
        # Subtasks cancelled here that the worker has not yet said are over, each with the timer
        # that stops waiting for it.
        self.stopping: dict[int, asyncio.TimerHandle] = {}
        self.reader: asyncio.Task[None] | None = None
        self.ended = False
        self._on_slot_freed = on_slot_freed
        # The plan contexts the worker holds for this stream, by text.
        self._contexts: dict[str, _HeldContext] = {}
        self._context_keys = itertools.count(1)

    def use_context(self, text: str) -> str:
        """The key a start names `text` by; sent to the worker first if it does not hold it."""
        held = self._contexts.get(text)
        if held is None:
            held = self._contexts[text] = _HeldContext(str(next(self._context_keys)))
            self.send(worker_pb2.PlanContext(key=held.key, text=text))
        held.users += 1
        return held.key

    def release_context(self, text: str) -> None:
        """A call that used `text` is over: the worker lets it go once no call uses it. A later
        start sends it again, under a new key."""
        held = self._contexts[text]
        held.users -= 1
        if not held.users:
            del self._contexts[text]
            self.send(_Forget(held.key))

    def send(self, call: Sendable) -> None:
        if not self.ended:
            self.outbox.put_nowait(call)

    def cancel(self, call_id: int, timeout_s: float) -> None:
        """Cancels the subtask on the worker; its slot stays taken until the worker says the
        subtask is over, for at most `timeout_s`."""
        if self.ended:
            return
        self.send(worker_pb2.SubtaskCall(call_id=call_id, cancel=worker_pb2.CancelSubtask()))
        self.stopping[call_id] = asyncio.get_running_loop().call_later(
            timeout_s, self._unconfirmed, call_id, timeout_s
        )

    def over(self, call_id: int) -> None:
        """The worker ended a subtask cancelled here (or the stream ended): its slot is free."""
        timer = self.stopping.pop(call_id, None)
        if timer is not None:
            timer.cancel()
            self._on_slot_freed()

    def _unconfirmed(self, call_id: int, timeout_s: float) -> None:
        log.warning(
            f"a cancelled subtask's end was not confirmed within {timeout_s:g}s: its slot is counted free"
        )
        self.over(call_id)

    async def requests(self) -> AsyncIterator[worker_pb2.ExecuteSubtasksRequest]:
        ready: AsyncIterator[list[Sendable]] = batches(self.outbox)
        async for batch in ready:
            request = worker_pb2.ExecuteSubtasksRequest()
            for item in batch:
                if isinstance(item, worker_pb2.SubtaskCall):
                    request.calls.append(item)
                elif isinstance(item, worker_pb2.DeltaWindow):
                    # Applied after the calls: a start made after the change carries the window too.
                    request.delta_windows.append(item)
                elif isinstance(item, worker_pb2.PlanContext):
                    request.plan_contexts.append(item)  # taken before the calls that name it
                else:
                    request.forget_plan_contexts.append(item.key)  # after the calls, whose ended it
            yield request

    async def end(self) -> None:
        """Closes the request side and stops reading; the subtasks still on it fail."""
        self.ended = True
        self.outbox.put_nowait(None)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class WorkerSession:
    def __init__(
        self,
        stub: worker_pb2_grpc.WorkerServiceAsyncStub,
        *,
        on_slot_freed: Callable[[], None] = lambda: None,
        cancel_timeout_s: float = CANCEL_TIMEOUT_S,
    ) -> None:
        """`on_slot_freed` is called when a cancelled subtask's slot is free again."""
        self._stub = stub
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._on_slot_freed = on_slot_freed
        self._cancel_timeout_s = cancel_timeout_s

    @property
    def stopping(self) -> int:
        """The worker's slots still held by subtasks cancelled here."""
        return len(self._stream.stopping) if self._stream is not None else 0

    def _open(self) -> _Stream:
        if self._stream is None:
            stream = _Stream(self._on_slot_freed)
            # A context of its own: the stream outlives the subtask that opened it, whose log
            # fields and trace it would otherwise carry.
            stream.reader = asyncio.create_task(
                self._read(stream, self._stub.ExecuteSubtasks(stream.requests())),
                context=contextvars.Context(),
            )
            self._stream = stream
        return self._stream

    async def _read(
        self,
        stream: _Stream,
        call: grpc.aio.StreamStreamCall[
            worker_pb2.ExecuteSubtasksRequest, worker_pb2.ExecuteSubtasksResponse
        ],
    ) -> None:
        """Hands each reply to its subtask; when the stream ends, fails whatever is still open."""
        failure = CallFailure(grpc.StatusCode.UNAVAILABLE, "the worker closed the stream")
        try:
            async for response in call:
                for reply in response.replies:
                    kind = reply.WhichOneof("kind")
                    inbox = stream.inboxes.get(reply.call_id)
                    if inbox is None:
                        # A subtask cancelled here, whose last replies were on their way: the
                        # one that ends it says its slot is free.
                        if kind != "output" or reply.output.HasField("result"):
                            stream.over(reply.call_id)
                    elif kind == "error":
                        inbox.put(CallFailure.of_proto(reply.error))
                    elif kind == "cancelled":
                        inbox.put(CallFailure(grpc.StatusCode.CANCELLED, "the worker cancelled the subtask"))
                    else:
                        inbox.put(reply.output)
        except grpc.aio.AioRpcError as error:
            failure = CallFailure(error.code(), error.details() or error.code().name)
        finally:
            call.cancel()
            stream.ended = True
            if self._stream is stream:
                self._stream = None
            for inbox in stream.inboxes.values():
                inbox.put(failure)
            for call_id in list(stream.stopping):
                stream.over(call_id)

    async def execute(
        self, request: worker_pb2.ExecuteSubtaskRequest, *, plan_context: str = ""
    ) -> AsyncGenerator[worker_pb2.ExecuteSubtaskResponse, None]:
        """The subtask's chunks, then its result, as ExecuteSubtask would stream them; a failure
        raises SubtaskCallFailed. Leaving before the result cancels the subtask on the worker.
        `plan_context` goes to the worker once for all the calls on the stream that share it."""
        call_id = next(self._ids)
        inbox = Inbox()
        stream = self._open()
        stream.inboxes[call_id] = inbox
        if plan_context:
            request.plan_context_key = stream.use_context(plan_context)
        stream.send(worker_pb2.SubtaskCall(call_id=call_id, start=request))
        # The worker is done with the call once it sent its result or its error, whether or not
        # the caller reads on after the result.
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, CallFailure):
                    finished = True
                    raise SubtaskCallFailed(item)
                finished = item.HasField("result")
                yield item
        finally:
            del stream.inboxes[call_id]
            if not finished:
                stream.cancel(call_id, self._cancel_timeout_s)
            if plan_context:
                stream.release_context(plan_context)

    def set_window(self, swarm_id: str, window_s: float) -> None:
        """A new delta window for the swarm's subtasks running on this worker (none: no stream)."""
        if self._stream is not None:
            change = worker_pb2.DeltaWindow(swarm_id=swarm_id)
            change.window.FromNanoseconds(round(window_s * 1e9))
            self._stream.send(change)

    async def close(self) -> None:
        """Ends the stream; subtasks still on it fail as if the worker had gone. A subtask started
        meanwhile opens a stream of its own."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.end()
