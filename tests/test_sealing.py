"""What is signed is exactly what is sent; NaN and infinity never reach the wire; any JSON payload arrives intact."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    NonFiniteNumber,
    PaigeantMessage,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai._sealing import seal, signing_input, unsigned_body
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import SecurityError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER

from .brokers import TRANSPORTS, clean, make_transport

KEY = generate_key("sealing-1")


def signer() -> MessageSigner:
    return MessageSigner(KEY)


# -- the bytes -------------------------------------------------------------------------------------------------


def test_the_bytes_signed_are_the_bytes_sent() -> None:
    message = _message({"a": 1.5, "b": "NaN is a word", "c": -0.0})
    body = seal(message, signer(), max_bytes=1_000_000)
    signature = message.security.jws_signature
    assert signature is not None
    assert body.endswith(b'"' + signature.encode() + b'"}}')
    assert signing_input(body, signature) == unsigned_body(message)
    assert json.loads(body)["security"]["jws_signature"] == signature
    assert PaigeantMessage.from_json(body) == message


async def test_a_signature_that_is_not_the_last_value_is_refused() -> None:
    message = _message({"a": 1})
    body = seal(message, signer(), max_bytes=1_000_000)
    reordered = json.dumps(json.loads(body)).encode()  # same content, other bytes
    with pytest.raises(SecurityError, match="not the last value of the message"):
        await signer().verify(PaigeantMessage.from_json(reordered), message.routing_slip.itinerary[0], reordered)
    verified = await signer().verify(PaigeantMessage.from_json(body), message.routing_slip.itinerary[0], body)
    assert verified.claims is None
    assert verified.signer


@pytest.mark.parametrize(
    ("variables", "found"),
    [
        ({"score": math.nan}, "nan at ['score']"),
        ({"limits": {"upper": math.inf}}, "inf at ['limits']['upper']"),
        ({"series": [1.0, 2.0, -math.inf]}, "-inf at ['series'][2]"),
    ],
)
async def test_nan_and_infinity_are_refused_at_dispatch_and_nothing_is_sent(
    variables: dict[str, Any], found: str
) -> None:
    from paigeant_ai import InMemoryTransport

    async with InMemoryTransport() as memory:
        dispatcher = WorkflowDispatcher(memory, security=signer())
        with pytest.raises(NonFiniteNumber, match="JSON has no NaN or infinity") as raised:
            await dispatcher.dispatch_workflow(["score"], variables)
        assert found in str(raised.value)
        assert await memory.pending("score") == 0


# -- an output that JSON cannot carry --------------------------------------------------------------------------


class Verdict(BaseModel):
    label: str
    confidence: float


def nan_function(ctx: ActivityContext) -> dict[str, Any]:
    return {"confidence": math.nan}


def nan_agent() -> AgentActivity[None, Verdict]:
    def overconfident(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        tool = info.output_tools[0].name
        return ModelResponse(parts=[ToolCallPart(tool, {"label": "spam", "confidence": math.inf})])

    agent = Agent(FunctionModel(overconfident), output_type=Verdict)
    return AgentActivity(agent, name="score", prompt="Score this")


@pytest.mark.parametrize("kind", ["function", "agent"])
async def test_an_output_with_nan_faults_the_step_as_a_failure_not_an_attack(transport: Transport, kind: str) -> None:
    step = activity(name="score")(nan_function) if kind == "function" else nan_agent()
    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport, security=signer())
    worker = Worker(transport, [step], security=signer(), on_event=events.append)
    correlation_id = await dispatcher.dispatch_workflow(["score"], {"text": "win money now"})
    await worker.run(burst=True)

    faulted = [event for event in events if event.kind == "faulted"]
    assert [event.correlation_id for event in faulted] == [correlation_id]
    assert "its output holds" in (faulted[0].detail or "")
    assert "JSON has no NaN or infinity" in (faulted[0].detail or "")
    assert not [event for event in events if event.kind == "rejected"]
    async with await transport.consume(DEAD_LETTER) as letters:
        letter = await asyncio.wait_for(anext(letters), 10)
        await transport.ack(letter)
    assert letter.headers[REASON_HEADER].startswith("step 'score' failed: its output holds")
    faulted_copy = PaigeantMessage.from_json(letter.body)
    signer().check_signature(faulted_copy, letter.body)  # a signed letter, which an operator can replay


# -- any JSON arrives as it was sent ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=12), json_values, max_size=5)


class RoundTrip:
    """A worker whose one step echoes the payload it got, on a transport, with one event loop across examples."""

    def __init__(self, transport_name: str) -> None:
        self.runner = asyncio.Runner()
        self.namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
        self.transport = make_transport(transport_name, self.namespace)
        self.results: dict[str, asyncio.Future[WorkflowEvent]] = {}

        @activity(name="echo")
        async def echo(ctx: ActivityContext) -> dict[str, Any]:
            return {"echo": dict(ctx.payload)}

        self.dispatcher = WorkflowDispatcher(self.transport, security=signer())
        self.worker = Worker(self.transport, [echo, activity(name="check")(_check)], security=signer())
        self.worker.reporter.callbacks.append(self._on_event)
        self.runner.run(self.transport.connect())
        self.task = self.runner.get_loop().create_task(self.worker.run())

    def _on_event(self, event: WorkflowEvent) -> None:
        future = self.results.get(event.correlation_id or "")
        if future is not None and not future.done() and event.kind in ("completed", "faulted", "rejected"):
            future.set_result(event)

    def send(self, variables: dict[str, Any]) -> WorkflowEvent:
        async def run() -> WorkflowEvent:
            correlation_id = str(uuid.uuid4())
            result = self.results[correlation_id] = asyncio.get_running_loop().create_future()
            try:
                await self.dispatcher.dispatch_workflow(["echo", "check"], variables, correlation_id=correlation_id)
                return await asyncio.wait_for(result, 20)
            finally:
                del self.results[correlation_id]

        return self.runner.run(run())

    def close(self) -> None:
        self.worker.stop()
        self.runner.run(self._close())
        self.runner.close()

    async def _close(self) -> None:
        await self.task
        await self.transport.disconnect()
        await clean(self.transport, self.namespace)


async def _check(ctx: ActivityContext) -> dict[str, Any]:
    # The next hop verified, and the step sees what the step before it wrote.
    return {"checked": ctx.payload["echo"] == {k: v for k, v in ctx.payload.items() if k not in ("echo",)}}


@pytest.fixture(scope="module", params=TRANSPORTS)
def round_trip(request: pytest.FixtureRequest) -> Iterator[RoundTrip]:
    trip = RoundTrip(request.param)
    yield trip
    trip.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variables=payloads)
def test_any_json_payload_arrives_intact_and_verified(round_trip: RoundTrip, variables: dict[str, Any]) -> None:
    variables.pop("echo", None)
    variables.pop("checked", None)
    event = round_trip.send(variables)
    assert event.kind == "completed", event.detail
    assert event.payload is not None
    assert event.payload["echo"] == variables
    assert event.payload["checked"] is True
    assert {k: v for k, v in event.payload.items() if k not in ("echo", "checked")} == variables


def _message(variables: dict[str, Any]) -> PaigeantMessage:
    from paigeant_ai import ActivitySpec

    return PaigeantMessage.new([ActivitySpec(name="score")], variables)
