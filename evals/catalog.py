"""The planner suite's catalog: the examples' activities, what each reads and writes, and their ordering rules.

Each description starts with the flow the activity belongs to ("Order: ...") and says what it does, as a planner
reads it. The rules are the shop's: nothing ships before it is paid for, a payment follows the stock check and is
always confirmed, a refund follows a checked order and happens once, and an order is never shipped and refunded in
one workflow. The examples declare them where each activity is declared (`@activity(after=...)`); this catalog
adds `issue-refund` and its conflict with shipping. They are enforced by the catalog whatever the planner says.
"""

from __future__ import annotations

from examples import onboarding, order_processing, support_ticket
from paigeant_ai import ActivityCatalog, ActivitySpec

__all__ = ("build_catalog",)


def build_catalog() -> ActivityCatalog:
    """The activities the planner may use. `issue-refund` is a step no example implements: it gives refund
    requests something to use."""
    catalog = ActivityCatalog()
    _onboarding(catalog)
    _orders(catalog)
    _support(catalog)
    return catalog


def _onboarding(catalog: ActivityCatalog) -> None:
    catalog.add(
        onboarding.validate,
        description="Onboarding, first step: check a new customer's email address and subscription tier.",
    )
    catalog.add(
        onboarding.create_account,
        description="Onboarding: create the new customer's account once their data is valid.",
        needs=["validation"],
        produces=["account_id"],
    )
    catalog.add(
        onboarding.setup_payment,
        description="Onboarding: attach a payment method to the new account; the provider is flaky on the first try.",
        needs=["account_id"],
        produces=["payment_method"],
    )
    catalog.add(
        onboarding.send_welcome,
        description="Onboarding, last step: send the new customer the welcome email of their tier.",
    )


def _orders(catalog: ActivityCatalog) -> None:
    catalog.add(
        order_processing.validate_order,
        description="Order: check an order (its items, quantity and address) before anything else is done with it.",
    )
    catalog.add(
        order_processing.check_inventory,
        description="Order: make sure the items are in stock, and reserve them; an order that cannot be filled ends "
        "here.",
        needs=["review", "sku", "quantity"],
        produces=["in_stock"],
    )
    catalog.add(
        order_processing.process_payment,
        description="Order: charge the customer for the order with the main provider.",
        needs=["amount"],
        produces=["payment_id"],
    )
    catalog.add(
        order_processing.update_inventory,
        description="Order: the reserved items leave the warehouse for good.",
        needs=["sku", "quantity"],
        produces=["stock_left"],
    )
    catalog.add(
        order_processing.generate_label,
        description="Order: book the parcel with the carrier so that the order ships, and return its tracking number.",
        produces=["tracking_number"],
        conflicts=["issue-refund"],  # besides the example's own rules: never shipped and refunded at once
    )
    catalog.add(
        order_processing.send_confirmation,
        description="Order, last step: confirm the shipped order to the customer with its tracking number.",
    )
    catalog.add(
        ActivitySpec(name="issue-refund", description="Refund: pay an order's money back to the customer."),
        needs=["order_id", "review"],
        produces=["refund_id"],
        after=["validate-order"],
        max_per_plan=1,
    )


def _support(catalog: ActivityCatalog) -> None:
    described = {
        "classify-ticket-priority": "Support ticket, first step: rate the ticket's priority and category.",
        "route-to-specialist": "Support ticket: pick the team that handles the ticket, from its classification.",
        "research-customer-history": "Support ticket: look up the customer's recent history in the CRM.",
        "generate-response": "Support ticket, last step: write the reply to the customer and send it, once a "
        "person approves it.",
        "schedule-follow-up": "Follow-up: book a call with the customer for the next morning.",
    }
    for entry in support_ticket.catalog:
        catalog.add(entry.model_copy(update={"description": described.get(entry.name, entry.description)}))
