"""A workflow whose parallel group failed is not `compensated` while the steps before the group are still being
undone, even when a branch that completed after the failure has its own compensation done first."""

from __future__ import annotations

import asyncio

import pytest

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    NonRetryableError,
    Parallel,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai.store import InMemoryWorkflowStore

pytestmark = pytest.mark.usefixtures("signed_with_one_key")


store = InMemoryWorkflowStore()
seen_while_undoing: list[str] = []


@activity(compensate="unbook")
async def book(ctx: ActivityContext) -> dict[str, str]:
    return {"booking": "b-1"}


@activity(compensate="unhold")
async def hold(ctx: ActivityContext) -> dict[str, str]:
    await asyncio.sleep(0.1)  # completes after its sibling failed the group
    return {"hold": "h-1"}


@activity
async def quote(ctx: ActivityContext) -> dict[str, str]:
    raise NonRetryableError("no quote")


@activity
async def unbook(ctx: ActivityContext) -> dict[str, bool]:
    await asyncio.sleep(0.5)  # the late branch's own compensation ends meanwhile
    status = await store.get(ctx.correlation_id)
    seen_while_undoing.append(status.state if status is not None else "unknown")
    return {"unbooked": True}


@activity
async def unhold(ctx: ActivityContext) -> dict[str, bool]:
    return {"unheld": True}


async def test_a_workflow_is_not_compensated_while_a_step_before_its_failed_group_is_being_undone() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    cid = await WorkflowDispatcher(transport).dispatch_workflow(
        activities=["book", Parallel("hold", "quote"), "pay"], variables={}
    )
    worker = Worker(transport, [book, hold, quote, unbook, unhold], on_event=store.apply, concurrency=4)
    await asyncio.wait_for(worker.run(burst=True), 30)

    assert seen_while_undoing == ["compensating"], "book is still being undone: the workflow has not ended"
    status = await store.get(cid)
    assert status is not None
    assert status.state == "compensated"
