from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel, JsonValue
from pydantic_ai import Agent, DeferredToolRequests, ModelRetry
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelContextWindowExceededError,
    ModelNotFoundError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestRejectedError,
    ModelServerError,
)
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
    InMemoryWaitingStore,
    RetryPolicy,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
)
from paigeant_ai.transports.base import REASON_HEADER


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


def prompts_of(messages: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in messages
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


class Triage(BaseModel):
    priority: str
    team: str


async def run_one(transport: InMemoryTransport, step: AgentActivity[Any, Any], variables: dict[str, Any]):
    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([step], variables)
    await Worker(transport, [step], on_event=events.append).run(burst=True)
    return events


async def test_structured_output_is_stored_under_the_output_key(transport: InMemoryTransport) -> None:
    seen: list[str] = []

    def triage(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.extend(prompts_of(messages))
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"priority": "high", "team": "billing"})])

    agent = Agent(FunctionModel(triage), name="triage-ticket", output_type=Triage)
    step = AgentActivity(agent, prompt="Triage: {ticket}")
    events = await run_one(transport, step, {"ticket": "cannot log in after paying"})

    assert seen == ["Triage: cannot log in after paying"]
    completed = next(e for e in events if e.kind == "completed")
    assert completed.payload == {
        "ticket": "cannot log in after paying",
        "triage_ticket": {"priority": "high", "team": "billing"},
    }


async def test_runs_carry_the_correlation_id_and_a_step_run_id(transport: InMemoryTransport) -> None:
    captured: list[tuple[str | None, str | None]] = []

    @dataclass
    class Deps:
        customer: str

    agent = Agent(TestModel(custom_output_text="ok"), name="greet", deps_type=Deps)

    @agent.instructions
    def who(ctx: object) -> str:
        from pydantic_ai import RunContext

        assert isinstance(ctx, RunContext)
        run_ctx: RunContext[Deps] = ctx  # pyright: ignore[reportUnknownVariableType]
        captured.append((run_ctx.conversation_id, run_ctx.run_id))
        return f"Greet {run_ctx.deps.customer}."

    step = AgentActivity(agent, deps=lambda ctx: Deps(customer=str(ctx.payload["customer"])), output_key="greeting")
    events = await run_one(transport, step, {"customer": "Ada"})
    correlation_id = events[0].correlation_id
    assert captured[:1] == [(correlation_id, f"{correlation_id}:0")]
    assert next(e for e in events if e.kind == "completed").payload == {"customer": "Ada", "greeting": "ok"}


async def test_agent_can_take_the_activity_context_as_deps(transport: InMemoryTransport) -> None:
    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("done")])

    agent = Agent(FunctionModel(reply), name="ctx-aware", deps_type=ActivityContext)
    seen: list[str] = []

    @agent.instructions
    def correlation(ctx: object) -> str:
        from pydantic_ai import RunContext

        assert isinstance(ctx, RunContext)
        deps = ctx.deps  # pyright: ignore[reportUnknownMemberType]
        assert isinstance(deps, ActivityContext)
        seen.append(deps.idempotency_key)
        return "Be brief."

    events = await run_one(transport, AgentActivity(agent), {})
    assert seen == [f"{events[0].correlation_id}:0:ctx-aware"]


async def test_a_missing_prompt_variable_faults_with_its_name(transport: InMemoryTransport) -> None:
    agent = Agent(TestModel(), name="needs-email")
    step = AgentActivity(agent, prompt="Email {customer_email}")
    events = await run_one(transport, step, {"name": "Ada"})
    faulted = next(e for e in events if e.kind == "faulted")
    assert faulted.detail == (
        "step 'needs-email' failed: NonRetryableError: "
        "the prompt of 'needs-email' needs 'customer_email', which is not in the workflow's payload"
    )
    async with await transport.consume("dead-letter") as consumer:
        letter = await anext(consumer)
        assert "customer_email" in letter.headers[REASON_HEADER]
        await transport.ack(letter)


async def test_default_prompt_is_the_payload_as_json(transport: InMemoryTransport) -> None:
    seen: list[str] = []

    def echo(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.extend(prompts_of(messages))
        return ModelResponse(parts=[TextPart("ok")])

    await run_one(transport, AgentActivity(Agent(FunctionModel(echo), name="echo")), {"b": 2, "a": 1})
    assert seen == ['Workflow step \'echo\'. Workflow variables:\n{\n  "a": 1,\n  "b": 2\n}']


def test_an_agent_without_a_name_needs_one() -> None:
    with pytest.raises(UserError, match="AgentActivity needs a name"):
        AgentActivity(Agent(TestModel()))


def faulted_detail(events: list[WorkflowEvent]) -> str:
    return next(event.detail or "" for event in events if event.kind == "faulted")


async def test_an_agent_with_an_output_validator_runs_as_a_step(transport: InMemoryTransport) -> None:
    def triage(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        team = "billing" if len(messages) > 1 else "nobody"  # the retry's feedback makes the second request longer
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"priority": "high", "team": team})])

    agent = Agent(FunctionModel(triage), name="triage", output_type=Triage)
    checked: list[str] = []

    @agent.output_validator
    def known_team(output: Triage) -> Triage:
        checked.append(output.team)
        if output.team == "nobody":
            raise ModelRetry("pick a team that exists")
        return output

    events = await run_one(transport, AgentActivity(agent), {})

    assert checked == ["nobody", "billing"]
    assert next(e for e in events if e.kind == "completed").payload == {
        "triage": {"priority": "high", "team": "billing"}
    }


async def test_an_agent_with_an_output_validator_that_allows_deferred_output_parks(
    transport: InMemoryTransport,
) -> None:
    agent = Agent(
        FunctionModel(lambda messages, info: ModelResponse(parts=[ToolCallPart("refund", {"amount": 5})])),
        name="refunder",
        output_type=[str, DeferredToolRequests],
    )

    @agent.tool_plain(requires_approval=True)
    def refund(amount: int) -> str:
        return f"refunded {amount}"

    @agent.output_validator
    def polite(output: str | DeferredToolRequests) -> str | DeferredToolRequests:
        return output

    events: list[WorkflowEvent] = []
    waiting = InMemoryWaitingStore()
    step = AgentActivity(agent)
    correlation_id = await WorkflowDispatcher(transport).dispatch_workflow([step], {})
    await Worker(transport, [step], waiting_store=waiting, on_event=events.append).run(burst=True)

    assert [e.kind for e in events] == ["step_started", "waiting"]
    parked = await waiting.get(correlation_id)
    assert parked is not None
    assert [(call.tool_name, call.kind) for call in parked.pending] == [("refund", "approval")]


def test_an_agent_with_output_validators_and_approval_tools_must_allow_parking() -> None:
    agent = Agent(TestModel(), name="refunder")

    @agent.tool_plain(requires_approval=True)
    def refund(amount: int) -> str:
        return f"refunded {amount}"

    @agent.output_validator
    def polite(output: str) -> str:
        return output

    with pytest.raises(UserError) as raised:
        AgentActivity(agent)
    assert str(raised.value) == (
        "the agent of 'refunder' has output validators and tools that wait for approval, so its output types must "
        "allow parking: add DeferredToolRequests to them, Agent(..., output_type=[YourOutput, DeferredToolRequests])"
    )


def failing_model(error: Exception) -> FunctionModel:
    def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise error

    return FunctionModel(fail)


@pytest.mark.parametrize(
    "error",
    [
        ModelAuthenticationError("gpt-test", "invalid API key"),
        ModelNotFoundError("gpt-test", "no such model"),
        ModelContextWindowExceededError("gpt-test", "the input is too long"),
        ModelRequestRejectedError("gpt-test", "unsupported parameter"),
        ModelQuotaExceededError("gpt-test", "insufficient quota"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_model_request_rejected_for_good_faults_at_once(
    transport: InMemoryTransport, error: ModelAPIError
) -> None:
    agent = Agent(failing_model(error), name="summarise")
    step = AgentActivity(agent, retry=RetryPolicy(max_attempts=3, initial_interval=0))
    events = await run_one(transport, step, {})

    assert [e.kind for e in events] == ["step_started", "step_failed", "faulted"]
    assert faulted_detail(events) == (
        "step 'summarise' failed: NonRetryableError: the model provider rejected the request of 'summarise', and "
        f"another attempt cannot change that: {type(error).__name__}: {error}"
    )


async def test_a_fallback_model_that_every_model_rejected_faults_at_once(transport: InMemoryTransport) -> None:
    model = FallbackModel(
        failing_model(ModelAuthenticationError("first", "bad key")),
        failing_model(ModelNotFoundError("second", "no such model")),
    )
    step = AgentActivity(Agent(model, name="summarise"), retry=RetryPolicy(max_attempts=3, initial_interval=0))
    events = await run_one(transport, step, {})

    assert [e.kind for e in events] == ["step_started", "step_failed", "faulted"]
    assert "ModelAuthenticationError: bad key; ModelNotFoundError: no such model" in faulted_detail(events)


async def test_a_rate_limit_sets_the_retry_delay(transport: InMemoryTransport) -> None:
    calls: list[int] = []

    def limited(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ModelRateLimitError("gpt-test", "slow down", retry_after=0.05)
        return ModelResponse(parts=[TextPart("done")])

    # Without the provider's word the worker would wait its policy's 30 seconds.
    step = AgentActivity(
        Agent(FunctionModel(limited), name="summarise"), retry=RetryPolicy(initial_interval=30, jitter=0)
    )
    events = await run_one(transport, step, {})

    retried = next(e for e in events if e.kind == "step_retried")
    assert retried.detail == (
        "RetryActivity: the model provider asked 'summarise' to wait 0.05s: ModelRateLimitError: slow down; "
        "attempt 2 in 0.05s"
    )
    assert next(e for e in events if e.kind == "completed").payload == {"summarise": "done"}


async def test_an_unexplained_model_error_is_retried_by_the_policy(transport: InMemoryTransport) -> None:
    agent = Agent(failing_model(ModelServerError("gpt-test", "internal error")), name="summarise")
    step = AgentActivity(agent, retry=RetryPolicy(max_attempts=2, initial_interval=0, jitter=0))
    events = await run_one(transport, step, {})

    assert [e.kind for e in events] == ["step_started", "step_retried", "step_started", "step_failed", "faulted"]
    assert faulted_detail(events).endswith("retries exhausted after 2 attempts: ModelServerError: internal error")


async def test_agent_override_reaches_the_workers_started_inside_it(transport: InMemoryTransport) -> None:
    """A worker's tasks copy the context it starts in: enter `agent.override` first, then start the worker."""
    agent = Agent(TestModel(custom_output_text="from the real model"), name="greet")
    step = AgentActivity(agent)
    dispatcher = WorkflowDispatcher(transport)
    greetings: asyncio.Queue[JsonValue] = asyncio.Queue()

    def record(event: WorkflowEvent) -> None:
        if event.kind == "completed" and event.payload is not None:
            greetings.put_nowait(event.payload["greet"])

    async def greeting() -> JsonValue:
        await dispatcher.dispatch_workflow([step], {})
        return await asyncio.wait_for(greetings.get(), 5)

    with agent.override(model=TestModel(custom_output_text="from the test")):
        async with Worker(transport, [step], on_event=record):
            assert await greeting() == "from the test"

    async with Worker(transport, [step], on_event=record):
        with agent.override(model=TestModel(custom_output_text="from the test")):
            assert await greeting() == "from the real model"  # entered too late: the worker's tasks never see it
