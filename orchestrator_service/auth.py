"""Who is calling: bearer tokens that belong to tenants, kept as hashes in the auth file.

    {"tenants": {"acme": {"tokens": [{"id": "3f9c1a2b", "sha256": "…", "created": "…"}],
                          "quotas": {"concurrent_swarms": 4, "cost_usd_per_day": 20}}}}

A token is `swt_` and 43 random URL-safe characters (256 bits): guessing one is hopeless, so a
plain SHA-256 is the right hash (a slow password hash guards guessable secrets). The file holds
only hashes: whoever reads it cannot call with them. A token is compared with every stored hash
in constant time, and is never logged. `swarm-orchestrator add-token` adds one and prints it, the
only time it is shown. The file is read again when it changes, so tokens and quotas change
without a restart.

The interceptor in front of every call turns `authorization: Bearer TOKEN` metadata into a
tenant, which the handler reads with `current_tenant()`. Health needs no token; reflection needs
none unless told to.
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, ValidationError

from swarm_common.logs import Throttle

TOKEN_PREFIX = "swt_"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
# How often a call may make the file be looked at for changes.
RECHECK_S = 1.0

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names it and says why in one line."""


class Quotas(BaseModel):
    """What one tenant may start and spend; 0 = no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrent_swarms: NonNegativeInt = 0
    agents_per_swarm: NonNegativeInt = 0
    runs_per_minute: NonNegativeInt = 0
    tokens_per_day: NonNegativeInt = 0
    cost_usd_per_day: NonNegativeFloat = 0.0


class _Token(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str = ""


class _Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[_Token] = []
    quotas: Quotas = Quotas()


class _AuthFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, _Tenant] = {}


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    quotas: Quotas = field(default_factory=Quotas)


# The caller of an orchestrator that runs without tokens: one tenant, no quotas.
ANONYMOUS = Tenant("")
_current: contextvars.ContextVar[Tenant] = contextvars.ContextVar("tenant", default=ANONYMOUS)


def current_tenant() -> Tenant:
    """The tenant of the call being handled (set by `Authentication`)."""
    return _current.get()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> _AuthFile:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _AuthFile()
    except OSError as error:
        raise AuthFileError(f"cannot read the auth file {path}: {error.strerror}") from None
    try:
        document = _AuthFile.model_validate(json.loads(text))
    except (ValueError, ValidationError) as error:
        first = error.errors()[0] if isinstance(error, ValidationError) else None
        where = ".".join(str(part) for part in first["loc"]) if first else ""
        reason = first["msg"] if first else str(error).splitlines()[0]
        raise AuthFileError(
            f"the auth file {path} is not valid: {where + ': ' if where else ''}{reason}"
        ) from None
    for name in document.tenants:
        if not TENANT_NAME.fullmatch(name):
            raise AuthFileError(
                f"the auth file {path} names a tenant {name[:40]!r}: use letters, digits, . _ -"
            )
    return document


class TokenBook:
    """The auth file's tokens and quotas, read again when the file changes."""

    def __init__(
        self, path: str, *, log: logging.Logger, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self._log = log
        self._clock = clock
        self._checked = clock()
        self._stamp = self._file_stamp()
        self._entries, self._tenants = self._index(_read(self.path))  # a bad file stops the start

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            stat = self.path.stat()
        except OSError:
            return (0, 0, 0)
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    @staticmethod
    def _index(document: _AuthFile) -> tuple[list[tuple[bytes, str]], dict[str, Tenant]]:
        tenants = {name: Tenant(name, entry.quotas) for name, entry in document.tenants.items()}
        entries = [
            (bytes.fromhex(token.sha256), name)
            for name, entry in document.tenants.items()
            for token in entry.tokens
        ]
        return entries, tenants

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries, self._tenants = self._index(_read(self.path))
        except AuthFileError as error:
            self._log.warning(f"{error}; the tokens read before stay in force")
            return
        self._log.info(f"read the auth file {self.path} again: {len(self._tenants)} tenant(s)")

    def tenant_for(self, token: str) -> Tenant | None:
        """The token's tenant, or None. Every stored hash is compared, each in constant time, so
        the time taken tells nothing of which (if any) matched."""
        self._refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for stored, name in self._entries:
            if hmac.compare_digest(digest, stored):
                found = name
        return self._tenants.get(found) if found is not None else None

    def tenant(self, name: str) -> Tenant | None:
        """The tenant as the file says now (its quotas may have changed since the call began)."""
        self._refresh()
        return self._tenants.get(name)


def add_token(path: str, tenant: str) -> str:
    """Creates a token for `tenant` (and the tenant, and the file, if new), stores its hash, and
    returns the token. The file is replaced whole, readable by its owner only."""
    if not TENANT_NAME.fullmatch(tenant):
        raise AuthFileError(
            f"--tenant {tenant[:40]!r} is not a tenant name: use letters, digits, . _ - (up to 64)"
        )
    file = Path(path)
    document = _read(file)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry = document.tenants.setdefault(tenant, _Tenant())
    entry.tokens.append(
        _Token(
            id=secrets.token_hex(4),
            sha256=token_hash(token),
            created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    )
    temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(document.model_dump_json(indent=2) + "\n")
        os.replace(temporary, file)
    except OSError as error:
        raise AuthFileError(f"cannot write the auth file {file}: {error.strerror}") from None
    return token


def bearer_token(metadata: Any) -> str | None:
    """The token of `authorization: Bearer TOKEN`, or None when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class Authentication(grpc.aio.ServerInterceptor):
    """The door in front of every call: a call that needs a token and has no known one is answered
    UNAUTHENTICATED before anything else of it is read. `book` None: no tokens, every caller is the
    anonymous tenant."""

    def __init__(
        self, book: TokenBook | None, *, log: logging.Logger, reflection_needs_token: bool = False
    ) -> None:
        self._book = book
        self._log = log
        self._open = (HEALTH_PREFIX,) if reflection_needs_token else (HEALTH_PREFIX, *REFLECTION_PREFIXES)
        self._refusals = Throttle()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        if self._book is None:
            return handler  # every caller is the anonymous tenant, the variable's default
        token = bearer_token(handler_call_details.invocation_metadata)
        tenant = self._book.tenant_for(token) if token is not None else None
        if tenant is not None:
            return _as(handler, tenant)
        why = (
            "no token: send the metadata `authorization: Bearer TOKEN`"
            if token is None
            else "the token is not known to this orchestrator"
        )
        left_out = self._refusals.take()
        if left_out is not None:  # the token itself is never logged
            self._log.info(f"refused a call: {why}", extra={"method": method, "left_out": left_out or None})
        return _refusal(handler, why)


def _kind(handler: Handler) -> tuple[Callable[..., Handler], Any]:
    for name, make in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behavior = getattr(handler, name)
        if behavior is not None:
            return make, behavior
    raise AssertionError("a handler has one of the four kinds")


def _as(handler: Handler, tenant: Tenant) -> Handler:
    """The handler, run with `tenant` as the current tenant. grpc runs each call in a task of its
    own, whose context the variable is set in: it ends with the call."""
    make, behavior = _kind(handler)
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: Any) -> Any:
            _current.set(tenant)
            async for response in behavior(request, context):
                yield response

        wrapped: Callable[..., Any] = streamed
    else:

        async def called(request: Any, context: Any) -> Any:
            _current.set(tenant)
            return await behavior(request, context)

        wrapped = called
    return make(wrapped, handler.request_deserializer, handler.response_serializer)


def _refusal(handler: Handler, why: str) -> Handler:
    make, _ = _kind(handler)

    async def refuse(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    # No deserializer: what an unknown caller sent is not even parsed.
    return make(refuse, None, handler.response_serializer)
