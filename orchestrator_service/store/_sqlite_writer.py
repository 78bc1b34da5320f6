"""Group commit: the one connection that writes, on a thread of its own.

Writes are jobs on a queue. The thread takes every job waiting (up to a limit), runs them all in
one transaction and commits once, then settles each job's future on the event loop. While one
transaction commits, the next batch queues up, so the busier the orchestrator, the more events
share a commit, and writing does not limit throughput. Should a batch fail, its jobs are run again
one transaction each, so that only the job at fault fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator_service.store._interface import StoreError

R = TypeVar("R")
MAX_JOBS_PER_COMMIT = 512
Outcome = tuple[Any, Exception | None]


@dataclass(slots=True)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any]


@dataclass(slots=True)
class WriteStats:
    """Counts since the store was opened."""

    commits: int = 0
    jobs: int = 0


class Writer:
    def __init__(self, connection: sqlite3.Connection, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self._connection = connection
        self._path = path
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.stats = WriteStats()
        self._thread = threading.Thread(target=self._write_forever, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[sqlite3.Connection], R]) -> asyncio.Future[R]:
        """Queues `work` (run on the writer thread, inside a transaction); the future settles once
        its transaction has committed, or with the error that stopped it."""
        done: asyncio.Future[R] = self._loop.create_future()
        self._jobs.put(_Job(work, done))
        return done

    def stop(self) -> None:
        """Lets every queued job commit, then ends the thread (blocking: call it off the loop)."""
        self._jobs.put(None)
        self._thread.join()

    def _write_forever(self) -> None:
        stopping = False
        while not stopping:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            try:
                outcomes: list[Outcome] = [(value, None) for value in self._commit(batch)]
            except Exception as error:
                outcomes = [self._commit_alone(job) for job in batch] if len(batch) > 1 else [(None, error)]
            self._loop.call_soon_threadsafe(_settle, batch, [self._reported(o) for o in outcomes])

    def _commit(self, batch: list[_Job]) -> list[Any]:
        """Runs the jobs in one transaction: all of them commit, or none does and it raises."""
        db = self._connection
        try:
            db.execute("BEGIN IMMEDIATE")
            values = [job.work(db) for job in batch]
            db.execute("COMMIT")
        except Exception:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the error raised is the one to report
                    db.execute("ROLLBACK")
            raise
        self.stats.commits += 1
        self.stats.jobs += len(batch)
        return values

    def _commit_alone(self, job: _Job) -> Outcome:
        try:
            return self._commit([job])[0], None
        except Exception as error:
            return None, error

    def _reported(self, outcome: Outcome) -> Outcome:
        value, error = outcome
        if isinstance(error, sqlite3.Error):
            return value, StoreError(f"cannot write to the database {self._path}: {error}")
        return outcome


def _settle(batch: list[_Job], outcomes: list[Outcome]) -> None:
    for job, (value, error) in zip(batch, outcomes, strict=True):
        if job.done.done():  # its waiter was cancelled; the write stands regardless
            continue
        if error is None:
            job.done.set_result(value)
        else:
            job.done.set_exception(error)
