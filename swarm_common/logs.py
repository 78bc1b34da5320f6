"""Logs as JSON lines on standard error, one logger per service, ids as fields.

A line logged while a swarm's work runs carries that work's ids (`swarm_id`, `subtask_id`,
`attempt`, `trace_id`) without each call naming them: `bind` puts them on the current asyncio task,
whose child tasks inherit them, and a field given with `extra=` wins.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

# Fields that callers pass with `extra=` and that belong in the JSON line.
_FIELDS = (
    "swarm_id",
    "subtask_id",
    "worker_id",
    "attempt",
    "trace_id",
    "address",
    "provider",
    "model",
    "error",
    "error_id",
    "method",
    "peer",
    "left_out",
)


_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "log_fields", default=types.MappingProxyType({})
)


def bind(**fields: Any) -> None:
    """Puts `fields` on every line logged from here on by the current task and the tasks it starts
    (call it where a task's work begins: a task's fields are its own). None or "" leaves a field
    out."""
    _bound.set({**_bound.get(), **fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _bound.get()
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is None:
                value = bound.get(field)
            if value is not None and value != "":
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class Throttle:
    """At most `lines` log lines per `window_s` for one kind of event, then a count of the lines left
    out: a caller who can provoke a log line must not be able to fill the disk with them."""

    def __init__(self, lines: int = 10, window_s: float = 60.0) -> None:
        self._lines = lines
        self._window_s = window_s
        self._window_start = -window_s
        self._taken = 0
        self._left_out = 0

    def take(self) -> int | None:
        """None: leave this line out. Else log it, with the returned count of lines left out since
        the last one logged."""
        now = time.monotonic()
        if now - self._window_start >= self._window_s:
            self._window_start, self._taken = now, 0
        if self._taken >= self._lines:
            self._left_out += 1
            return None
        self._taken += 1
        left_out, self._left_out = self._left_out, 0
        return left_out


def setup(service: str, level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(f"swarm.{service}")
