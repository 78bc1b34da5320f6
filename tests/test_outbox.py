"""The worker's outbox, on its own: a subtask's text held to its delta window, the subtasks of a
stream sharing its messages, and nothing lost, reordered or held longer than it may be.

The bounds on time here are one-sided and wide: a window is a floor on the time between two sends
of a subtask (load only lengthens it), and "at once" is checked against a window of 10 s."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

from swarm.v1 import worker_pb2
from worker_service.outbox import Outbox

QUIET_WINDOW_S = 10.0  # what "held for its window" would cost; "at once" must beat it by far


def result(call_id: int) -> worker_pb2.SubtaskReply:
    done = worker_pb2.ExecuteSubtaskResponse(result=worker_pb2.SubtaskResult(model="m"))
    return worker_pb2.SubtaskReply(call_id=call_id, output=done)


class Received:
    """Every message an outbox sends, with the loop time it was sent at."""

    def __init__(self, outbox: Outbox) -> None:
        self.messages: list[tuple[float, list[worker_pb2.SubtaskReply]]] = []
        self._stream = outbox.messages()
        self._loop = asyncio.get_running_loop()

    async def next(self, within_s: float = 5.0) -> list[worker_pb2.SubtaskReply]:
        replies = await asyncio.wait_for(anext(self._stream), within_s)
        self.messages.append((self._loop.time(), replies))
        return replies

    async def rest(self, within_s: float = 5.0) -> None:
        async with asyncio.timeout(within_s):
            async for replies in self._stream:
                self.messages.append((self._loop.time(), replies))

    def texts(self, call_id: int) -> list[tuple[float, str]]:
        return [
            (sent, r.output.text)
            for sent, replies in self.messages
            for r in replies
            if r.call_id == call_id and r.output.text
        ]


async def feed(outbox: Outbox, call_id: int, chunks: int, every_s: float) -> list[str]:
    sent = []
    for i in range(chunks):
        text = f"<{call_id}.{i}>"
        await outbox.text(call_id, text)
        sent.append(text)
        await asyncio.sleep(every_s)
    await outbox.reply(result(call_id))
    return sent


async def test_each_subtask_sends_at_most_once_a_window_and_loses_or_reorders_nothing() -> None:
    outbox = Outbox("w", limit=64)
    window_s = 0.05
    for call_id in (1, 2):
        outbox.open(call_id, "swarm", window_s)
    received = Received(outbox)
    feeders = asyncio.gather(*(feed(outbox, call_id, 100, 0.003) for call_id in (1, 2)))
    reading = asyncio.create_task(received.rest(within_s=20))
    chunks = await asyncio.wait_for(feeders, 20)
    outbox.finish()
    await reading
    for call_id, sent in zip((1, 2), chunks, strict=True):
        texts = received.texts(call_id)
        assert "".join(text for _, text in texts) == "".join(sent), "every chunk, once, in order"
        assert len(texts) < len(sent) / 3, "chunks were gathered"
        held = [sent_at for sent_at, _ in texts[:-1]]  # the last goes with the result, at once
        gaps = [later - earlier for earlier, later in itertools.pairwise(held)]
        assert min(gaps) >= window_s - 0.001, f"a window between two sends of a subtask: {gaps}"
        replies = [r for _, message in received.messages for r in message if r.call_id == call_id]
        assert [r.output.HasField("result") for r in replies] == [False] * (len(replies) - 1) + [True]
    shared = [replies for _, replies in received.messages if {r.call_id for r in replies} == {1, 2}]
    assert len(shared) >= len(received.messages) / 2, "the subtasks of a stream share its messages"


async def test_subtasks_that_always_hold_text_all_go_in_every_message() -> None:
    """Many subtasks streaming on one stream: each window's message takes every one of them. A
    subtask left out of one waits a second window, and its text reaches the client twice as late."""
    calls = range(1, 301)
    window_s = 0.02
    outbox = Outbox("w", limit=len(calls) * 2)
    for call_id in calls:
        outbox.open(call_id, "swarm", window_s)
    received = Received(outbox)
    reading = asyncio.create_task(received.rest(within_s=30))
    for tick in range(150):  # every call holds text at every flush: it gets some each 5 ms
        for call_id in calls:
            await outbox.text(call_id, f"<{call_id}.{tick}>")
        await asyncio.sleep(0.005)
    for call_id in calls:
        await outbox.reply(result(call_id))
    outbox.finish()
    await reading
    texts = [{r.call_id for r in replies if r.output.text} for _, replies in received.messages]
    held = [sent for sent in texts[1:] if sent]  # the first took the one call holding text then
    assert len(held) >= 10
    partial = [len(sent) for sent in held[:-1] if len(sent) != len(calls)]  # the last: the results
    assert not partial, f"{len(partial)} of {len(held) - 1} messages left subtasks out: {partial}"


async def test_text_after_a_quiet_window_and_a_result_go_at_once() -> None:
    outbox = Outbox("w", limit=8)
    outbox.open(1, "swarm", QUIET_WINDOW_S)
    received = Received(outbox)
    await outbox.text(1, "first")
    assert [r.output.text for r in await received.next(within_s=QUIET_WINDOW_S / 2)] == ["first"]
    await outbox.text(1, "held ")
    await outbox.text(1, "back")
    await outbox.reply(result(1))
    replies = await received.next(within_s=QUIET_WINDOW_S / 2)
    assert [r.output.text for r in replies] == ["held back", ""]
    assert replies[-1].output.HasField("result"), "the result follows the text it ends"
    assert replies[0].output.worker_id == "w"


async def test_a_cancelled_subtask_drops_its_held_text_and_says_so_at_once() -> None:
    outbox = Outbox("w", limit=8)
    outbox.open(1, "swarm", QUIET_WINDOW_S)
    received = Received(outbox)
    await outbox.text(1, "sent")
    await received.next()
    await outbox.text(1, "never sent")
    outbox.close(1, cancelled=True)
    replies = await received.next(within_s=QUIET_WINDOW_S / 2)
    assert [r.WhichOneof("kind") for r in replies] == ["cancelled"]
    outbox.finish()
    await received.rest()
    assert "never sent" not in str(received.messages)


async def test_a_wider_window_holds_a_running_subtask_longer() -> None:
    outbox = Outbox("w", limit=8)
    outbox.open(1, "big swarm", 0.02)
    outbox.open(2, "other swarm", 0.02)
    received = Received(outbox)
    reading = asyncio.create_task(received.rest(within_s=20))
    outbox.set_window("big swarm", 0.2)
    chunks = await asyncio.gather(feed(outbox, 1, 60, 0.01), feed(outbox, 2, 60, 0.01))
    outbox.finish()
    await reading
    widened = [sent for sent, _ in received.texts(1)[:-1]]
    assert min(b - a for a, b in itertools.pairwise(widened)) >= 0.2 - 0.001
    assert len(received.texts(2)) > 2 * len(received.texts(1)), "the other swarm kept its window"
    assert "".join(t for _, t in received.texts(1)) == "".join(chunks[0])


async def test_held_text_takes_a_place_and_waits_when_there_is_none() -> None:
    outbox = Outbox("w", limit=1)
    outbox.open(1, "swarm", 0.05)
    outbox.open(2, "swarm", 0.05)
    await outbox.text(1, "a")  # held until the sender takes it: its place is taken
    second = asyncio.create_task(outbox.text(2, "b"))
    await asyncio.sleep(0.05)
    assert not second.done(), "no place for a second subtask's text"
    received = Received(outbox)
    await received.next()
    await asyncio.wait_for(second, 5)
    assert [r.output.text for r in await received.next()] == ["b"]


async def test_with_no_window_each_chunk_is_a_reply_of_its_own() -> None:
    outbox = Outbox("w", limit=64)
    outbox.open(1, "swarm", 0.0)
    for i in range(5):
        await outbox.text(1, str(i))
    await outbox.reply(result(1))
    outbox.finish()
    received = Received(outbox)
    await received.rest()
    replies = [r for _, message in received.messages for r in message]
    assert [r.output.text for r in replies] == ["0", "1", "2", "3", "4", ""]
    by_call: dict[int, int] = defaultdict(int)
    for r in replies:
        by_call[r.call_id] += 1
    assert by_call == {1: 6}
