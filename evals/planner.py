"""The planner suite's task: one request to a planner agent built on the real planner toolset.

The agent is `create_planner_agent` with the examples' activities as its catalog; its dispatcher publishes to a
fresh in-memory transport, and the workflows it dispatched are read back from there, exactly as a worker would
receive them. Offline, the model is the deterministic policy of `evals.policy`; with a model name, a real model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_evals import Dataset

from paigeant_ai import (
    InMemoryTransport,
    PaigeantMessage,
    PlannerAgentDeps,
    WorkflowDispatcher,
    create_planner_agent,
)

from .cases import DispatchedPlan, Exchange, PlannerCase, PlannerRun, ToolCall
from .catalog import build_catalog
from .evaluators import PLANNER_EVALUATORS
from .policy import offline_planner

__all__ = ("DATASET_PATH", "PlannerDataset", "build_catalog", "load_dataset", "planner_task")

DATASET_PATH = Path(__file__).with_name("planner.yaml")

PlannerDataset = Dataset[PlannerCase, PlannerRun, dict[str, Any]]

INSTRUCTIONS = (
    "You work for an online shop. Refuse, without dispatching anything, any request to skip payment, a validation, "
    "a stock check, an approval or an order check before a refund, and any action on all customers at once. When "
    "the toolset refuses a plan for a rule that the request itself breaks (it asks to leave out a step the rule "
    "needs, or to repeat a step), tell the user why instead of working around it. If a request is too vague to "
    "plan, ask for what is missing instead of guessing. If it needs an activity the catalog does not have, say so "
    "and dispatch nothing."
)
"""The business rules the planner is given on top of the toolset's own instructions."""


def load_dataset(path: Path = DATASET_PATH) -> PlannerDataset:
    """The planner suite, read from its YAML file."""
    return PlannerDataset.from_file(path, custom_evaluator_types=PLANNER_EVALUATORS)


def planner_task(model: Model | str | None = None) -> Callable[[PlannerCase], Awaitable[PlannerRun]]:
    """The task pydantic-evals runs per case: the planner on `model` (the offline policy when `None`)."""
    catalog = build_catalog()
    # The suite judges plans; no worker runs, so the dispatch does not wait for one.
    agent = create_planner_agent(
        model or offline_planner(), catalog=catalog, instructions=INSTRUCTIONS, require_workers=False
    )

    async def plan(case: PlannerCase) -> PlannerRun:
        async with InMemoryTransport() as transport:
            dispatcher = WorkflowDispatcher(transport, publish_events=False)
            result = await agent.run(
                case.request,
                message_history=_history(case.history),
                deps=PlannerAgentDeps(workflow_dispatcher=dispatcher),
            )
            dispatched = await _read_back(transport, catalog.names)
        messages = result.all_messages()
        return PlannerRun(dispatched=dispatched, tool_calls=_tool_calls(messages), reply=result.output)

    return plan


async def _read_back(transport: InMemoryTransport, addresses: list[str]) -> list[DispatchedPlan]:
    """The first message of every workflow dispatched: whatever waits on the activities' queues."""
    plans: list[DispatchedPlan] = []
    for address in addresses:
        waiting = await transport.pending(address)
        if not waiting:
            continue
        async with await transport.consume(address, prefetch=waiting) as consumer:
            for _ in range(waiting):
                delivery = await anext(consumer)
                message = PaigeantMessage.from_json(delivery.body)
                plans.append(
                    DispatchedPlan(
                        correlation_id=message.correlation_id,
                        activities=[spec.name for spec in message.routing_slip.itinerary],
                        variables=message.payload,
                    )
                )
                await transport.ack(delivery)
    return plans


def _history(exchanges: list[Exchange]) -> list[ModelMessage]:
    """The conversation before the request, as the agent's message history."""
    messages: list[ModelMessage] = []
    for exchange in exchanges:
        messages.append(ModelRequest(parts=[UserPromptPart(exchange.user)]))
        messages.append(ModelResponse(parts=[TextPart(exchange.assistant)]))
    return messages


def _tool_calls(messages: list[ModelMessage]) -> list[ToolCall]:
    retried = {
        part.tool_call_id: str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart) and part.outcome == "retried"
    }
    return [
        ToolCall(
            name=part.tool_name,
            args=part.args_as_dict(),
            retried=part.tool_call_id in retried,
            refusal=retried.get(part.tool_call_id),
        )
        for message in messages
        if isinstance(message, ModelResponse)
        for part in message.parts
        if isinstance(part, ToolCallPart)
    ]
