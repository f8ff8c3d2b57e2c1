"""The usage ledger: what each step's model runs used, in the signed slip, totalled in the workflow's status.

The three agents of the workflow run on FunctionModels that report known token counts; the totals the status shows
must equal what pydantic-ai itself reports for the same runs (a run that raised included, through the `RunUsage`
it was handed), on each transport.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from logfire.testing import CaptureLogfire
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage, RunUsage

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
    InMemoryWaitingStore,
    InMemoryWorkflowStore,
    PaigeantToolset,
    Parallel,
    PlannerAgentDeps,
    RetryPolicy,
    Transport,
    Usage,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    WorkflowProjector,
    activity,
    usage_by_model,
    workflow_usage,
)
from paigeant_ai._cli_workflows import render_status
from paigeant_ai._ledger import run_model_name, to_usage

pytestmark = pytest.mark.usefixtures("signed_with_one_key")

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0)


@pytest.fixture
async def memory() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


def _replied(messages: list[ModelMessage]) -> bool:
    return any(isinstance(part, ToolReturnPart) for part in messages[-1].parts)


def draft_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    usage = RequestUsage(input_tokens=120, output_tokens=30, cache_read_tokens=40)
    return ModelResponse(parts=[TextPart("a draft")], usage=usage)


def check_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not _replied(messages):
        call = ToolCallPart("look_up", {"term": "refund"})
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=80, output_tokens=12))
    return ModelResponse(parts=[TextPart("checked")], usage=RequestUsage(input_tokens=95, output_tokens=7))


def publish_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not _replied(messages):
        call = ToolCallPart("post", {"text": "hello"})
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=60, output_tokens=9, cache_write_tokens=25))
    return ModelResponse(parts=[TextPart("published")], usage=RequestUsage(input_tokens=70, output_tokens=4))


def asks_then_answers(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not _replied(messages):
        call = ToolCallPart("send", {"text": "hi"}, tool_call_id="send-1")
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=50, output_tokens=5))
    return ModelResponse(parts=[TextPart("sent")], usage=RequestUsage(input_tokens=70, output_tokens=3))


def approval_agent() -> Agent[None, str]:
    """An agent whose `send` tool waits for approval: 50 input tokens to ask, 70 once it is approved."""
    agent = Agent(FunctionModel(asks_then_answers), name="reply")

    @agent.tool_plain(requires_approval=True)
    def send(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return "sent"

    return agent


@dataclass
class Agents:
    """The three agents; the `post` tool fails the first time it is called, so `publish` fails once."""

    posted: list[str] = field(default_factory=list[str])

    def build(self) -> tuple[Agent[None, str], Agent[None, str], Agent[None, str]]:
        draft = Agent(FunctionModel(draft_model), name="draft")
        check = Agent(FunctionModel(check_model), name="check")
        publish = Agent(FunctionModel(publish_model), name="publish")

        @check.tool_plain
        def look_up(term: str) -> str:  # pyright: ignore[reportUnusedFunction]
            return f"{term}: allowed"

        @publish.tool_plain
        def post(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
            self.posted.append(text)
            if len(self.posted) == 1:
                raise ConnectionError("the channel hung up")
            return "posted"

        return draft, check, publish


async def reported_by_pydantic_ai() -> Usage:
    """What pydantic-ai reports for the same runs as the workflow's, run here directly: the failed run's usage is
    the `RunUsage` it was handed."""
    draft, check, publish = Agents().build()
    total = to_usage((await draft.run("go")).usage) + to_usage((await check.run("go")).usage)
    failed = RunUsage()
    with pytest.raises(ConnectionError):
        await publish.run("go", usage=failed)
    assert failed.requests == 1  # the run that raised still tells what it used
    return total + to_usage(failed) + to_usage((await publish.run("go")).usage)


async def test_the_status_totals_what_pydantic_ai_reported_for_every_run(transport: Transport) -> None:
    expected = await reported_by_pydantic_ai()
    draft, check, publish = Agents().build()
    steps = [
        AgentActivity(draft, prompt="Draft for {customer}"),
        AgentActivity(check, prompt="Check {draft}"),
        AgentActivity(publish, prompt="Publish {check}", retry=FAST),
    ]
    store = InMemoryWorkflowStore()
    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    cid = await dispatcher.dispatch_workflow(activities=steps, variables={"customer": "ada"})
    worker = Worker(transport, steps, on_event=[store.apply, events.append], rng=random.Random(0))
    await worker.run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.state == "completed"
    assert worker.stats.retried == 1
    assert status.usage == expected
    assert expected == Usage(
        requests=6,
        input_tokens=120 + 80 + 95 + 60 + 60 + 70,
        output_tokens=30 + 12 + 7 + 9 + 9 + 4,
        cache_read_tokens=40,
        cache_write_tokens=50,
        tool_calls=expected.tool_calls,
    )
    completed = next(event for event in events if event.kind == "completed")
    assert completed.usage == expected
    projected = InMemoryWorkflowStore()  # the same totals from the signed events on the broker
    await WorkflowProjector(transport, projected).run(burst=True)
    from_broker = await projected.get(cid)
    assert from_broker is not None
    assert from_broker.usage == expected
    assert "usage: 6 requests, 485 input + 71 output tokens, cache 40 read, 50 written" in render_status(status)


async def test_each_entry_records_its_step_and_the_failed_attempts_before_it(memory: InMemoryTransport) -> None:
    transport = memory
    draft, check, publish = Agents().build()
    steps = [AgentActivity(draft), AgentActivity(check), AgentActivity(publish, retry=FAST)]
    last: list[Any] = []

    @activity
    async def keep(ctx: ActivityContext) -> None:
        last.append(ctx.routing_slip.model_copy(deep=True))

    await WorkflowDispatcher(transport).dispatch_workflow(activities=[*steps, keep])
    await Worker(transport, [*steps, keep], rng=random.Random(0)).run(burst=True)

    [slip] = last
    draft_entry, check_entry, publish_entry = slip.completed
    assert draft_entry.usage == [
        Usage(model="function:draft_model:", requests=1, input_tokens=120, output_tokens=30, cache_read_tokens=40)
    ]
    assert [usage.model for usage in check_entry.usage] == ["function:check_model:"]
    assert check_entry.usage[0].requests == 2
    assert publish_entry.attempt == 1
    assert publish_entry.usage[0].requests == 3  # one of the failed attempt, two of the one that completed
    assert slip.carried_usage == []
    assert sum(usage.requests for usage in usage_by_model(slip).values()) == 6
    assert set(usage_by_model(slip)) == {"function:draft_model:", "function:check_model:", "function:publish_model:"}
    assert workflow_usage(slip).requests == 6


async def test_an_activity_adds_what_its_own_model_calls_used(memory: InMemoryTransport) -> None:
    transport = memory
    agent = Agent(FunctionModel(draft_model))

    @activity
    async def summarise(ctx: ActivityContext) -> dict[str, str]:
        result = await agent.run("summarise")
        ctx.add_usage(result.usage, model="openai:gpt-5")
        ctx.add_usage(Usage(model="openai:gpt-5", requests=1, input_tokens=10))
        ctx.add_usage(RequestUsage(input_tokens=3, output_tokens=1), model="anthropic:claude")
        return {"summary": result.output}

    store = InMemoryWorkflowStore()
    cid = await WorkflowDispatcher(transport, on_event=store.apply).dispatch_workflow([summarise])
    await Worker(transport, [summarise], on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.usage == Usage(requests=3, input_tokens=133, output_tokens=31, cache_read_tokens=40)


def test_add_usage_refuses_what_is_not_usage() -> None:
    with pytest.raises(UserError, match=r"pass result\.usage"):
        to_usage({"input_tokens": 3})  # pyright: ignore[reportArgumentType]


async def test_branches_and_compensations_count_in_the_totals(memory: InMemoryTransport) -> None:
    transport = memory

    def answering(tokens: int) -> FunctionModel:
        def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            return ModelResponse(parts=[TextPart("ok")], usage=RequestUsage(input_tokens=tokens, output_tokens=1))

        return FunctionModel(reply, model_name=f"model-{tokens}")

    @activity(name="undo-research")
    async def undo_research(ctx: ActivityContext) -> None:
        ctx.add_usage(Usage(model="model-7", requests=1, input_tokens=7))

    @activity(retry=RetryPolicy(max_attempts=1))
    async def fail(ctx: ActivityContext) -> None:
        ctx.add_usage(Usage(model="model-5", requests=1, input_tokens=5))
        raise ConnectionError("down")

    research = AgentActivity(Agent(answering(100), name="research"), compensate="undo-research")
    pricing = AgentActivity(Agent(answering(200), name="pricing"))
    steps = [research, pricing, undo_research, fail]
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    cid = await dispatcher.dispatch_workflow([Parallel("research", "pricing"), "fail"])
    await Worker(transport, steps, on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.state == "compensated"
    assert status.usage == Usage(requests=4, input_tokens=100 + 200 + 5 + 7, output_tokens=2)


async def test_the_step_and_the_workflow_usage_are_on_the_spans(
    capfire: CaptureLogfire, memory: InMemoryTransport
) -> None:
    draft = AgentActivity(Agent(FunctionModel(draft_model), name="draft"))
    await WorkflowDispatcher(memory).dispatch_workflow([draft])
    await Worker(memory, [draft]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    [step] = [span["attributes"] for span in spans if span["name"] == "paigeant.activity"]
    assert step["paigeant.usage.input_tokens"] == 120
    assert step["paigeant.usage.output_tokens"] == 30
    assert step["paigeant.usage.cache_read_tokens"] == 40
    assert step["paigeant.usage.requests"] == 1
    assert step["paigeant.usage.model"] == "function:draft_model:"
    # pydantic-ai's own spans tell the run's gen_ai.usage.*: the step's does not repeat them (a sum would count twice)
    assert not [name for name in step if name.startswith("gen_ai.usage.")]
    [hop] = [span["attributes"] for span in spans if span["name"] == "paigeant.hop"]
    assert hop["paigeant.workflow_outcome"] == "completed"
    assert hop["paigeant.workflow.usage.input_tokens"] == 120
    assert hop["paigeant.workflow.usage.requests"] == 1


async def test_a_run_that_waits_for_approval_is_counted_once_across_its_resume(memory: InMemoryTransport) -> None:
    reply = AgentActivity(approval_agent())
    last: list[Any] = []

    @activity
    async def keep(ctx: ActivityContext) -> None:
        last.append(ctx.routing_slip.model_copy(deep=True))

    waiting = InMemoryWaitingStore()
    dispatcher = WorkflowDispatcher(memory, waiting_store=waiting)
    cid = await dispatcher.dispatch_workflow([reply, keep])
    await Worker(memory, [reply, keep], waiting_store=waiting).run(burst=True)
    parked = await waiting.get(cid)
    assert parked is not None
    assert workflow_usage(parked.message).input_tokens == 50  # carried while it waits
    await dispatcher.resume(cid, approvals={"send-1": True}, approver="ana")
    await Worker(memory, [reply, keep], waiting_store=waiting).run(burst=True)

    [slip] = last
    assert slip.completed[0].usage == [
        Usage(model="function:asks_then_answers:", requests=2, input_tokens=120, output_tokens=8, tool_calls=1)
    ]


async def test_a_resumed_run_that_fails_and_waits_again_is_counted(memory: InMemoryTransport) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returned = {
            part.tool_name for message in messages for part in message.parts if isinstance(part, ToolReturnPart)
        }
        if "send" not in returned:
            call = ToolCallPart("send", {"text": "hi"}, tool_call_id="send-1")
            return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=50, output_tokens=5))
        if "note" not in returned:
            return ModelResponse(parts=[ToolCallPart("note", {})], usage=RequestUsage(input_tokens=70, output_tokens=3))
        return ModelResponse(parts=[TextPart("sent")], usage=RequestUsage(input_tokens=90, output_tokens=2))

    agent = Agent(FunctionModel(model), name="reply")
    notes: list[int] = []

    @agent.tool_plain(requires_approval=True)
    def send(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return "sent"

    @agent.tool_plain
    def note() -> str:  # pyright: ignore[reportUnusedFunction]
        notes.append(1)
        if len(notes) == 1:
            raise ConnectionError("the log hung up")
        return "noted"

    reply = AgentActivity(agent, retry=FAST)
    last: list[Any] = []

    @activity
    async def keep(ctx: ActivityContext) -> None:
        last.append(ctx.routing_slip.model_copy(deep=True))

    waiting = InMemoryWaitingStore()
    dispatcher = WorkflowDispatcher(memory, waiting_store=waiting)
    cid = await dispatcher.dispatch_workflow([reply, keep])
    for _ in range(3):  # parks, fails once resumed and parks again, then completes
        await Worker(memory, [reply, keep], waiting_store=waiting).run(burst=True)
        if last:
            break
        await dispatcher.resume(cid, approvals={"send-1": True}, approver="ana")
    [slip] = last
    assert len(notes) == 2
    # 50 asking, 70 in the resumed run that failed, then 70 and 90 in the run that completed
    assert workflow_usage(slip).input_tokens == 50 + 70 + 70 + 90


async def test_the_branches_that_completed_before_their_group_failed_count(memory: InMemoryTransport) -> None:
    @activity(compensate="undo-research")
    async def research(ctx: ActivityContext) -> str:
        ctx.add_usage(Usage(model="model-100", requests=1, input_tokens=100))
        return "found"

    @activity(name="undo-research")
    async def undo_research(ctx: ActivityContext) -> None:
        ctx.add_usage(Usage(model="model-7", requests=1, input_tokens=7))

    @activity(retry=RetryPolicy(max_attempts=1))
    async def broken(ctx: ActivityContext) -> None:
        ctx.add_usage(Usage(model="model-5", requests=1, input_tokens=5))
        raise ConnectionError("down")

    steps = [research, broken, undo_research]
    store = InMemoryWorkflowStore()
    cid = await WorkflowDispatcher(memory, on_event=store.apply).dispatch_workflow([Parallel("research", "broken")])
    await Worker(memory, steps, on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.state == "compensated"  # research completed first, then broken failed the group
    assert status.usage == Usage(requests=3, input_tokens=100 + 5 + 7)


async def test_the_status_tells_the_usage_so_far_while_the_workflow_runs_or_waits(memory: InMemoryTransport) -> None:
    draft = AgentActivity(Agent(FunctionModel(draft_model), name="draft"))
    reply = AgentActivity(approval_agent())
    store, waiting = InMemoryWorkflowStore(), InMemoryWaitingStore()
    dispatcher = WorkflowDispatcher(memory, waiting_store=waiting, on_event=store.apply)
    cid = await dispatcher.dispatch_workflow([draft, reply])
    await Worker(memory, [draft, reply], waiting_store=waiting, on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.state == "waiting"
    assert status.usage is not None
    assert (status.usage.requests, status.usage.input_tokens) == (2, 120 + 50)  # the draft, then the run that asks
    step = next(event for event in status.events if event.kind == "step_completed")
    assert step.usage is not None
    assert step.usage.input_tokens == 120  # the totals after the draft


async def test_a_branch_that_completes_tells_the_totals_with_its_own_usage(memory: InMemoryTransport) -> None:
    @activity
    async def research(ctx: ActivityContext) -> str:
        ctx.add_usage(Usage(model="model-100", requests=1, input_tokens=100))
        return "found"

    @activity
    async def pricing(ctx: ActivityContext) -> str:
        ctx.add_usage(Usage(model="model-200", requests=1, input_tokens=200))
        return "priced"

    store = InMemoryWorkflowStore()
    cid = await WorkflowDispatcher(memory, on_event=store.apply).dispatch_workflow([Parallel("research", "pricing")])
    await Worker(memory, [research, pricing], on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    completed = [event for event in status.events if event.kind == "step_completed" and event.branch is not None]
    told = {event.branch: event.usage for event in completed}
    assert told == {
        "research": Usage(model="model-100", requests=1, input_tokens=100),
        "pricing": Usage(model="model-200", requests=1, input_tokens=200),
    }
    assert status.usage == Usage(requests=2, input_tokens=300)


async def test_an_attempt_that_times_out_still_counts_what_it_used(memory: InMemoryTransport) -> None:
    def slow_tool_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("wait", {})], usage=RequestUsage(input_tokens=40, output_tokens=2))

    agent = Agent(FunctionModel(slow_tool_model), name="slow")

    @agent.tool_plain
    async def wait() -> str:  # pyright: ignore[reportUnusedFunction]
        await asyncio.sleep(30)
        return "never"

    slow = AgentActivity(agent, timeout=0.2, retry=RetryPolicy(max_attempts=1))
    store = InMemoryWorkflowStore()
    cid = await WorkflowDispatcher(memory, on_event=store.apply).dispatch_workflow([slow])
    await Worker(memory, [slow], on_event=store.apply).run(burst=True)

    status = await store.get(cid)
    assert status is not None
    assert status.state == "faulted"
    assert status.usage is not None
    assert (status.usage.requests, status.usage.input_tokens) == (1, 40)


async def test_the_planners_status_of_a_waiting_workflow_tells_its_usage(memory: InMemoryTransport) -> None:
    reply = AgentActivity(approval_agent())
    waiting = InMemoryWaitingStore()
    dispatcher = WorkflowDispatcher(memory, waiting_store=waiting)
    cid = await dispatcher.dispatch_workflow([reply], principal="tenant-a:alice")
    await Worker(memory, [reply], waiting_store=waiting).run(burst=True)
    planner = PaigeantToolset(ActivityCatalog([reply]), dispatcher=dispatcher, require_workers=False)
    ctx = RunContext[Any](
        deps=PlannerAgentDeps(dispatcher, principal="tenant-a:alice"), model=TestModel(), usage=RunUsage()
    )

    answer = await planner.get_workflow_status(ctx, cid)
    assert answer["state"] == "waiting"
    assert answer["usage"] == {
        "model": "function:asks_then_answers:",
        "requests": 1,
        "input_tokens": 50,
        "output_tokens": 5,
    }


def test_add_usage_refuses_a_model_name_too_long_for_the_slip() -> None:
    with pytest.raises(UserError, match="name the model in at most 200 characters"):
        to_usage(RunUsage(requests=1), model="m" * 201)
    with pytest.raises(UserError, match="name the model in at most 200 characters"):
        to_usage(Usage(model="m" * 300, requests=1))
    response = ModelResponse(parts=[TextPart("ok")], model_name="m" * 300)
    assert run_model_name([response], None) == "m" * 200  # a provider's name is cut, never refused mid-run
