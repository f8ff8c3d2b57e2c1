"""Ordering rules of the catalog (`after`, `requires`, `conflicts`, `max_per_plan`): declared with the activity, kept by
the registry, and enforced by `plan()`, the planner's `dispatch_workflow` and itinerary revisions."""

from __future__ import annotations

import pytest
from inline_snapshot import snapshot
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart
from pydantic_ai.models.test import TestModel

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    AdvertisedActivity,
    AgentActivity,
    InMemoryTransport,
    InvalidPlan,
    ItineraryRevision,
    PlannerAgentDeps,
    PlanRules,
    UserError,
    Worker,
    WorkerRecord,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    create_planner_agent,
    dispatched_workflows,
)
from paigeant_ai._registry import verified_records
from paigeant_ai._wire import FROM_WIRE
from paigeant_ai.security import MessageSigner, generate_key

from .brokers import wait_until
from .scripted import Script, call, tool_returns


@activity(name="take-payment")
async def take_payment(ctx: ActivityContext) -> dict[str, str]:
    """Charge the customer's card."""
    return {"payment_id": "pay-1"}


@activity(name="ship-order", after=["take-payment"], conflicts=["refund-order"])
async def ship_order(ctx: ActivityContext) -> dict[str, str]:
    """Hand the parcel to the carrier."""
    return {"tracking": "trk-1"}


@activity(name="refund-order", max_per_plan=1, requires=["notify-customer"])
async def refund_order(ctx: ActivityContext) -> None:
    """Refund the order's payment."""


@activity(name="notify-customer")
async def notify_customer(ctx: ActivityContext) -> None:
    """Tell the customer what happened."""


def shop() -> ActivityCatalog:
    return ActivityCatalog([take_payment, ship_order, refund_order, notify_customer])


def refused(catalog: ActivityCatalog, steps: list[str | list[str]]) -> str:
    with pytest.raises(InvalidPlan) as caught:
        catalog.plan(steps)
    return str(caught.value)


def test_the_rules_declared_with_an_activity_are_in_its_catalog_entry_and_shown_to_models() -> None:
    entry = shop().get("ship-order")
    assert entry is not None
    assert entry.rules == PlanRules(after=("take-payment",), conflicts=("refund-order",))
    assert entry.model_dump(mode="json") == snapshot(
        {
            "name": "ship-order",
            "description": "Hand the parcel to the carrier.",
            "needs": {"type": "object"},
            "produces": {"type": "object"},
            "after": ["take-payment"],
            "conflicts": ["refund-order"],
        }
    )


def test_a_plan_that_ships_without_paying_is_refused_with_the_fix() -> None:
    assert refused(shop(), ["ship-order"]) == snapshot(
        "'ship-order' must come after 'take-payment', which the plan lacks: add 'take-payment' before 'ship-order'"
    )
    assert refused(shop(), ["ship-order", "take-payment"]) == snapshot(
        "'ship-order' must come after 'take-payment': move 'take-payment' before 'ship-order'"
    )
    assert [spec.name for spec in shop().plan(["take-payment", "ship-order"])] == ["take-payment", "ship-order"]


def test_a_branch_is_not_before_its_sibling_but_a_group_is_before_what_follows_it() -> None:
    assert refused(shop(), [["take-payment", "ship-order"]]) == snapshot(
        "'ship-order' must come after 'take-payment', which runs beside it in a parallel group: move 'take-payment' "
        "to a step before the group"
    )
    specs = shop().plan([["take-payment", "notify-customer"], "ship-order"])
    assert [spec.name for spec in specs][-1] == "ship-order"


def test_requires_conflicts_and_max_per_plan_each_name_their_fix() -> None:
    assert refused(shop(), ["refund-order", "notify-customer", "refund-order"]) == snapshot(
        "'refund-order' may appear at most once in a plan, and appears 2 times: remove the extra"
    )
    assert refused(shop(), ["refund-order"]) == snapshot(
        "'refund-order' must be accompanied by 'notify-customer': add 'notify-customer' to the plan"
    )
    assert refused(shop(), ["take-payment", "ship-order", "refund-order", "notify-customer"]) == snapshot(
        "'refund-order' and 'ship-order' must not be in the same plan: keep only one of them"
    )
    assert len(shop().plan(["notify-customer", "refund-order"])) == 2  # requires: any position


def test_a_rule_naming_an_activity_the_catalog_lacks_says_no_plan_can_keep_it() -> None:
    catalog = ActivityCatalog([notify_customer])
    catalog.add(ActivitySpec(name="ship"), after=["take-paymnt"], requires=["notify-customer", "insure-parcel"])
    assert refused(catalog, ["ship", "notify-customer"]) == snapshot(
        "'ship' must come after 'take-paymnt', which the catalog lacks: leave 'ship' out of the plan, or add "
        "'take-paymnt' to the catalog (or correct the rule's name); 'ship' must be accompanied by 'insure-parcel', "
        "which the catalog lacks: leave 'ship' out of the plan, or add 'insure-parcel' to the catalog (or correct "
        "the rule's name)"
    )


def test_every_broken_rule_is_told_at_once_beside_missing_variables() -> None:
    catalog = shop()
    catalog.add(ActivitySpec(name="label"), needs=["address"], after=["take-payment"])
    assert refused(catalog, ["label", "refund-order", "refund-order"]) == snapshot(
        "step 1 'label' needs variable 'address', which neither the workflow's variables nor an earlier step "
        "provide; 'label' must come after 'take-payment', which the plan lacks: add 'take-payment' before 'label'; "
        "'refund-order' must be accompanied by 'notify-customer': add 'notify-customer' to the plan; "
        "'refund-order' may appear at most once in a plan, and appears 2 times: remove the extra"
    )


def test_rules_are_set_on_agent_activities_and_catalog_entries_and_amended_by_add() -> None:
    agent = AgentActivity(Agent(TestModel(), name="review"), after=["take-payment"], max_per_plan=2)
    catalog = ActivityCatalog([agent, take_payment])
    entry = catalog.get("review")
    assert entry is not None
    assert entry.rules == PlanRules(after=("take-payment",), max_per_plan=2)
    amended = catalog.add(agent, requires=["notify-customer"])  # the other rules are kept
    assert amended.rules == PlanRules(after=("take-payment",), requires=("notify-customer",), max_per_plan=2)
    spec = catalog.add(ActivitySpec(name="archive"), conflicts=["review"])
    assert spec.conflicts == ["review"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"after": "take-payment"}, "after of 'x' must be a list of activity names: write after=['take-payment']"),
        ({"conflicts": ["x"]}, "conflicts of 'x' names 'x' itself: name other activities"),
        ({"max_per_plan": 0}, "max_per_plan of 'x' must be a whole number of at least 1, or None for no limit"),
    ],
)
def test_a_malformed_rule_is_refused_where_it_is_declared(rules: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("]", r"\]") + "$"):
        activity(name="x", **rules)(lambda ctx: None)  # pyright: ignore[reportArgumentType]


async def test_the_planner_toolset_refuses_a_plan_that_drops_the_payment_whatever_the_model_says() -> None:
    plan = {"activities": ["ship-order"], "variables": {}}
    fixed = {"activities": ["take-payment", "ship-order"], "variables": {}}
    script = Script(
        [call("dispatch_workflow", plan), call("dispatch_workflow", fixed), ModelResponse([TextPart("ok")])]
    )
    agent = create_planner_agent(script.model, catalog=shop(), require_workers=False)
    async with InMemoryTransport() as transport:
        result = await agent.run("ship it", deps=PlannerAgentDeps(WorkflowDispatcher(transport)))
    [retry] = tool_returns(script.requests[1])
    assert retry.outcome == "retried"  # the model is told to fix the plan; nothing was dispatched
    assert retry.content == snapshot(
        "The plan was not dispatched: 'ship-order' must come after 'take-payment', which the plan lacks: add "
        "'take-payment' before 'ship-order'. Fix the plan and call dispatch_workflow again."
    )
    assert [workflow.activities for workflow in dispatched_workflows(result)] == [["take-payment", "ship-order"]]


async def test_a_revision_that_would_break_a_rule_is_refused_and_one_that_keeps_them_is_made() -> None:
    catalog = shop()
    remove = call("remove_steps", {"activities": ["take-payment"], "reason": "the customer paid by phone"})
    add_refund = call("add_steps", {"activities": ["refund-order"], "reason": "double charge"})
    add_notify = call("add_steps", {"activities": ["notify-customer"], "reason": "tell them"})
    script = Script([remove, add_refund, add_notify, ModelResponse([TextPart("done")])])
    triage = AgentActivity(Agent(script.model, name="triage"), toolsets=[ItineraryRevision(catalog)])
    events: list[WorkflowEvent] = []
    async with InMemoryTransport() as transport:
        worker = Worker(
            transport, [triage, take_payment, ship_order, refund_order, notify_customer], on_event=events.append
        )
        await WorkflowDispatcher(transport).dispatch_workflow(["triage", "take-payment", "ship-order"], {})
        await worker.run(burst=True)
    answers = [part.content for part in tool_returns(script.requests[-1])]
    assert answers[:2] == snapshot(
        [
            "The route was not changed: 'ship-order' must come after 'take-payment', which the plan lacks: add "
            "'take-payment' before 'ship-order'.",
            "The route was not changed: 'refund-order' and 'ship-order' must not be in the same plan: keep only one "
            "of them; 'refund-order' must be accompanied by 'notify-customer': add 'notify-customer' to the plan.",
        ]
    )
    assert answers[2] == ["take-payment", "ship-order", "notify-customer"]
    done = [event.activity for event in events if event.kind == "step_completed"]
    assert done == ["triage", "take-payment", "ship-order", "notify-customer"]


def test_an_advertisement_carries_the_rules_and_an_older_one_without_them_still_verifies() -> None:
    signer = MessageSigner(generate_key("workers"))
    entry = shop().get("refund-order")
    assert entry is not None
    advertised = AdvertisedActivity.of(entry, "1.0")
    assert advertised.catalog_entry().rules == entry.rules
    record = WorkerRecord(worker_id="w-1", interval=5, activities=[advertised]).sign(signer)
    [read] = verified_records([record.to_bytes()], signer)
    assert read.activities[0].catalog_entry().rules == PlanRules(requires=("notify-customer",), max_per_plan=1)
    plain = shop().get("notify-customer")
    assert plain is not None
    older = AdvertisedActivity.of(plain, "1.0")
    body = WorkerRecord(worker_id="w-2", interval=5, activities=[older]).sign(signer).to_bytes()
    assert b"max_per_plan" not in body
    assert b'"after"' not in body  # no rules: the very record an older release posts
    [old] = verified_records([body], signer)
    assert old.activities[0].catalog_entry().rules == PlanRules()
    assert WorkerRecord.model_validate_json(body, context=FROM_WIRE).to_bytes() == body


async def test_a_catalog_built_from_the_live_registry_keeps_the_rules_its_workers_advertise() -> None:
    signer = MessageSigner(generate_key("workers"))
    async with InMemoryTransport() as transport:
        worker = Worker(transport, [take_payment, ship_order], security=signer)
        async with worker:
            await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
            live = await ActivityCatalog.from_registry(transport, security=signer)
    entry = live.get("ship-order")
    assert entry is not None
    assert entry.rules == PlanRules(after=("take-payment",), conflicts=("refund-order",))
    assert refused(live, ["ship-order"]) == snapshot(
        "'ship-order' must come after 'take-payment', which the plan lacks: add 'take-payment' before 'ship-order'"
    )
