"""One workflow across three worker processes on the real Redis is one trace, its hops side by side.

Each worker runs as `paigeant worker tests.test_observability_processes:make_worker`, one activity per process,
and exports its spans to a file of its own through the OpenTelemetry SDK, set up by `make_worker` (the library
never configures tracing). The test dispatches in its own process, under `capfire`, then joins the files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from inline_snapshot import snapshot
from logfire.testing import CaptureLogfire
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.instrumented import InstrumentationSettings

from paigeant_ai import ActivityContext, AgentActivity, Worker, WorkflowDispatcher, activity
from paigeant_ai.transports.redis import RedisTransport

from .brokers import REDIS_URL, delete_redis_namespace, require_redis
from .span_files import JsonLinesExporter

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ACTIVITY_ENV = "PAIGEANT_TEST_ACTIVITY"
SPAN_FILE_ENV = "PAIGEANT_TEST_SPAN_FILE"
STEPS = ("fetch", "summarize", "publish")


# -- what each worker process runs ---------------------------------------------------------------------------


@activity
async def fetch(ctx: ActivityContext) -> dict[str, str]:
    return {"document": "a long document"}


@activity
async def publish(ctx: ActivityContext) -> dict[str, bool]:
    return {"published": True}


def summarizer() -> AgentActivity[None, str]:
    def summarize(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("a short summary")])

    agent = Agent(FunctionModel(summarize, model_name="summarizer-model"), name="summarize")
    return AgentActivity(agent, prompt="Summarize {document}")


class CorrelationIdFromBaggage(SpanProcessor):
    """Copies the `correlation_id` baggage onto every span, as Logfire does for all baggage."""

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        value = baggage.get_baggage("correlation_id", parent_context)
        if isinstance(value, str):
            span.set_attribute("correlation_id", value)


def make_worker() -> Worker:
    """The worker of one process: the activity named by PAIGEANT_TEST_ACTIVITY, spans to PAIGEANT_TEST_SPAN_FILE."""
    provider = TracerProvider()
    provider.add_span_processor(CorrelationIdFromBaggage())
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(os.environ[SPAN_FILE_ENV], process=os.environ[ACTIVITY_ENV]))
    )
    trace.set_tracer_provider(provider)
    Agent.instrument_all(InstrumentationSettings(tracer_provider=provider))
    steps = {"fetch": fetch, "summarize": summarizer(), "publish": publish}
    return Worker(RedisTransport(), [steps[os.environ[ACTIVITY_ENV]]])


# -- the test ------------------------------------------------------------------------------------------------


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    require_redis()
    name = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_redis_namespace(name)


@pytest.fixture
def workers(namespace: str, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """One `paigeant worker` process per step; the span file of each."""
    paigeant = Path(sys.executable).with_name("paigeant")
    root = Path(__file__).resolve().parents[1]
    files = {step: tmp_path / f"{step}.jsonl" for step in STEPS}
    processes: list[subprocess.Popen[bytes]] = []
    for step, file in files.items():
        env = {
            **os.environ,
            "PAIGEANT_TRANSPORT": "redis",
            "PAIGEANT_REDIS_URL": REDIS_URL,
            "PAIGEANT_NAMESPACE": namespace,
            "PAIGEANT_ALLOW_UNSIGNED": "1",
            ACTIVITY_ENV: step,
            SPAN_FILE_ENV: str(file),
        }
        command = [str(paigeant), "worker", f"{__name__}:make_worker"]
        processes.append(subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE))
    try:
        yield files
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stderr is not None
            process.stderr.close()


def read_spans(files: dict[str, Path]) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for file in files.values():
        if file.exists():
            spans.extend(json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line)
    return spans


def wait_for_completion(files: dict[str, Path], timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = read_spans(files)
        if any(span["attributes"].get("paigeant.workflow_outcome") == "completed" for span in spans):
            return spans
        time.sleep(0.1)
    raise AssertionError(f"the workflow did not complete in {timeout:g}s; spans so far: {read_spans(files)}")


async def test_a_workflow_across_three_processes_is_one_trace(
    capfire: CaptureLogfire, namespace: str, workers: dict[str, Path]
) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        dispatcher = WorkflowDispatcher(transport, allow_unsigned=True)
        await dispatcher.dispatch_workflow(["fetch", "summarize", "publish"], correlation_id="wf-procs")
    [dispatch] = capfire.exporter.exported_spans_as_dict()
    dispatched: dict[str, Any] = {
        "name": dispatch["name"],
        "trace_id": f"{dispatch['context']['trace_id']:032x}",
        "span_id": f"{dispatch['context']['span_id']:016x}",
        "parent_id": None,
        "links": [],
        "attributes": dispatch["attributes"],
        "process": "test",
    }

    spans = [dispatched, *wait_for_completion(workers)]
    assert {span["trace_id"] for span in spans} == {dispatched["trace_id"]}
    assert all(span["attributes"].get("correlation_id") == "wf-procs" for span in spans)

    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        children[span["parent_id"]].append(span)

    def tree(span: dict[str, Any]) -> list[Any]:
        below = sorted((tree(child) for child in children[span["span_id"]]), key=str)
        return [f"{span['name']} ({span['process']})", *below]

    assert [tree(root) for root in children[None]] == snapshot(
        [
            [
                "paigeant.dispatch (test)",
                ["paigeant.hop (fetch)", ["paigeant.activity (fetch)"]],
                ["paigeant.hop (publish)", ["paigeant.activity (publish)"]],
                [
                    "paigeant.hop (summarize)",
                    [
                        "paigeant.activity (summarize)",
                        ["invoke_agent summarize (summarize)", ["chat summarizer-model (summarize)"]],
                    ],
                ],
            ]
        ]
    )
    # Each hop links to the hop that sent it, across processes.
    by_id = {span["span_id"]: span for span in spans}
    hops = sorted(
        (span for span in spans if span["name"] == "paigeant.hop"), key=lambda span: STEPS.index(span["process"])
    )
    assert [[by_id[link]["process"] for link in hop["links"]] for hop in hops] == [[], ["fetch"], ["summarize"]]
