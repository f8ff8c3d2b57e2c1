"""The planner's `cancel_workflow`, and what `get_workflow_status` says of workflows that stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    InMemoryTransport,
    PaigeantToolset,
    PlannerAgentDeps,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai.store import InMemoryWorkflowStore

from .scripted import Script, call, tool_returns

DONE = ModelResponse(parts=[TextPart("done")])


@activity(name="reserve-stock", compensate="release-stock")
async def reserve(ctx: ActivityContext) -> dict[str, str]:
    return {"reservation": "r-1"}


@activity(name="release-stock")
async def release(ctx: ActivityContext) -> None:
    return None


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


async def answers(agent: Agent[PlannerAgentDeps, str], script: Script, deps: PlannerAgentDeps) -> list[object]:
    """Run the agent; what each tool it called returned, as the model saw it."""
    await agent.run("please", deps=deps)
    return [json.loads(part.model_response_str()) for part in tool_returns(script.requests[-1])]


async def test_a_model_cancels_its_users_running_workflow_and_then_sees_it_cancelled(
    transport: InMemoryTransport,
) -> None:
    started, interrupted = asyncio.Event(), asyncio.Event()

    @activity(name="charge-card")
    async def charge(ctx: ActivityContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    toolset = PaigeantToolset(ActivityCatalog([reserve, charge]), dispatcher=dispatcher, store=store)
    undone = asyncio.Event()

    def note(event: WorkflowEvent) -> None:
        if event.kind == "compensated":
            undone.set()

    worker = Worker(transport, [reserve, release, charge], on_event=[store.apply, note])
    worker.cancel_poll = 0.05
    async with worker:
        correlation_id = await dispatcher.dispatch_workflow([reserve, charge], principal="alice")
        await asyncio.wait_for(started.wait(), 5)
        script = Script(
            [call("cancel_workflow", {"correlation_id": correlation_id, "reason": "changed my mind"}), DONE]
        )
        [answer] = await answers(
            Agent(script.model, toolsets=[toolset]), script, PlannerAgentDeps(dispatcher, principal="alice")
        )
        assert answer == {
            "correlation_id": correlation_id,
            "state": "requested",
            "detail": f"workflow {correlation_id!r} will stop before its next step, and a step of it running now is "
            "interrupted",
        }
        await asyncio.wait_for(interrupted.wait(), 5)
        await asyncio.wait_for(undone.wait(), 5)

    script = Script(
        [
            call("get_workflow_status", {"correlation_id": correlation_id}),
            call("cancel_workflow", {"correlation_id": correlation_id, "reason": "again"}),
            DONE,
        ]
    )
    status, again = await answers(
        Agent(script.model, toolsets=[toolset]), script, PlannerAgentDeps(dispatcher, principal="alice")
    )
    assert isinstance(status, dict)
    assert (status["state"], status["cancelled"]) == ("cancelled", "cancelled by alice: changed my mind")
    assert (
        status["compensation"]
        == "undid reserve-stock (by release-stock); cancelled: cancelled by alice: changed my mind"
    )
    assert again == {
        "correlation_id": correlation_id,
        "state": "finished",
        "detail": f"workflow {correlation_id!r} had already ended cancelled; nothing was cancelled",
    }


async def test_another_users_workflow_is_not_cancelled_and_is_answered_as_an_unknown_one(
    transport: InMemoryTransport,
) -> None:
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    toolset = PaigeantToolset(ActivityCatalog([reserve]), dispatcher=dispatcher, store=store)
    bobs = await dispatcher.dispatch_workflow([reserve], principal="bob")
    script = Script(
        [
            call("cancel_workflow", {"correlation_id": bobs, "reason": "mine now"}),
            call("cancel_workflow", {"correlation_id": "no-such-workflow", "reason": "mine now"}),
            DONE,
        ]
    )

    others, unknown = await answers(
        Agent(script.model, toolsets=[toolset]), script, PlannerAgentDeps(dispatcher, principal="alice")
    )

    assert isinstance(others, dict)
    assert isinstance(unknown, dict)
    assert others["detail"] == unknown["detail"].replace("no-such-workflow", bobs)
    assert unknown == {
        "correlation_id": "no-such-workflow",
        "state": "unknown",
        "detail": "no workflow 'no-such-workflow' of this user is known; nothing was cancelled",
    }
    board = transport.cancel_board()
    assert await board.records(bobs) == []  # nothing was posted
    status = await store.get(bobs)
    assert status is not None
    assert status.cancelled is None
    await Worker(transport, [reserve, release], on_event=store.apply).run(burst=True)
    status = await store.get(bobs)
    assert status is not None
    assert status.state == "completed"


async def test_a_caller_without_a_principal_cancels_nothing(transport: InMemoryTransport) -> None:
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    toolset = PaigeantToolset(ActivityCatalog([reserve]), dispatcher=dispatcher, store=store)
    nobodys = await dispatcher.dispatch_workflow([reserve])
    script = Script([call("cancel_workflow", {"correlation_id": nobodys, "reason": "stop"}), DONE])

    [answer] = await answers(Agent(script.model, toolsets=[toolset]), script, PlannerAgentDeps(dispatcher))

    assert isinstance(answer, dict)
    assert answer["state"] == "unknown"
    assert await transport.cancel_board().records(nobodys) == []
