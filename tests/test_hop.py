"""The hop's stages: the successor is safe before every ack, each check runs once, and the knots stay untied."""

from __future__ import annotations

import ast
import inspect
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset
from pydantic_ai.models.test import TestModel

import paigeant_ai.activity
from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    InMemoryTransport,
    NonRetryableError,
    PaigeantMessage,
    RetryActivity,
    RetryPolicy,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    approval,
    exceptions,
)
from paigeant_ai.exceptions import DuplicateMessage, ReplayedMessage, SecurityError
from paigeant_ai.security import MessageSecurity, MessageSigner
from paigeant_ai.store import project
from paigeant_ai.transports.base import Delivery

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0)


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


def record_settling(transport: InMemoryTransport, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """What the transport is asked to do, in order: publishing (events by kind) and acking, by address."""
    log: list[tuple[str, str]] = []
    publish, ack = transport.publish, transport.ack

    async def recording_publish(address: str, body: Any, **kwargs: Any) -> None:
        if address == "events":
            kinds = [kind for kind in ("completed", "faulted") if f'"kind":"{kind}"'.encode() in body]
            log.extend(("publish", f"events:{kind}") for kind in kinds)
        else:
            log.append(("publish", address))
        await publish(address, body, **kwargs)

    async def recording_ack(delivery: Delivery) -> None:
        log.append(("ack", delivery.address))
        await ack(delivery)

    monkeypatch.setattr(transport, "publish", recording_publish)
    monkeypatch.setattr(transport, "ack", recording_ack)
    return log


@activity(retry=FAST)
async def flaky(ctx: ActivityContext) -> dict[str, int]:
    if ctx.attempt == 0:
        raise RetryActivity("not yet", delay=0.01)
    return {"tries": ctx.attempt + 1}


@activity
async def last(ctx: ActivityContext) -> dict[str, bool]:
    return {"done": True}


@activity
async def refuse(ctx: ActivityContext) -> None:
    raise NonRetryableError("never")


async def test_nothing_is_acked_before_its_successor_is_published(
    transport: InMemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_settling(transport, monkeypatch)
    dispatcher = WorkflowDispatcher(transport)
    await dispatcher.dispatch_workflow(["flaky", "last"])
    await Worker(transport, [flaky, last, refuse], concurrency=1).run(burst=True)

    assert log == [
        ("publish", "flaky"),  # the dispatch
        ("publish", "flaky"),  # the retry ...
        ("ack", "flaky"),  # ... before the first attempt is acked
        ("publish", "last"),
        ("ack", "flaky"),
        ("publish", "events:completed"),  # the result, the last step's successor
        ("ack", "last"),
    ]

    log.clear()
    await dispatcher.dispatch_workflow(["refuse"])
    await Worker(transport, [flaky, last, refuse], concurrency=1).run(burst=True)

    assert ("publish", "dead-letter") in log
    assert log.index(("publish", "dead-letter")) < log.index(("ack", "refuse"))


class CountingDedupe:
    def __init__(self) -> None:
        self.done: set[str] = set()
        self.checks = 0

    async def is_done(self, key: str) -> bool:
        self.checks += 1
        return key in self.done

    async def mark_done(self, key: str) -> None:
        self.done.add(key)


async def test_each_hop_asks_the_dedupe_store_once(transport: InMemoryTransport) -> None:
    dedupe = CountingDedupe()
    await WorkflowDispatcher(transport).dispatch_workflow(["flaky", "last"])
    await Worker(transport, [flaky, last], dedupe=dedupe).run(burst=True)

    assert dedupe.checks == 3  # flaky twice (the first attempt and its retry), last once
    assert len(dedupe.done) == 2


def test_a_benign_duplicate_is_not_a_security_error() -> None:
    assert not issubclass(DuplicateMessage, SecurityError)
    assert issubclass(ReplayedMessage, SecurityError)
    assert ReplayedMessage("replayed").code == "replayed"


def test_control_signals_and_the_security_protocol_live_in_one_place_each() -> None:
    assert approval.ParkWorkflow is exceptions.ParkWorkflow
    assert isinstance(MessageSigner, type)
    assert {"signature_for", "verify", "settled"} <= set(dir(MessageSecurity))


def test_activities_know_nothing_of_revisions_or_catalogs() -> None:
    tree = ast.parse(inspect.getsource(paigeant_ai.activity))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"revision", "catalog", "planner"}


async def test_an_agent_step_takes_toolsets_and_per_step_factories() -> None:
    seen: list[int] = []
    shared = FunctionToolset[Any](id="shared")

    @shared.tool_plain
    def shared_tool() -> str:
        """A tool every step has."""
        return "shared"

    def per_step(ctx: ActivityContext) -> FunctionToolset[Any]:
        toolset = FunctionToolset[Any](id="per-step")

        @toolset.tool_plain
        def note_step() -> str:
            """Note which step this is."""
            seen.append(ctx.step)
            return "noted"

        return toolset

    step = AgentActivity(Agent(TestModel(), name="helper"), toolsets=[shared, per_step])
    message = PaigeantMessage.new([ActivitySpec(name="helper")])
    ctx = ActivityContext(message=message, spec=step.spec)

    assert step.build_toolsets(ctx)[0] is shared
    output = await step.run(ctx)

    assert seen == [0]
    assert "shared_tool" in str(output)
    assert "note_step" in str(output)


def test_a_replay_from_the_dead_letter_queue_is_projected_as_the_workflow_running_again() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def event(kind: Any, seconds: int, **fields: Any) -> WorkflowEvent:
        at = start + timedelta(seconds=seconds)
        return WorkflowEvent(kind=kind, correlation_id="wf", activity="charge", step=0, at=at, **fields)

    faulted = [event("dispatched", 0), event("step_started", 1), event("step_failed", 2), event("faulted", 2)]
    status = project("wf", [*faulted, event("replayed", 3, attempt=1), event("step_started", 4, attempt=1)])

    assert status is not None
    assert (status.state, status.failure) == ("running", None)
    assert status.events[-2].kind == "replayed"


class _LongSignatures(MessageSigner):
    """Accepts every message and signs with a signature far longer than a real one: a retry cannot be sealed."""

    def __init__(self) -> None:
        super().__init__(unsigned=True)

    def signature_for(self, body: bytes) -> str:
        return "x" * 2000


async def test_a_retry_that_cannot_be_sealed_faults_the_workflow(transport: InMemoryTransport) -> None:
    @activity(retry=FAST)
    async def stubborn(ctx: ActivityContext) -> None:
        raise RetryActivity("not yet", delay=0.01)

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport, allow_unsigned=True).dispatch_workflow([stubborn], {"a": 1})
    worker = Worker(transport, [stubborn], security=_LongSignatures(), max_message_bytes=1500, on_event=events.append)
    await worker.run(burst=True)
    [faulted] = [event for event in events if event.kind == "faulted"]
    assert "over the limit of 1500" in (faulted.detail or "")
    assert worker.stats.faulted == 1
