"""Workflows to datasets, and datasets replayed against a candidate: real workflows of the support example run
through a real worker, recorded from the status store, and replayed against new versions of its classifier."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from logfire.testing import CaptureLogfire
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from examples.support_ticket import TicketPriority
from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    InMemoryTransport,
    InMemoryWorkflowStore,
    NonRetryableError,
    Parallel,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai.evals import RecordedDataset, RecordedStep, load_dataset, record_dataset, replay_dataset
from paigeant_ai.exceptions import UserError

from .support_records import CHANGED, CUSTOMERS, OBO_TOKEN, changed_classifier, run_support_workflows, same_classifier

CLASSIFY = "classify-ticket-priority"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def support_store() -> AsyncIterator[InMemoryWorkflowStore]:
    """The status store of 20 workflows of the support example, run to their end by a real worker."""
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        await run_support_workflows(transport, on_event=store.apply)
    yield store


def classify_cases(dataset: RecordedDataset, customers: list[str]) -> set[str]:
    return {
        case.name or ""
        for case in dataset.cases
        if isinstance(case.inputs, RecordedStep)
        and case.inputs.activity == CLASSIFY
        and case.inputs.payload["customer"] in customers
    }


async def test_a_changed_classifier_regresses_on_exactly_the_five_tickets_it_answers_differently(
    support_store: InMemoryWorkflowStore, tmp_path: Path
) -> None:
    recorded = await record_dataset(support_store)
    recorded.to_file(tmp_path / "support.yaml")
    dataset = load_dataset(tmp_path / "support.yaml")
    kinds = [case.inputs.kind for case in dataset.cases]
    assert (kinds.count("step"), kinds.count("workflow")) == (40, 20)  # the classifier and the reply, per workflow

    changed = await replay_dataset(dataset, {CLASSIFY: changed_classifier})

    assert set(changed.regressions) == classify_cases(dataset, CHANGED)
    assert len(changed.regressions) == 5
    for reasons in changed.regressions.values():
        assert reasons == ["FieldsMatch: priority: expected 'normal', got 'low'"]
    assert len(changed.report.cases) == 20
    assert changed.skipped == 40  # the replies and the workflows
    assert "5 of 20 replayed cases regressed" in changed.render()

    same = await replay_dataset(dataset, {CLASSIFY: same_classifier})
    assert same.regressions == {}
    assert "0 of 20 replayed cases regressed" in same.render()


async def test_a_step_case_holds_the_rendered_prompt_the_payload_it_saw_its_output_and_its_tool_calls(
    support_store: InMemoryWorkflowStore,
) -> None:
    dataset = await record_dataset(support_store)
    by_name = {case.name: case for case in dataset.cases}
    [urgent] = [
        case
        for case in dataset.cases
        if isinstance(case.inputs, RecordedStep) and case.inputs.activity == CLASSIFY
        if case.inputs.payload["customer"] == "C03"
    ]
    assert isinstance(urgent.inputs, RecordedStep)
    assert urgent.inputs.prompt == "Classify this support ticket: urgent: customer C03 was charged twice this month"
    assert urgent.inputs.payload == {"ticket": "urgent: customer C03 was charged twice this month", "customer": "C03"}
    assert urgent.expected_output == {"priority": "urgent", "category": "general"}
    assert urgent.metadata is not None
    assert urgent.metadata["tool_calls"] == ["add_steps"]  # the follow-up call

    correlation_id = urgent.metadata["correlation_id"]
    reply = by_name[f"{correlation_id}:3:generate-response"]
    assert isinstance(reply.inputs, RecordedStep)
    assert reply.inputs.payload["specialist"] == "first-line support"
    assert reply.metadata is not None
    assert reply.metadata["tool_calls"] == ["send_response"]  # approved, then sent
    workflow = by_name[correlation_id]
    assert workflow.inputs.kind == "workflow"
    assert workflow.inputs.model_dump()["plan"] == [
        CLASSIFY,
        "route-to-specialist",
        "research-customer-history",
        "generate-response",
        "schedule-follow-up",
    ]
    assert isinstance(workflow.expected_output, dict)
    assert workflow.expected_output["follow_up"] == "call customer C03 tomorrow at 09:00"


async def test_no_token_or_signature_reaches_the_dataset(support_store: InMemoryWorkflowStore, tmp_path: Path) -> None:
    seen: list[str] = []

    def prompt(ctx: ActivityContext) -> str:
        seen.append(str(ctx.message.security.jws_signature))
        return f"Token {ctx.message.security.obo_token}, signature {ctx.message.security.jws_signature}"

    leaky = AgentActivity(Agent(TestModel(custom_output_text="done"), name="leaky"), prompt=prompt)
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([leaky], obo_token=OBO_TOKEN)
        await Worker(transport, [leaky], on_event=store.apply).run(burst=True)
    dataset = await record_dataset(store)
    dataset.to_file(tmp_path / "leaky.json")

    text = (tmp_path / "leaky.json").read_text()
    assert OBO_TOKEN not in text
    assert seen[0] != "None"
    assert seen[0] not in text
    [step] = [case for case in dataset.cases if isinstance(case.inputs, RecordedStep)]
    assert isinstance(step.inputs, RecordedStep)
    assert step.inputs.prompt == "Token [redacted], signature [redacted]"
    recorded = await record_dataset(support_store)
    recorded.to_file(tmp_path / "support.yaml")
    assert OBO_TOKEN not in (tmp_path / "support.yaml").read_text()


async def test_redacted_fields_leave_the_payloads_outputs_and_prompts(support_store: InMemoryWorkflowStore) -> None:
    dataset = await record_dataset(support_store, redact=["ticket", "classification.category"])

    for case in dataset.cases:
        if isinstance(case.inputs, RecordedStep):
            assert case.inputs.payload["ticket"] == "[redacted]"
            assert "customer C" not in (case.inputs.prompt or "")
            if case.inputs.activity == CLASSIFY:
                assert isinstance(case.expected_output, dict)
                assert case.expected_output["category"] == "[redacted]"
            else:
                assert case.inputs.payload["classification"] == {"priority": "normal", "category": "[redacted]"} or (
                    case.inputs.payload["classification"] == {"priority": "urgent", "category": "[redacted]"}
                )
        else:
            assert isinstance(case.expected_output, dict)
            assert case.expected_output["ticket"] == "[redacted]"


async def test_filters_by_activity_state_and_time(support_store: InMemoryWorkflowStore) -> None:
    only = await record_dataset(support_store, activities=["generate-response"])
    assert {case.inputs.activity for case in only.cases if isinstance(case.inputs, RecordedStep)} == {
        "generate-response"
    }
    assert len(only.cases) == 40

    assert (await record_dataset(support_store, since=datetime.now(UTC) + timedelta(minutes=1))).cases == []
    assert (await record_dataset(support_store, until=datetime.now(UTC) - timedelta(hours=1))).cases == []
    assert len((await record_dataset(support_store, since=datetime.now(UTC) - timedelta(hours=1))).cases) == 60
    assert (await record_dataset(support_store, states=["faulted"])).cases == []
    with pytest.raises(UserError, match="use final states"):
        await record_dataset(support_store, states=["running"])


async def test_faulted_workflows_are_recorded_only_when_asked_for() -> None:
    @activity(name="fail")
    async def fail(ctx: ActivityContext) -> None:
        raise NonRetryableError("the CRM is down")

    step = AgentActivity(Agent(TestModel(custom_output_text="ok"), name="answer"))
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport)
        await dispatcher.dispatch_workflow([step], {"n": 1})
        await dispatcher.dispatch_workflow([step, fail], {"n": 2})
        await Worker(transport, [step, fail], on_event=store.apply).run(burst=True)

    completed = await record_dataset(store)
    assert [case.expected_output for case in completed.cases] == ["ok", {"n": 1, "answer": "ok"}]
    faulted = await record_dataset(store, states=["faulted"])
    assert [case.inputs.kind for case in faulted.cases] == ["step", "workflow"]
    assert faulted.cases[0].metadata is not None
    assert completed.cases[0].metadata is not None
    assert faulted.cases[0].metadata["correlation_id"] != completed.cases[0].metadata["correlation_id"]


async def test_a_record_over_its_bound_keeps_its_size_only_and_is_left_out() -> None:
    bounded = AgentActivity(Agent(TestModel(custom_output_text="ok"), name="bounded"), record=300)
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport)
        await dispatcher.dispatch_workflow([bounded], {"text": "small"})
        await dispatcher.dispatch_workflow([bounded], {"text": "x" * 1000})
        await Worker(transport, [bounded], on_event=store.apply).run(burst=True)

    statuses = await store.list()
    records = [event.record for status in statuses for event in status.events if event.record is not None]
    assert sorted(record.omitted or 0 for record in records)[0] == 0
    [big] = [record for record in records if record.omitted]
    assert big.omitted is not None
    assert big.omitted > 1000
    assert (big.inputs, big.prompt, big.output) == ({}, None, None)
    dataset = await record_dataset(store)
    steps = [case for case in dataset.cases if isinstance(case.inputs, RecordedStep)]
    assert [case.inputs.payload for case in steps if isinstance(case.inputs, RecordedStep)] == [{"text": "small"}]


async def test_an_agent_without_the_steps_toolset_calls_other_tools_and_a_schema_change_is_caught(
    support_store: InMemoryWorkflowStore,
) -> None:
    def plain(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"priority": "urgent", "category": "x"})])

    class Renamed(BaseModel):
        urgency: str

    def renamed(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('{"urgency": "high"}')])

    dataset = await record_dataset(support_store, activities=[CLASSIFY])
    no_revisions = Agent(FunctionModel(plain), output_type=TicketPriority)  # run on the recorded prompt
    report = await replay_dataset(dataset, {CLASSIFY: no_revisions})
    urgent = classify_cases(dataset, [customer for customer in CUSTOMERS if int(customer[1:]) % 3 == 0])
    assert len(report.regressions) == 20
    for name in urgent:
        assert "SameToolCalls: called [], the recorded run ['add_steps']" in report.regressions[name]

    report = await replay_dataset(dataset, {CLASSIFY: Agent(FunctionModel(renamed), output_type=Renamed)})
    some = next(iter(report.regressions.values()))
    assert any(
        reason.startswith("FieldsMatch: priority: missing; category: missing; urgency: not in") for reason in some
    )


async def test_a_candidate_that_fails_or_waits_for_approval_is_a_regression(
    support_store: InMemoryWorkflowStore,
) -> None:
    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError("the new prompt broke the model")

    dataset = await record_dataset(support_store, activities=[CLASSIFY])
    report = await replay_dataset(dataset, {CLASSIFY: Agent(FunctionModel(broken), output_type=TicketPriority)})
    assert len(report.regressions) == 20
    assert all("the new prompt broke the model" in reasons[0] for reasons in report.regressions.values())

    with pytest.raises(UserError, match="no steps of \\['classify'\\]"):
        await replay_dataset(dataset, {"classify": same_classifier})


async def test_the_replay_runs_in_a_span_with_pydantic_evals_spans_inside(
    support_store: InMemoryWorkflowStore, capfire: CaptureLogfire
) -> None:
    dataset = await record_dataset(support_store, activities=[CLASSIFY])
    await replay_dataset(dataset, {CLASSIFY: changed_classifier})

    spans = capfire.exporter.exported_spans_as_dict()
    [replay] = [span for span in spans if span["name"] == "paigeant.evals.replay"]
    [evaluate] = [span for span in spans if span["name"] == "evaluate {name}"]
    assert evaluate["parent"]["span_id"] == replay["context"]["span_id"]
    assert evaluate["attributes"]["dataset_name"] == "recorded-workflows"
    cases = [span for span in spans if span["name"] == "case: {case_name}"]
    assert len(cases) == 20
    failed: list[Any] = [
        span for span in cases if '"value":false' in str(span["attributes"].get("assertions", "")).replace(" ", "")
    ]
    assert len(failed) == 5


async def test_the_branches_of_a_parallel_group_are_recorded_each_under_its_key() -> None:
    first = AgentActivity(Agent(TestModel(custom_output_text="one"), name="summarize"), prompt="Part {part}")
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        cid = await WorkflowDispatcher(transport).dispatch_workflow(
            [Parallel("summarize", "summarize", keys=["left", "right"])], {"part": 1}
        )
        await Worker(transport, [first], on_event=store.apply).run(burst=True)

    dataset = await record_dataset(store)
    steps = sorted((case.name or "", case.expected_output) for case in dataset.cases if case.inputs.kind == "step")
    assert steps == [(f"{cid}:0:left:summarize", "one"), (f"{cid}:0:right:summarize", "one")]
