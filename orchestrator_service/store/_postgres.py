"""The shared store: PostgreSQL, for several orchestrator replicas on one database.

Tables as in SQLite (swarms with their tenant and view rows, subtasks, events), and on each swarm
its lease:
the owning replica, the epoch it holds, and when the lease runs out (`lease_until`, on the
database's clock, so the replicas' own clocks never matter). One append is one call of the
`append_events` function, in one statement: it checks the writer's epoch under the swarm row's
lock, writes the events and view rows, and NOTIFYs `swarm_events`, all in one transaction, so a
stopped or cut-off client can never leave a lock held, and a stale epoch writes nothing.

Followers on any replica LISTEN on `swarm_events` and read what was appended by sequence, so a
stream has no gap and no duplicate; they also read every second, should a notification be lost.
A CancelSwarm on a replica that does not own the swarm records the request on its row and
NOTIFYs `swarm_requests`; the owner finds it when it renews its leases.

The schema is versioned: `schema_migrations` lists the versions applied, and an orchestrator
applies the missing ones at start, under an advisory lock, so replicas starting together migrate
once. The URL's password is a secret: errors and logs show the URL with `***` in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from orchestrator_service.store._interface import (
    EVENTS_PAGE,
    FIRST_EPOCH,
    TERMINAL_KINDS,
    VIEW_COLUMNS,
    Claim,
    Cursor,
    Entry,
    LeaseLost,
    Renewal,
    StoreError,
    listing_query,
    stored_view,
)
from swarm.v1 import events_pb2, orchestrator_pb2

R = TypeVar("R")
log = logging.getLogger("swarm.orchestrator.postgres")

SCHEMES = ("postgresql://", "postgres://")
# Connections appends and reads share; a CancelSwarm, a start with a request_id, the listener
# each take one more.
POOL_SIZE = 16
REQUEST_LOCKS = 4
# How long a connection may wait for its turn in a pool before the operation is tried again.
POOL_WAIT_S = 5.0
# Followers read again at least this often, should a notification be lost with its connection.
FOLLOW_POLL_S = 1.0
# Reads and a follower's wait go on through an outage (a restart of the database) this long.
READ_RETRY_S = 3.0
STALE_EPOCH = "SW001"
OUT_OF_ORDER = "SW002"
# Any constant: the key of the advisory lock under which the schema is migrated.
MIGRATION_LOCK = 0x5741524D

# Version N is MIGRATIONS[N - 1]; each is applied once, in its own transaction. `view` is a
# swarm.v1.Swarm without subtasks, `status` a swarm.v1.SubtaskStatus, `event` a swarm.v1.SwarmEvent.
MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE swarms (
    swarm_id text PRIMARY KEY,
    tenant text NOT NULL,
    request_id text,
    state integer NOT NULL,
    create_ns bigint NOT NULL,
    update_ns bigint NOT NULL,
    end_ns bigint,
    last_sequence bigint NOT NULL,
    view bytea NOT NULL,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    lease_until timestamptz NOT NULL,
    cancel_reason text
);
-- Every listing and request id lookup is one tenant's: the indexes lead with it.
CREATE INDEX swarms_newest ON swarms (tenant, create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_state ON swarms (tenant, state, create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_request ON swarms (tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX swarms_by_end ON swarms (end_ns);
CREATE INDEX swarms_by_lease ON swarms (lease_until) WHERE end_ns IS NULL;
-- Orchestrators alive on this database: each renews its row with its leases.
CREATE TABLE replicas (
    name text PRIMARY KEY,
    seen_until timestamptz NOT NULL
);
CREATE TABLE subtasks (
    swarm_id text NOT NULL,
    position integer NOT NULL,
    status bytea NOT NULL,
    PRIMARY KEY (swarm_id, position)
);
CREATE TABLE events (
    swarm_id text NOT NULL,
    sequence bigint NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (swarm_id, sequence)
);
-- One append of one swarm's events, fenced by its epoch. The first append (sequence 1) makes the
-- swarm's row, owned by the writer. An append that already committed (its answer was lost with a
-- connection, and it was sent again) is not written twice.
CREATE FUNCTION append_events(
    p_swarm_id text, p_epoch bigint, p_owner text, p_lease_s double precision,
    p_sequences bigint[], p_events bytea[], p_update_ns bigint,
    p_view bytea, p_tenant text, p_request_id text, p_state integer, p_create_ns bigint, p_end_ns bigint,
    p_positions integer[], p_statuses bytea[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    first_sequence bigint := p_sequences[1];
    last_sequence_in bigint := p_sequences[cardinality(p_sequences)];
    held_epoch bigint;
    stored bigint;
BEGIN
    IF first_sequence = 1 THEN
        INSERT INTO swarms (swarm_id, tenant, request_id, state, create_ns, update_ns, end_ns,
                            last_sequence, view, owner, epoch, lease_until)
        VALUES (p_swarm_id, p_tenant, p_request_id, p_state, p_create_ns, p_update_ns, p_end_ns, 0,
                p_view, p_owner, p_epoch, now() + make_interval(secs => p_lease_s))
        ON CONFLICT (swarm_id) DO NOTHING;
    END IF;
    SELECT epoch, last_sequence INTO held_epoch, stored FROM swarms WHERE swarm_id = p_swarm_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'swarm %: event % is out of order (the swarm is not stored)', p_swarm_id, first_sequence
            USING ERRCODE = 'SW002';
    END IF;
    IF held_epoch <> p_epoch THEN
        RAISE EXCEPTION 'swarm %: epoch % is stale; another orchestrator holds epoch %', p_swarm_id, p_epoch, held_epoch
            USING ERRCODE = 'SW001';
    END IF;
    IF stored >= last_sequence_in THEN
        RETURN;
    END IF;
    IF stored <> first_sequence - 1 THEN
        RAISE EXCEPTION 'swarm %: event % is out of order (% stored)', p_swarm_id, first_sequence, stored
            USING ERRCODE = 'SW002';
    END IF;
    UPDATE swarms SET last_sequence = last_sequence_in, update_ns = p_update_ns,
        state = CASE WHEN p_view IS NULL THEN state ELSE p_state END,
        end_ns = CASE WHEN p_view IS NULL THEN end_ns ELSE p_end_ns END,
        view = coalesce(p_view, view)
    WHERE swarm_id = p_swarm_id;
    INSERT INTO events (swarm_id, sequence, event)
        SELECT p_swarm_id, s, e FROM unnest(p_sequences, p_events) AS t(s, e);
    INSERT INTO subtasks (swarm_id, position, status)
        SELECT p_swarm_id, p, s FROM unnest(p_positions, p_statuses) AS t(p, s)
        ON CONFLICT (swarm_id, position) DO UPDATE SET status = excluded.status;
    PERFORM pg_notify('swarm_events', p_swarm_id);
END
$$;
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


def is_postgres(db: str) -> bool:
    return db.startswith(SCHEMES)


def redacted(url: str) -> str:
    """The URL with its password, if any, replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def replica_name() -> str:
    """This process's name in the `owner` column: for people reading the table; epochs fence."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class PostgresStore:
    """Made by `await PostgresStore.open(url, lease_ttl_s=...)`."""

    def __init__(self, url: str, lease_ttl_s: float) -> None:
        self.name = redacted(url)
        self.replica = replica_name()
        self.lease_ttl_s = lease_ttl_s
        # Appends are tried again through an outage this long, so a database restart costs
        # nothing. Past a whole lease the lease keeper has handed the swarm over, and the failure
        # is moot; past two, the store is broken for this orchestrator, which then stops.
        self._append_retry_s = 2 * lease_ttl_s
        password = urlsplit(url).password
        self._secrets = [s for s in {password, unquote(password)} if s] if password else []
        self._conninfo = make_conninfo(
            url,
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            application_name="swarm-orchestrator",
        )
        self._pool = AsyncConnectionPool(
            self._conninfo,
            min_size=2,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True},
            timeout=POOL_WAIT_S,
            open=False,
            name="swarm-store",
        )
        # A start under a request_id holds one of these while its first events are stored; a
        # replica stopped while holding one gives it up after the idle timeout.
        self._locks = AsyncConnectionPool(
            make_conninfo(
                self._conninfo,
                options=f"-c idle_in_transaction_session_timeout={int(lease_ttl_s * 1000)}",
            ),
            min_size=0,
            max_size=REQUEST_LOCKS,
            kwargs={"autocommit": True},
            timeout=lease_ttl_s,
            open=False,
            name="swarm-request-locks",
        )
        self._changed: dict[str, asyncio.Event] = {}
        self._followers: Counter[str] = Counter()
        self._requests = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, lease_ttl_s: float = 15.0) -> PostgresStore:
        """Connects (one connection first, so that a refusal says why at once), migrates the
        schema, and opens the pools and the listener."""
        store = cls(url, lease_ttl_s)
        try:
            connection = await psycopg.AsyncConnection.connect(store._conninfo, autocommit=True)
        except psycopg.Error as error:
            raise StoreError(f"cannot connect to the database {store.name}: {store._said(error)}") from None
        async with connection:
            await store._migrate(connection)
        try:
            await store._pool.open(wait=True, timeout=15)
            await store._locks.open()
        except psycopg.Error as error:
            await store.close()
            raise StoreError(f"cannot connect to the database {store.name}: {store._said(error)}") from None
        store._listener = asyncio.get_running_loop().create_task(store._listen(), name="postgres-listener")
        return store

    @property
    def persistent(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return True

    async def close(self) -> None:
        """Signs off (so the others count one orchestrator less at once), then closes."""
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(2):
                await self._fetch("DELETE FROM replicas WHERE name = %s", [self.replica], retry_s=0)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._locks.close()
        await self._pool.close()

    # ------------------------------------------------------------------ writes

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        calls = [
            _append_call(swarm_entries, epoch, self.replica, self.lease_ttl_s)
            for swarm_entries in _by_swarm(entries)
        ]

        async def write(connection: psycopg.AsyncConnection[Any]) -> None:
            async with connection.transaction():
                for parameters in calls:
                    await connection.execute(_APPEND, parameters)

        await self._run(write, retry_s=self._append_retry_s, doing="write to")

    async def delete_finished(self, *, ended_before_ns: int, limit: int) -> int:
        async def delete(connection: psycopg.AsyncConnection[Any]) -> int:
            cursor = await connection.execute(_DELETE_FINISHED, {"before": ended_before_ns, "limit": limit})
            return len(await cursor.fetchall())

        return await self._run(delete, retry_s=READ_RETRY_S, doing="write to")

    # ------------------------------------------------------------------ leases

    async def claim(self) -> list[Claim]:
        rows = await self._fetch(
            _CLAIM, {"owner": self.replica, "lease_s": self.lease_ttl_s}, retry_s=READ_RETRY_S
        )
        return [
            Claim(str(swarm_id), int(epoch), reason or "")
            for swarm_id, epoch, reason, _ in sorted(rows, key=lambda row: row[3])
        ]

    async def renew(self, held: Mapping[str, int]) -> Renewal:
        ((orchestrators,),) = await self._fetch(
            _HEARTBEAT, {"owner": self.replica, "lease_s": self.lease_ttl_s}, retry_s=0
        )
        rows = (
            await self._fetch(
                _RENEW,
                {"ids": list(held), "epochs": list(held.values()), "lease_s": self.lease_ttl_s},
                retry_s=0,
            )
            if held
            else []
        )
        return Renewal(
            lost=[str(swarm_id) for swarm_id, lost, _, _ in rows if lost],
            cancels={str(swarm_id): reason for swarm_id, lost, ended, reason in rows if reason and not ended},
            orchestrators=int(orchestrators),
        )

    async def release(self, held: Mapping[str, int]) -> None:
        await self._fetch("DELETE FROM replicas WHERE name = %s", [self.replica], retry_s=0)
        if held:
            await self._fetch(_RELEASE, {"ids": list(held), "epochs": list(held.values())}, retry_s=0)

    async def request_cancel(self, swarm_id: str, reason: str) -> None:
        await self._fetch(_REQUEST_CANCEL, {"swarm_id": swarm_id, "reason": reason}, retry_s=READ_RETRY_S)

    async def wait_for_requests(self) -> None:
        await self._requests.wait()
        self._requests.clear()

    @contextlib.asynccontextmanager
    async def request_lock(self, request_id: str) -> AsyncIterator[None]:
        try:
            async with self._locks.connection() as connection, connection.transaction():
                await connection.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [request_id]
                )
                yield
        except psycopg.Error as error:
            raise StoreError(f"cannot write to the database {self.name}: {self._said(error)}") from None

    # ------------------------------------------------------------------ reads

    async def events(self, swarm_id: str, *, after_sequence: int, limit: int) -> list[events_pb2.SwarmEvent]:
        rows = await self._fetch(
            "SELECT event FROM events WHERE swarm_id = %s AND sequence > %s ORDER BY sequence LIMIT %s",
            [swarm_id, after_sequence, limit],
        )
        return [events_pb2.SwarmEvent.FromString(blob) for (blob,) in rows]

    async def get_swarm(self, swarm_id: str, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm | None:
        rows = await self._fetch(f"SELECT {VIEW_COLUMNS} FROM swarms WHERE swarm_id = %s", [swarm_id])
        if not rows:
            return None
        subtasks = (
            await self._fetch("SELECT status FROM subtasks WHERE swarm_id = %s ORDER BY position", [swarm_id])
            if with_subtasks
            else []
        )
        return stored_view(rows[0], [orchestrator_pb2.SubtaskStatus.FromString(blob) for (blob,) in subtasks])

    async def list_swarms(
        self, *, limit: int, state: int = 0, after: Cursor | None = None, tenant: str = ""
    ) -> list[orchestrator_pb2.Swarm]:
        query, parameters = listing_query("%s", limit=limit, state=state, after=after, tenant=tenant)
        return [stored_view(row) for row in await self._fetch(query, parameters)]

    async def find_request(self, request_id: str, *, tenant: str = "") -> str | None:
        rows = await self._fetch(
            "SELECT swarm_id FROM swarms WHERE tenant = %s AND request_id = %s ORDER BY create_ns LIMIT 1",
            [tenant, request_id],
        )
        return str(rows[0][0]) if rows else None

    async def unfinished(self) -> list[str]:
        rows = await self._fetch("SELECT swarm_id FROM swarms WHERE end_ns IS NULL ORDER BY create_ns", [])
        return [str(swarm_id) for (swarm_id,) in rows]

    async def follow(self, swarm_id: str, *, after_sequence: int) -> AsyncIterator[events_pb2.SwarmEvent]:
        index = after_sequence
        failing_since: float | None = None
        with self._following(swarm_id) as changed:
            while True:
                wake = changed()  # taken before the read, so an append during it is not missed
                try:
                    page = await self.events(swarm_id, after_sequence=index, limit=EVENTS_PAGE)
                    failing_since = None
                except StoreError:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > READ_RETRY_S:
                        raise
                    page = []
                for event in page:
                    index = event.sequence
                    yield event
                    if event.WhichOneof("kind") in TERMINAL_KINDS:
                        return
                if len(page) < EVENTS_PAGE:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), FOLLOW_POLL_S)

    # ------------------------------------------------------------------ machinery

    @contextlib.contextmanager
    def _following(self, swarm_id: str) -> Iterator[Callable[[], asyncio.Event]]:
        self._followers[swarm_id] += 1
        try:
            yield lambda: self._changed.setdefault(swarm_id, asyncio.Event())
        finally:
            self._followers[swarm_id] -= 1
            if not self._followers[swarm_id]:
                del self._followers[swarm_id]
                self._changed.pop(swarm_id, None)

    def _wake(self, swarm_id: str) -> None:
        changed = self._changed.pop(swarm_id, None)
        if changed is not None:
            changed.set()

    async def _listen(self) -> None:
        """Hands notifications to followers and the lease keeper; reconnects after an outage, and
        then wakes every follower, since what was appended meanwhile was never notified."""
        pause = 0.1
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                async with connection:
                    await connection.execute("LISTEN swarm_events")
                    await connection.execute("LISTEN swarm_requests")
                    pause = 0.1
                    for swarm_id in list(self._changed):
                        self._wake(swarm_id)
                    self._requests.set()
                    async for notification in connection.notifies():
                        if notification.channel == "swarm_events":
                            self._wake(notification.payload)
                        else:
                            self._requests.set()
            except psycopg.Error as error:
                log.warning(f"lost the notifications of {self.name}, reconnecting: {self._said(error)}")
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)

    async def _fetch(
        self, query: str, parameters: Any, *, retry_s: float = READ_RETRY_S
    ) -> list[tuple[Any, ...]]:
        async def fetch(connection: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cursor = await connection.execute(query, parameters)
            return await cursor.fetchall() if cursor.description is not None else []

        return await self._run(fetch, retry_s=retry_s, doing="read")

    async def _run(
        self,
        work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[R]],
        *,
        retry_s: float,
        doing: str,
    ) -> R:
        """Runs `work` on a pooled connection; through a lost connection or a database that is
        down, again until `retry_s` has passed (each statement is safe to send twice)."""
        deadline = time.monotonic() + retry_s
        pause = 0.05
        while True:
            try:
                async with self._pool.connection() as connection:
                    return await work(connection)
            except psycopg.errors.DatabaseError as error:
                if error.sqlstate == STALE_EPOCH:
                    raise LeaseLost(self._said(error)) from None
                if not isinstance(error, psycopg.OperationalError) or time.monotonic() + pause > deadline:
                    raise StoreError(
                        f"cannot {doing} the database {self.name}: {self._said(error)}"
                    ) from None
            except psycopg.Error as error:
                raise StoreError(f"cannot {doing} the database {self.name}: {self._said(error)}") from None
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    async def _migrate(self, connection: psycopg.AsyncConnection[Any]) -> None:
        try:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
                tables = {
                    str(name)
                    for (name,) in await (
                        await connection.execute(
                            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                        )
                    ).fetchall()
                }
                if tables and "schema_migrations" not in tables:
                    raise StoreError(f"{self.name} holds tables, but not an orchestrator's")
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations"
                    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                row = await (
                    await connection.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
                ).fetchone()
                version = int(row[0]) if row is not None else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database {self.name} has schema version {version}; "
                        f"this orchestrator knows {SCHEMA_VERSION}"
                    )
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    await connection.execute(MIGRATIONS[number - 1])
                    await connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", [number])
                    log.info(f"{self.name}: schema migrated to version {number}")
        except psycopg.Error as error:
            raise StoreError(f"cannot set up the database {self.name}: {self._said(error)}") from None

    def _said(self, error: psycopg.Error) -> str:
        """The error's first line, with the password taken out wherever the server or libpq
        quoted the connection string."""
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _by_swarm(entries: Sequence[Entry]) -> list[list[Entry]]:
    grouped: dict[str, list[Entry]] = {}
    for entry in entries:
        grouped.setdefault(entry.event.swarm_id, []).append(entry)
    return list(grouped.values())


def _append_call(entries: list[Entry], epoch: int, owner: str, lease_s: float) -> dict[str, Any]:
    """The parameters of one `append_events` call: the swarm's events, and of its view rows the
    latest of each that the events changed."""
    summary: orchestrator_pb2.Swarm | None = None
    subtasks: dict[int, orchestrator_pb2.SubtaskStatus] = {}
    for entry in entries:
        summary = entry.summary or summary
        for row in entry.subtasks:
            subtasks[row.position] = row.status
    last = entries[-1].event
    return {
        "swarm_id": last.swarm_id,
        "epoch": epoch,
        "owner": owner,
        "lease_s": lease_s,
        "sequences": [entry.event.sequence for entry in entries],
        "events": [entry.data for entry in entries],
        "update_ns": last.time.ToNanoseconds(),
        "view": summary.SerializeToString() if summary is not None else None,
        "tenant": summary.tenant if summary is not None else None,
        "request_id": (summary.request_id or None) if summary is not None else None,
        "state": summary.state if summary is not None else None,
        "create_ns": summary.create_time.ToNanoseconds() if summary is not None else None,
        "end_ns": summary.end_time.ToNanoseconds()
        if summary is not None and summary.HasField("end_time")
        else None,
        "positions": list(subtasks),
        "statuses": [status.SerializeToString() for status in subtasks.values()],
    }


_APPEND = (
    "SELECT append_events(%(swarm_id)s, %(epoch)s, %(owner)s, %(lease_s)s, %(sequences)s::bigint[],"
    " %(events)s::bytea[], %(update_ns)s, %(view)s::bytea, %(tenant)s, %(request_id)s, %(state)s, %(create_ns)s,"
    " %(end_ns)s, %(positions)s::integer[], %(statuses)s::bytea[])"
)
# Oldest first; SKIP LOCKED: replicas claiming at once take different swarms instead of waiting.
_CLAIM = """
WITH expired AS (
    SELECT swarm_id FROM swarms WHERE end_ns IS NULL AND lease_until < now()
    ORDER BY create_ns LIMIT 100 FOR UPDATE SKIP LOCKED
)
UPDATE swarms AS s
SET epoch = s.epoch + 1, owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease_s)s)
FROM expired WHERE s.swarm_id = expired.swarm_id
RETURNING s.swarm_id, s.epoch, s.cancel_reason, s.create_ns
"""
_HEARTBEAT = """
WITH beat AS (
    INSERT INTO replicas (name, seen_until) VALUES (%(owner)s, now() + make_interval(secs => %(lease_s)s))
    ON CONFLICT (name) DO UPDATE SET seen_until = excluded.seen_until
), gone AS (
    DELETE FROM replicas WHERE seen_until < now() - interval '1 day'
)
SELECT 1 + count(*) FROM replicas WHERE seen_until > now() AND name <> %(owner)s
"""
# Lost: a swarm stored under another epoch. One not stored yet (its first append is on its way) is
# neither renewed nor lost: its first append makes its lease.
_RENEW = """
WITH held AS (SELECT * FROM unnest(%(ids)s::text[], %(epochs)s::bigint[]) AS held(swarm_id, epoch)),
renewed AS (
    UPDATE swarms AS s SET lease_until = now() + make_interval(secs => %(lease_s)s)
    FROM held WHERE s.swarm_id = held.swarm_id AND s.epoch = held.epoch
    RETURNING s.swarm_id, s.end_ns IS NOT NULL AS ended, s.cancel_reason
)
SELECT swarm_id, false, ended, cancel_reason FROM renewed
UNION ALL
SELECT s.swarm_id, true, false, NULL FROM swarms AS s JOIN held ON s.swarm_id = held.swarm_id
WHERE s.epoch <> held.epoch
"""
_RELEASE = """
UPDATE swarms AS s SET lease_until = now()
FROM unnest(%(ids)s::text[], %(epochs)s::bigint[]) AS held(swarm_id, epoch)
WHERE s.swarm_id = held.swarm_id AND s.epoch = held.epoch AND s.end_ns IS NULL
"""
_REQUEST_CANCEL = """
WITH asked AS (
    UPDATE swarms SET cancel_reason = coalesce(cancel_reason, %(reason)s)
    WHERE swarm_id = %(swarm_id)s AND end_ns IS NULL RETURNING swarm_id
)
SELECT pg_notify('swarm_requests', swarm_id) FROM asked
"""
_DELETE_FINISHED = """
WITH expired AS (
    SELECT swarm_id FROM swarms WHERE end_ns < %(before)s LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), events_gone AS (
    DELETE FROM events WHERE swarm_id IN (SELECT swarm_id FROM expired)
), subtasks_gone AS (
    DELETE FROM subtasks WHERE swarm_id IN (SELECT swarm_id FROM expired)
)
DELETE FROM swarms WHERE swarm_id IN (SELECT swarm_id FROM expired) RETURNING swarm_id
"""
