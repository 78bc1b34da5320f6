"""The embedded default store: one SQLite file in WAL mode.

One connection writes, on the writer thread (group commit, `_sqlite_writer.py`); another reads,
on a reader thread, so neither blocks the event loop and reads never wait for a commit (WAL). The
file is locked (flock) while an orchestrator uses it: two orchestrators resuming the same swarms
would run them twice. A file that is not a database, is another program's database, or cannot be
written is refused at open with a one-line StoreError.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from orchestrator_service.store._interface import (
    FIRST_EPOCH,
    VIEW_COLUMNS,
    Cursor,
    Entry,
    OneOrchestrator,
    StoreError,
    listing_query,
    stored_view,
)
from orchestrator_service.store._sqlite_writer import Writer, WriteStats
from swarm.v1 import events_pb2, orchestrator_pb2

R = TypeVar("R")
SCHEMA_VERSION = 2
# Every listing and request id lookup is one tenant's: the indexes lead with it.
TENANT_INDEXES = """
CREATE INDEX swarms_newest ON swarms (tenant, create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_state ON swarms (tenant, state, create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_request ON swarms (tenant, request_id) WHERE request_id IS NOT NULL;
"""
# `view` is a swarm.v1.Swarm without subtasks, `status` a swarm.v1.SubtaskStatus, `event` a
# swarm.v1.SwarmEvent: the API's own messages, so what is stored is what clients are shown.
SCHEMA = f"""
CREATE TABLE swarms (
    swarm_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL DEFAULT '',
    request_id TEXT,
    state INTEGER NOT NULL,
    create_ns INTEGER NOT NULL,
    update_ns INTEGER NOT NULL,
    end_ns INTEGER,
    last_sequence INTEGER NOT NULL,
    view BLOB NOT NULL
);
CREATE INDEX swarms_by_end ON swarms (end_ns);
{TENANT_INDEXES}
CREATE TABLE subtasks (
    swarm_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    status BLOB NOT NULL,
    PRIMARY KEY (swarm_id, position)
) WITHOUT ROWID;
CREATE TABLE events (
    swarm_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (swarm_id, sequence)
) WITHOUT ROWID;
"""
# From each version to the next, in one transaction each; a file of an older version is brought up
# to date when opened. Version 2: swarms belong to tenants (those stored before belong to "", the
# tenant of an orchestrator without tokens).
MIGRATIONS = {
    1: f"""
ALTER TABLE swarms ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
DROP INDEX swarms_newest;
DROP INDEX swarms_by_state;
DROP INDEX swarms_by_request;
{TENANT_INDEXES}
""",
}


class SqliteStore(OneOrchestrator):
    """Made by `await SqliteStore.open(path)`."""

    def __init__(self, path: str, lock: int, writer: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        self.path = path
        self._lock = lock
        self._reader_db = reader
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._writer = Writer(writer, path, asyncio.get_running_loop())
        self._writer_db = writer
        self._appends = _Appends(self._writer, path)

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        lock, writer, reader = await asyncio.to_thread(_open, path)
        return cls(path, lock, writer, reader)

    @property
    def persistent(self) -> bool:
        return True

    @property
    def stats(self) -> WriteStats:
        return self._writer.stats

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        await self._appends.add(entries)

    async def delete_finished(self, *, ended_before_ns: int, limit: int) -> int:
        return await self._writer.submit(lambda db: _delete_finished(db, ended_before_ns, limit))

    async def events(self, swarm_id: str, *, after_sequence: int, limit: int) -> list[events_pb2.SwarmEvent]:
        rows = await self._read(
            lambda db: db.execute(
                "SELECT event FROM events WHERE swarm_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (swarm_id, after_sequence, limit),
            ).fetchall()
        )
        return [events_pb2.SwarmEvent.FromString(blob) for (blob,) in rows]

    async def get_swarm(self, swarm_id: str, *, with_subtasks: bool = True) -> orchestrator_pb2.Swarm | None:
        def read(db: sqlite3.Connection) -> tuple[tuple[bytes, int, int] | None, list[tuple[bytes]]]:
            row = db.execute(f"SELECT {VIEW_COLUMNS} FROM swarms WHERE swarm_id = ?", (swarm_id,)).fetchone()
            if row is None or not with_subtasks:
                return row, []
            query = "SELECT status FROM subtasks WHERE swarm_id = ? ORDER BY position"
            return row, db.execute(query, (swarm_id,)).fetchall()

        row, subtasks = await self._read(read)
        if row is None:
            return None
        return stored_view(row, [orchestrator_pb2.SubtaskStatus.FromString(blob) for (blob,) in subtasks])

    async def list_swarms(
        self, *, limit: int, state: int = 0, after: Cursor | None = None, tenant: str = ""
    ) -> list[orchestrator_pb2.Swarm]:
        query, parameters = listing_query("?", limit=limit, state=state, after=after, tenant=tenant)
        rows = await self._read(lambda db: db.execute(query, parameters).fetchall())
        return [stored_view(row) for row in rows]

    async def find_request(self, request_id: str, *, tenant: str = "") -> str | None:
        query = "SELECT swarm_id FROM swarms WHERE tenant = ? AND request_id = ? ORDER BY create_ns LIMIT 1"
        row = await self._read(lambda db: db.execute(query, (tenant, request_id)).fetchone())
        return str(row[0]) if row is not None else None

    async def unfinished(self) -> list[str]:
        query = "SELECT swarm_id FROM swarms WHERE end_ns IS NULL ORDER BY create_ns"
        rows = await self._read(lambda db: db.execute(query).fetchall())
        return [str(swarm_id) for (swarm_id,) in rows]

    async def close(self) -> None:
        """Commits what is queued, then closes the connections and releases the file."""
        await asyncio.to_thread(self._writer.stop)
        await asyncio.to_thread(self._reader.shutdown)
        self._reader_db.close()
        self._writer_db.close()
        os.close(self._lock)

    async def _read(self, query: Callable[[sqlite3.Connection], R]) -> R:
        def run() -> R:
            try:
                return query(self._reader_db)
            except sqlite3.Error as error:
                raise StoreError(f"cannot read the database {self.path}: {error}") from None

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)


def _open(path: str) -> tuple[int, sqlite3.Connection, sqlite3.Connection]:
    """Locks the file, checks or creates the schema, and opens the two connections."""
    try:
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise StoreError(f"cannot open the database {path}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise StoreError(f"the database {path} is in use by another orchestrator") from None
    try:
        writer = _connect(path)
        if writer.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise StoreError(f"the database {path} cannot use write-ahead logging")
        # FULL: a commit is on disk, not only in the OS, before any client is shown its events.
        writer.execute("PRAGMA synchronous = FULL")
        _check_schema(writer, path)
        reader = _connect(path)
        reader.execute("PRAGMA query_only = ON")
    except sqlite3.Error as error:
        os.close(lock)
        raise StoreError(f"cannot use the database {path}: {error}") from None
    except StoreError:
        os.close(lock)
        raise
    return lock, writer, reader


def _connect(path: str) -> sqlite3.Connection:
    # Autocommit mode: the writer begins and commits its own transactions; each connection is used
    # by exactly one thread, its own, though it is made on another.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def _check_schema(db: sqlite3.Connection, path: str) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        if db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
            raise StoreError(f"{path} is an SQLite database, but not an orchestrator's")
        db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        return
    if not 0 < version < SCHEMA_VERSION:
        raise StoreError(
            f"the database {path} has schema version {version}; this orchestrator knows {SCHEMA_VERSION}"
        )
    for step in range(version, SCHEMA_VERSION):
        db.executescript(f"BEGIN; {MIGRATIONS[step]} PRAGMA user_version = {step + 1}; COMMIT;")


class _Appends:
    """The appends of every swarm that wait for the writer, written together: one job, with a
    statement or two per table, not one per swarm or per event.

    The writer lets go of the GIL for each statement it steps, and then waits to get it back
    while the event loop's thread is busy: up to the switch interval each time. Written swarm by
    swarm with a statement per event, a commit of 20 swarms' events stepped hundreds of
    statements, and no reader saw those events until the last. Appends that come while a job waits
    join it. One that cannot be written (a sequence already stored) fails alone: the others are
    written without it."""

    def __init__(self, writer: Writer, path: str) -> None:
        self._writer = writer
        self._path = path
        self._lock = threading.Lock()  # the loop adds to a round while the writer may take it
        self._round: _Round | None = None

    def add(self, entries: Sequence[Entry]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            round_ = self._round
            if round_ is None or round_.taken:
                round_ = self._round = _Round(self._lock, self._path)
                self._writer.submit(round_.write).add_done_callback(round_.settle)
            round_.appends.append((entries, done))
        return done


class _Round:
    """Appends written by one job of the writer."""

    def __init__(self, lock: threading.Lock, path: str) -> None:
        self.appends: list[tuple[Sequence[Entry], asyncio.Future[None]]] = []
        self.taken = False
        self._lock = lock
        self._path = path

    def write(self, db: sqlite3.Connection) -> list[StoreError | None]:
        """On the writer thread, in its transaction: every append, or each alone if one fails."""
        with self._lock:
            self.taken = True
        groups = [entries for entries, _ in self.appends]
        try:
            _within_savepoint(db, [entry for entries in groups for entry in entries])
            return [None] * len(groups)
        except sqlite3.Error:
            pass
        failures: list[StoreError | None] = []
        for entries in groups:
            try:
                _within_savepoint(db, entries)
                failures.append(None)
            except sqlite3.Error as error:
                failures.append(StoreError(f"cannot write to the database {self._path}: {error}"))
        return failures

    def settle(self, job: asyncio.Future[list[StoreError | None]]) -> None:
        """On the loop: each append's outcome, or the transaction's failure for all of them."""
        failed = job.exception()
        outcomes: list[BaseException | None] = [failed] * len(self.appends) if failed else [*job.result()]
        for (_, done), error in zip(self.appends, outcomes, strict=True):
            if done.done():  # its waiter was cancelled; the write stands regardless
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)


def _within_savepoint(db: sqlite3.Connection, entries: Sequence[Entry]) -> None:
    """Writes the entries, or, if that fails, nothing of them, and raises."""
    db.execute("SAVEPOINT append")
    try:
        _write(db, entries)
    except BaseException:
        db.execute("ROLLBACK TO append")
        raise
    finally:
        db.execute("RELEASE append")


def _write(db: sqlite3.Connection, entries: Sequence[Entry]) -> None:
    """One append: the events, the view rows they changed (the latest of each only), and every
    touched swarm's last sequence and update time."""
    summaries: dict[str, orchestrator_pb2.Swarm] = {}
    subtasks: dict[tuple[str, int], orchestrator_pb2.SubtaskStatus] = {}
    latest: dict[str, tuple[int, int]] = {}
    for entry in entries:
        event = entry.event
        if entry.summary is not None:
            summaries[event.swarm_id] = entry.summary
        for row in entry.subtasks:
            subtasks[(event.swarm_id, row.position)] = row.status
        latest[event.swarm_id] = (event.sequence, event.time.ToNanoseconds())
    # Most events are output chunks, which change no view row: those statements are skipped.
    _with_values(
        db, _UPSERT_SWARM, [_swarm_row(swarm_id, summary) for swarm_id, summary in summaries.items()]
    )
    _with_values(
        db,
        "INSERT INTO events (swarm_id, sequence, event) VALUES {values}",
        [(e.event.swarm_id, e.event.sequence, e.data) for e in entries],
    )
    _with_values(
        db,
        "INSERT INTO subtasks (swarm_id, position, status) VALUES {values}"
        " ON CONFLICT (swarm_id, position) DO UPDATE SET status = excluded.status",
        [
            (swarm_id, position, status.SerializeToString())
            for (swarm_id, position), status in subtasks.items()
        ],
    )
    _with_values(
        db,
        "UPDATE swarms SET last_sequence = v.column2, update_ns = v.column3"
        " FROM (VALUES {values}) AS v WHERE swarms.swarm_id = v.column1",
        [(swarm_id, sequence, update_ns) for swarm_id, (sequence, update_ns) in latest.items()],
    )


# Values one statement carries at most: SQLite's oldest limit.
_VALUES_PER_STATEMENT = 999


def _with_values(db: sqlite3.Connection, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
    """Runs `statement` for all the rows with a few statements of many rows each (in `VALUES`, in
    place of `{values}`), not one statement per row as executemany does: each statement is stepped
    once, and so gives up the GIL once (see _Appends). A statement per power of two of rows keeps
    the statements few enough to stay prepared."""
    if not rows:
        return
    width = len(rows[0])
    place = "(" + ", ".join("?" * width) + ")"
    most = 1 << ((_VALUES_PER_STATEMENT // width).bit_length() - 1)
    done = 0
    while done < len(rows):
        count = min(most, 1 << ((len(rows) - done).bit_length() - 1))
        chunk = rows[done : done + count]
        db.execute(
            statement.format(values=", ".join([place] * count)), [value for row in chunk for value in row]
        )
        done += count


_UPSERT_SWARM = (
    "INSERT INTO swarms (swarm_id, tenant, request_id, state, create_ns, update_ns, end_ns, last_sequence, view)"
    " VALUES {values} ON CONFLICT (swarm_id) DO UPDATE"
    " SET state = excluded.state, end_ns = excluded.end_ns, view = excluded.view"
)


def _swarm_row(swarm_id: str, summary: orchestrator_pb2.Swarm) -> tuple[object, ...]:
    return (
        swarm_id,
        summary.tenant,
        summary.request_id or None,
        summary.state,
        summary.create_time.ToNanoseconds(),
        summary.update_time.ToNanoseconds(),
        summary.end_time.ToNanoseconds() if summary.HasField("end_time") else None,
        summary.last_sequence,
        summary.SerializeToString(),
    )


def _delete_finished(db: sqlite3.Connection, ended_before_ns: int, limit: int) -> int:
    expired = db.execute(
        "SELECT swarm_id FROM swarms WHERE end_ns < ? LIMIT ?", (ended_before_ns, limit)
    ).fetchall()
    for table in ("events", "subtasks", "swarms"):
        db.executemany(f"DELETE FROM {table} WHERE swarm_id = ?", expired)
    return len(expired)
