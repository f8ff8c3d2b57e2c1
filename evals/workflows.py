"""The workflow suite's task: run one of the examples' workflows end to end on the in-memory transport.

The steps are the examples' own activities (their agents run on `FunctionModel`, offline), so the suite checks
the workflows exactly as they ship. A fresh transport and worker per case keep the cases apart; the worker runs
in burst mode, so the run ends when every queue, including delayed retries, is drained. A workflow that waits
for a person's approval is answered as the case says, and run on to its end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic_ai import ToolDenied
from pydantic_evals import Dataset

from examples import onboarding, order_processing, support_ticket
from paigeant_ai import (
    Activity,
    InMemoryTransport,
    InMemoryWaitingStore,
    PaigeantMessage,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
)
from paigeant_ai.contracts import DEAD_LETTER

from .cases import WorkflowCase, WorkflowRun, WorkflowStatus
from .evaluators import WORKFLOW_EVALUATORS

__all__ = ("DATASET_PATH", "WORKFLOWS", "Workflow", "WorkflowDataset", "load_dataset", "run_workflow")

DATASET_PATH = Path(__file__).with_name("workflows.yaml")


@dataclass(frozen=True)
class Workflow:
    """A workflow a case can run.

    Attributes:
        route: The steps it is dispatched with, in order.
        activities: What the worker runs: the route's steps and any a step may add to the route as it runs.
    """

    route: Sequence[Activity]
    activities: Sequence[Activity]


WORKFLOWS: dict[str, Workflow] = {
    "onboarding": Workflow(onboarding.ONBOARDING, onboarding.ONBOARDING),
    "orders": Workflow(order_processing.ORDER_STEPS, order_processing.ACTIVITIES),
    # The route the support example's planner dispatches; the classifier adds a follow-up call to urgent tickets.
    "support": Workflow(
        [
            support_ticket.classify_ticket,
            support_ticket.route_to_specialist,
            support_ticket.research_customer_history,
            support_ticket.generate_response,
        ],
        support_ticket.STEPS,
    ),
}
"""The workflows a case can name."""

DENIAL = "The support lead will call the customer instead."
"""What a person who denies an approval says."""

WorkflowDataset = Dataset[WorkflowCase, WorkflowRun, dict[str, Any]]

# The order example keeps its stock in a module-level dict (a stand-in for the shop's database): cases that set
# it run one at a time.
_shop = asyncio.Lock()


def load_dataset(path: Path = DATASET_PATH) -> WorkflowDataset:
    """The workflow suite, read from its YAML file."""
    return WorkflowDataset.from_file(path, custom_evaluator_types=WORKFLOW_EVALUATORS)


async def run_workflow(case: WorkflowCase) -> WorkflowRun:
    """Dispatch the case's workflow, run its steps until it finishes, and report what happened."""
    try:
        workflow = WORKFLOWS[case.workflow]
    except KeyError:
        known = ", ".join(sorted(WORKFLOWS))
        raise ValueError(f"unknown workflow {case.workflow!r}; the suite knows: {known}") from None
    async with _shop:
        if case.stock is not None:
            order_processing.STOCK.clear()
            order_processing.STOCK.update(case.stock)
        return await _run(case, workflow)


async def _run(case: WorkflowCase, workflow: Workflow) -> WorkflowRun:
    events: list[WorkflowEvent] = []
    waiting = InMemoryWaitingStore()

    async def record(event: WorkflowEvent) -> None:
        events.append(event)

    async with InMemoryTransport() as transport:
        worker = Worker(
            transport, workflow.activities, waiting_store=waiting, on_event=events.append, rng=random.Random(0)
        )
        dispatcher = WorkflowDispatcher(transport, waiting_store=waiting, on_event=record)
        started = time.perf_counter()
        await dispatcher.dispatch_workflow(workflow.route, case.variables)
        timed_out = False
        try:
            async with asyncio.timeout(case.timeout):
                await worker.run(burst=True)
                while case.approvals is not None and await _answer(dispatcher, case.approvals):
                    await worker.run(burst=True)
        except TimeoutError:
            timed_out = True
        duration = time.perf_counter() - started
        dead = await _dead_letters(transport)
    return _summarize(events, dead, duration, timed_out)


async def _answer(dispatcher: WorkflowDispatcher, decision: Literal["approve", "deny"]) -> bool:
    """Answer every approval a parked workflow waits for, as a person would; False when none waits."""
    parked = await dispatcher.waiting()
    answer = True if decision == "approve" else ToolDenied(DENIAL)
    for step in parked:
        approvals = {call.tool_call_id: answer for call in step.pending}
        await dispatcher.resume(step.correlation_id, approvals=approvals, approver="evals")
    return bool(parked)


async def _dead_letters(transport: InMemoryTransport) -> list[PaigeantMessage]:
    count = await transport.pending(DEAD_LETTER)
    if not count:
        return []
    messages: list[PaigeantMessage] = []
    async with await transport.consume(DEAD_LETTER, prefetch=count) as consumer:
        for _ in range(count):
            delivery = await anext(consumer)
            messages.append(PaigeantMessage.from_json(delivery.body))
            await transport.ack(delivery)
    return messages


def _summarize(
    events: list[WorkflowEvent], dead: list[PaigeantMessage], duration: float, timed_out: bool
) -> WorkflowRun:
    steps = [e.activity or "?" for e in events if e.kind == "step_completed"]
    retries: dict[str, int] = {}
    for event in events:
        if event.kind == "step_retried":
            retries[event.activity or "?"] = retries.get(event.activity or "?", 0) + 1
    status: WorkflowStatus = "timed_out"
    payload = dead[0].payload if dead else None
    reason: str | None = "the workflow did not finish in time" if timed_out else None
    final = next((e for e in reversed(events) if e.kind in ("completed", "faulted", "rejected", "waiting")), None)
    if final is not None and not timed_out:
        reason = final.detail
        if final.kind == "completed":
            status, payload = ("ended" if final.detail else "completed"), final.payload
        elif final.kind == "waiting":
            status = "waiting"
        else:
            status = "faulted" if final.kind == "faulted" else "rejected"
    return WorkflowRun(
        status=status, steps=steps, retries=retries, payload=payload, reason=reason, duration=round(duration, 3)
    )
