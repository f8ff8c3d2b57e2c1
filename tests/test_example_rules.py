"""The seed examples declare the ordering rules their users expect, and their real catalogs enforce them."""

from __future__ import annotations

import pytest
from inline_snapshot import snapshot
from pydantic_ai.messages import ModelResponse, TextPart

from examples import onboarding, order_processing, support_ticket
from paigeant_ai import (
    ActivityCatalog,
    InMemoryTransport,
    InvalidPlan,
    PlannerAgentDeps,
    WorkflowDispatcher,
    create_planner_agent,
    dispatched_workflows,
)

from .scripted import Script, call, tool_returns

ORDER = {"order_id": "ord-1", "sku": "SKU-BOOK", "quantity": 1, "amount": 19.9, "address": "1 Main St"}
ROUTE = [step.spec.name for step in order_processing.ORDER_STEPS]
WITHOUT_PAYMENT = [name for name in ROUTE if name != "process-payment"]


def refused(catalog: ActivityCatalog, steps: list[str]) -> str:
    with pytest.raises(InvalidPlan) as caught:
        catalog.plan(steps, variables=ORDER)
    return str(caught.value)


def test_the_order_examples_own_route_is_a_plan_its_catalog_accepts() -> None:
    plan = order_processing.catalog.plan(ROUTE, variables=ORDER)
    assert [spec.name for spec in plan] == ROUTE


async def test_the_planner_toolset_refuses_an_order_plan_that_drops_the_payment() -> None:
    script = Script(
        [
            call("dispatch_workflow", {"activities": WITHOUT_PAYMENT, "variables": ORDER}),
            call("dispatch_workflow", {"activities": ROUTE, "variables": ORDER}),
            ModelResponse([TextPart("dispatched")]),
        ]
    )
    agent = create_planner_agent(script.model, catalog=order_processing.catalog, require_workers=False)
    async with InMemoryTransport() as transport:
        result = await agent.run("ship ord-1", deps=PlannerAgentDeps(WorkflowDispatcher(transport)))
    [retry] = tool_returns(script.requests[1])
    assert retry.outcome == "retried"  # nothing dispatched: the model is told what to fix
    assert retry.content == snapshot(
        "The plan was not dispatched: 'update-inventory' must come after 'process-payment', which the plan lacks: add "
        "'process-payment' before 'update-inventory'; 'generate-shipping-label' must come after 'process-payment', "
        "which the plan lacks: add 'process-payment' before 'generate-shipping-label'. Fix the plan and call "
        "dispatch_workflow again."
    )
    assert [workflow.activities for workflow in dispatched_workflows(result)] == [ROUTE]


def test_the_order_catalog_refuses_shipping_before_paying_and_charging_twice() -> None:
    shipped_first = ["validate-order", "check-inventory", "update-inventory", "process-payment", *ROUTE[4:]]
    assert refused(order_processing.catalog, shipped_first) == snapshot(
        "'update-inventory' must come after 'process-payment': move 'process-payment' before 'update-inventory'"
    )
    assert refused(order_processing.catalog, [*ROUTE[:3], "process-payment", *ROUTE[3:]]) == snapshot(
        "'process-payment' may appear at most once in a plan, and appears 2 times: remove the extra"
    )
    assert refused(order_processing.catalog, ["validate-order", "check-inventory", "process-payment"]) == snapshot(
        "'process-payment' must be accompanied by 'send-confirmation': add 'send-confirmation' to the plan"
    )


def test_onboarding_and_support_declare_their_order_too() -> None:
    accounts = ActivityCatalog(onboarding.ONBOARDING)
    variables = {"customer_email": "ada@example.com", "subscription_tier": "premium"}
    with pytest.raises(InvalidPlan, match="'setup-payment-method' must come after 'create-customer-account'"):
        accounts.plan(["validate-customer-data", "setup-payment-method", "create-customer-account"], variables)
    with pytest.raises(InvalidPlan, match="'create-customer-account' may appear at most once"):
        accounts.plan(["validate-customer-data", "create-customer-account", "create-customer-account"], variables)
    with pytest.raises(InvalidPlan, match="'generate-response' must come after 'classify-ticket-priority'"):
        support_ticket.catalog.plan(["generate-response"], {"ticket": "slow", "customer": "X"})
