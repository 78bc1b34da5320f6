"""Translates WorkerService calls to and from the Worker. A subtask is admitted in one place
(`_admit`), its outputs come from one place (`_outputs`), and they leave through an Outbox, which
holds its text to the caller's delta window (`outbox.py`); ExecuteSubtask streams them as a call of
their own, ExecuteSubtasks as messages on a stream shared with other subtasks. Whatever a subtask
ends in, its caller is told: an error the worker did not expect ends it as INTERNAL, with an error
id that the worker's log line carries too, and nothing else about it."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from swarm.v1 import events_pb2, worker_pb2, worker_pb2_grpc
from swarm_common.errors import ProviderError
from swarm_common.logs import Throttle
from swarm_common.providers import DEFAULT_ANSWER_MAX_TOKENS
from swarm_common.rpc_errors import internal_message, new_error_id
from swarm_common.status import WORKER_BUSY, CallFailure
from swarm_common.telemetry import TRACE_HEADERS
from swarm_common.usage import usage_proto
from worker_service.outbox import Outbox
from worker_service.worker import Assignment, RefusedAssignment, Slot, Worker, WorkerBusy, executing

log = logging.getLogger("swarm.worker")

# The request and response types are the method's own; the context is only passed through.
Context = grpc.aio.ServicerContext[Any, Any]


class CallFailed(Exception):
    def __init__(self, failure: CallFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class StreamMisused(Exception):
    """The caller broke the stream's rules: the stream ends with `code`."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DuplicateCall(StreamMisused):
    """A start reused the id of a call still running on the stream: the caller has lost track."""


class TooManyPlanContexts(StreamMisused):
    """The caller sent more plan contexts than its calls could use and forgot none."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def _window_s(request: worker_pb2.ExecuteSubtaskRequest) -> float:
    """The caller's delta window, in seconds; 0 = each chunk as it comes."""
    return request.delta_window.ToNanoseconds() / 1e9 if request.HasField("delta_window") else 0.0


def _assignment(
    request: worker_pb2.ExecuteSubtaskRequest, context: Context | None = None, plan_context: str | None = None
) -> Assignment:
    """The request as an assignment; a direct caller's trace headers may come as call metadata,
    and a stream's start may name a plan context sent before it (`plan_context`)."""
    trace_context = dict(request.trace_context)
    if not trace_context and context is not None:
        metadata = context.invocation_metadata() or ()
        trace_context = {key: str(value) for key, value in metadata if key in TRACE_HEADERS}
    deadline = None
    if request.HasField("deadline"):
        deadline = request.deadline.seconds + request.deadline.nanos / 1e9
    return Assignment(
        swarm_id=request.swarm_id,
        subtask_id=request.subtask.id,
        title=request.subtask.title,
        instructions=request.subtask.instructions,
        idea=request.idea,
        model=request.model,
        attempt=request.attempt,
        deadline=deadline,
        max_tokens=request.max_tokens or DEFAULT_ANSWER_MAX_TOKENS,
        trace_context=trace_context,
        plan_context=request.plan_context if plan_context is None else plan_context,
        cache_shared_prefix=request.cache_shared_prefix,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker: Worker, *, stream_queue: int = 1024) -> None:
        """`stream_queue`: replies an ExecuteSubtasks stream holds for a caller that reads slowly
        before its subtasks wait, and the stream stops reading the caller's requests."""
        self._worker = worker
        self._stream_queue = stream_queue
        self._unexpected = Throttle()

    def _admit(
        self,
        request: worker_pb2.ExecuteSubtaskRequest,
        *,
        direct: bool,
        context: Context | None = None,
        plan_contexts: dict[str, str] | None = None,
    ) -> tuple[Assignment, Slot]:
        """The request as an assignment, and the slot it holds; a refusal raises CallFailed.
        `plan_contexts`: those sent on the stream, by key, which a start may name."""
        plan_context = None
        if request.plan_context_key:
            plan_context = (plan_contexts or {}).get(request.plan_context_key)
            if plan_context is None:
                raise CallFailed(
                    CallFailure(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"plan_context_key {request.plan_context_key!r} names no plan context sent on this stream",
                    )
                )
        if not request.subtask.id:
            raise CallFailed(CallFailure(grpc.StatusCode.INVALID_ARGUMENT, "subtask.id is required"))
        if request.max_tokens < 0:
            raise CallFailed(CallFailure(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must not be negative"))
        assignment = _assignment(request, context, plan_context)
        try:
            return assignment, self._worker.claim(assignment, direct=direct)
        except RefusedAssignment as refused:
            raise CallFailed(CallFailure(grpc.StatusCode.INVALID_ARGUMENT, str(refused))) from None
        except WorkerBusy as busy:
            raise CallFailed(
                CallFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(busy), WORKER_BUSY)
            ) from None

    async def _outputs(
        self, assignment: Assignment, slot: Slot
    ) -> AsyncIterator[str | worker_pb2.ExecuteSubtaskResponse]:
        """An admitted subtask's chunks, then its result once its slot is free again; a failure
        raises CallFailed."""
        usage: events_pb2.Usage | None = None
        stop_reason = ""
        try:
            async for item in self._worker.execute(assignment, slot):
                if isinstance(item, str):
                    yield item
                else:
                    usage = usage_proto(item)
                    stop_reason = item.stop_reason
        except ProviderError as error:
            raise CallFailed(CallFailure.of_provider_error(error)) from None
        except Exception as error:
            raise CallFailed(self._unexpected_failure(error, assignment)) from None
        if usage is not None:
            result = worker_pb2.SubtaskResult(
                usage=usage, model=assignment.model or self._worker.default_model, stop_reason=stop_reason
            )
            yield worker_pb2.ExecuteSubtaskResponse(worker_id=self._worker.worker_id, result=result)

    async def _run(self, outbox: Outbox, call_id: int, assignment: Assignment, slot: Slot) -> None:
        """One call from its start to its last reply, a result or an error, sent through `outbox`;
        in a task of its own, which is the assignment's span."""
        try:
            with executing(assignment):
                async for item in self._outputs(assignment, slot):
                    if isinstance(item, str):
                        await outbox.text(call_id, item)
                    else:
                        await outbox.reply(worker_pb2.SubtaskReply(call_id=call_id, output=item))
        except CallFailed as failed:
            await outbox.reply(worker_pb2.SubtaskReply(call_id=call_id, error=failed.failure.to_proto()))

    def _unexpected_failure(self, error: Exception, assignment: Assignment) -> CallFailure:
        error_id = new_error_id()
        left_out = self._unexpected.take()
        if left_out is not None:
            log.error(
                "a subtask failed unexpectedly",
                exc_info=error,
                extra={
                    "swarm_id": assignment.swarm_id,
                    "subtask_id": assignment.subtask_id,
                    "error_id": error_id,
                    "left_out": left_out or None,
                },
            )
        return CallFailure(grpc.StatusCode.INTERNAL, internal_message(error_id))

    async def ExecuteSubtask(
        self, request: worker_pb2.ExecuteSubtaskRequest, context: Context
    ) -> AsyncIterator[worker_pb2.ExecuteSubtaskResponse]:
        try:
            assignment, slot = self._admit(request, direct=True, context=context)
        except CallFailed as refused:
            await self._abort(refused.failure, context)
        outbox = Outbox(self._worker.worker_id, self._stream_queue)
        outbox.open(0, request.swarm_id, _window_s(request))
        running = asyncio.create_task(self._run(outbox, 0, assignment, slot))
        running.add_done_callback(lambda _: outbox.finish())
        try:
            async for replies in outbox.messages():
                for reply in replies:
                    if reply.HasField("error"):
                        await self._abort(CallFailure.of_proto(reply.error), context)
                    yield reply.output
            running.result()  # an error of the outbox's own, were there one
        finally:
            running.cancel()
            slot.release()

    @staticmethod
    async def _abort(failure: CallFailure, context: Context) -> NoReturn:
        context.set_trailing_metadata(failure.trailers())
        await context.abort(failure.code, failure.message)
        raise AssertionError("abort returns only by raising")

    async def ExecuteSubtasks(
        self, requests: AsyncIterator[worker_pb2.ExecuteSubtasksRequest], context: Context
    ) -> AsyncIterator[worker_pb2.ExecuteSubtasksResponse]:
        """Runs each admitted subtask as a task of its own; their replies share this stream, sent
        together when several are ready, each subtask's text held to its delta window.

        What a stream may hold is bounded. Its running calls hold the worker's slots, so a start
        beyond them is answered worker_busy at once, without a task. Replies and held text take
        places in the outbox, `stream_queue` of them: when every place is taken, the subtasks wait
        to add theirs and the stream reads no more requests, so HTTP/2 flow control holds the
        caller back. A start that reuses the id of a running call ends the stream
        (INVALID_ARGUMENT): replies to the two could not be told apart, and the first would run on
        unseen. So do more plan contexts held at once than the worker's calls could use
        (RESOURCE_EXHAUSTED); a start naming a plan context the stream never sent is refused on
        its own (INVALID_ARGUMENT)."""
        outbox = Outbox(self._worker.worker_id, self._stream_queue)
        running: dict[int, asyncio.Task[None]] = {}
        # The plan contexts the starts name, by key. The caller forgets each once no call of its
        # uses it, so it holds no more than it has calls running, and a margin for those on their way.
        plan_contexts: dict[str, str] = {}
        most_contexts = 2 * self._worker.max_concurrency + 16

        def ended(call_id: int, slot: Slot, task: asyncio.Task[None]) -> None:
            slot.release()  # a call cancelled before it began never reached `execute`
            if running.get(call_id) is task:
                del running[call_id]
                # A cancelled call's cleanup is over (or it never began): only now is its slot
                # free, and the caller counts it taken until told so.
                outbox.close(call_id, cancelled=task.cancelled())

        async def read() -> None:
            try:
                async for request in requests:
                    for sent in request.plan_contexts:
                        if len(plan_contexts) >= most_contexts and sent.key not in plan_contexts:
                            raise TooManyPlanContexts(
                                f"more than {most_contexts} plan contexts held on this stream at once"
                            )
                        plan_contexts[sent.key] = sent.text
                    for call in request.calls:
                        if call.HasField("start"):
                            if call.call_id in running:
                                raise DuplicateCall(
                                    f"call_id {call.call_id} is already running on this stream"
                                )
                            try:
                                assignment, slot = self._admit(
                                    call.start, direct=False, plan_contexts=plan_contexts
                                )
                            except CallFailed as refused:
                                error = refused.failure.to_proto()
                                await outbox.reply(worker_pb2.SubtaskReply(call_id=call.call_id, error=error))
                                continue
                            outbox.open(call.call_id, call.start.swarm_id, _window_s(call.start))
                            started = asyncio.create_task(self._run(outbox, call.call_id, assignment, slot))
                            running[call.call_id] = started
                            started.add_done_callback(functools.partial(ended, call.call_id, slot))
                        elif (task := running.get(call.call_id)) is not None:
                            task.cancel()
                    for window in request.delta_windows:
                        outbox.set_window(window.swarm_id, window.window.ToNanoseconds() / 1e9)
                    for key in request.forget_plan_contexts:
                        plan_contexts.pop(key, None)
            finally:
                outbox.finish()  # the caller closed the stream: nothing more is wanted

        reader = asyncio.create_task(read())
        try:
            async for replies in outbox.messages():
                yield worker_pb2.ExecuteSubtasksResponse(replies=replies)
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(failure, StreamMisused):
                await context.abort(failure.code, str(failure))
            if failure is not None and not isinstance(failure, grpc.aio.AbortError):
                raise failure
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    async def GetWorkerInfo(
        self, request: worker_pb2.GetWorkerInfoRequest, context: Context
    ) -> worker_pb2.GetWorkerInfoResponse:
        return worker_pb2.GetWorkerInfoResponse(
            worker_id=self._worker.worker_id,
            max_concurrency=self._worker.max_concurrency,
            in_flight=self._worker.in_flight,
            provider=self._worker.provider.name,
            default_model=self._worker.default_model,
            direct_slots=self._worker.limits.direct_slots,
            direct_in_flight=self._worker.direct_in_flight,
            plan_contexts=True,
        )
