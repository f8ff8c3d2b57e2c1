"""Workflows of the support-ticket example run to their end, to record as a dataset; and candidate classifiers to
replay it against: the example's own, and one that answers differently for five customers."""

from __future__ import annotations

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from examples import support_ticket
from examples.support_ticket import STEPS, TicketPriority, catalog, classify_ticket
from paigeant_ai import AgentActivity, ItineraryRevision, Worker, WorkflowDispatcher, get_waiting_store
from paigeant_ai._events import EventCallback
from paigeant_ai.security import MessageSecurity
from paigeant_ai.transports import Transport

ROUTE = ["classify-ticket-priority", "route-to-specialist", "research-customer-history", "generate-response"]
CUSTOMERS = [f"C{index:02d}" for index in range(20)]
CHANGED = ["C02", "C05", "C11", "C14", "C19"]
"""The customers whose tickets the changed classifier rates differently."""
OBO_TOKEN = "obo-token-of-the-user-never-recorded"


def ticket(customer: str) -> str:
    """A ticket of `customer`: every third one urgent, every other one about logging in."""
    index = int(customer[1:])
    problem = "can't log in after payment" if index % 2 == 0 else "was charged twice this month"
    return f"{'urgent: ' if index % 3 == 0 else ''}customer {customer} {problem}"


async def run_support_workflows(
    transport: Transport, *, security: MessageSecurity | None = None, on_event: EventCallback | None = None
) -> list[str]:
    """Dispatch a workflow for each of `CUSTOMERS` on the example's route, run a real worker over them, approve each
    reply, and run them to their end; the correlation IDs."""
    waiting = get_waiting_store(transport)
    dispatcher = WorkflowDispatcher(transport, waiting_store=waiting, security=security)
    worker = Worker(transport, STEPS, waiting_store=waiting, security=security, concurrency=4, on_event=on_event)
    ids = [
        await dispatcher.dispatch_workflow(
            ROUTE,
            {"ticket": ticket(customer), "customer": customer},
            obo_token=OBO_TOKEN,
        )
        for customer in CUSTOMERS
    ]
    await worker.run(burst=True)
    for parked in await dispatcher.waiting():
        approvals = {call.tool_call_id: True for call in parked.pending}
        await dispatcher.resume(
            parked.correlation_id, approvals=approvals, approver="support-lead", obo_token=OBO_TOKEN
        )
    await worker.run(burst=True)
    return ids


def _changed_classify(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The example's classifier, but the tickets of `CHANGED` customers are rated `low`."""
    response = support_ticket._classify(messages, info)  # pyright: ignore[reportPrivateUsage]
    prompt = support_ticket._prompt(messages)  # pyright: ignore[reportPrivateUsage]
    [part] = response.parts
    changed = any(f"customer {customer} " in prompt for customer in CHANGED)
    if changed and isinstance(part, ToolCallPart) and part.tool_name == info.output_tools[0].name:
        return ModelResponse(parts=[ToolCallPart(part.tool_name, {**part.args_as_dict(), "priority": "low"})])
    return response


changed_classifier = AgentActivity(
    Agent(
        FunctionModel(_changed_classify),
        name="classify-ticket-priority",
        output_type=TicketPriority,
        instructions="Classify the support ticket; urgent tickets also get a follow-up call.",
    ),
    prompt="Classify this support ticket: {ticket}",
    output_key="classification",
    toolsets=[ItineraryRevision(catalog, max_revisions=2)],
)
"""A new version of the example's classifier that rates five customers' tickets `low`."""
same_classifier = classify_ticket
