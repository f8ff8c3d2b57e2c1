"""A workflow that stops reports why before its compensations can: its status ends where the compensations left it,
however fast another worker runs them."""

from __future__ import annotations

import asyncio

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    NonRetryableError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai.store import FINAL_STATES, InMemoryWorkflowStore
from paigeant_ai.transports.base import Delivery


class SlowAcks(InMemoryTransport):
    """A broker that takes its time to confirm an ack, as a remote one may: the successor already runs meanwhile."""

    async def ack(self, delivery: Delivery) -> None:
        await asyncio.sleep(0.05)
        await super().ack(delivery)


async def undo_hold(ctx: ActivityContext) -> None:
    """Release the hold."""


@activity(name="hold", compensate=undo_hold)
async def hold(ctx: ActivityContext) -> dict[str, str]:
    return {"held": "yes"}


@activity(name="break")
async def break_(ctx: ActivityContext) -> None:
    raise NonRetryableError("broken for good")


async def test_a_faulted_workflow_ends_compensated_even_when_its_compensation_reports_first() -> None:
    store = InMemoryWorkflowStore()
    async with SlowAcks() as transport:
        cid = await WorkflowDispatcher(transport).dispatch_workflow([hold, break_])
        worker = Worker(transport, [hold, break_], on_event=store.apply)
        await worker.run(burst=True)
    status = await store.get(cid)
    assert status is not None
    kinds = [event.kind for event in status.events if event.step is not None and event.kind != "step_started"]
    assert kinds == ["step_completed", "step_failed", "faulted", "compensating", "step_completed", "compensated"]
    assert status.state == "compensated"


async def test_a_stopped_workflow_never_looks_ended_while_its_compensations_run() -> None:
    store = InMemoryWorkflowStore()
    seen: list[str] = []

    async def watch(event: WorkflowEvent) -> None:
        await store.apply(event)
        status = await store.get(event.correlation_id or "")
        assert status is not None
        seen.append(status.state)

    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([hold, break_])
        await Worker(transport, [hold, break_], on_event=watch).run(burst=True)

    undoing = seen.index("compensating")
    assert seen[-1] == "compensated"
    assert not FINAL_STATES & set(seen[undoing:-1]), f"a final state showed while the undoing ran: {seen}"
    assert not FINAL_STATES & set(seen[:undoing]), f"the workflow looked ended before its undoing began: {seen}"
