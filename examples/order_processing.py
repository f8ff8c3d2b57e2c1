"""E-commerce order processing: six steps, a flaky payment provider, and an order that cannot be filled.

Shows: an agent that reviews the order (`AgentActivity` on `FunctionModel`, offline), a payment step that fails
twice and succeeds on its third attempt (exponential backoff), and an out-of-stock order that ends cleanly with a
clear reason (`EndWorkflow`) instead of faulting. Side effects are keyed on `ctx.idempotency_key`.

Run it:

    uv run python -m examples.order_processing
"""

from __future__ import annotations

import argparse
import asyncio

from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    EndWorkflow,
    NonRetryableError,
    RetryPolicy,
    Worker,
    WorkflowDispatcher,
    activity,
    get_transport,
)

from ._progress import show

# A stand-in for the shop's systems. A real payment provider would receive the idempotency key too.
STOCK = {"SKU-BOOK": 5, "SKU-LAMP": 0}
CHARGES: dict[str, float] = {}


class OrderReview(BaseModel):
    approved: bool
    reason: str


def _review(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    review = {"approved": True, "reason": "address and quantities look plausible"}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, review)])


def _confirm(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("Thank you for your order! It is on its way.")])


validate_order = AgentActivity(
    Agent(FunctionModel(_review), name="validate-order", output_type=OrderReview),
    prompt="Review order {order_id}: {quantity} x {sku}, shipping to {address}.",
    output_key="review",
)


@activity(name="check-inventory")
async def check_inventory(ctx: ActivityContext) -> dict[str, bool]:
    """Make sure the items are in stock; an order that cannot be filled ends here."""
    review = ctx.payload.get("review")
    if not isinstance(review, dict) or not review.get("approved"):
        raise NonRetryableError("the order was not approved")
    sku, quantity = str(ctx.payload["sku"]), int(str(ctx.payload["quantity"]))
    if STOCK.get(sku, 0) < quantity:
        raise EndWorkflow(f"out of stock: {sku} has {STOCK.get(sku, 0)}, the order needs {quantity}")
    return {"in_stock": True}


@activity(name="process-payment", retry=RetryPolicy(max_attempts=4, initial_interval=0.1, backoff=2))
async def process_payment(ctx: ActivityContext) -> dict[str, str]:
    """Charge the customer; the provider times out twice before it answers."""
    if ctx.attempt < 2:
        raise ConnectionError("payment provider timed out")
    CHARGES.setdefault(ctx.idempotency_key, float(str(ctx.payload["amount"])))  # charged once per key
    return {"payment_id": f"pay-{ctx.correlation_id[:8]}"}


@activity(name="update-inventory")
async def update_inventory(ctx: ActivityContext) -> dict[str, int]:
    """Take the items out of stock."""
    sku = str(ctx.payload["sku"])
    STOCK[sku] -= int(str(ctx.payload["quantity"]))
    return {"stock_left": STOCK[sku]}


@activity(name="generate-shipping-label")
async def generate_label(ctx: ActivityContext) -> dict[str, str]:
    """Book the parcel and return its tracking number."""
    return {"tracking_number": f"TRK-{ctx.correlation_id[:8].upper()}"}


send_confirmation = AgentActivity(
    Agent(FunctionModel(_confirm), name="send-confirmation"),
    prompt="Write a confirmation for order {order_id}, tracking number {tracking_number}.",
    output_key="confirmation",
)

ORDER_STEPS = [validate_order, check_inventory, process_payment, update_inventory, generate_label, send_confirmation]

transport = get_transport()
worker = Worker(transport, ORDER_STEPS, on_event=show)

ORDERS = [
    {"order_id": "ord-1001", "sku": "SKU-BOOK", "quantity": 2, "amount": 39.90, "address": "1 Main St"},
    {"order_id": "ord-1002", "sku": "SKU-LAMP", "quantity": 1, "amount": 24.50, "address": "9 Side Rd"},
]


async def main(*, dispatch_only: bool = False) -> list[str]:
    """Dispatch the two orders; unless `dispatch_only`, run the steps here until both are done."""
    async with transport:
        dispatcher = WorkflowDispatcher(transport)
        ids: list[str] = []
        for order in ORDERS:
            ids.append(await dispatcher.dispatch_workflow(activities=ORDER_STEPS, variables=order))
            print(f"dispatched order {order['order_id']} as workflow {ids[-1]}")
        if not dispatch_only:
            await worker.run(burst=True)
    return ids


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run two order-processing workflows.")
    parser.add_argument("--dispatch-only", action="store_true", help="dispatch, and leave the steps to workers")
    asyncio.run(main(dispatch_only=parser.parse_args().dispatch_only))
