"""The raw grpc.aio floor: how many bare server-streaming calls per second two processes can make.

The server (`python -m bench.floor`, a separate process) has one method, `/bench.Floor/Stream`,
whose handler yields one 32-byte message and returns: no application work, no protobuf (identity
serializers on bytes). The client (the benchmark's own process) keeps 64 calls in flight: 64
coroutines on one channel, each starting a call, reading its one message and the end of the stream,
and starting the next. Figure: completed calls / measured seconds, after a warm-up.

It is the ceiling of what one grpc.aio hop can do on this machine in this run; the dispatch
benchmark's subtasks/s is compared with it.

A second method, `/bench.Floor/Events`, streams a number of 100-byte events, so many to a message:
what streaming an event to a watcher costs a grpc.aio server at the least, per message and per
event (`events_cost`; the watchers benchmark, 1i, reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.common import ROOT, client_channel, cpu_seconds
from swarm_client.stack import Process, start

METHOD = "/bench.Floor/Stream"
EVENTS = "/bench.Floor/Events"
PAYLOAD = b"x" * 32
EVENT = b"e" * 100


async def _events(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """`request` is "EVENTS,PER_MESSAGE" in ASCII."""
    events, per_message = (int(part) for part in request.decode().split(","))
    message = EVENT * per_message
    for _ in range(events // per_message):
        yield message


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield PAYLOAD


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Floor",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "Events": grpc.unary_stream_rpc_method_handler(_events),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"floor listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)


def start_server() -> Process:
    return start(
        "floor", sys.executable, ["-m", "bench.floor", "--listen", "127.0.0.1:0"], listen=None, cwd=ROOT
    )


async def measure(
    target: str, *, concurrency: int = 64, warmup_s: float = 0.5, seconds: float = 3.0
) -> float:
    """Calls per second at `concurrency` calls in flight, over `seconds` after `warmup_s`."""
    async with client_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(METHOD)
        counting = False
        done = 0
        stop_at = time.monotonic() + warmup_s + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async for _ in stream(PAYLOAD, timeout=10):
                    pass
                if counting:
                    done += 1

        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warmup_s)
            counting, started = True, time.monotonic()
            await asyncio.wait_for(asyncio.gather(*callers), seconds + 15)
            elapsed = time.monotonic() - started
        finally:
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
    return done / elapsed


async def events_cost(target: str, pid: int, *, watchers: int, events: int, per_message: int) -> float:
    """CPU µs of the server process (`pid`) per event per watcher, streaming `events` events to each
    of `watchers` clients at once, `per_message` events to a message."""
    channels = [client_channel(target) for _ in range(watchers)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 10)
        request = f"{events},{per_message}".encode()

        async def watch(channel: grpc.aio.Channel) -> None:
            async for _ in channel.unary_stream(EVENTS)(request, timeout=60):
                pass

        before = cpu_seconds(pid)
        await asyncio.gather(*(watch(channel) for channel in channels))
        return 1e6 * (cpu_seconds(pid) - before) / (events * watchers)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
