"""The shape of a workflow's trace: hops side by side under the dispatch, linked in order, read from signed bytes."""

from __future__ import annotations

from typing import Any

import logfire
from inline_snapshot import snapshot
from logfire.testing import CaptureLogfire

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    PaigeantMessage,
    RetryActivity,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai.approval import InMemoryWaitingStore
from paigeant_ai.observability import LINK_HEADER, inject_context

from .scripted import refunder
from .test_observability import FAST, fetch, publish, span_tree


def traceparent(span: logfire.LogfireSpan, *, span_id: int | None = None) -> str:
    """The W3C `traceparent` of a Logfire span (or of another span id in its trace)."""
    found = span.get_span_context()
    assert found is not None
    return f"00-{found.trace_id:032x}-{span_id or found.span_id:016x}-01"


async def test_a_workflow_with_an_agent_step_and_a_resume_is_flat(capfire: CaptureLogfire) -> None:
    step = refunder()
    waiting = InMemoryWaitingStore()
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport, waiting_store=waiting)
        await dispatcher.dispatch_workflow([fetch, step, publish], correlation_id="wf-flat")
        await Worker(transport, [fetch, step, publish], waiting_store=waiting).run(burst=True)
        with logfire.span("POST /approvals/wf-flat"):  # the request that answers the approval
            await dispatcher.resume("wf-flat", approve_all=True, approver="ana")
        await Worker(transport, [fetch, step, publish], waiting_store=waiting).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    outline = [
        {
            "name": node["name"],
            "trace": node["trace"],
            **({"children": [_outline(child) for child in node["children"]]} if "children" in node else {}),
        }
        for node in span_tree(spans)
    ]
    assert outline == snapshot(
        [
            {
                "name": "paigeant.dispatch",
                "trace": 1,
                "children": [
                    {"hop": "paigeant.hop fetch (completed)", "activity": ["completed"]},
                    {
                        "hop": "paigeant.hop refund-order (waiting)",
                        "links": ["sender: paigeant.hop fetch (completed)"],
                        "activity": ["waiting"],
                    },
                    {
                        "hop": "paigeant.resume refund-order (sent)",
                        "links": ["sender: paigeant.hop refund-order (waiting)", "caller: POST /approvals/wf-flat"],
                    },
                    {
                        "hop": "paigeant.hop refund-order (completed)",
                        "links": ["sender: paigeant.resume refund-order (sent)"],
                        "activity": ["completed"],
                    },
                    {
                        "hop": "paigeant.hop publish (completed)",
                        "links": ["sender: paigeant.hop refund-order (completed)"],
                        "activity": ["completed"],
                    },
                ],
            },
            {"name": "POST /approvals/wf-flat", "trace": 2},
        ]
    )


def _outline(node: dict[str, Any]) -> dict[str, Any]:
    """A child of the dispatch: its label, links, and the outcomes of the activity spans below it."""
    name = f"{node['name']} {node.get('paigeant.activity', '')} ({node.get('paigeant.outcome', '-')})"
    outline: dict[str, Any] = {"hop": name}
    if "links" in node:
        outline["links"] = node["links"]
    if "children" in node:
        outline["activity"] = [child.get("paigeant.outcome") for child in node["children"]]
    return outline


async def test_hop_and_dispatch_attributes_follow_the_messaging_conventions(capfire: CaptureLogfire) -> None:
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([fetch], correlation_id="wf-semconv")
        await Worker(transport, [fetch]).run(burst=True)

    spans = {span["name"]: span["attributes"] for span in capfire.exporter.exported_spans_as_dict()}
    keys = (
        "messaging.system",
        "messaging.operation.type",
        "messaging.operation.name",
        "messaging.destination.name",
        "messaging.message.id",
        "messaging.message.conversation_id",
        "paigeant.message_id",
    )
    assert {name: {key: spans[name][key] for key in keys} for name in ("paigeant.dispatch", "paigeant.hop")} == (
        snapshot(
            {
                "paigeant.dispatch": {
                    "messaging.system": "inmemory",
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "dispatch",
                    "messaging.destination.name": "fetch",
                    "messaging.message.id": "a273c19b-398a-fbd5-b64e-3c38d0dd24f6",
                    "messaging.message.conversation_id": "wf-semconv",
                    "paigeant.message_id": "a273c19b-398a-fbd5-b64e-3c38d0dd24f6",
                },
                "paigeant.hop": {
                    "messaging.system": "inmemory",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": "fetch",
                    "messaging.message.id": "a273c19b-398a-fbd5-b64e-3c38d0dd24f6",
                    "messaging.message.conversation_id": "wf-semconv",
                    "paigeant.message_id": "a273c19b-398a-fbd5-b64e-3c38d0dd24f6",
                },
            }
        )
    )
    assert spans["paigeant.hop"]["messaging.message.body.size"] > 0


async def test_a_retry_is_a_sibling_hop_linked_to_the_attempt_before_with_the_wire_attempt(
    capfire: CaptureLogfire,
) -> None:
    @activity(name="flaky", retry=FAST)
    async def flaky(ctx: ActivityContext) -> None:
        raise RetryActivity("the provider is down")

    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([flaky], correlation_id="wf-retry")
        await Worker(transport, [flaky]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    [dispatch] = [span for span in spans if span["name"] == "paigeant.dispatch"]
    first, second = [span for span in spans if span["name"] == "paigeant.hop"]
    assert first["parent"]["span_id"] == second["parent"]["span_id"] == dispatch["context"]["span_id"]
    assert "links" not in first
    assert [link["context"]["span_id"] for link in second["links"]] == [first["context"]["span_id"]]
    # 0-based, as the message's `attempt`: the first try is 0, the first retry 1; titles say "retry n".
    assert [hop["attributes"]["paigeant.attempt"] for hop in (first, second)] == [0, 1]
    titles = [span["attributes"]["logfire.msg"] for span in spans if span["name"] == "paigeant.activity"]
    assert titles == ["activity flaky (step 0)", "activity flaky (step 0, retry 1)"]


async def test_trace_context_in_broker_headers_is_never_read(capfire: CaptureLogfire) -> None:
    with logfire.span("victim") as victim_span:
        victim = traceparent(victim_span)
    forged = {"traceparent": victim, LINK_HEADER: victim, "baggage": "correlation_id=victim"}
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([fetch], correlation_id="wf-headers")
        async with await transport.consume("fetch") as consumer:
            delivery = await anext(consumer)
            await transport.ack(delivery)
        await transport.publish("fetch", delivery.body, headers=forged)  # signed body, forged broker headers
        await Worker(transport, [fetch]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    [dispatch] = [span for span in spans if span["name"] == "paigeant.dispatch"]
    [hop] = [span for span in spans if span["name"] == "paigeant.hop"]
    assert hop["attributes"]["paigeant.outcome"] == "completed"
    assert hop["parent"] == dispatch["context"] | {"is_remote": True}
    assert "links" not in hop
    assert hop["attributes"]["correlation_id"] == "wf-headers"


async def test_a_forged_body_cannot_graft_a_span_onto_a_workflow_trace(capfire: CaptureLogfire) -> None:
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([fetch], correlation_id="wf-victim")
        async with await transport.consume("fetch") as consumer:
            delivery = await anext(consumer)
            await transport.ack(delivery)
        message = PaigeantMessage.from_json(delivery.body)
        message.headers[LINK_HEADER] = message.headers["traceparent"]
        message.payload["amount"] = 1_000_000  # altered after signing: the signature no longer holds
        await transport.publish("fetch", message.to_json(), headers=dict(message.headers))
        await Worker(transport, [fetch]).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    [dispatch] = [span for span in spans if span["name"] == "paigeant.dispatch"]
    [hop] = [span for span in spans if span["name"] == "paigeant.hop"]
    assert hop["attributes"]["paigeant.outcome"] == "rejected"
    assert hop["attributes"]["paigeant.reason"].startswith("security check failed")
    assert hop["parent"] is None
    assert "links" not in hop
    assert hop["context"]["trace_id"] != dispatch["context"]["trace_id"]
    assert "correlation_id" not in hop["attributes"]


async def test_inject_keeps_the_workflow_root_and_links_the_sender(capfire: CaptureLogfire) -> None:
    with logfire.span("root") as root_span:
        pass
    root = {"traceparent": traceparent(root_span, span_id=1), "x-other": "kept"}
    with logfire.span("sender") as sender:
        headers = inject_context(root, "wf-inject")
        fresh = inject_context({}, "wf-fresh")
    sent = traceparent(sender)
    assert headers == {**root, LINK_HEADER: sent, "baggage": "correlation_id=wf-inject"}
    assert fresh == {"traceparent": sent, "baggage": "correlation_id=wf-fresh"}  # no root yet: the sender is it


async def test_a_workflow_dispatched_untraced_is_rooted_at_its_first_traced_hop(capfire: CaptureLogfire) -> None:
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport, allow_unsigned=True).dispatch_workflow(
            [fetch, publish], correlation_id="wf-untraced"
        )
        async with await transport.consume("fetch") as consumer:
            delivery = await anext(consumer)
            await transport.ack(delivery)
        message = PaigeantMessage.from_json(delivery.body)
        message.headers = {}  # as a dispatcher without a tracer provider sends it
        await transport.publish("fetch", message.to_json())
        capfire.exporter.clear()
        await Worker(transport, [fetch, publish], allow_unsigned=True).run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    first, second = [span for span in spans if span["name"] == "paigeant.hop"]
    assert first["parent"] is None
    assert second["parent"]["span_id"] == first["context"]["span_id"]
    assert {span["context"]["trace_id"] for span in spans} == {first["context"]["trace_id"]}


async def test_a_replayed_hop_is_refused_in_a_trace_of_its_own(capfire: CaptureLogfire) -> None:
    """Whoever can write to the broker can replay an old hop; it is refused without touching the workflow's trace."""
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([fetch], correlation_id="wf-replayed")
        async with await transport.consume("fetch") as consumer:
            body = (await anext(consumer)).body  # closing gives the message back
        worker = Worker(transport, [fetch])
        await worker.run(burst=True)
        await transport.publish("fetch", body)  # the same signed hop, sent again
        await worker.run(burst=True)

    spans = capfire.exporter.exported_spans_as_dict()
    [dispatch] = [span for span in spans if span["name"] == "paigeant.dispatch"]
    ran, replayed = [span for span in spans if span["name"] == "paigeant.hop"]
    assert replayed["attributes"]["paigeant.outcome"] == "rejected"
    assert ran["parent"]["span_id"] == dispatch["context"]["span_id"]
    assert replayed["parent"] is None
    assert replayed["context"]["trace_id"] != dispatch["context"]["trace_id"]
