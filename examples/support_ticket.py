"""A planner agent turns a support ticket into a durable workflow; one step waits for a person's approval.

Shows: the planner toolset (`create_planner_agent` + `PlannerAgentDeps`) choosing steps from an activity catalog
and dispatching them; the classifier revising the route as it runs (an urgent ticket gets a follow-up call); the
reply step parking the workflow until its `send_response` tool is approved; the script approving (`--deny` to
refuse) and the workflow completing. The agents run on `FunctionModel`, offline; set `PAIGEANT_MODEL` (for
example `PAIGEANT_MODEL=openai:gpt-5`, with that provider's package and API key) to use a real model instead.

Run it:

    uv run python -m examples.support_ticket
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from typing import Literal

from pydantic import BaseModel
from pydantic_ai import Agent, FunctionToolset, ToolDenied
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart, UserPromptPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionDef, FunctionModel

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    AgentActivity,
    InMemoryWaitingStore,
    ItineraryRevision,
    PlannerAgentDeps,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    create_planner_agent,
    get_transport,
)

from . import _progress

REQUEST = "urgent: customer X can't log in after payment"
REAL_MODEL = os.environ.get("PAIGEANT_MODEL")
USER_TOKEN = os.environ.get("PAIGEANT_USER_TOKEN")  # the user's on-behalf-of token, carried by the workflow


def model(script: FunctionDef) -> Model | str:
    """The real model when `PAIGEANT_MODEL` names one, else the offline script."""
    return REAL_MODEL or FunctionModel(script)


# -- what the scripted models do (a real model decides this itself) -------------------------------------------


def _prompt(messages: list[ModelMessage]) -> str:
    return next(
        (p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart) and isinstance(p.content, str)),
        "",
    )


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


def _call(tool: str, **args: object) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(tool, args)])


def _plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    if not returns:
        return _call("list_activities")
    if len(returns) == 1:
        listed = [entry["name"] for entry in json.loads(returns[0].model_response_str())]
        wanted = ["classify-ticket-priority", "route-to-specialist", "research-customer-history", "generate-response"]
        request = _prompt(messages)
        customer = re.search(r"customer (\w+)", request)
        variables = {"ticket": request, "customer": customer.group(1) if customer else "unknown"}
        return _call("dispatch_workflow", activities=[name for name in wanted if name in listed], variables=variables)
    dispatched = json.loads(returns[-1].model_response_str())
    return ModelResponse(parts=[TextPart(f"Dispatched workflow {dispatched['correlation_id']} for the ticket.")])


def _classify(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    ticket = _prompt(messages).lower()
    urgent = "urgent" in ticket
    remaining = re.search(r"Steps still to run after yours: ([^.]*)\.", info.instructions or "")
    if urgent and not _returns(messages) and remaining and "schedule-follow-up" not in remaining.group(1):
        return _call("add_steps", activities=["schedule-follow-up"], reason="urgent tickets get a follow-up call")
    priority = "urgent" if urgent else "normal"
    category = "account-access" if "log in" in ticket else "general"
    return _call(info.output_tools[0].name, priority=priority, category=category)


def _reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    if not returns:
        customer = re.search(r"Customer (\w+)", _prompt(messages))
        name = customer.group(1) if customer else "there"
        text = (
            f"Hi {name}, sorry for the trouble. Your payment went through and we have unlocked your account: "
            "please log in again. Our account-access team will call you tomorrow to make sure all is well."
        )
        return _call("send_response", message=text)
    return ModelResponse(parts=[TextPart(returns[-1].model_response_str())])


# -- the activities ------------------------------------------------------------------------------------------


class TicketPriority(BaseModel):
    priority: Literal["low", "normal", "urgent"]
    category: str


class Assignment(BaseModel):
    specialist: str


class History(BaseModel):
    customer_history: list[str]


class FollowUp(BaseModel):
    follow_up: str


CRM = {"X": ["2024-03: upgraded to the premium plan", "yesterday: card payment of 49.00 EUR succeeded"]}
OUTBOX: list[str] = []


@activity(name="route-to-specialist")
async def route_to_specialist(ctx: ActivityContext) -> Assignment:
    """Pick the team that handles the ticket, from its classification."""
    classification = ctx.payload.get("classification")
    category = classification.get("category") if isinstance(classification, dict) else None
    return Assignment(specialist="account-access team" if category == "account-access" else "first-line support")


@activity(name="research-customer-history")
async def research_customer_history(ctx: ActivityContext) -> History:
    """Look up the customer's recent history in the CRM."""
    return History(customer_history=CRM.get(str(ctx.payload["customer"]), ["no history on file"]))


@activity(name="schedule-follow-up", max_per_plan=1)  # one call per ticket
async def schedule_follow_up(ctx: ActivityContext) -> FollowUp:
    """Book a follow-up call with the customer for the next morning."""
    return FollowUp(follow_up=f"call customer {ctx.payload['customer']} tomorrow at 09:00")


reply_tools = FunctionToolset[object](id="support-desk")


@reply_tools.tool_plain(requires_approval=True)
def send_response(message: str) -> str:
    """Send the reply to the customer (a person approves every reply first).

    Args:
        message: The reply, as the customer will read it.
    """
    OUTBOX.append(message)
    return f"Reply sent: {message}"


classify_ticket = AgentActivity(
    Agent(
        model(_classify),
        name="classify-ticket-priority",
        description="Rate the ticket's priority and category.",
        output_type=TicketPriority,
        instructions="Classify the support ticket. Urgent tickets also get a follow-up call: make sure the "
        "workflow's route has schedule-follow-up.",
    ),
    prompt="Classify this support ticket: {ticket}",
    output_key="classification",
)
generate_response = AgentActivity(
    Agent(
        model(_reply),
        name="generate-response",
        description="Write the reply to the customer and send it, once a person approves it.",
        toolsets=[reply_tools],
        instructions="Write a short, kind reply and send it with send_response. Then say what became of it.",
    ),
    prompt=(
        "Customer {customer} wrote: {ticket}\nClassification: {classification}\nHandled by: {specialist}\n"
        "History: {customer_history}\nWrite the reply and send it."
    ),
    output_key="response",
    after=["classify-ticket-priority"],  # never answered before it is classified
    max_per_plan=1,  # the customer gets one reply
)

STEPS = [classify_ticket, route_to_specialist, research_customer_history, generate_response, schedule_follow_up]
catalog = ActivityCatalog()
catalog.add(classify_ticket)
catalog.add(route_to_specialist, needs=["classification"])
catalog.add(research_customer_history, needs=["customer"])
catalog.add(generate_response)
catalog.add(schedule_follow_up, needs=["customer"])
classify_ticket.toolsets.append(ItineraryRevision(catalog, max_revisions=2))

# This script plans first and drains the queues after, so no worker consumes yet when the plan is dispatched; a
# service whose workers are running keeps the default, which sends a plan nobody serves back to the model.
planner = create_planner_agent(model=model(_plan), catalog=catalog, require_workers=False)

# -- running it ----------------------------------------------------------------------------------------------


def show(event: WorkflowEvent) -> None:
    """One line per event, the new kinds included."""
    short = (event.correlation_id or "?")[:8]
    if event.kind == "dispatched":
        print(f"plan: {' -> '.join(event.remaining or [])}")
    elif event.kind == "revised":
        print(f"  [{short}] revised {event.detail}")
    elif event.kind == "waiting":
        print(f"  [{short}] waiting step {event.step} {event.activity}: {event.detail}")
    elif event.kind == "resumed":
        print(f"  [{short}] resumed step {event.step} {event.activity}: {event.detail}")
    else:
        _progress.show(event)


async def report(event: WorkflowEvent) -> None:
    show(event)


transport = get_transport()
waiting_store = InMemoryWaitingStore()
worker = Worker(transport, STEPS, waiting_store=waiting_store, on_event=show)


async def main(*, deny: bool = False) -> str:
    """Plan and dispatch the ticket's workflow, run it to the approval, decide, and run it to the end."""
    async with transport:
        dispatcher = WorkflowDispatcher(transport, waiting_store=waiting_store, on_event=report)
        print(f"request: {REQUEST}")
        deps = PlannerAgentDeps(workflow_dispatcher=dispatcher, user_obo_token=USER_TOKEN)
        result = await planner.run(REQUEST, deps=deps)
        print(f"planner: {result.output}")

        await worker.run(burst=True)
        for parked in await dispatcher.waiting():  # the parked records that verify
            for call in parked.pending:
                print(f"approval needed: {call.tool_name}({json.dumps(call.args)})")
            # This script stands in for the person who decides.
            answer = ToolDenied("The support lead will call the customer instead.") if deny else True
            print(f"  {'denied' if deny else 'approved'} by the support lead")
            approvals = {c.tool_call_id: answer for c in parked.pending}
            await dispatcher.resume(parked.correlation_id, approvals=approvals, approver="support-lead")
        await worker.run(burst=True)
        print(f"result: {OUTBOX[-1] if OUTBOX else 'no reply was sent'}")
        return result.output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plan and run a support-ticket workflow with a human approval.")
    parser.add_argument("--deny", action="store_true", help="deny the reply instead of approving it")
    asyncio.run(main(deny=parser.parse_args().deny))
