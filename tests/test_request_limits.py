"""What one request may cost the orchestrator, against real processes: a request_id is bound to the
request it came with, list pages are bounded in bytes, and the server-wide limits on agents and
model input refuse with RESOURCE_EXHAUSTED and a reason."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stack import Stack, stack
from swarm.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from swarm_checks import assert_completed
from swarm_client import AsyncSwarmClient, SwarmError

S = orchestrator_pb2.SwarmState


async def refusal(target: str, request: orchestrator_pb2.RunSwarmRequest) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        try:
            async for _ in stub.RunSwarm(request, timeout=20):
                pass
        except grpc.aio.AioRpcError as error:
            return error
    raise AssertionError("the swarm was accepted")


def quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    subjects: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return subjects


async def test_a_request_id_reused_with_other_parameters_is_already_exists_saying_what_differs() -> None:
    with stack(workers=1, sim_latency_ms=1500) as running:
        async with AsyncSwarmClient(running.target) as client:
            owner = client.run("The owner's private idea", 2, request_id="k-1", detach=True)
            first = await anext(owner)
            for idea, agents, model, differ in (
                ("Someone else's idea", 2, "", "idea"),
                ("The owner's private idea", 3, "claude-haiku-4-5", "num_agents, model"),
            ):
                with pytest.raises(SwarmError) as raised:
                    [e async for e in client.run(idea, agents, model=model, request_id="k-1")]
                assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
                assert (
                    raised.value.message == f"request_id 'k-1' already started a swarm with another {differ}"
                )
                assert "private" not in raised.value.message
            rest = [e async for e in owner]
            listed = await client.list()
    assert_completed([first, *rest], 2)
    assert [s.swarm_id for s in listed.swarms] == [first.swarm_id], "no other swarm was started"


async def test_a_duplicate_that_attached_and_left_does_not_cancel_the_swarm_it_did_not_start() -> None:
    with stack(workers=1, sim_latency_ms=1500) as running:
        async with AsyncSwarmClient(running.target) as client:
            owner = client.run("Repaint the bridge", 2, request_id="k-2", detach=True)
            first = await anext(owner)
            duplicate = client.run("Repaint the bridge", 2, request_id="k-2")  # attached
            assert (await anext(duplicate)) == first
            await duplicate.aclose()  # cancels its call
            rest = [e async for e in owner]
            swarm = await client.get(first.swarm_id)
    assert_completed([first, *rest], 2)
    assert swarm.state == S.SWARM_STATE_COMPLETED


async def test_list_pages_are_cut_by_bytes_and_show_texts_cut_while_get_has_them_whole() -> None:
    idea = "é" * 2500  # 5,000 bytes; cut at 2,000 bytes is 1,000 whole characters
    with stack(
        workers=1,
        sim_latency_ms=10,
        orchestrator_args=["--max-page-bytes", "12000", "--list-text-bytes", "2000"],
    ) as running:
        async with AsyncSwarmClient(running.target) as client:
            ids = [(await anext(client.run(f"{i} {idea}", 1))).swarm_id for i in range(10)]
            pages: list[orchestrator_pb2.ListSwarmsResponse] = []
            token = ""
            for _ in range(20):
                page = await client.list(page_size=1000, page_token=token)
                pages.append(page)
                token = page.next_page_token
                if not token:
                    break
            whole = await client.get(ids[0])
    listed = [swarm for page in pages for swarm in page.swarms]
    assert [s.swarm_id for s in listed] == ids[::-1], "every swarm once, newest first"
    assert len(pages) > 1 and all(page.ByteSize() <= 12000 for page in pages), [p.ByteSize() for p in pages]
    assert all(s.truncated and len(s.idea.encode()) <= 2000 and s.idea.endswith("é") for s in listed)
    assert whole.idea == f"0 {idea}" and not whole.truncated
    print(f"{len(listed)} swarms of 5,000-byte ideas came in {len(pages)} pages of at most 12,000 B")


async def test_a_swarm_whose_agents_would_pass_the_orchestrators_limit_is_refused_with_a_reason() -> None:
    with stack(workers=1, sim_latency_ms=2000, orchestrator_args=["--max-agents-in-flight", "10"]) as running:
        async with AsyncSwarmClient(running.target) as client:
            big = client.run("Count the birds", 8, detach=True)
            first = await anext(big)
            refused = await refusal(
                running.target, orchestrator_pb2.RunSwarmRequest(idea="Count the bees", num_agents=3)
            )
            small = [e async for e in client.run("Count the bees", 2)]
            await client.cancel(first.swarm_id)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8 agents in flight or queued; 3 more would pass its limit of 10" in (refused.details() or "")
    assert quota_subjects(refused) == ["--max-agents-in-flight"]
    assert_completed(small, 2)


async def test_an_idea_sent_to_too_many_agents_is_refused_before_any_model_call(swarm_stack: Stack) -> None:
    idea = "z" * (64 * 1024)
    refused = await refusal(swarm_stack.target, orchestrator_pb2.RunSwarmRequest(idea=idea, num_agents=65))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused) == ["--max-swarm-input-bytes"]
    assert "4259840 bytes of model input, over this server's limit of 4194304" in (refused.details() or "")
    async with AsyncSwarmClient(swarm_stack.target) as client:
        assert not [s for s in (await client.list(page_size=1000)).swarms if s.num_agents == 65]
