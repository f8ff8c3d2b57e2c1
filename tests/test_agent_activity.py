from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
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


async def run_one(transport: InMemoryTransport, step: AgentActivity[object, object], variables: dict[str, object]):
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
    events = await run_one(transport, step, {"ticket": "cannot log in after paying"})  # pyright: ignore[reportArgumentType]

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
    events = await run_one(transport, step, {"customer": "Ada"})  # pyright: ignore[reportArgumentType]
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

    events = await run_one(transport, AgentActivity(agent), {})  # pyright: ignore[reportArgumentType]
    assert seen == [f"{events[0].correlation_id}:0:ctx-aware"]


async def test_a_missing_prompt_variable_faults_with_its_name(transport: InMemoryTransport) -> None:
    agent = Agent(TestModel(), name="needs-email")
    step = AgentActivity(agent, prompt="Email {customer_email}")
    events = await run_one(transport, step, {"name": "Ada"})  # pyright: ignore[reportArgumentType]
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

    await run_one(transport, AgentActivity(Agent(FunctionModel(echo), name="echo")), {"b": 2, "a": 1})  # pyright: ignore[reportArgumentType]
    assert seen == ['Workflow step \'echo\'. Workflow variables:\n{\n  "a": 1,\n  "b": 2\n}']


def test_an_agent_without_a_name_needs_one() -> None:
    with pytest.raises(UserError, match="AgentActivity needs a name"):
        AgentActivity(Agent(TestModel()))
