"""What any one call can make a server do, at most. One server interceptor wraps every method of
both services, so no handler can forget it:

- bytes that are not the method's request message get INVALID_ARGUMENT and one log line without a
  traceback. Left to grpc, they got UNKNOWN naming the decoder's exception class, and an ERROR
  traceback of 805 B for a 2-byte request;
- an error that the handler did not expect gets INTERNAL with a short message and an error id;
  the server's log line (with the traceback) carries the same id;
- a streamed reply (from an async generator, as all of ours are) that the caller does not take
  within `write_timeout_s` (its HTTP/2 window stays shut) ends the call and closes its handler,
  so that what the handler held, a swarm's watcher or a worker's slot, is freed. Without it, a
  reader that never reads holds them for ever.

Log lines that a caller can provoke are rate-limited.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from swarm_common.logs import Throttle
from swarm_common.rpc_errors import bad_request, internal_message, new_error_id

Context = grpc.aio.ServicerContext[Any, Any]
# grpc's runtime class takes no type parameters; the stubs' does.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ReaderStalled(Exception):
    """The caller took no reply within the write timeout."""


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(self, *, write_timeout_s: float, log: logging.Logger) -> None:
        self._write_timeout_s = write_timeout_s
        self._log = log
        # Handlers are fixed per method, so each is wrapped once (the original is kept to check).
        self._guarded: dict[str, tuple[Handler, Handler]] = {}
        self._malformed = Throttle()
        self._unexpected = Throttle()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded

    def _guard(self, handler: Handler, method: str) -> Handler:
        behavior: Any = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous handler runs in grpc's thread pool; none of ours does
        parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer

        async def one(raw: bytes, context: Context) -> Any:
            return await self._parse(raw, parse, method, context)

        async def many(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            async for raw in raws:
                yield await self._parse(raw, parse, method, context)

        # Requests reach the wrapper as bytes (no deserializer), so a decoding error is ours to answer.
        if handler.unary_unary is not None:

            async def unary_unary(raw: bytes, context: Context) -> Any:
                async def call() -> Any:
                    return await behavior(await one(raw, context), context)

                return await self._answer(method, context, call)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
        if handler.unary_stream is not None:

            async def unary_stream(raw: bytes, context: Context) -> None:
                async def send() -> None:
                    await self._send(behavior(await one(raw, context), context), context)

                await self._answer(method, context, send)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)
        if handler.stream_unary is not None:

            async def stream_unary(raws: AsyncIterator[bytes], context: Context) -> Any:
                async def call() -> Any:
                    return await behavior(many(raws, context), context)

                return await self._answer(method, context, call)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

        async def stream_stream(raws: AsyncIterator[bytes], context: Context) -> None:
            async def send() -> None:
                await self._send(behavior(many(raws, context), context), context)

            await self._answer(method, context, send)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)

    async def _parse(self, raw: bytes, parse: Callable[[bytes], Any], method: str, context: Context) -> Any:
        try:
            return parse(raw)
        except Exception as error:
            kind = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
            what = f"a valid {kind.full_name} message" if kind is not None else "a valid request message"
            left_out = self._malformed.take()
            if left_out is not None:
                self._log.warning(
                    f"refused a request that is not {what}: {type(error).__name__}",
                    extra={"method": method, "peer": context.peer(), "left_out": left_out or None},
                )
            await context.abort_with_status(
                bad_request(f"the request is not {what}", [("request", f"is not {what}")])
            )
            raise AssertionError("abort_with_status returns only by raising") from None

    async def _answer(self, method: str, context: Context, call: Callable[[], Awaitable[Any]]) -> Any:
        """Runs the handler; what it did not expect becomes a status the caller may see."""
        try:
            return await call()
        except grpc.aio.BaseError:
            raise  # grpc's own: an abort, a call that already ended, a server that stopped
        except ReaderStalled:
            self._log.info(
                f"a caller read no reply for {self._write_timeout_s:g}s: its call is ended",
                extra={"method": method, "peer": context.peer()},
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no reply was read for {self._write_timeout_s:g}s (--stream-write-timeout): the call is ended",
            )
        except Exception as error:
            error_id = new_error_id()
            left_out = self._unexpected.take()
            if left_out is not None:
                self._log.error(
                    "a call failed unexpectedly",
                    exc_info=error,
                    extra={"method": method, "error_id": error_id, "left_out": left_out or None},
                )
            if not context.done():
                await context.abort(grpc.StatusCode.INTERNAL, internal_message(error_id))
        return None

    async def _send(self, responses: AsyncIterator[Any] | Awaitable[None], context: Context) -> None:
        """Writes each reply, giving up on a caller that takes none within the write timeout. The
        handler's generator is closed here, at once, whatever ends the call. A handler that writes
        for itself (grpc's health Watch) is only awaited."""
        if inspect.isawaitable(responses):
            await responses
            return
        watch = _WriteWatch(self._write_timeout_s)
        try:
            async for response in responses:
                await watch.write(context, response)
        finally:
            watch.close()
            await responses.aclose()  # type: ignore[attr-defined]  # an async generator's


class _WriteWatch:
    """The write timeout of one stream, kept by one timer for the stream rather than one per write:
    a timer armed and cancelled on every write cost the dispatch benchmark more than the write."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a write is always made by a task"
        self._task = task
        self._since: float | None = None  # when the write under way began
        self._timer: asyncio.TimerHandle | None = None
        self._stalled = False

    async def write(self, context: Context, response: Any) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout_s, self._check)
        try:
            await context.write(response)
        except asyncio.CancelledError:
            if self._stalled:
                self._task.uncancel()
                raise ReaderStalled from None
            raise
        finally:
            self._since = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no write is waiting; the next one sets the timer again
        due = self._since + self._timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._stalled = True
        self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
