"""A worker reports a workflow's events in the order its hops happened, even when the broker hands out the next hop
before the one that sent it has its confirm (as RabbitMQ does with persistent messages: it delivers, then writes to
disk, then confirms)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    NonRetryableError,
    Parallel,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai._in_order import SettlingWorkflows

pytestmark = pytest.mark.usefixtures("signed_with_one_key")


class ConfirmsLate(InMemoryTransport):
    """Delivers a step's message at once and confirms it to its sender a while later."""

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        await super().publish(address, body, headers=headers, delay=delay)
        if not address.startswith("paigeant."):  # a step's queue, not events, progress or the registry
            await asyncio.sleep(0.05)


@activity
async def reserve(ctx: ActivityContext) -> dict[str, str]:
    return {"reservation": "r-1"}


@activity
async def charge(ctx: ActivityContext) -> dict[str, str]:
    return {"charge": "c-1"}


@activity
async def ship(ctx: ActivityContext) -> dict[str, str]:
    raise NonRetryableError("the carrier refused the parcel")


@activity
async def release(ctx: ActivityContext) -> dict[str, bool]:
    return {"released": True}


@activity
async def refund(ctx: ActivityContext) -> dict[str, bool]:
    return {"refunded": True}


def steps(events: list[WorkflowEvent]) -> list[tuple[str, str | None]]:
    return [(event.kind, event.activity) for event in events if event.kind.startswith("step_")]


async def test_a_step_that_arrives_before_its_sender_is_confirmed_reports_after_it() -> None:
    transport = ConfirmsLate()
    await transport.connect()
    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow(activities=[reserve, charge], variables={})
    worker = Worker(transport, [reserve, charge], on_event=events.append, concurrency=4)
    await worker.run(burst=True)

    assert steps(events) == [
        ("step_started", "reserve"),
        ("step_completed", "reserve"),
        ("step_started", "charge"),
        ("step_completed", "charge"),
    ]
    assert events[-1].kind == "completed"


async def test_a_saga_reports_its_undoing_latest_step_first() -> None:
    transport = ConfirmsLate()
    await transport.connect()
    events: list[WorkflowEvent] = []
    specs = [
        reserve.spec.model_copy(update={"compensate": "release"}),
        charge.spec.model_copy(update={"compensate": "refund"}),
        ship.spec,
    ]
    await WorkflowDispatcher(transport).dispatch_workflow(activities=specs, variables={})
    worker = Worker(transport, [reserve, charge, ship, release, refund], on_event=events.append, concurrency=4)
    await worker.run(burst=True)

    undone = [(event.undoes, event.activity) for event in events if event.kind == "step_completed" and event.undoes]
    assert undone == [("charge", "refund"), ("reserve", "release")]
    kinds = [event.kind for event in events if not event.kind.startswith("step_")]
    assert kinds[-3:] == ["compensating", "faulted", "compensated"]


async def test_a_settle_that_hangs_holds_the_next_hop_up_for_a_bounded_time() -> None:
    settling = SettlingWorkflows()
    done = settling.begin("wf-1")
    await asyncio.wait_for(settling.wait_for("wf-1", at_most=0.05), 1)  # returns, though wf-1 still settles
    waiter = asyncio.create_task(settling.wait_for("wf-1", at_most=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    settling.end("wf-1", done)
    await asyncio.wait_for(waiter, 1)  # released as soon as the settle ends
    await asyncio.wait_for(settling.wait_for("wf-1"), 0.01)  # nothing settling: no wait at all


async def test_a_hop_waiting_for_its_workflow_is_cancelled_by_a_shutdown_that_comes_as_the_settle_ends() -> None:
    settling = SettlingWorkflows()
    done = settling.begin("wf-1")
    waiter = asyncio.create_task(settling.wait_for("wf-1"))
    await asyncio.sleep(0.01)
    settling.end("wf-1", done)
    assert waiter.cancel(), "the hop has not resumed yet: the shutdown's cancel reaches it"
    with pytest.raises(asyncio.CancelledError):
        await waiter  # rather than go on to run its step while the worker shuts down


async def test_a_step_is_reported_completed_before_the_group_after_it_fans_out() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    events: list[WorkflowEvent] = []
    itinerary = ["reserve", Parallel("charge", "release")]
    await WorkflowDispatcher(transport).dispatch_workflow(activities=itinerary, variables={})
    worker = Worker(transport, [reserve, charge, release], on_event=events.append)
    await worker.run(burst=True)

    kinds = [(event.kind, event.activity) for event in events if event.branch is None]
    assert kinds[:3] == [("step_started", "reserve"), ("step_completed", "reserve"), ("fanned_out", "parallel")]
    assert kinds[-1] == ("completed", "parallel")


async def test_a_hop_waits_only_for_the_hops_of_its_workflow_settling_when_it_arrived() -> None:
    settling = SettlingWorkflows()
    earlier = settling.begin("wf-1")
    waiter = asyncio.create_task(settling.wait_for("wf-1", at_most=5))
    await asyncio.sleep(0.01)
    settling.begin("wf-1")  # a sibling branch begins to settle after the hop arrived, and is still settling
    settling.end("wf-1", earlier)
    await asyncio.wait_for(waiter, 1)  # the one it waited for has settled: it goes, though the sibling has not
