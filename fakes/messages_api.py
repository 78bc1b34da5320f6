"""A local HTTP server that speaks the Anthropic Messages API, for tests that must not reach the internet.

It runs in a background thread on 127.0.0.1 with a free port, so sync and async tests (and
subprocesses, through ANTHROPIC_BASE_URL) can use it alike:

    with FakeMessagesAPI(api_key="test-key", chunks=5) as api:
        api.script(Fault.rate_limited(retry_after_ms=20), Reply("scripted text"))
        client = anthropic.Anthropic(api_key="test-key", base_url=api.base_url)
        ...
        assert api.requests[-1].body["stream"] is True

`POST /v1/messages` answers a JSON Message, or with `"stream": true` the real SSE event sequence
(message_start, content_block_start, ping, content_block_delta..., content_block_stop, message_delta,
message_stop) in chunked transfer encoding. Errors have the real shape
`{"type": "error", "error": {"type": ..., "message": ...}}`.

What a request gets, in order of precedence:
1. 404 `not_found_error` for any other path or method;
2. 401 `authentication_error` when `api_key` is set and neither `x-api-key: KEY` nor
   `Authorization: Bearer KEY` matches;
3. 400 `invalid_request_error` for a body that is not JSON or lacks model/max_tokens/messages,
   or a request without an `anthropic-version` header; 404 for a model outside `known_models`;
   400 for a `max_tokens` over `max_output_tokens`, a prompt over `context_window` ("prompt is too
   long"), or a prompt and `max_tokens` that together exceed it, each with the real API's message;
4. 429 `rate_limit_error` when `rate_limits` are set and their budget is spent (see `RateLimits`);
5. the next scripted item (`Reply`, `Fault` or `StreamFault`), consumed one per request, FIFO;
6. the default answer: `answer(body)` if given, else for plan calls (`output_config.format.type ==
   "json_schema"`) a valid `{"subtasks": [...]}` with exactly the N the prompt asks for
   ("exactly N independent subtasks"), or for outline calls (a schema of `areas`) exactly the N
   areas asked for ("exactly N areas"), else "fake answer to: <first 60 chars of the last user
   message>". `realistic_answer` answers the same at a real model's length: about 90 words a
   planned subtask, about 700 words an answer.

An answer longer than the request's `max_tokens` is cut off there, with `stop_reason: "max_tokens"`,
as the real API does, scripted replies included.

Token counts are estimates, `estimate_tokens(text)` = ceil(len / 4) (at least 1): input over the
system prompt and all messages, output over the answer text. A `Reply` can set them exactly.

Prompt caching works as the real API's does. A content block (system or message) may carry
`cache_control: {"type": "ephemeral"}`: a breakpoint. The prefix up to a breakpoint (the model,
the system prompt and the messages' blocks up to it) is cached when it holds at least
`min_cache_tokens`, for `cache_ttl_s` from its last use (5 minutes). A request reads the longest
prefix already cached that ends at one of its breakpoints, or at a block boundary up to 20 blocks
before one, and writes the rest up to its last breakpoint; usage then counts the three apart:
`cache_read_input_tokens`, `cache_creation_input_tokens`, and `input_tokens` for what follows the
last breakpoint. An entry can be read once its response has begun (the real API's rule: parallel
requests sent before the first answer starts all miss). A request without breakpoints neither
reads nor writes. `cache_writes` and `cache_reads` count requests that wrote or read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

__all__ = [
    "AcceptedCall",
    "FakeMessagesAPI",
    "Fault",
    "RateLimits",
    "RecordedRequest",
    "Reply",
    "Scripted",
    "StreamFault",
    "default_answer",
    "estimate_tokens",
    "plan_answer",
    "realistic_answer",
    "split_chunks",
]

MESSAGES_PATH = "/v1/messages"
PLAN_SUBTASKS = re.compile(r"exactly (\d+) independent subtasks")
PLAN_IDEA = re.compile(r"Idea:\n(.*?)\n\n", re.DOTALL)
PLAN_AREA = re.compile(r"Your area is area (\d+), (.*?): ")
OUTLINE_AREAS = re.compile(r"exactly (\d+) areas")
# The real API's default context window, in tokens.
CONTEXT_WINDOW = 200_000
# Words for filler prose (a string, to read as one).
FILLER = (  # noqa: SIM905
    "the plan sets a clear owner for each step and measures the outcome against a baseline so that "
    "risks surface early while the budget and the schedule stay visible to everyone involved in the "
    "rollout of the service to its users with a fallback for every dependency and a review of capacity"
).split()

# The error `type` the real API sends with each status.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES: dict[str, str] = {
    "invalid_request_error": "invalid request",
    "authentication_error": "invalid x-api-key",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
}


# --- What a test can script -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer with this text (streamed or not, as the request asks)."""

    text: str
    input_tokens: int | None = None  # None: estimated from the request
    output_tokens: int | None = None  # None: estimated from `text`
    stop_reason: str = "end_turn"
    delay_s: float = 0.0  # wait before the response starts (a slow first byte)
    chunks: int | None = None  # None: the server's `chunks`
    chunk_delay_s: float | None = None  # None: the server's `chunk_delay_s`


@dataclass(frozen=True, slots=True)
class Fault:
    """An HTTP error answer with the real error body.

    `error_type` and `message` default by status (429 rate_limit_error, 529 overloaded_error, 401
    authentication_error "invalid x-api-key", ...). A 429 always carries `retry-after` in whole
    seconds (from `retry_after_s`, else rounded up from `retry_after_ms`, else 1); `retry-after-ms`
    is sent, on any status, when `retry_after_ms` is set, and the SDK prefers it, so tests stay fast.
    """

    status: int
    error_type: str | None = None
    message: str | None = None
    retry_after_s: float | None = None
    retry_after_ms: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def rate_limited(cls, retry_after_ms: float = 50.0, message: str | None = None) -> Fault:
        return cls(429, message=message, retry_after_ms=retry_after_ms)

    @classmethod
    def overloaded(cls, retry_after_ms: float | None = 50.0) -> Fault:
        return cls(529, retry_after_ms=retry_after_ms)

    @classmethod
    def server_error(cls, status: int = 500, retry_after_ms: float | None = 50.0) -> Fault:
        return cls(status, retry_after_ms=retry_after_ms)

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls(401)

    @classmethod
    def bad_request(cls, message: str = "messages: at least one message is required") -> Fault:
        return cls(400, message=message)

    def body(self) -> dict[str, Any]:
        error_type = self.error_type or ERROR_TYPES.get(self.status, "api_error")
        message = self.message or ERROR_MESSAGES.get(error_type, f"HTTP {self.status}")
        return {"type": "error", "error": {"type": error_type, "message": message}}

    def response_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.status == 429 or self.retry_after_s is not None:
            if self.retry_after_s is not None:
                seconds = self.retry_after_s
            elif self.retry_after_ms is not None:
                seconds = math.ceil(self.retry_after_ms / 1000)
            else:
                seconds = 1
            headers["retry-after"] = _format_number(seconds)
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = _format_number(self.retry_after_ms)
        headers.update({k.lower(): v for k, v in self.headers.items()})
        return headers


@dataclass(frozen=True, slots=True)
class StreamFault:
    """A stream that starts well (200, `after_chunks` text deltas) and then fails.

    With an `error_type` the server sends the API's mid-stream `event: error` (by default
    overloaded_error) and ends the body cleanly; with `error_type=None` it drops the connection
    without ending the body. On a non-streaming request it drops the connection without answering.
    """

    after_chunks: int = 1
    error_type: str | None = "overloaded_error"
    message: str | None = None
    text: str = "partial answer that never finishes"


Scripted = Reply | Fault | StreamFault


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Budgets over a sliding window, like the API's per-minute limits (a short window keeps tests fast).

    A request is accepted only while fewer than `requests` requests, and fewer than `output_tokens`
    output tokens, were accepted in the last `window_s` seconds; otherwise it gets 429 rate_limit_error
    with `retry-after` (whole seconds, rounded up) and `retry-after-ms` (exact, unless
    `send_retry_after_ms` is False): the time until the window has room again. An accepted request is
    charged its reply's output tokens at once (the real API also reserves at the start). Requests
    that end in a scripted Fault are not counted. None disables a budget.
    """

    requests: int | None = None
    output_tokens: int | None = None
    window_s: float = 60.0
    send_retry_after_ms: bool = True


# --- What the server records -------------------------------------------------------------------


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request as the server saw it; `status` and `stream_outcome` fill in as it is answered."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON, or None when it was not JSON
    at: float  # time.monotonic() on arrival
    status: int | None = None
    # For streamed answers: "open", then "completed", "disconnected" (the client went away before
    # the end), "failed" (a scripted StreamFault) or "stopped" (the server stopped).
    stream_outcome: str | None = None

    @property
    def streaming(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def is_plan(self) -> bool:
        """A structured-output call: a plan, or a plan's outline."""
        return _is_plan(self.body)

    @property
    def is_outline(self) -> bool:
        return _is_outline(self.body)

    @property
    def last_user_text(self) -> str:
        return _last_user_text(self.body)

    @property
    def prompt_tail(self) -> str:
        """The last text block of the last user message: what this call alone is asked, after
        the blocks it shares with other calls."""
        return _last_block_text(self.body)

    @property
    def cache_marks(self) -> int:
        """How many blocks of the request carry cache_control."""
        if not isinstance(self.body, dict):
            return 0
        marks = sum(marked for _, marked in _blocks(self.body.get("system")))
        for message in self.body.get("messages") or []:
            if isinstance(message, dict):
                marks += sum(marked for _, marked in _blocks(message.get("content")))
        return marks


@dataclass(frozen=True, slots=True)
class AcceptedCall:
    """A request the rate limiter let through (only recorded when `rate_limits` are set)."""

    at: float  # time.monotonic()
    output_tokens: int


# --- Text helpers --------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def split_chunks(text: str, chunks: int) -> list[str]:
    """`text` in up to `chunks` non-empty pieces of near-equal length, in order."""
    if not text:
        return [""]
    count = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), count)
    pieces: list[str] = []
    start = 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _last_user_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _is_plan(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    return isinstance(fmt, dict) and fmt.get("type") == "json_schema"


def _is_outline(body: Any) -> bool:
    if not _is_plan(body):
        return False
    schema = body["output_config"]["format"].get("schema")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return isinstance(properties, dict) and "areas" in properties


def _blocks(content: Any) -> list[tuple[str, bool]]:
    """A system prompt or a message's content as (text, marked for the cache) blocks."""
    if isinstance(content, str):
        return [(content, False)]
    if isinstance(content, list):
        return [
            (str(block.get("text", "")), isinstance(block.get("cache_control"), dict))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        ]
    return []


def _last_block_text(body: Any) -> str:
    """The last text block of the last user message: the prompt's own part, after what it shares."""
    if not isinstance(body, dict):
        return ""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            blocks = _blocks(message.get("content"))
            return blocks[-1][0] if blocks else ""
    return ""


def _input_text(body: dict[str, Any]) -> str:
    parts = [_text_of(body.get("system"))]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            parts.append(_text_of(message.get("content")))
    return "\n".join(parts)


def filler(seed: str, words: int) -> str:
    """`words` words of plausible prose, the same for the same seed."""
    digest = b""
    block = seed.encode()
    while len(digest) < words:
        block = hashlib.sha256(block).digest()
        digest += block
    return " ".join(FILLER[b % len(FILLER)] for b in digest[:words])


def plan_answer(prompt: str, instruction_words: int = 0) -> str:
    """A valid plan with exactly the number of subtasks `prompt` asks for (3 when it does not say),
    each of the area the prompt names, if any; `instruction_words` pads the instructions."""
    found = PLAN_SUBTASKS.search(prompt)
    count = int(found.group(1)) if found else 3
    idea_match = PLAN_IDEA.search(prompt)
    idea = (idea_match.group(1) if idea_match else prompt)[:60]
    area = PLAN_AREA.search(prompt)
    of_area = f"{area.group(2)}, " if area else ""
    subtasks = []
    for i in range(1, count + 1):
        instructions = f"Work out part {i} of {count} of: {of_area}{idea}"
        if instruction_words:
            instructions += ". " + filler(f"{of_area}{i}{prompt}", instruction_words)
        subtasks.append({"title": f"{of_area}Part {i} of {count}", "instructions": instructions})
    return json.dumps({"subtasks": subtasks})


def outline_answer(prompt: str) -> str:
    """Exactly the number of areas `prompt` asks for (3 when it does not say)."""
    found = OUTLINE_AREAS.search(prompt)
    count = int(found.group(1)) if found else 3
    areas = [
        {"title": f"Area {i} of {count}", "scope": f"Part {i} of {count} of the idea: {filler(str(i), 25)}"}
        for i in range(1, count + 1)
    ]
    return json.dumps({"areas": areas})


def default_answer(body: dict[str, Any]) -> str:
    """A plan or outline as asked, else a line naming the prompt's own part."""
    prompt = _last_user_text(body)
    if _is_outline(body):
        return outline_answer(prompt)
    if _is_plan(body):
        return plan_answer(prompt)
    return f"fake answer to: {_last_block_text(body)[:60]}"


def realistic_answer(body: dict[str, Any]) -> str:
    """`default_answer` at a real model's length: about 90 words a planned subtask's instructions,
    about 700 words an answer."""
    prompt = _last_user_text(body)
    if _is_outline(body):
        return outline_answer(prompt)
    if _is_plan(body):
        return plan_answer(prompt, instruction_words=80)
    return f"fake answer to: {_last_block_text(body)[:60]}\n\n{filler(prompt, 690)}."


def _within(reply: Reply, max_tokens: int) -> Reply:
    """The reply as the API gives it under `max_tokens`: cut off there, with that stop reason."""
    if estimate_tokens(reply.text) <= max_tokens:
        return reply
    return dataclasses.replace(
        reply,
        text=reply.text[: max_tokens * 4],
        stop_reason="max_tokens",
        output_tokens=max_tokens if reply.output_tokens is None else min(reply.output_tokens, max_tokens),
    )


def _cache_usage(decision: _Decision) -> dict[str, int]:
    return {
        "cache_creation_input_tokens": decision.cache_creation_input_tokens,
        "cache_read_input_tokens": decision.cache_read_input_tokens,
    }


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


# --- The server ----------------------------------------------------------------------------------


class _Disconnected(Exception):
    """The client went away (or the server is stopping) while a response was being written."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, api: FakeMessagesAPI) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished (a killed process) is how the real API's clients go too: no
        traceback for that; anything else is still reported."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        self.server.api._handle(self)

    def do_GET(self) -> None:
        self.server.api._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(slots=True)
class _Decision:
    """What to answer one request, chosen under the lock."""

    item: Scripted
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # Cache entries (keys) the request writes: readable once its response has begun.
    cache_entries: tuple[str, ...] = ()


# The real API looks for a cached prefix at block boundaries this far before a breakpoint.
CACHE_LOOKBACK_BLOCKS = 20


def _cache_plan(body: dict[str, Any], min_tokens: int) -> tuple[list[tuple[str, int]], list[int]]:
    """The request's block boundaries as (cache key, prefix tokens), in order, and which of them are
    breakpoints (indexes into the first list). The key names the model and the prefix's text."""
    blocks = _blocks(body.get("system"))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            blocks += _blocks(message.get("content"))
    digest = hashlib.sha256(str(body.get("model")).encode())
    boundaries: list[tuple[str, int]] = []
    breakpoints: list[int] = []
    chars = 0
    for index, (text, marked) in enumerate(blocks):
        digest.update(b"\x00" + text.encode())
        chars += len(text)
        boundaries.append((digest.copy().hexdigest(), max(1, math.ceil(chars / 4))))
        if marked and boundaries[-1][1] >= min_tokens:
            breakpoints.append(index)
    return boundaries, breakpoints


class FakeMessagesAPI:
    """The Messages API on 127.0.0.1:<free port>, in a background thread. See the module docstring.

    Options:
      api_key: if set, requests must carry it (x-api-key or Authorization: Bearer), else 401.
      chunks: how many text deltas a streamed answer is split into (fewer for a shorter text).
      chunk_delay_s: pause before each text delta; give one (e.g. 0.05) to test cancellation,
        since a client that leaves is noticed only while the server still has something to send.
      answer: the default answer's text, from the request body (replaces `default_answer`).
      known_models: if set, any other model gets 404 not_found_error.
      rate_limits: sliding-window budgets, see `RateLimits`.
      fault_rate: the probability that a valid request, before any script, gets a 429 or a 529
        (chosen evenly) with a short retry-after, as a busy API does now and then (soak tests);
        `seed` makes the draws repeatable.
      context_window: the tokens a prompt and its max_tokens may take together (None = no limit).
      max_output_tokens: the largest max_tokens a request may ask for (None = no limit).
      min_cache_tokens, cache_ttl_s: the prompt cache's shortest prefix and its lifetime (see above).

    Counters (read them directly; `wait_for`/`async_wait_for` to wait on them): `streams_opened`,
    `streams_completed`, `streams_disconnected` (the client left before message_stop, or the server
    stopped), `streams_failed` (scripted StreamFault), `open_streams`, `rate_limited`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        chunks: int = 4,
        chunk_delay_s: float = 0.0,
        answer: Callable[[dict[str, Any]], str] | None = None,
        known_models: Collection[str] | None = None,
        rate_limits: RateLimits | None = None,
        fault_rate: float = 0.0,
        seed: int | None = None,
        context_window: int | None = CONTEXT_WINDOW,
        max_output_tokens: int | None = None,
        min_cache_tokens: int = 1024,
        cache_ttl_s: float = 300.0,
    ) -> None:
        self.context_window = context_window
        self.min_cache_tokens = min_cache_tokens
        self.cache_ttl_s = cache_ttl_s
        # Cached prefixes by key: when each expires (monotonic time).
        self._cache: dict[str, float] = {}
        self.cache_writes = 0
        self.cache_reads = 0
        self.max_output_tokens = max_output_tokens
        self.api_key = api_key
        self.fault_rate = fault_rate
        self._random = random.Random(seed)
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.answer = answer or default_answer
        self.known_models = frozenset(known_models) if known_models is not None else None
        self.rate_limits = rate_limits
        self._lock = threading.Condition()
        self._script: list[Scripted] = []
        self._requests: list[RecordedRequest] = []
        self._accepted: list[AcceptedCall] = []
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.streams_opened = 0
        self.streams_completed = 0
        self.streams_disconnected = 0
        self.streams_failed = 0
        self.rate_limited = 0  # requests refused by `rate_limits`
        self.random_faults = 0  # requests answered 429/529 by `fault_rate`

    # --- lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-messages-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(5)
        # Streams in progress notice the stop within ~50 ms; let them record how they ended.
        self.wait_for(lambda: self.open_streams == 0, timeout_s=2.0)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeMessagesAPI is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- scripting

    def script(self, *items: Scripted, times: int = 1) -> None:
        """Queue answers for the next requests, one each, in order (`times` repeats the whole group)."""
        with self._lock:
            self._script.extend(list(items) * times)

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    @property
    def pending_script(self) -> int:
        with self._lock:
            return len(self._script)

    # --- what happened

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in arrival order (a copy of the list; the records are live)."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise AssertionError("the fake Messages API has received no request")
            return self._requests[-1]

    @property
    def open_streams(self) -> int:
        with self._lock:
            ended = self.streams_completed + self.streams_disconnected + self.streams_failed
            return self.streams_opened - ended

    @property
    def accepted(self) -> list[AcceptedCall]:
        """Requests the rate limiter let through, in order (empty without `rate_limits`)."""
        with self._lock:
            return list(self._accepted)

    def peak_requests(self, window_s: float) -> int:
        """The most accepted requests that fell within any `window_s`-long span."""
        times = [call.at for call in self.accepted]
        return max(
            (sum(1 for t in times[i:] if t - start < window_s) for i, start in enumerate(times)), default=0
        )

    def peak_output_tokens(self, window_s: float) -> int:
        """The most output tokens accepted within any `window_s`-long span."""
        calls = self.accepted
        return max(
            (
                sum(c.output_tokens for c in calls[i:] if c.at - start.at < window_s)
                for i, start in enumerate(calls)
            ),
            default=0,
        )

    def reset(self) -> None:
        """Forget recorded requests, counters, the script and the rate-limit window."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._accepted.clear()
            self.streams_opened = self.streams_completed = 0
            self.streams_disconnected = self.streams_failed = 0
            self.rate_limited = 0

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        """Block until predicate() is true (re-checked whenever a request changes state or every
        50 ms) or `timeout_s` passes; returns the predicate's last value. Not for an event loop's
        thread: use `async_wait_for` there."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.05))
            return True

    async def async_wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        """Like `wait_for`, polling every 10 ms without blocking the event loop."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- request handling (server threads)

    def _record(self, record: RecordedRequest, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)
            self._lock.notify_all()

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in handler.headers.items()}
        record = RecordedRequest(handler.command, handler.path.split("?")[0], headers, body, time.monotonic())
        with self._lock:
            self._requests.append(record)
            self._lock.notify_all()

        try:
            refusal = self._refusal(record)
            if refusal is not None:
                self._answer_fault(handler, record, refusal)
                return
            decision = self._decide(record.body)
            item = decision.item
            if isinstance(item, Fault):
                self._answer_fault(handler, record, item)
            elif isinstance(item, StreamFault):
                if record.streaming:
                    self._answer_stream(handler, record, decision)
                else:
                    self._record(record, status=0)
                    self._drop(handler)
            elif record.streaming:
                self._answer_stream(handler, record, decision)
            else:
                self._answer_json(handler, record, decision)
        except _Disconnected:
            handler.close_connection = True
        except OSError:
            handler.close_connection = True

    def _refusal(self, record: RecordedRequest) -> Fault | None:
        """The error a request gets before any script or default answer, if any."""
        if record.method != "POST" or record.path != MESSAGES_PATH:
            return Fault(404, message=f"{record.method} {record.path}: not found")
        if self.api_key is not None:
            bearer = record.headers.get("authorization", "")
            if record.headers.get("x-api-key") != self.api_key and bearer != f"Bearer {self.api_key}":
                return Fault(401)
        if "anthropic-version" not in record.headers:
            return Fault(400, message="anthropic-version: header is required")
        body = record.body
        if not isinstance(body, dict):
            return Fault(400, message="the request body is not valid JSON")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return Fault(400, message=f"{name}: Field required")
        if not isinstance(body["messages"], list) or not body["messages"]:
            return Fault(400, message="messages: at least one message is required")
        if self.known_models is not None and body["model"] not in self.known_models:
            return Fault(404, message=f"model: {body['model']}")
        return self._oversize(body)

    def _oversize(self, body: dict[str, Any]) -> Fault | None:
        """The 400 the real API gives a request too big for the model, with its message."""
        max_tokens = int(body["max_tokens"])
        if self.max_output_tokens is not None and max_tokens > self.max_output_tokens:
            return Fault(
                400,
                message=f"max_tokens: {max_tokens} > {self.max_output_tokens}, which is the maximum "
                f"allowed number of output tokens for {body['model']}",
            )
        if self.context_window is None:
            return None
        prompt = estimate_tokens(_input_text(body))
        if prompt > self.context_window:
            return Fault(400, message=f"prompt is too long: {prompt} tokens > {self.context_window} maximum")
        if prompt + max_tokens > self.context_window:
            return Fault(
                400,
                message=f"input length and `max_tokens` exceed context limit: {prompt} + {max_tokens} > "
                f"{self.context_window}, decrease input length or `max_tokens` and try again",
            )
        return None

    def _decide(self, body: dict[str, Any]) -> _Decision:
        """The answer to a valid request: the rate limiter's 429, the next scripted item or the default."""
        input_tokens = estimate_tokens(_input_text(body))
        with self._lock:
            limits = self.rate_limits
            now = time.monotonic()
            if limits is not None:
                wait_s = self._rate_limit_wait(limits, now)
                if wait_s is not None:
                    self.rate_limited += 1
                    return _Decision(self._rate_limit_fault(limits, wait_s))
            if self.fault_rate and self._random.random() < self.fault_rate:
                self.random_faults += 1
                status = self._random.choice((429, 529))
                return _Decision(Fault(status, retry_after_ms=self._random.uniform(20, 200)))
            item: Scripted = self._script.pop(0) if self._script else Reply(self.answer(body))
            if isinstance(item, Reply):
                item = _within(item, int(body["max_tokens"]))
            if limits is not None and isinstance(item, Reply | StreamFault):
                text = item.text
                output = item.output_tokens if isinstance(item, Reply) else None
                self._accepted.append(AcceptedCall(now, output or estimate_tokens(text)))
            if isinstance(item, Fault):
                return _Decision(item, input_tokens)
            return self._cached(_Decision(item, input_tokens), body, now)

    def _cached(self, decision: _Decision, body: dict[str, Any], now: float) -> _Decision:
        """The decision with its prompt cache reads and writes. Call under the lock."""
        boundaries, breakpoints = _cache_plan(body, self.min_cache_tokens)
        if not breakpoints:
            return decision
        live = {key for key, expires in self._cache.items() if expires > now}
        hit = -1
        for breakpoint in breakpoints:
            for index in range(breakpoint, max(-1, breakpoint - CACHE_LOOKBACK_BLOCKS), -1):
                if boundaries[index][0] in live:
                    hit = max(hit, index)
                    break
        read = boundaries[hit][1] if hit >= 0 else 0
        last = breakpoints[-1]
        written = boundaries[last][1] - read if last > hit else 0
        if hit >= 0:
            self._cache[boundaries[hit][0]] = now + self.cache_ttl_s  # a read refreshes the entry
        self.cache_reads += read > 0
        self.cache_writes += written > 0
        decision.cache_read_input_tokens = read
        decision.cache_creation_input_tokens = written
        decision.input_tokens = max(0, decision.input_tokens - read - written)
        decision.cache_entries = tuple(boundaries[index][0] for index in breakpoints if index > hit)
        return decision

    def _cache_begun(self, decision: _Decision) -> None:
        """The response has begun: the prefixes it wrote can be read from now on."""
        if decision.cache_entries:
            with self._lock:
                expires = time.monotonic() + self.cache_ttl_s
                for key in decision.cache_entries:
                    self._cache[key] = expires

    def _rate_limit_wait(self, limits: RateLimits, now: float) -> float | None:
        """Seconds until the window has room, or None when the request fits. Call under the lock."""
        window = [call for call in self._accepted if call.at > now - limits.window_s]
        waits: list[float] = []
        if limits.requests is not None and len(window) >= limits.requests:
            # Room comes back when enough of the oldest calls leave the window.
            waits.append(window[len(window) - limits.requests].at + limits.window_s - now)
        if limits.output_tokens is not None:
            spent = sum(call.output_tokens for call in window)
            for call in window:
                if spent < limits.output_tokens:
                    break
                spent -= call.output_tokens
                waits.append(call.at + limits.window_s - now)
        if not waits:
            return None
        return max(max(waits), 0.001)

    @staticmethod
    def _rate_limit_fault(limits: RateLimits, wait_s: float) -> Fault:
        return Fault(
            429,
            message="This request would exceed the rate limit for your organization",
            retry_after_s=math.ceil(wait_s),
            retry_after_ms=round(wait_s * 1000) if limits.send_retry_after_ms else None,
        )

    # --- writing answers

    def _pause(self, handler: _Handler, seconds: float) -> None:
        """Wait `seconds`, raising _Disconnected as soon as the client closes its end or we stop."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping.is_set():
                raise _Disconnected
            remaining = max(0.0, deadline - time.monotonic())
            try:
                readable, _, _ = select.select([handler.connection], [], [], min(remaining, 0.05))
                # Nothing more is sent on this connection while we answer, so readable means EOF.
                if readable and handler.connection.recv(1, socket.MSG_PEEK) == b"":
                    raise _Disconnected
            except (OSError, ValueError) as error:
                raise _Disconnected from error
            if remaining <= 0:
                return

    def _send_head(self, handler: _Handler, status: int, headers: Mapping[str, str]) -> None:
        handler.send_response(status)
        handler.send_header("request-id", f"req_fake{next(self._ids):06d}")
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()

    def _answer_fault(self, handler: _Handler, record: RecordedRequest, fault: Fault) -> None:
        self._record(record, status=fault.status)
        if fault.delay_s:
            self._pause(handler, fault.delay_s)
        data = json.dumps(fault.body()).encode()
        headers = {"content-type": "application/json", "content-length": str(len(data))}
        headers.update(fault.response_headers())
        self._send_head(handler, fault.status, headers)
        handler.wfile.write(data)

    def _message(
        self, body: dict[str, Any], text: str | None, usage: dict[str, int], stop_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": f"msg_fake{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [] if text is None else [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, **usage},
        }

    def _answer_json(self, handler: _Handler, record: RecordedRequest, decision: _Decision) -> None:
        reply = decision.item
        assert isinstance(reply, Reply)
        self._record(record, status=200)
        if reply.delay_s:
            self._pause(handler, reply.delay_s)
        usage = {
            "input_tokens": reply.input_tokens if reply.input_tokens is not None else decision.input_tokens,
            "output_tokens": reply.output_tokens
            if reply.output_tokens is not None
            else estimate_tokens(reply.text),
            **_cache_usage(decision),
        }
        data = json.dumps(self._message(record.body, reply.text, usage, reply.stop_reason)).encode()
        self._cache_begun(decision)
        self._send_head(handler, 200, {"content-type": "application/json", "content-length": str(len(data))})
        handler.wfile.write(data)

    def _answer_stream(self, handler: _Handler, record: RecordedRequest, decision: _Decision) -> None:
        item = decision.item
        assert isinstance(item, Reply | StreamFault)
        self._record(record, status=200)
        if isinstance(item, Reply) and item.delay_s:
            self._pause(handler, item.delay_s)
        chunks = item.chunks if isinstance(item, Reply) and item.chunks is not None else self.chunks
        delay = (
            item.chunk_delay_s
            if isinstance(item, Reply) and item.chunk_delay_s is not None
            else self.chunk_delay_s
        )
        input_tokens = (
            item.input_tokens
            if isinstance(item, Reply) and item.input_tokens is not None
            else decision.input_tokens
        )

        self._send_head(
            handler,
            200,
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "transfer-encoding": "chunked",
            },
        )
        with self._lock:
            self.streams_opened += 1
            record.stream_outcome = "open"
            self._lock.notify_all()
        try:
            self._cache_begun(decision)
            self._write_events(handler, record, item, chunks, delay, input_tokens, _cache_usage(decision))
        except BaseException:
            if record.stream_outcome == "open":
                self._end_stream(record, "stopped" if self._stopping.is_set() else "disconnected")
            raise

    _OUTCOME_COUNTERS = {
        "completed": "streams_completed",
        "failed": "streams_failed",
        "disconnected": "streams_disconnected",
        "stopped": "streams_disconnected",
    }

    def _end_stream(self, record: RecordedRequest, outcome: str) -> None:
        """Record how a stream ended (again, if a late write failed), keeping the counters in step."""
        with self._lock:
            previous = self._OUTCOME_COUNTERS.get(record.stream_outcome or "")
            if previous is not None:
                setattr(self, previous, getattr(self, previous) - 1)
            record.stream_outcome = outcome
            counter = self._OUTCOME_COUNTERS[outcome]
            setattr(self, counter, getattr(self, counter) + 1)
            self._lock.notify_all()

    def _write_events(
        self,
        handler: _Handler,
        record: RecordedRequest,
        item: Reply | StreamFault,
        chunks: int,
        delay: float,
        input_tokens: int,
        cache_usage: dict[str, int],
    ) -> None:
        def event(name: str, data: dict[str, Any]) -> None:
            payload = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            try:
                handler.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            except OSError as error:
                raise _Disconnected from error

        """Writes the SSE events. The outcome is recorded just before the last event that the
        client can see, so a test that has seen the stream end also sees it recorded."""
        body = record.body
        usage = {"input_tokens": input_tokens, "output_tokens": 1, **cache_usage}
        event("message_start", {"type": "message_start", "message": self._message(body, None, usage, None)})
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        event("ping", {"type": "ping"})
        pieces: Iterator[str] = iter(split_chunks(item.text, chunks))
        if isinstance(item, StreamFault):
            pieces = itertools.islice(pieces, item.after_chunks)
        for piece in pieces:
            self._pause(handler, delay)
            event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
            )
        self._pause(handler, 0)

        if isinstance(item, StreamFault):
            self._end_stream(record, "failed")
            if item.error_type is None:
                self._drop(handler)
                return
            fault = Fault(500, error_type=item.error_type, message=item.message)
            event("error", fault.body())
            with contextlib.suppress(OSError):
                handler.wfile.write(b"0\r\n\r\n")
            return

        output_tokens = item.output_tokens if item.output_tokens is not None else estimate_tokens(item.text)
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": item.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
        self._end_stream(record, "completed")
        try:
            event("message_stop", {"type": "message_stop"})
        except _Disconnected:
            self._end_stream(record, "stopped" if self._stopping.is_set() else "disconnected")
            raise
        with contextlib.suppress(OSError):  # the client has the whole message already
            handler.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _drop(handler: _Handler) -> None:
        """Close the connection at once, mid-answer."""
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
