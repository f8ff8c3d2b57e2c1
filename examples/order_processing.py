"""E-commerce order processing as a saga: what a step did is undone when the order cannot go through.

Shows, on one order of two books:

- by default, the saga: the items are reserved, the main payment provider times out twice and then declines the
  card, its fallback (`charge-backup`) declines it too; the workflow faults, and the compensations of the completed
  steps run in reverse order: the reservation is released (`release-inventory`), then the customer is told why
  (`notify-customer`). It ends `compensated`.
- `--cancel-after STEP`: the payment goes through, and the customer withdraws the order as STEP starts (this script
  calls `dispatcher.cancel`). A step done before the worker's next look at the cancel board (every 0.5 s)
  finishes, and no step after it starts; a longer one, such as `generate-shipping-label` (a carrier booking of a
  second), is interrupted mid-way. What completed is undone, and the workflow ends `cancelled`.
- `--pay-ok`: the payment goes through and the order ships; a second order, out of stock, ends early
  (`EndWorkflow`): a success, so nothing is undone.

The agents (`AgentActivity`) run on `FunctionModel`, offline. Side effects are keyed on `ctx.idempotency_key`, and
each compensation on the key of the step it undoes (`ctx.undoing.idempotency_key`), so a redelivery never does
anything twice. At the end it prints each workflow's status, as `paigeant status` shows it.

Run it (in memory, one process; `--transport sqlite`, `redis` or `rabbitmq` to keep it, with the `PAIGEANT_*` settings):

    uv run python -m examples.order_processing
    uv run python -m examples.order_processing --cancel-after generate-shipping-label
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    AgentActivity,
    EndWorkflow,
    InMemoryWorkflowStore,
    NonRetryableError,
    RetryPolicy,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    get_transport,
)
from paigeant_ai._cli_workflows import render_status  # what `paigeant status` prints

from ._progress import show

# -- a stand-in for the shop's systems ------------------------------------------------------------------------
# A real warehouse and payment provider would receive the idempotency keys too.

STOCK = {"SKU-BOOK": 5, "SKU-LAMP": 0}
RESERVED: dict[str, tuple[str, int]] = {}  # idempotency key of the reservation -> (sku, quantity)
RELEASED: set[str] = set()
CHARGES: dict[str, float] = {}  # idempotency key of the charge -> amount
REFUNDS: dict[str, float] = {}
OUTBOX: list[str] = []  # what the customer was told
DECLINED_CARDS = {"4000-0000-0000-0002"}
"""Cards both payment providers decline."""


class OrderReview(BaseModel):
    approved: bool
    reason: str


def _review(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    review = {"approved": True, "reason": "address and quantities look plausible"}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, review)])


def _confirm(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("Thank you for your order! It is on its way.")])


# -- the steps, each with what undoes it ----------------------------------------------------------------------

validate_order = AgentActivity(
    Agent(FunctionModel(_review), name="validate-order", output_type=OrderReview),
    prompt="Review order {order_id}: {quantity} x {sku}, shipping to {address}.",
    output_key="review",
    compensate="notify-customer",  # an accepted order that is called off: the customer is told why
    max_per_plan=1,
)


@activity(name="check-inventory", compensate="release-inventory", after=["validate-order"], max_per_plan=1)
async def check_inventory(ctx: ActivityContext) -> dict[str, bool]:
    """Make sure the items are in stock, and reserve them; an order that cannot be filled ends here."""
    review = ctx.payload.get("review")
    if not isinstance(review, dict) or not review.get("approved"):
        raise NonRetryableError("the order was not approved")
    sku, quantity = str(ctx.payload["sku"]), int(str(ctx.payload["quantity"]))
    if ctx.idempotency_key not in RESERVED:  # reserved once, however often the step is delivered
        if STOCK.get(sku, 0) < quantity:
            raise EndWorkflow(f"out of stock: {sku} has {STOCK.get(sku, 0)}, the order needs {quantity}")
        STOCK[sku] -= quantity
        RESERVED[ctx.idempotency_key] = (sku, quantity)
    return {"in_stock": True}


@activity(
    name="process-payment",
    retry=RetryPolicy(max_attempts=4, initial_interval=0.1, backoff=2),
    compensate="refund-payment",
    fallbacks=["charge-backup"],  # once this step has failed for good
    after=["check-inventory"],  # never charged for items that are not reserved
    requires=["send-confirmation"],  # a charge is always confirmed to the customer
    max_per_plan=1,  # charged once per order
)
async def process_payment(ctx: ActivityContext) -> dict[str, str]:
    """Charge the customer with the main provider; it times out twice before it answers."""
    if ctx.attempt < 2:
        raise ConnectionError("payment provider timed out")
    if ctx.payload.get("card") in DECLINED_CARDS:
        raise NonRetryableError("the main payment provider declined the card")
    CHARGES.setdefault(ctx.idempotency_key, float(str(ctx.payload["amount"])))  # charged once per key
    return {"payment_id": f"pay-{ctx.correlation_id[:8]}"}


@activity(name="charge-backup", retry=RetryPolicy(max_attempts=2, initial_interval=0.1), compensate="refund-payment")
async def charge_backup(ctx: ActivityContext) -> dict[str, str]:
    """Charge the customer with the backup provider, when the main one failed for good."""
    if ctx.payload.get("card") in DECLINED_CARDS:
        raise NonRetryableError("the backup payment provider declined the card")
    CHARGES.setdefault(ctx.idempotency_key, float(str(ctx.payload["amount"])))
    return {"payment_id": f"bak-{ctx.correlation_id[:8]}"}


@activity(name="update-inventory", after=["process-payment"], max_per_plan=1)
async def update_inventory(ctx: ActivityContext) -> dict[str, int]:
    """Confirm the reservation: the items leave the warehouse's stock for good."""
    return {"stock_left": STOCK[str(ctx.payload["sku"])]}


@activity(name="generate-shipping-label", after=["process-payment", "update-inventory"], max_per_plan=1)
async def generate_label(ctx: ActivityContext) -> dict[str, str]:
    """Book the parcel with the carrier (it takes a second) and return its tracking number."""
    try:
        await asyncio.sleep(1.0)
    except asyncio.CancelledError:
        print(f"  [{ctx.correlation_id[:8]}] the carrier booking was called off mid-way; nothing was booked")
        raise  # the worker then stops the workflow: its completed steps are undone
    return {"tracking_number": f"TRK-{ctx.correlation_id[:8].upper()}"}


send_confirmation = AgentActivity(
    Agent(FunctionModel(_confirm), name="send-confirmation"),
    prompt="Write a confirmation for order {order_id}, tracking number {tracking_number}.",
    output_key="confirmation",
    after=["generate-shipping-label"],
)

# -- the compensations: each gets the step it undoes as `ctx.undoing`, and why as `ctx.unwinding` ----------------


@activity(name="release-inventory")
async def release_inventory(ctx: ActivityContext) -> dict[str, str]:
    """Put the items a reservation held back in stock."""
    assert ctx.undoing is not None
    key = ctx.undoing.idempotency_key  # the reservation's own key: released once, however often this runs
    sku, quantity = RESERVED[key]
    if key not in RELEASED:
        STOCK[sku] += quantity
        RELEASED.add(key)
    return {"released": f"{quantity} x {sku}"}


@activity(name="refund-payment", max_per_plan=1)  # a charge is refunded once
async def refund_payment(ctx: ActivityContext) -> dict[str, str]:
    """Refund a charge, with the provider that made it (the main one or the backup)."""
    assert ctx.undoing is not None
    amount = REFUNDS.setdefault(ctx.undoing.idempotency_key, CHARGES[ctx.undoing.idempotency_key])
    return {"refunded": f"{amount:.2f} on {ctx.undoing.output['payment_id']}"}


@activity(name="notify-customer")
async def notify_customer(ctx: ActivityContext) -> dict[str, str]:
    """Tell the customer their order is called off, and why."""
    assert ctx.unwinding is not None
    why = {
        "faulted": "we could not take the payment",
        "cancelled": "you cancelled it",
        "expired": "it took too long",
    }[ctx.unwinding.cause]
    # The compensation log tells what was undone before this: the latest steps are undone first.
    refunded = [r for r in ctx.routing_slip.compensations if r.compensate == "refund-payment" and r.compensated_at]
    money = "your payment is refunded" if refunded else "you were not charged"
    notice = f"Your order {ctx.payload['order_id']} is cancelled: {why}; {money}."
    if notice not in OUTBOX:
        OUTBOX.append(notice)
    return {"customer_notice": notice}


ORDER_STEPS = [validate_order, check_inventory, process_payment, update_inventory, generate_label, send_confirmation]
"""The route of an order."""
ACTIVITIES = [*ORDER_STEPS, charge_backup, release_inventory, refund_payment, notify_customer]
"""What the worker runs: the route's steps, the payment's fallback, and the compensations."""

catalog = ActivityCatalog()
"""What a planner may put in an order's plan, with the shop's rules: nothing ships before it is paid for, the
payment follows the stock check and is always confirmed, and each step happens once per order."""
for step in [*ORDER_STEPS, charge_backup]:
    catalog.add(step)
catalog.add(generate_label, produces=["tracking_number"])  # its `dict[str, str]` does not say which keys

ORDER = {"order_id": "ord-1001", "sku": "SKU-BOOK", "quantity": 2, "amount": 39.90, "address": "1 Main St"}
GOOD_CARD, DECLINED_CARD = "4242-4242-4242-4242", "4000-0000-0000-0002"
OUT_OF_STOCK = {"order_id": "ord-1002", "sku": "SKU-LAMP", "quantity": 1, "amount": 24.50, "address": "9 Side Rd"}


def withdraw_when(
    step: str, dispatcher: WorkflowDispatcher, store: InMemoryWorkflowStore
) -> Callable[[WorkflowEvent], Awaitable[None]]:
    """An event callback that cancels the workflow when `step` starts, as the customer who withdraws the order."""
    sent: set[str] = set()

    async def on_event(event: WorkflowEvent) -> None:
        cid = event.correlation_id
        if event.kind != "step_started" or event.activity != step or cid is None or cid in sent:
            return
        sent.add(cid)
        await dispatcher.cancel(cid, "the customer withdrew the order", by="customer-service", store=store)

    return on_event


async def main(*, cancel_after: str | None = None, pay_ok: bool = False, transport_name: str | None = None) -> None:
    """Dispatch the order (and, with `pay_ok`, an out-of-stock one), run every step here, and print the outcome."""
    store = InMemoryWorkflowStore()  # each workflow's status, from the events of this process

    async def record(event: WorkflowEvent) -> None:
        show(event)
        await store.apply(event)

    async with get_transport(transport_name) as transport:
        dispatcher = WorkflowDispatcher(transport, on_event=record)
        withdraw = [withdraw_when(cancel_after, dispatcher, store)] if cancel_after is not None else []
        worker = Worker(transport, ACTIVITIES, on_event=[record, *withdraw])
        card = GOOD_CARD if pay_ok or cancel_after else DECLINED_CARD
        orders = [{**ORDER, "card": card}] + ([{**OUT_OF_STOCK, "card": card}] if pay_ok else [])
        ids: list[str] = []
        for order in orders:
            ids.append(await dispatcher.dispatch_workflow(activities=ORDER_STEPS, variables=order))
            print(f"dispatched order {order['order_id']} as workflow {ids[-1]} on the {transport.name} transport")
        await worker.run(burst=True)
    print(f"\nstock: {', '.join(f'{sku} {count}' for sku, count in STOCK.items())}")
    print(f"charged: {sum(CHARGES.values()):.2f}, refunded: {sum(REFUNDS.values()):.2f}")
    for notice in OUTBOX:
        print(f"customer told: {notice}")
    for correlation_id in ids:
        status = await store.get(correlation_id)
        if status is not None:
            # The status as `paigeant status` prints it, without the event timeline the lines above told.
            print("\n" + render_status(status).split("\n  timeline:")[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run an order-processing saga: a payment that fails, undone.")
    parser.add_argument(
        "--cancel-after",
        metavar="STEP",
        choices=[step.spec.name for step in ORDER_STEPS],
        help="pay, then cancel the order as STEP starts: " + ", ".join(step.spec.name for step in ORDER_STEPS),
    )
    parser.add_argument("--pay-ok", action="store_true", help="the payment goes through: the order ships")
    parser.add_argument(
        "--transport", choices=["inmemory", "sqlite", "redis", "rabbitmq"], help="default: PAIGEANT_TRANSPORT"
    )
    args = parser.parse_args()
    try:
        asyncio.run(main(cancel_after=args.cancel_after, pay_ok=args.pay_ok, transport_name=args.transport))
    except UserError as exc:  # a setting to fix (a broker's keys, say): one sentence, not a traceback
        raise SystemExit(f"order_processing: {exc}") from None
