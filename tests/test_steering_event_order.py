"""A workflow that stops reports why before its compensations can: its status ends where the compensations left it,
however fast another worker runs them."""

from __future__ import annotations

import asyncio

from paigeant_ai import ActivityContext, InMemoryTransport, NonRetryableError, Worker, WorkflowDispatcher, activity
from paigeant_ai.store import InMemoryWorkflowStore
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
