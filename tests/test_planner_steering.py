"""The planner's `cancel_workflow`, and what `get_workflow_status` says of workflows that stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from inline_snapshot import snapshot
from pydantic_ai import Agent, ModelRetry, RunContext
from pydantic_ai.messages import ModelResponse, TextPart
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RunUsage

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    InMemoryTransport,
    ItineraryRevision,
    NonRetryableError,
    PaigeantMessage,
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


async def first_message(transport: InMemoryTransport, address: str) -> PaigeantMessage:
    async with await transport.consume(address) as consumer:
        delivery = await asyncio.wait_for(anext(consumer), 1)
        await transport.ack(delivery)
    return PaigeantMessage.from_json(delivery.body)


async def agent_run(agent: Agent[PlannerAgentDeps, str], deps: PlannerAgentDeps) -> None:
    await agent.run("please", deps=deps)


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


# -- compensations and fallbacks in the catalog and the plan ----------------------------------------------------


@activity(name="book-courier", compensate=lambda ctx: None, description="Book a courier.")
async def book_courier(ctx: ActivityContext) -> None:
    return None


@activity(name="charge-card", fallbacks=["charge-invoice"])
async def charge_card(ctx: ActivityContext) -> None:
    raise NonRetryableError("card declined")


@activity(name="charge-backup")
async def charge_backup(ctx: ActivityContext) -> dict[str, str]:
    return {"charged_by": "backup"}


def steering_catalog() -> ActivityCatalog:
    catalog = ActivityCatalog([reserve, book_courier, charge_card, charge_backup])
    catalog.add(ActivitySpec(name="release-stock", description="Put the reserved items back on the shelf."))
    catalog.add(ActivitySpec(name="charge-invoice", description="Send an invoice."), needs=["billing_address"])
    catalog.add(ActivitySpec(name="refund-payment", description="Refund the customer."))
    return catalog


async def test_the_catalog_says_what_undoes_each_step_and_its_own_fallbacks(transport: InMemoryTransport) -> None:
    script = Script([call("list_activities", {}), DONE])
    dispatcher = WorkflowDispatcher(transport)
    toolset = PaigeantToolset(steering_catalog(), dispatcher=dispatcher, require_workers=False)

    [listing] = await answers(Agent(script.model, toolsets=[toolset]), script, PlannerAgentDeps(dispatcher))

    entries: list[dict[str, object]] = listing  # pyright: ignore[reportAssignmentType]
    keys = ("compensate", "compensation", "fallbacks")
    shown = {entry["name"]: {key: entry[key] for key in keys if key in entry} for entry in entries}
    assert shown == snapshot(
        {
            "reserve-stock": {
                "compensate": "release-stock",
                "compensation": "Put the reserved items back on the shelf.",
            },
            "book-courier": {"compensate": "book-courier.compensate", "compensation": "Undoes 'book-courier'"},
            "charge-card": {"fallbacks": ["charge-invoice"]},
            "charge-backup": {},
            "release-stock": {},
            "charge-invoice": {},
            "refund-payment": {},
        }
    )
    catalog = steering_catalog()
    entry = catalog.get("reserve-stock")
    assert entry is not None
    assert entry.spec.compensate == "release-stock"  # the route carries it: a dispatch can check who serves it
    charge = catalog.get("charge-card")
    assert charge is not None
    assert charge.spec.fallbacks == ("charge-invoice",)


async def test_a_plan_sets_fallbacks_on_its_steps_checked_against_the_catalog(transport: InMemoryTransport) -> None:
    dispatcher = WorkflowDispatcher(transport)
    toolset = PaigeantToolset(
        steering_catalog(), dispatcher=dispatcher, forbidden={"refund-payment"}, require_workers=False
    )
    plan = {"activities": ["reserve-stock", "charge-card"], "variables": {}}
    script = Script(
        [
            call(
                "dispatch_workflow",
                {
                    **plan,
                    "fallbacks": {
                        "charge-card": ["charge-by-pigeon", "refund-payment"],
                        "ship-order": ["charge-backup"],
                    },
                },
            ),
            call("dispatch_workflow", {**plan, "fallbacks": {"charge-card": ["charge-card"]}}),
            call("dispatch_workflow", {**plan, "fallbacks": {"charge-card": ["charge-invoice"]}}),
            call("dispatch_workflow", {**plan, "fallbacks": {"charge-card": ["charge-backup"]}}),
            DONE,
        ]
    )
    agent = Agent(script.model, toolsets=[toolset], retries=5)

    await agent.run("plan it", deps=PlannerAgentDeps(dispatcher))

    retries = [part.content for part in tool_returns(script.requests[-1]) if part.outcome == "retried"]
    assert retries == snapshot(
        [
            "The plan was not dispatched: unknown activity 'charge-by-pigeon'; use only: reserve-stock, book-courier, "
            "charge-card, charge-backup, release-stock, charge-invoice; activity 'refund-payment' is not allowed here; "
            "fallbacks are given for 'ship-order', which is not an activity of the plan. Fix the plan and call "
            "dispatch_workflow again.",
            "The plan was not dispatched: the fallbacks of 'charge-card' must be other activities, each named once. "
            "Fix the plan and call dispatch_workflow again.",
            "The plan was not dispatched: fallback 'charge-invoice' of step 2 'charge-card' needs variable "
            "'billing_address', which neither the workflow's variables nor an earlier step provide. Fix the plan and "
            "call dispatch_workflow again.",
        ]
    )
    [dispatched] = [part for part in tool_returns(script.requests[-1]) if part.outcome == "success"]
    assert dispatched.tool_name == "dispatch_workflow"
    message = await first_message(transport, "reserve-stock")
    assert [(spec.name, spec.fallbacks, spec.compensate) for spec in message.routing_slip.itinerary] == [
        ("reserve-stock", (), "release-stock"),
        ("charge-card", ("charge-backup",), None),
    ]


async def test_a_fallback_the_planner_set_runs_once_the_step_failed_for_good(transport: InMemoryTransport) -> None:
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    toolset = PaigeantToolset(steering_catalog(), dispatcher=dispatcher, require_workers=False)
    plan = {"activities": ["charge-card"], "variables": {}, "fallbacks": {"charge-card": ["charge-backup"]}}
    script = Script([call("dispatch_workflow", plan), DONE])

    await agent_run(Agent(script.model, toolsets=[toolset]), PlannerAgentDeps(dispatcher))
    await Worker(transport, [charge_card, charge_backup], on_event=store.apply).run(burst=True)

    [status] = await store.list()
    assert status.state == "completed"
    assert status.payload == {"charged_by": "backup"}
    assert [(step.activity, step.state) for step in status.steps] == [
        ("charge-card", "failed"),
        ("charge-backup", "completed"),
    ]


async def test_a_fallback_nobody_serves_goes_back_to_the_model(transport: InMemoryTransport) -> None:
    toolset = PaigeantToolset(steering_catalog(), dispatcher=WorkflowDispatcher(transport))
    ctx = RunContext[Any](deps=None, model=TestModel(), usage=RunUsage(), run_id="run-1", tool_call_id="call-1")
    async with await transport.consume("charge-card"):
        with pytest.raises(ModelRetry) as raised:
            await toolset.dispatch_workflow(ctx, ["charge-card"], {}, fallbacks={"charge-card": ["charge-backup"]})
        assert str(raised.value) == (
            "The plan was not dispatched: no worker consumes 'charge-backup', the fallback of step 0 'charge-card': "
            "start a worker for it, or fix its name (did you mean 'charge-card'? workers consume: charge-card)."
        )
        async with await transport.consume("charge-backup"):
            await toolset.dispatch_workflow(ctx, ["charge-card"], {}, fallbacks={"charge-card": ["charge-backup"]})
    assert await transport.pending("charge-card") == 1


async def test_a_step_added_by_a_revision_brings_its_compensation(transport: InMemoryTransport) -> None:
    undone: list[str] = []

    @activity(name="release-stock")
    async def release_noting(ctx: ActivityContext) -> None:
        assert ctx.undoing is not None
        undone.append(f"{ctx.undoing.activity} {ctx.undoing.output}")

    @activity(name="pay")
    async def pay(ctx: ActivityContext) -> None:
        raise NonRetryableError("card declined")

    add = call("add_steps", {"activities": ["reserve-stock"], "reason": "hold the stock first", "before": "pay"})
    script = Script([add, DONE])
    triage = AgentActivity(Agent(script.model, name="triage"), toolsets=[ItineraryRevision(ActivityCatalog([reserve]))])
    store = InMemoryWorkflowStore()
    correlation_id = await WorkflowDispatcher(transport, on_event=store.apply).dispatch_workflow(["triage", "pay"])

    await Worker(transport, [triage, reserve, release_noting, pay], on_event=store.apply).run(burst=True)

    assert undone == ["reserve-stock {'reservation': 'r-1'}"]
    status = await store.get(correlation_id)
    assert status is not None
    assert status.state == "compensated"
