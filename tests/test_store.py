"""The stores (in memory, SQLite and PostgreSQL) against one contract, SQLite's own promises, and the event log's
rule that a reader sees an event only once it is durable."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import psycopg
import pytest

from fakes.postgres import PostgresServer
from orchestrator_service.event_log import REPLAY_PAGE, EventLog, replay
from orchestrator_service.state import SwarmRecord
from orchestrator_service.store import (
    FIRST_EPOCH,
    Claim,
    Cursor,
    Entry,
    LeaseLost,
    MemoryStore,
    PostgresStore,
    Renewal,
    SqliteStore,
    Store,
    StoreError,
    expire,
)
from orchestrator_service.store._postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from swarm.v1 import events_pb2, orchestrator_pb2

S = orchestrator_pb2.SwarmState


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = await SqliteStore.open(str(tmp_path / "s.db"))
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_url"))
    yield opened
    await opened.close()


async def write_swarm(
    store: Store,
    swarm_id: str,
    *,
    agents: int = 2,
    end: str = "swarm_completed",
    request_id: str = "",
    tenant: str = "",
) -> EventLog:
    """A whole swarm through a real EventLog (so with the real reducer's view rows); `end` is the
    terminal kind, or "" for a swarm still running."""
    log = EventLog(SwarmRecord(swarm_id), store)
    log.append(
        "accepted",
        events_pb2.SwarmAccepted(
            idea=f"idea {swarm_id}", num_agents=agents, request_id=request_id, tenant=tenant
        ),
    )
    subtasks = [events_pb2.Subtask(id=f"subtask-{i}", title=f"t{i}", instructions="x") for i in range(agents)]
    log.append(
        "plan_created", events_pb2.PlanCreated(subtasks=subtasks, usage=events_pb2.Usage(input_tokens=5))
    )
    for subtask in subtasks:
        log.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="w", attempt=1)
        )
        log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id=subtask.id, text="out", attempt=1))
        log.append(
            "subtask_completed",
            events_pb2.SubtaskCompleted(
                subtask_id=subtask.id,
                worker_id="w",
                output="out",
                usage=events_pb2.Usage(output_tokens=3),
                attempt=1,
            ),
        )
    if end == "swarm_completed":
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text="all", attempt=1))
        log.append("swarm_completed", events_pb2.SwarmCompleted(result="all"))
    elif end == "swarm_failed":
        log.append("swarm_failed", events_pb2.SwarmFailed(error="broken"))
    await log.stored()
    return log


async def test_a_stored_swarm_reads_back_exactly_as_its_record_shows_it(store: Store) -> None:
    log = await write_swarm(store, "a", agents=3)
    events = await store.events("a", after_sequence=0, limit=100)
    assert [e.sequence for e in events] == list(range(1, 14))
    assert events[0].accepted.idea == "idea a" and events[-1].HasField("swarm_completed")
    assert await store.events("a", after_sequence=10, limit=2) == events[10:12]
    assert await store.get_swarm("a") == log.record.to_proto()
    summary = await store.get_swarm("a", with_subtasks=False)
    assert summary is not None and not summary.subtasks and summary.last_sequence == 13
    assert await store.get_swarm("nobody") is None
    assert await store.events("nobody", after_sequence=0, limit=10) == []


async def test_the_view_of_a_running_swarm_moves_with_every_event(store: Store) -> None:
    log = await write_swarm(store, "r", end="")
    log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id="subtask-0", text="late", attempt=1))
    await log.stored()
    view = await store.get_swarm("r")
    assert view == log.record.to_proto()
    assert view is not None and view.state == S.SWARM_STATE_RUNNING and view.last_sequence == 9
    assert not view.HasField("end_time")


async def test_swarms_list_newest_first_in_pages_and_by_state(store: Store) -> None:
    for name, end in [
        ("s1", "swarm_completed"),
        ("s2", "swarm_failed"),
        ("s3", ""),
        ("s4", "swarm_completed"),
    ]:
        await write_swarm(store, name, end=end)
    listed = await store.list_swarms(limit=10)
    assert [s.swarm_id for s in listed] == ["s4", "s3", "s2", "s1"]
    assert all(not s.subtasks for s in listed)
    first = await store.list_swarms(limit=2)
    rest = await store.list_swarms(limit=10, after=Cursor.of(first[-1]))
    assert [s.swarm_id for s in first + rest] == ["s4", "s3", "s2", "s1"]
    completed = await store.list_swarms(limit=10, state=S.SWARM_STATE_COMPLETED)
    assert [s.swarm_id for s in completed] == ["s4", "s1"]
    assert [s.swarm_id for s in await store.list_swarms(limit=10, state=S.SWARM_STATE_RUNNING)] == ["s3"]


async def test_request_ids_and_unfinished_swarms_are_found(store: Store) -> None:
    await write_swarm(store, "done", request_id="key-1")
    await write_swarm(store, "running", end="", request_id="key-2")
    await write_swarm(store, "also-running", end="")
    assert await store.find_request("key-1") == "done"
    assert await store.find_request("key-2") == "running"
    assert await store.find_request("key-3") is None
    assert await store.unfinished() == ["running", "also-running"]


async def test_swarms_belong_to_their_tenant_in_views_listings_and_request_ids(store: Store) -> None:
    await write_swarm(store, "a1", tenant="acme", request_id="same")
    await write_swarm(store, "b1", tenant="bolt", request_id="same", end="")
    await write_swarm(store, "a2", tenant="acme", end="swarm_failed")
    await write_swarm(store, "anonymous", request_id="same")
    view = await store.get_swarm("a1")
    assert view is not None and view.tenant == "acme"
    assert [s.swarm_id for s in await store.list_swarms(limit=10, tenant="acme")] == ["a2", "a1"]
    assert [s.swarm_id for s in await store.list_swarms(limit=10, tenant="bolt")] == ["b1"]
    assert [s.swarm_id for s in await store.list_swarms(limit=10)] == ["anonymous"]
    assert [s.tenant for s in await store.list_swarms(limit=10, tenant="acme")] == ["acme", "acme"]
    failed = await store.list_swarms(limit=10, state=S.SWARM_STATE_FAILED, tenant="acme")
    assert [s.swarm_id for s in failed] == ["a2"]
    assert await store.list_swarms(limit=10, state=S.SWARM_STATE_FAILED, tenant="bolt") == []
    # Each tenant's request ids are its own.
    assert await store.find_request("same", tenant="acme") == "a1"
    assert await store.find_request("same", tenant="bolt") == "b1"
    assert await store.find_request("same") == "anonymous"
    assert await store.find_request("same", tenant="nobody") is None
    await expire(store, max_age_s=0)
    assert await store.find_request("same", tenant="acme") is None
    assert await store.find_request("same", tenant="bolt") == "b1"


async def test_retention_deletes_finished_swarms_past_their_age_and_nothing_else(store: Store) -> None:
    await write_swarm(store, "completed", request_id="key")
    await write_swarm(store, "failed", end="swarm_failed")
    await write_swarm(store, "running", end="")
    assert await expire(store, max_age_s=3600) == 0
    assert await expire(store, max_age_s=0) == 2
    assert [s.swarm_id for s in await store.list_swarms(limit=10)] == ["running"]
    for gone in ("completed", "failed"):
        assert await store.get_swarm(gone) is None
        assert await store.events(gone, after_sequence=0, limit=10) == []
    assert await store.find_request("key") is None
    assert len(await store.events("running", after_sequence=0, limit=100)) == 8


async def test_replay_reads_long_logs_page_by_page(store: Store) -> None:
    log = await write_swarm(store, "long", end="")
    for i in range(REPLAY_PAGE * 2 + 10):
        log.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id="subtask-0", text=str(i), attempt=1))
    await log.stored()
    sequences = [event.sequence async for event in replay(store, "long", after_sequence=5)]
    assert sequences == list(range(6, log.last_sequence + 1))
    assert [e.sequence async for e in replay(store, "long", after_sequence=5, through=1500)] == list(
        range(6, 1501)
    )


async def test_sqlite_keeps_every_swarm_across_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    first = await SqliteStore.open(path)
    done = await write_swarm(first, "done")
    running = await write_swarm(first, "running", end="")
    await first.close()
    again = await SqliteStore.open(path)
    try:
        assert await again.get_swarm("done") == done.record.to_proto()
        assert await again.get_swarm("running") == running.record.to_proto()
        assert await again.unfinished() == ["running"]
        assert len(await again.events("done", after_sequence=0, limit=100)) == done.last_sequence
    finally:
        await again.close()


# The swarms table of schema version 1, before swarms had tenants.
SCHEMA_1_SWARM_INDEXES = """
CREATE INDEX swarms_newest ON swarms (create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_state ON swarms (state, create_ns DESC, swarm_id DESC);
CREATE INDEX swarms_by_request ON swarms (request_id) WHERE request_id IS NOT NULL;
"""


async def test_sqlite_brings_a_version_1_file_up_to_date_keeping_every_swarm(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    first = await SqliteStore.open(path)
    done = await write_swarm(first, "done", request_id="key")
    running = await write_swarm(first, "running", end="")
    await first.close()
    old = sqlite3.connect(path, isolation_level=None)  # back to what version 1 wrote
    old.executescript(
        "BEGIN; DROP INDEX swarms_newest; DROP INDEX swarms_by_state; DROP INDEX swarms_by_request;"
        f" ALTER TABLE swarms DROP COLUMN tenant; {SCHEMA_1_SWARM_INDEXES} PRAGMA user_version = 1; COMMIT;"
    )
    old.close()

    again = await SqliteStore.open(path)
    try:
        assert await again.get_swarm("done") == done.record.to_proto()
        assert await again.get_swarm("running") == running.record.to_proto()
        assert [s.swarm_id for s in await again.list_swarms(limit=10)] == ["running", "done"]
        assert await again.find_request("key") == "done"
        assert await again.unfinished() == ["running"]
        await write_swarm(again, "new", tenant="acme", request_id="key")
        assert await again.find_request("key", tenant="acme") == "new"
        assert [s.swarm_id for s in await again.list_swarms(limit=10, tenant="acme")] == ["new"]
    finally:
        await again.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 2
    check.close()


async def test_sqlite_commits_the_appends_of_many_swarms_together(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        logs = [EventLog(SwarmRecord(f"s{i}"), store) for i in range(50)]
        for log in logs:
            log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1))
        for round_ in range(20):
            for log in logs:
                log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(round_), attempt=1))
            await asyncio.sleep(0)
        await asyncio.gather(*(log.stored() for log in logs))
        events = 50 * 21
        for log in logs:
            assert len(await store.events(log.swarm_id, after_sequence=0, limit=100)) == 21
        assert store.stats.commits <= events / 20, f"{store.stats.commits} commits for {events} events"
    finally:
        await store.close()


async def test_big_appends_of_many_swarms_at_once_are_stored_whole(store: Store) -> None:
    """More rows than one statement carries, in every table: 300 swarms appending at once, one of
    them 300 subtasks and 700 events in a single append."""
    big = EventLog(SwarmRecord("big"), store)
    big.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=300))
    subtasks = [events_pb2.Subtask(id=f"subtask-{i}", title="t") for i in range(300)]
    big.append("plan_created", events_pb2.PlanCreated(subtasks=subtasks))
    for subtask in subtasks:
        big.append(
            "subtask_started", events_pb2.SubtaskStarted(subtask_id=subtask.id, worker_id="w", attempt=1)
        )
    for i in range(398):
        big.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id="subtask-7", text=str(i), attempt=1))
    small = [EventLog(SwarmRecord(f"s{i}"), store) for i in range(299)]
    for log in small:
        log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1))
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text="t", attempt=1))
    await asyncio.wait_for(asyncio.gather(*(log.stored() for log in [big, *small])), 30)
    stored = await store.events("big", after_sequence=0, limit=1000)
    assert [e.sequence for e in stored] == list(range(1, 701))
    view = await store.get_swarm("big")
    assert view is not None and view.last_sequence == 700
    assert [s.state for s in view.subtasks] == [orchestrator_pb2.SUBTASK_STATE_RUNNING] * 300
    for log in small:
        assert await store.get_swarm(log.swarm_id) == log.record.to_proto()


async def test_a_failing_append_fails_alone_and_the_rest_of_its_batch_commits(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        log = await write_swarm(store, "a", end="")
        first = (await store.events("a", after_sequence=0, limit=1))[0]
        duplicate = Entry(first, first.SerializeToString())
        # The writer is held busy, so that the two appends below queue up and share one batch.
        gate = threading.Event()
        held = store._writer.submit(lambda db: gate.wait(5))
        failing = asyncio.ensure_future(store.append([duplicate]))
        other = EventLog(SwarmRecord("b"), store)
        other.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1))
        await asyncio.sleep(0.05)
        gate.set()
        await held
        with pytest.raises(StoreError, match="UNIQUE constraint failed"):
            await failing
        await asyncio.wait_for(other.stored(), 5)
        assert (await store.get_swarm("b")) is not None
        assert await store.get_swarm("a") == log.record.to_proto()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (
            lambda path: path.write_bytes(b"this is not a database, just garbage " * 200),
            "file is not a database",
        ),
        (
            lambda path: _sqlite(path, "CREATE TABLE notes (text)"),
            "is an SQLite database, but not an orchestrator's",
        ),
        (lambda path: _sqlite(path, "PRAGMA user_version = 99"), "has schema version 99"),
        (lambda path: path.mkdir(), "Is a directory"),
    ],
)
async def test_sqlite_refuses_a_file_it_cannot_use_with_a_clear_error(
    tmp_path: Path, prepare: object, message: str
) -> None:
    path = tmp_path / "s.db"
    prepare(path)  # type: ignore[operator]
    with pytest.raises(StoreError, match=message) as raised:
        await SqliteStore.open(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


async def test_sqlite_refuses_a_path_it_cannot_create_and_a_file_in_use(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=r"cannot open the database .*: Not a directory"):
        await SqliteStore.open(str(tmp_path / "file" / "s.db"))
    first = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        with pytest.raises(StoreError, match="in use by another orchestrator"):
            await SqliteStore.open(str(tmp_path / "s.db"))
    finally:
        await first.close()
    await (await SqliteStore.open(str(tmp_path / "s.db"))).close()  # closing released it


def _sqlite(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(statement)


class GatedStore(MemoryStore):
    """Holds every append until the test opens the gate, as a slow disk would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        await self.gate.wait()
        await super().append(entries, epoch=epoch)


async def test_readers_see_an_event_only_once_the_store_has_it() -> None:
    store = GatedStore()
    log = EventLog(SwarmRecord("s1"), store)
    seen: list[int] = []

    async def follow() -> None:
        async for batch in log.follow():
            seen.extend(event.sequence for event in batch)

    follower = asyncio.create_task(follow())
    log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1))
    log.append("swarm_failed", events_pb2.SwarmFailed(error="x"))
    stored = asyncio.create_task(log.stored())
    await asyncio.sleep(0.05)
    assert seen == [] and not stored.done()
    assert await store.get_swarm("s1") is None
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(follower, stored), 2)
    assert seen == [1, 2]


class FailingStore(MemoryStore):
    async def append(self, entries: Sequence[Entry], *, epoch: int = FIRST_EPOCH) -> None:
        raise StoreError("cannot write to the database x.db: disk I/O error")


async def test_events_that_cannot_be_stored_are_never_shown_and_the_failure_is_reported() -> None:
    failures: list[StoreError] = []
    log = EventLog(SwarmRecord("s1"), FailingStore(), on_store_failure=failures.append)
    log.append("accepted", events_pb2.SwarmAccepted(idea="i", num_agents=1))
    with pytest.raises(StoreError, match="disk I/O error"):
        async for _ in log.follow():
            pytest.fail("an unstored event was shown")
    with pytest.raises(StoreError):
        await log.stored()
    assert len(failures) == 1


async def test_a_log_taken_over_from_the_store_replays_then_follows_without_gap_or_duplicate(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        await write_swarm(store, "s1", end="")
        record = SwarmRecord("s1")
        async for event in replay(store, "s1"):
            record.apply(event)
        log = EventLog(record, store)

        async def collect(after: int) -> list[int]:
            return [event.sequence async for batch in log.follow(after) for event in batch]

        followers = [asyncio.create_task(collect(after)) for after in (0, 3, 8, 9)]
        for i in range(30):
            log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(i), attempt=1))
            if i % 7 == 0:
                await asyncio.sleep(0)
        log.append("swarm_completed", events_pb2.SwarmCompleted(result="r"))
        results = await asyncio.wait_for(asyncio.gather(*followers), 5)
    finally:
        await store.close()
    assert results == [list(range(after + 1, 40)) for after in (0, 3, 8, 9)]


# ---------------------------------------------------------------- PostgreSQL: leases, fencing, schema


@pytest.fixture
async def two_replicas(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two orchestrators' stores on one database, with leases short enough to run out in a test."""
    first = await PostgresStore.open(postgres_url, lease_ttl_s=0.3)
    second = await PostgresStore.open(postgres_url, lease_ttl_s=0.3)
    yield first, second
    await first.close()
    await second.close()


async def resumed_log(store: Store, swarm_id: str, epoch: int) -> EventLog:
    record = SwarmRecord(swarm_id)
    async for event in replay(store, swarm_id):
        record.apply(event)
    return EventLog(record, store, epoch=epoch)


async def test_postgres_refuses_an_append_under_a_stale_epoch_and_writes_nothing(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    old, new = two_replicas
    stale = await write_swarm(old, "s", end="")
    assert await new.claim() == []  # the lease is live
    await asyncio.sleep(0.4)
    assert await new.claim() == [Claim("s", FIRST_EPOCH + 1)]
    lost: list[tuple[str, int]] = []
    stale._on_lease_lost = lambda swarm_id, epoch: lost.append((swarm_id, epoch))
    stale.append("subtask_delta", events_pb2.SubtaskDelta(subtask_id="subtask-0", text="late", attempt=1))
    with pytest.raises(LeaseLost):
        await stale.stored()
    assert lost == [("s", FIRST_EPOCH)]
    assert len(await old.events("s", after_sequence=0, limit=100)) == 8
    assert (await old.renew({"s": FIRST_EPOCH})).lost == ["s"]
    taken = await resumed_log(new, "s", FIRST_EPOCH + 1)
    taken.append("swarm_failed", events_pb2.SwarmFailed(error="taken over"))
    await taken.stored()
    assert [e.sequence for e in await old.events("s", after_sequence=0, limit=100)] == list(range(1, 10))
    assert await new.claim() == [] and await old.unfinished() == []


async def test_postgres_leases_are_renewed_released_and_claimed_once(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    owner, other = two_replicas
    await write_swarm(owner, "a", end="")
    await write_swarm(owner, "b", end="")
    # A swarm whose first append is still on its way is not lost: that append makes its lease.
    assert await owner.renew({"not-stored-yet": FIRST_EPOCH}) == Renewal(orchestrators=1)
    assert (await other.renew({})).orchestrators == 2, "each renewal is a sign of life"
    for _ in range(3):
        await asyncio.sleep(0.15)
        assert (await owner.renew({"a": FIRST_EPOCH, "b": FIRST_EPOCH})).lost == []
        assert await other.claim() == []
    await owner.release({"a": FIRST_EPOCH})
    assert (await other.renew({})).orchestrators == 1, "a replica that lets go is no longer counted"
    claims = await asyncio.gather(other.claim(), owner.claim())
    assert sorted(claims, key=len) == [[], [Claim("a", FIRST_EPOCH + 1)]], "one replica takes it"


async def test_postgres_a_cancellation_asked_anywhere_reaches_the_owner(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    owner, other = two_replicas
    await write_swarm(owner, "s", end="")
    await write_swarm(owner, "done")
    woken = asyncio.create_task(owner.wait_for_requests())
    await other.request_cancel("s", "stop it")
    await other.request_cancel("done", "too late")
    await asyncio.wait_for(woken, 5)
    renewal = await owner.renew({"s": FIRST_EPOCH, "done": FIRST_EPOCH})
    assert renewal.cancels == {"s": "stop it"} and renewal.lost == []
    await asyncio.sleep(0.4)  # no renewal: a replica that claims the swarm is told as well
    assert await other.claim() == [Claim("s", FIRST_EPOCH + 1, "stop it")]


async def test_postgres_an_append_sent_again_after_its_commit_is_stored_once(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    try:
        await write_swarm(store, "s", end="")
        stored = await store.events("s", after_sequence=0, limit=100)
        await store.append([Entry(event, event.SerializeToString()) for event in stored[5:]])
        summary = await store.get_swarm("s", with_subtasks=False)
        await store.append([Entry(stored[0], stored[0].SerializeToString(), summary)])
        assert await store.events("s", after_sequence=0, limit=100) == stored
        gap = events_pb2.SwarmEvent(swarm_id="s", sequence=20, synthesis_delta=events_pb2.SynthesisDelta())
        with pytest.raises(StoreError, match="event 20 is out of order"):
            await store.append([Entry(gap, gap.SerializeToString())])
    finally:
        await store.close()


async def test_postgres_a_follower_at_another_replica_sees_each_append_once_in_order(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    owner, other = two_replicas
    log = await write_swarm(owner, "s", end="")

    async def follow(after: int) -> list[int]:
        return [event.sequence async for event in other.follow("s", after_sequence=after)]

    followers = [asyncio.create_task(follow(after)) for after in (0, 3, 8)]
    await asyncio.sleep(0.1)
    for i in range(40):
        log.append("synthesis_delta", events_pb2.SynthesisDelta(text=str(i), attempt=1))
        if i % 5 == 0:
            await asyncio.sleep(0.01)
    log.append("swarm_completed", events_pb2.SwarmCompleted(result="r"))
    # Followers get each event once the owner has stored it, whatever the notifications did.
    results = await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert results == [list(range(after + 1, 50)) for after in (0, 3, 8)]


async def test_postgres_migrates_a_new_database_once_even_when_replicas_start_together(
    postgres_url: str,
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(3)))
    for store in stores:
        await store.close()
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        rows = await (await db.execute("SELECT version FROM schema_migrations ORDER BY version")).fetchall()
        assert rows == [(version,) for version in range(1, len(POSTGRES_MIGRATIONS) + 1)]
        await db.execute("INSERT INTO schema_migrations (version) VALUES (99)")
        await db.commit()
    with pytest.raises(StoreError, match=r"has schema version 99; this orchestrator knows \d+"):
        await PostgresStore.open(postgres_url)


async def test_postgres_refuses_a_database_it_cannot_use_and_never_shows_the_password(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await db.execute("CREATE TABLE notes (text text)")
    with pytest.raises(StoreError, match="holds tables, but not an orchestrator's"):
        await PostgresStore.open(postgres_url)
    wrong = postgres_url.replace(postgres_server.password, "Wr0ng-Secret")
    for url, said in [
        (wrong, "password authentication failed"),
        (postgres_url.rsplit("/", 1)[0] + "/no_such_database", 'database "no_such_database" does not exist'),
        (wrong.replace(f":{postgres_server.port}/", ":1/"), "Connection refused"),
    ]:
        with pytest.raises(StoreError, match=said) as refused:
            await PostgresStore.open(url)
        message = str(refused.value)
        assert "swarm:***@127.0.0.1" in message and "\n" not in message
        assert "Wr0ng-Secret" not in message and postgres_server.password not in message
