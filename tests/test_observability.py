from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import logfire
import pytest
from inline_snapshot import Is, snapshot
from logfire.testing import CaptureLogfire
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
    NonRetryableError,
    PaigeantMessage,
    RetryActivity,
    RetryPolicy,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._cli_dead_letters import DeadLetter, browse_dead_letters, replay_dead_letter
from paigeant_ai.approval import InMemoryWaitingStore
from paigeant_ai.observability import extract_context, inject_context
from paigeant_ai.security import MessageSigner

from .scripted import refunder

FAST = RetryPolicy(max_attempts=2, initial_interval=0.01, jitter=0)
SHOWN = (
    "correlation_id",
    "paigeant.activity",
    "paigeant.step",
    "paigeant.attempt",
    "paigeant.message_id",
    "paigeant.outcome",
    "paigeant.workflow_outcome",
    "gen_ai.conversation.id",
)


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


@pytest.fixture
def instrumented_agents() -> Iterator[None]:
    logfire.instrument_pydantic_ai()
    yield
    Agent.instrument_all(False)


def label(span: dict[str, Any]) -> str:
    """A span's name, with the step and outcome of paigeant's spans: enough to tell the hops of a step apart."""
    attributes = span["attributes"]
    if "paigeant.activity" not in attributes:
        return span["name"]
    return f"{span['name']} {attributes['paigeant.activity']} ({attributes.get('paigeant.outcome', '-')})"


def span_tree(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans as a tree: name, trace, the attributes that matter here, links, and children in start order."""
    children: dict[int | None, list[dict[str, Any]]] = defaultdict(list)
    by_id = {span["context"]["span_id"]: span for span in spans}
    for span in sorted(spans, key=lambda s: s["start_time"]):
        children[span["parent"]["span_id"] if span["parent"] else None].append(span)

    def link(found: dict[str, Any]) -> str:
        target = by_id.get(found["context"]["span_id"])
        return f"{found['attributes']['paigeant.link']}: {label(target) if target else 'outside'}"

    def node(span: dict[str, Any]) -> dict[str, Any]:
        attributes = span["attributes"]
        shown = {key: attributes[key] for key in SHOWN if key in attributes}
        below = [node(child) for child in children[span["context"]["span_id"]]]
        links = [link(found) for found in span.get("links", [])]
        return {
            "name": span["name"],
            "trace": span["context"]["trace_id"],
            **shown,
            **({"links": links} if links else {}),
            **({"children": below} if below else {}),
        }

    return [node(root) for root in children[None]]


def summarizer() -> AgentActivity[None, str]:
    def summarize(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("a short summary")])

    agent = Agent(FunctionModel(summarize, model_name="summarizer-model"), name="summarize")
    return AgentActivity(agent, prompt="Summarize {document}")


@activity
async def fetch(ctx: ActivityContext) -> dict[str, str]:
    return {"document": "a long document"}


@activity
async def publish(ctx: ActivityContext) -> dict[str, bool]:
    return {"published": True}


async def test_one_workflow_is_one_trace_with_the_correlation_id_on_every_span(
    capfire: CaptureLogfire, transport: InMemoryTransport, instrumented_agents: None
) -> None:
    summarize = summarizer()
    await WorkflowDispatcher(transport).dispatch_workflow([fetch, summarize, publish], correlation_id="wf-trace")
    await Worker(transport, [fetch, summarize, publish]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    assert {span["context"]["trace_id"] for span in spans} == {1}
    assert all(span["attributes"]["correlation_id"] == "wf-trace" for span in spans)
    assert span_tree(spans) == snapshot(
        [
            {
                "name": "paigeant.dispatch",
                "trace": 1,
                "correlation_id": "wf-trace",
                "paigeant.activity": "fetch",
                "paigeant.step": 0,
                "paigeant.attempt": 0,
                "paigeant.message_id": "3afeb074-fce4-ec76-f274-296125678d51",
                "paigeant.outcome": "sent",
                "children": [
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-trace",
                        "paigeant.activity": "fetch",
                        "paigeant.step": 0,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": "3afeb074-fce4-ec76-f274-296125678d51",
                        "paigeant.outcome": "completed",
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-trace",
                                "paigeant.activity": "fetch",
                                "paigeant.step": 0,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": "3afeb074-fce4-ec76-f274-296125678d51",
                                "paigeant.outcome": "completed",
                            }
                        ],
                    },
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-trace",
                        "paigeant.activity": "summarize",
                        "paigeant.step": 1,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": "d927fadf-5d0b-6f16-7651-7fb1f726ddf9",
                        "paigeant.outcome": "completed",
                        "links": ["sender: paigeant.hop fetch (completed)"],
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-trace",
                                "paigeant.activity": "summarize",
                                "paigeant.step": 1,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": "d927fadf-5d0b-6f16-7651-7fb1f726ddf9",
                                "paigeant.outcome": "completed",
                                "children": [
                                    {
                                        "name": "invoke_agent summarize",
                                        "trace": 1,
                                        "correlation_id": "wf-trace",
                                        "gen_ai.conversation.id": "wf-trace",
                                        "children": [
                                            {
                                                "name": "chat summarizer-model",
                                                "trace": 1,
                                                "correlation_id": "wf-trace",
                                                "gen_ai.conversation.id": "wf-trace",
                                            }
                                        ],
                                    }
                                ],
                            }
                        ],
                    },
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-trace",
                        "paigeant.activity": "publish",
                        "paigeant.step": 2,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": "077e1898-5621-0d51-6623-3f259be6403d",
                        "paigeant.outcome": "completed",
                        "paigeant.workflow_outcome": "completed",
                        "links": ["sender: paigeant.hop summarize (completed)"],
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-trace",
                                "paigeant.activity": "publish",
                                "paigeant.step": 2,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": "077e1898-5621-0d51-6623-3f259be6403d",
                                "paigeant.outcome": "completed",
                            }
                        ],
                    },
                ],
            }
        ]
    )


async def test_the_first_message_carries_the_dispatch_span_and_the_correlation_id(
    capfire: CaptureLogfire, transport: InMemoryTransport
) -> None:
    await WorkflowDispatcher(transport).dispatch_workflow(["fetch"], correlation_id="wf-headers")
    async with await transport.consume("fetch") as consumer:
        delivery = await anext(consumer)
    message = PaigeantMessage.from_json(delivery.body)
    [dispatch] = capfire.exporter.exported_spans_as_dict()
    trace_id, span_id = dispatch["context"]["trace_id"], dispatch["context"]["span_id"]
    assert message.headers == {
        "traceparent": f"00-{trace_id:032x}-{span_id:016x}-01",
        "baggage": "correlation_id=wf-headers",
    }
    assert delivery.headers == message.headers
    assert dispatch["attributes"]["paigeant.itinerary"] == ("fetch",)

    restored = inject_context({"x-other": "kept", "traceparent": "00-old"}, "wf-2")
    assert restored["x-other"] == "kept"
    assert restored["baggage"] == "correlation_id=wf-2"
    assert extract_context(message.headers) is not None


async def test_retries_and_faults_show_on_the_hop_and_activity_spans(
    capfire: CaptureLogfire, transport: InMemoryTransport
) -> None:
    @activity(name="flaky", retry=FAST)
    async def flaky(ctx: ActivityContext) -> None:
        raise RetryActivity("the provider is down")

    await WorkflowDispatcher(transport).dispatch_workflow([flaky], correlation_id="wf-fail")
    await Worker(transport, [flaky]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    assert {span["context"]["trace_id"] for span in spans} == {1}
    hops = [span["attributes"] for span in spans if span["name"] == "paigeant.hop"]
    assert [(hop["paigeant.attempt"], hop["paigeant.outcome"]) for hop in hops] == [(0, "retried"), (1, "faulted")]
    assert hops[0]["paigeant.reason"].startswith("RetryActivity: the provider is down; attempt 2 in")
    assert hops[1]["paigeant.reason"] == (
        "step 'flaky' failed: retries exhausted after 2 attempts: RetryActivity: the provider is down"
    )
    activities = [span for span in spans if span["name"] == "paigeant.activity"]
    assert [span["attributes"]["paigeant.outcome"] for span in activities] == ["retry", "retry"]
    assert [event["name"] for event in activities[0]["events"]] == ["exception"]


async def test_a_rejected_message_has_a_hop_span_with_the_reason(
    capfire: CaptureLogfire, transport: InMemoryTransport
) -> None:
    await transport.publish("fetch", b"not json")
    await Worker(transport, [fetch]).run(burst=True)

    [hop] = capfire.exporter.exported_spans_as_dict()
    assert hop["name"] == "paigeant.hop"
    assert hop["attributes"]["paigeant.outcome"] == "rejected"
    assert hop["attributes"]["paigeant.reason"].startswith("malformed JSON")


async def test_no_token_or_signature_is_ever_on_a_span(
    capfire: CaptureLogfire, transport: InMemoryTransport, instrumented_agents: None
) -> None:
    summarize = summarizer()
    await WorkflowDispatcher(transport).dispatch_workflow(
        [fetch, summarize], obo_token="secret-obo-token", correlation_id="wf-secret"
    )
    async with await transport.consume("fetch") as consumer:  # closing gives the message back
        signature = PaigeantMessage.from_json((await anext(consumer)).body).security.jws_signature
    assert signature
    await Worker(transport, [fetch, summarize]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    assert any(span["name"] == "invoke_agent summarize" for span in spans)
    exported = json.dumps(spans, default=str)
    assert "secret-obo-token" not in exported
    assert signature.split(".")[-1] not in exported


async def test_a_workflow_that_waits_and_resumes_stays_one_trace(
    capfire: CaptureLogfire, transport: InMemoryTransport
) -> None:
    step = refunder()
    waiting = InMemoryWaitingStore()
    dispatcher = WorkflowDispatcher(transport, waiting_store=waiting)
    await dispatcher.dispatch_workflow([step], correlation_id="wf-resume")
    await Worker(transport, [step], waiting_store=waiting).run(burst=True)
    resume_id = (await dispatcher.parked("wf-resume")).resume_message_id()  # derived from the signed record
    await dispatcher.resume("wf-resume", approve_all=True, approver="ana")
    await Worker(transport, [step], waiting_store=waiting).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    assert {span["context"]["trace_id"] for span in spans} == {1}
    assert span_tree(spans) == snapshot(
        [
            {
                "name": "paigeant.dispatch",
                "trace": 1,
                "correlation_id": "wf-resume",
                "paigeant.activity": "refund-order",
                "paigeant.step": 0,
                "paigeant.attempt": 0,
                "paigeant.message_id": "765baa79-5479-4797-c5eb-71ab94ec8c6e",
                "paigeant.outcome": "sent",
                "children": [
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-resume",
                        "paigeant.activity": "refund-order",
                        "paigeant.step": 0,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": "765baa79-5479-4797-c5eb-71ab94ec8c6e",
                        "paigeant.outcome": "waiting",
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-resume",
                                "paigeant.activity": "refund-order",
                                "paigeant.step": 0,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": "765baa79-5479-4797-c5eb-71ab94ec8c6e",
                                "paigeant.outcome": "waiting",
                            }
                        ],
                    },
                    {
                        "name": "paigeant.resume",
                        "trace": 1,
                        "correlation_id": "wf-resume",
                        "paigeant.activity": "refund-order",
                        "paigeant.step": 0,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": Is(resume_id),
                        "paigeant.outcome": "sent",
                        "links": ["sender: paigeant.hop refund-order (waiting)"],
                    },
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-resume",
                        "paigeant.activity": "refund-order",
                        "paigeant.step": 0,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": Is(resume_id),
                        "paigeant.outcome": "completed",
                        "paigeant.workflow_outcome": "completed",
                        "links": ["sender: paigeant.resume refund-order (sent)"],
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-resume",
                                "paigeant.activity": "refund-order",
                                "paigeant.step": 0,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": Is(resume_id),
                                "paigeant.outcome": "completed",
                            }
                        ],
                    },
                ],
            }
        ]
    )


async def test_a_replayed_dead_letter_continues_the_trace_of_the_hop_that_faulted(
    capfire: CaptureLogfire, transport: InMemoryTransport
) -> None:
    fixed = False

    @activity(name="create-account")
    async def create_account(ctx: ActivityContext) -> dict[str, bool]:
        if not fixed:
            raise NonRetryableError("address refused")
        return {"created": True}

    await WorkflowDispatcher(transport).dispatch_workflow([create_account], correlation_id="wf-replay")
    await Worker(transport, [create_account]).run(burst=True)
    fixed = True

    async def replay(letter: DeadLetter) -> bool:
        await replay_dead_letter(transport, letter, MessageSigner.from_settings(transport))
        return False

    assert await browse_dead_letters(transport, replay) == 1
    await Worker(transport, [create_account]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    assert {span["context"]["trace_id"] for span in spans} == {1}
    assert span_tree(spans) == snapshot(
        [
            {
                "name": "paigeant.dispatch",
                "trace": 1,
                "correlation_id": "wf-replay",
                "paigeant.activity": "create-account",
                "paigeant.step": 0,
                "paigeant.attempt": 0,
                "paigeant.message_id": "e4347b90-062b-47b5-8d7a-a356a3ab3225",
                "paigeant.outcome": "sent",
                "children": [
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-replay",
                        "paigeant.activity": "create-account",
                        "paigeant.step": 0,
                        "paigeant.attempt": 0,
                        "paigeant.message_id": "e4347b90-062b-47b5-8d7a-a356a3ab3225",
                        "paigeant.outcome": "faulted",
                        "paigeant.workflow_outcome": "faulted",
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-replay",
                                "paigeant.activity": "create-account",
                                "paigeant.step": 0,
                                "paigeant.attempt": 0,
                                "paigeant.message_id": "e4347b90-062b-47b5-8d7a-a356a3ab3225",
                                "paigeant.outcome": "failed",
                            }
                        ],
                    },
                    {
                        "name": "paigeant.replay",
                        "trace": 1,
                        "correlation_id": "wf-replay",
                        "paigeant.activity": "create-account",
                        "paigeant.step": 0,
                        "paigeant.attempt": 1,
                        "paigeant.message_id": "9533f7d9-4abc-4dc6-18de-39c8c26cf97a",
                        "paigeant.outcome": "sent",
                        "links": ["sender: paigeant.hop create-account (faulted)"],
                    },
                    {
                        "name": "paigeant.hop",
                        "trace": 1,
                        "correlation_id": "wf-replay",
                        "paigeant.activity": "create-account",
                        "paigeant.step": 0,
                        "paigeant.attempt": 1,
                        "paigeant.message_id": "9533f7d9-4abc-4dc6-18de-39c8c26cf97a",
                        "paigeant.outcome": "completed",
                        "paigeant.workflow_outcome": "completed",
                        "links": ["sender: paigeant.replay create-account (sent)"],
                        "children": [
                            {
                                "name": "paigeant.activity",
                                "trace": 1,
                                "correlation_id": "wf-replay",
                                "paigeant.activity": "create-account",
                                "paigeant.step": 0,
                                "paigeant.attempt": 1,
                                "paigeant.message_id": "9533f7d9-4abc-4dc6-18de-39c8c26cf97a",
                                "paigeant.outcome": "completed",
                            }
                        ],
                    },
                ],
            }
        ]
    )
