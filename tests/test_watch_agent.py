"""An agent's output as it happens: `AgentActivity(..., stream_progress=True)` forwards its streamed text, tool
calls and their results into the workflow's progress stream, coalesced and bounded (issue 18)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
    OutputLimits,
    WatchedEvent,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._events import decode_events
from paigeant_ai.contracts import EVENTS
from paigeant_ai.exceptions import UserError
from paigeant_ai.security import MessageSigner, generate_key

from .brokers import wait_until

KEY = generate_key("agent-output-test-1")
WORDS = [f"word{n} " for n in range(40)]


def _has_tool_result(messages: list[ModelMessage]) -> bool:
    return any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)


async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    if not _has_tool_result(messages):
        yield {0: DeltaToolCall(name="lookup", json_args='{"city": "Paris"}', tool_call_id="call-1")}
        return
    for word in WORDS:
        yield word


def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The same answers, not streamed (a run without `stream_progress`)."""
    if not _has_tool_result(messages):
        return ModelResponse(parts=[ToolCallPart("lookup", {"city": "Paris"}, tool_call_id="call-1")])
    return ModelResponse(parts=[TextPart("".join(WORDS))])


def writer_agent() -> Agent[None, str]:
    agent = Agent(FunctionModel(respond, stream_function=stream), name="writer")

    @agent.tool_plain
    def lookup(city: str) -> str:
        return f"sunny in {city}"

    return agent


async def run_and_watch(activity: AgentActivity[None, str]) -> list[WatchedEvent]:
    signer = MessageSigner(KEY, [KEY])
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport, security=signer)
        worker = Worker(transport, [activity], security=signer)
        running = asyncio.create_task(worker.run())
        try:
            cid = await dispatcher.dispatch_workflow(["writer"])
            return [item async for item in dispatcher.watch(cid)]
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)


async def test_a_streaming_agent_s_text_tool_call_and_tool_result_reach_the_watch() -> None:
    watched = await run_and_watch(AgentActivity(writer_agent(), stream_progress=True))
    outputs = [item.event for item in watched if item.event.kind == "agent_output"]
    assert [(event.part, event.detail) for event in outputs[:2]] == [
        ("tool_call", 'lookup({"city":"Paris"})'),
        ("tool_result", "lookup: sunny in Paris"),
    ]
    text = [event for event in outputs if event.part == "text"]
    assert "".join(event.detail or "" for event in text) == "".join(WORDS)
    assert len(text) < len(WORDS)  # coalesced: a fast stream's deltas are joined
    assert all(event.activity == "writer" and event.step == 0 for event in outputs)
    assert watched[-1].event.kind == "completed"


async def test_agent_output_is_cut_and_capped_and_off_by_default() -> None:
    limits = OutputLimits(rate=1000, max_chars=10, max_events=3)
    watched = await run_and_watch(AgentActivity(writer_agent(), stream_progress=limits))
    outputs = [item.event for item in watched if item.event.kind == "agent_output"]
    assert len(outputs) == 4
    assert all(len(event.detail or "") <= 10 for event in outputs[:3])
    assert outputs[-1].part == "note"

    quiet = await run_and_watch(AgentActivity(writer_agent()))
    assert not [item for item in quiet if item.event.kind == "agent_output"]
    assert quiet[-1].event.kind == "completed"


async def test_text_reaches_the_watch_while_the_model_is_still_answering() -> None:
    """A model that says two words at once, then pauses: a watcher sees both while the step still runs."""
    pause = asyncio.Event()

    async def pauses(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "Hello "
        yield "world"  # within the same 1 / rate seconds as "Hello ": held back, then sent when the time is up
        await pause.wait()
        yield "!"

    step = AgentActivity(Agent(FunctionModel(stream_function=pauses), name="writer"), stream_progress=True)
    signer = MessageSigner(KEY, [KEY])
    watched: list[WatchedEvent] = []

    def said() -> str:
        return "".join(item.event.detail or "" for item in watched if item.event.kind == "agent_output")

    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport, security=signer)
        worker = Worker(transport, [step], security=signer)
        running = asyncio.create_task(worker.run())
        try:
            cid = await dispatcher.dispatch_workflow(["writer"])

            async def watch() -> None:
                async for item in dispatcher.watch(cid):
                    watched.append(item)

            watching = asyncio.create_task(watch())
            await wait_until(lambda: said() == "Hello world", within=10, what="the text before the pause")
            assert "step_completed" not in [item.event.kind for item in watched]  # the step is still running
            pause.set()
            await asyncio.wait_for(watching, 30)
        finally:
            pause.set()
            worker.stop()
            await asyncio.wait_for(running, 30)
    assert said() == "Hello world!"
    assert watched[-1].event.kind == "completed"


async def test_streamed_text_goes_out_at_most_rate_times_a_second() -> None:
    async def steady(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for word in WORDS:  # 40 words over about 0.8 s
            await asyncio.sleep(0.02)
            yield word

    limits = OutputLimits(rate=5)
    agent: Agent[None, str] = Agent(FunctionModel(stream_function=steady), name="writer")
    watched = await run_and_watch(AgentActivity(agent, stream_progress=limits))
    text = [item.event for item in watched if item.event.kind == "agent_output" and item.event.part == "text"]
    assert "".join(event.detail or "" for event in text) == "".join(WORDS)
    gaps = [(later.at - earlier.at).total_seconds() for earlier, later in itertools.pairwise(text)]
    # Never faster than the rate (clocks aside), but for the last: what is left goes out when the answer ends.
    assert all(gap >= 0.9 / limits.rate for gap in gaps[:-1]), gaps
    assert 2 <= len(text) < len(WORDS)


class SlowEvents(InMemoryTransport):
    """A broker slow to take a batch on `events`: the worker's next events wait behind it."""

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if address == EVENTS:
            await asyncio.sleep(0.3)
        await super().publish(address, body, headers=headers, delay=delay)


async def test_a_steps_output_follows_its_step_started_in_the_stream_however_slow_events_are() -> None:
    @activity(name="first")
    async def first(ctx: ActivityContext) -> dict[str, str]:
        await asyncio.sleep(0.1)  # done while the worker's first batch is still on its way
        return {"first": "done"}

    async def talks(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "a few words"

    agent: Agent[None, str] = Agent(FunctionModel(stream_function=talks), name="writer")
    signer = MessageSigner(KEY, [KEY])
    async with SlowEvents() as transport:
        worker = Worker(transport, [first, AgentActivity(agent, stream_progress=True)], security=signer)
        running = asyncio.create_task(worker.run())
        try:
            cid = await WorkflowDispatcher(transport, security=signer).dispatch_workflow(["first", "writer"])
            watched = [item async for item in WorkflowDispatcher(transport, security=signer).watch(cid)]
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
        entries = await (await transport.read_progress(cid)).read(0)

    assert watched[-1].event.kind == "completed"
    # The stream as written (the dispatcher's own `dispatched` may come late, as documented).
    written = [
        (event.kind, event.activity)
        for entry in entries
        for event in decode_events(entry.body)
        if event.kind != "dispatched"
    ]
    assert written == [
        ("step_started", "first"),
        ("step_completed", "first"),
        ("step_started", "writer"),
        ("agent_output", "writer"),
        ("step_completed", "writer"),
        ("completed", "writer"),
    ]


def test_limits_must_be_positive() -> None:
    with pytest.raises(UserError, match="must be positive"):
        OutputLimits(rate=0)
