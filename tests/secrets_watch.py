"""No secret in anything the suite's processes and clients say: the model API keys the tests give
the services (all `sk-ant-…`), the orchestrator's tokens (all `swt_…`), and private keys (PEM).

Every service the stack starter runs is read when its output ends (`OUTPUT_WATCHERS`), and so is
every test's captured output and log (what in-process clients, servers and fakes said). Tests add
the exact secrets they make with `watch_secret`. What is found fails the session (conftest.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

# An API key, a token, or a private key's PEM armour, wherever they appear.
PATTERNS = (
    re.compile(r"sk-ant-[A-Za-z0-9_-]+"),
    re.compile(r"swt_[A-Za-z0-9_-]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)
_exact: set[str] = set()
_found: list[str] = []
_lock = threading.Lock()


def watch_secret(secret: str) -> str:
    """A secret a test made (a token, a key's base64 body): it must appear nowhere."""
    with _lock:
        _exact.add(secret)
    return secret


def leaks_in(where: str, lines: Iterable[str]) -> list[str]:
    with _lock:
        exact = list(_exact)
    found = []
    for number, line in enumerate(lines, 1):
        if any(pattern.search(line) for pattern in PATTERNS) or any(secret in line for secret in exact):
            found.append(f"{where}, line {number}: {redact(line)[:200]}")
    return found


def note(where: str, lines: Iterable[str]) -> None:
    found = leaks_in(where, lines)
    if found:
        with _lock:
            _found.extend(found)


def found() -> list[str]:
    with _lock:
        return list(_found)


def redact(text: str) -> str:
    """The line as it may be shown: with the secrets in it masked."""
    for pattern in PATTERNS:
        text = pattern.sub("<secret>", text)
    with _lock:
        for secret in _exact:
            text = text.replace(secret, "<secret>")
    return text
