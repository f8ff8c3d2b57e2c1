"""`WorkflowStore`: status and history by correlation ID, in memory and in the real Redis (DB 15)."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from dirty_equals import IsDatetime, IsFloat, IsStr
from inline_snapshot import snapshot

from paigeant_ai import (
    ActivityContext,
    EndWorkflow,
    InMemoryTransport,
    NonRetryableError,
    RetryActivity,
    RetryPolicy,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai.store import (
    InMemoryWorkflowStore,
    WorkflowProjector,
    WorkflowStore,
    project,
)
from paigeant_ai.transports.redis import RedisTransport, RedisWorkflowStore

from .brokers import REDIS_URL, delete_redis_namespace, require_redis

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0)


@activity
async def first(ctx: ActivityContext) -> dict[str, int]:
    return {"a": 1}


@activity
async def second(ctx: ActivityContext) -> dict[str, int]:
    return {"b": 2}


@activity(name="flaky-then-fine", retry=FAST)
async def flaky_then_fine(ctx: ActivityContext) -> dict[str, bool]:
    if ctx.attempt == 0:
        raise RetryActivity("not yet")
    return {"fine": True}


@activity(name="broken")
async def broken(ctx: ActivityContext) -> None:
    raise NonRetryableError("the customer does not exist")


@contextlib.asynccontextmanager
async def new_redis_store() -> AsyncGenerator[RedisWorkflowStore]:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            yield RedisWorkflowStore(transport, max_workflows=5, max_events=50)
    finally:
        await delete_redis_namespace(namespace)


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisWorkflowStore]:
    async with new_redis_store() as store:
        yield store


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[WorkflowStore]:
    if request.param == "memory":
        yield InMemoryWorkflowStore(max_workflows=5, max_events=50)
    else:
        async with new_redis_store() as store:
            yield store


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


async def test_a_completed_workflow(store: WorkflowStore, transport: InMemoryTransport) -> None:
    dispatcher = WorkflowDispatcher(transport, on_event=store.apply)
    correlation_id = await dispatcher.dispatch_workflow(
        [first, flaky_then_fine, second], {"start": True}, obo_token="secret-obo-token"
    )
    await Worker(transport, [first, flaky_then_fine, second], on_event=store.apply).run(burst=True)

    status = await store.get(correlation_id)
    assert status is not None
    assert status.model_dump(exclude={"events"}) == snapshot(
        {
            "correlation_id": IsStr(),
            "state": "completed",
            "current_step": None,
            "current_activity": None,
            "steps": [
                {
                    "step": 0,
                    "activity": "first",
                    "state": "completed",
                    "attempts": 1,
                    "started_at": IsDatetime(),
                    "finished_at": IsDatetime(),
                    "duration": IsFloat(),
                    "error": None,
                    "timeout": 300.0,
                    "version": IsStr(regex=r"0\+[0-9a-f]{8}"),
                },
                {
                    "step": 1,
                    "activity": "flaky-then-fine",
                    "state": "completed",
                    "attempts": 2,
                    "started_at": IsDatetime(),
                    "finished_at": IsDatetime(),
                    "duration": IsFloat(),
                    "error": "RetryActivity: not yet; attempt 2 in 0.01s",
                    "timeout": 300.0,
                    "version": IsStr(regex=r"0\+[0-9a-f]{8}"),
                },
                {
                    "step": 2,
                    "activity": "second",
                    "state": "completed",
                    "attempts": 1,
                    "started_at": IsDatetime(),
                    "finished_at": IsDatetime(),
                    "duration": IsFloat(),
                    "error": None,
                    "timeout": 300.0,
                    "version": IsStr(regex=r"0\+[0-9a-f]{8}"),
                },
            ],
            "remaining": [],
            "deadline": IsDatetime(),
            "started_at": IsDatetime(),
            "updated_at": IsDatetime(),
            "payload": {"start": True, "a": 1, "fine": True, "b": 2},
            "failure": None,
            "ended": None,
            "waiting_for": None,
        }
    )
    assert [event.kind for event in status.events] == snapshot(
        [
            "dispatched",
            "step_started",
            "step_completed",
            "step_started",
            "step_retried",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "completed",
        ]
    )
    assert "secret-obo-token" not in status.model_dump_json()
    assert "jws" not in status.model_dump_json()


async def test_a_faulted_workflow_says_why(store: WorkflowStore, transport: InMemoryTransport) -> None:
    correlation_id = await WorkflowDispatcher(transport, on_event=store.apply).dispatch_workflow([first, broken])
    await Worker(transport, [first, broken], on_event=store.apply).run(burst=True)

    status = await store.get(correlation_id)
    assert status is not None
    assert status.state == "faulted"
    assert status.failure == "step 'broken' failed: NonRetryableError: the customer does not exist"
    assert [(s.activity, s.state, s.attempts, s.error) for s in status.steps] == [
        ("first", "completed", 1, None),
        ("broken", "failed", 1, "NonRetryableError: the customer does not exist"),
    ]
    assert status.remaining == ["broken"]
    assert status.payload is None


async def test_a_running_workflow_knows_its_next_step(store: WorkflowStore, transport: InMemoryTransport) -> None:
    correlation_id = await WorkflowDispatcher(transport, on_event=store.apply).dispatch_workflow([first, second])
    pending = await store.get(correlation_id)
    assert pending is not None
    assert (pending.state, pending.current_step, pending.current_activity) == ("pending", 0, "first")

    await Worker(transport, [first], on_event=store.apply).run(burst=True)  # nobody runs `second` yet
    running = await store.get(correlation_id)
    assert running is not None
    assert (running.state, running.current_step, running.current_activity) == ("running", 1, "second")
    assert running.remaining == ["second"]


def events_of_a_waiting_workflow(correlation_id: str) -> list[WorkflowEvent]:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)

    def event(seconds: float, kind: str, **fields: object) -> WorkflowEvent:
        return WorkflowEvent.model_validate(
            {"kind": kind, "correlation_id": correlation_id, "at": t0 + timedelta(seconds=seconds), **fields}
        )

    return [
        event(0, "dispatched", activity="refund", step=0, remaining=["refund", "notify"]),
        event(1, "step_started", activity="refund", step=0, remaining=["refund", "notify"]),
        event(2, "waiting", activity="refund", step=0, detail="approval of a refund over 500 EUR"),
    ]


async def test_a_waiting_workflow_and_its_resumption(store: WorkflowStore) -> None:
    events = events_of_a_waiting_workflow("wf-wait")
    for event in events:
        await store.apply(event)
    status = await store.get("wf-wait")
    assert status is not None
    assert (status.state, status.current_activity, status.waiting_for) == (
        "waiting",
        "refund",
        "approval of a refund over 500 EUR",
    )
    assert status.steps[0].state == "waiting"

    resumed = events[-1].model_copy(update={"kind": "resumed", "at": events[-1].at + timedelta(seconds=60)})
    await store.apply(resumed)
    status = await store.get("wf-wait")
    assert status is not None
    assert (status.state, status.waiting_for, status.steps[0].state) == ("running", None, "running")


async def test_events_out_of_order_and_twice_give_the_same_status(
    store: WorkflowStore, transport: InMemoryTransport
) -> None:
    events: list[WorkflowEvent] = []

    async def keep(event: WorkflowEvent) -> None:
        events.append(event)

    correlation_id = await WorkflowDispatcher(transport, on_event=keep).dispatch_workflow([first, flaky_then_fine])
    await Worker(transport, [first, flaky_then_fine], on_event=keep).run(burst=True)

    shuffled = [*events, *events[:3]]
    random.Random(7).shuffle(shuffled)
    for event in shuffled:
        await store.apply(event)
    status = await store.get(correlation_id)
    assert status is not None
    assert status == project(correlation_id, events)
    assert status.state == "completed"
    assert len(status.events) == len(events)


async def test_list_shows_the_most_recent_workflows_first(store: WorkflowStore) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    for n in range(7):
        await store.apply(WorkflowEvent(kind="dispatched", correlation_id=f"wf-{n}", at=t0 + timedelta(seconds=n)))
    listed = await store.list(limit=3)
    assert [status.correlation_id for status in listed] == ["wf-6", "wf-5", "wf-4"]
    everything = await store.list(limit=100)
    assert len(everything) == 5  # max_workflows
    assert await store.get("wf-nope") is None


async def test_a_workflow_keeps_its_latest_events(store: WorkflowStore) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    for n in range(60):
        await store.apply(
            WorkflowEvent(
                kind="step_retried",
                correlation_id="wf-long",
                activity="a",
                step=0,
                attempt=n,
                at=t0 + timedelta(seconds=n),
            )
        )
    status = await store.get("wf-long")
    assert status is not None
    assert len(status.events) == 50
    assert status.events[0].attempt == 10


async def test_events_without_a_workflow_are_ignored(store: WorkflowStore) -> None:
    await store.apply(WorkflowEvent(kind="rejected", correlation_id=None, detail="malformed JSON"))
    assert await store.list() == []


async def test_the_projector_feeds_a_store_from_the_events_address(transport: InMemoryTransport) -> None:
    correlation_id = await WorkflowDispatcher(transport).dispatch_workflow([first, second])
    await Worker(transport, [first, second]).run(burst=True)
    await transport.publish("events", b"not an event")

    store = InMemoryWorkflowStore()
    projector = WorkflowProjector(transport, store)
    await projector.run(burst=True)

    status = await store.get(correlation_id)
    assert status is not None
    assert status.state == "completed"
    assert projector.applied == 6
    assert await transport.pending("events") == 0


async def test_redis_store_expires_and_forgets(redis_store: RedisWorkflowStore) -> None:
    redis_store.ttl = 0.05
    await redis_store.apply(WorkflowEvent(kind="dispatched", correlation_id="wf-short"))
    assert await redis_store.get("wf-short") is not None
    client = redis_store.transport.client
    assert await client.pttl(redis_store.events_key("wf-short")) > 0
    await client.delete(redis_store.events_key("wf-short"))
    assert await redis_store.list() == []
    assert await client.zcard(redis_store.index_key) == 0


async def test_a_workflow_ended_early_says_why(store: WorkflowStore, transport: InMemoryTransport) -> None:
    @activity(name="reserve-stock")
    async def reserve_stock(ctx: ActivityContext) -> None:
        raise EndWorkflow("out of stock", output={"reserved": False})

    correlation_id = await WorkflowDispatcher(transport, on_event=store.apply).dispatch_workflow(
        [reserve_stock, second]
    )
    await Worker(transport, [reserve_stock, second], on_event=store.apply).run(burst=True)
    status = await store.get(correlation_id)
    assert status is not None
    assert (status.state, status.ended, status.payload) == (
        "completed",
        "out of stock (skipped: second)",
        {"reserved": False},
    )


def test_a_compensation_in_doubt_and_resumed_keeps_why_the_workflow_stopped() -> None:
    from datetime import UTC, datetime, timedelta

    from paigeant_ai import WorkflowEvent
    from paigeant_ai._events import EventKind
    from paigeant_ai.store import project

    start = datetime(2026, 1, 1, tzinfo=UTC)
    steps: list[tuple[EventKind, int | None, str | None]] = [
        ("dispatched", None, None),
        ("step_started", 0, "reserve"),
        ("step_completed", 0, "reserve"),
        ("faulted", 1, "charge"),
        ("compensating", 1, "charge"),
        ("step_started", 0, "release"),
        ("in_doubt", 0, "release"),
        ("resumed", 0, "release"),
    ]
    events = [
        WorkflowEvent(
            kind=kind,
            correlation_id="wf",
            step=step,
            activity=activity,
            at=start + timedelta(seconds=n),
            detail="the card was declined" if kind == "faulted" else None,
        )
        for n, (kind, step, activity) in enumerate(steps)
    ]
    parked = project("wf", events[:-1])
    assert parked is not None
    assert (parked.state, parked.failure) == ("in_doubt", "the card was declined")
    resumed = project("wf", events)
    assert resumed is not None
    assert (resumed.state, resumed.failure) == ("compensating", "the card was declined")
    late = project("wf", [*events, WorkflowEvent(kind="compensated", correlation_id="wf", at=start + timedelta(9))])
    assert late is not None
    after = project("wf", [*late.events, WorkflowEvent(kind="resumed", correlation_id="wf", at=start + timedelta(10))])
    assert after is not None
    assert after.state == "compensated", "a resume that came too late does not reopen a finished workflow"


def test_a_cancel_requested_too_late_leaves_who_stopped_the_workflow_and_why() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def at(n: int, kind: str, **fields: object) -> WorkflowEvent:
        return WorkflowEvent.model_validate(
            {"kind": kind, "correlation_id": "wf", "at": start + timedelta(seconds=n), **fields}
        )

    requested = at(3, "cancel_requested", by="bob", detail="ordered twice")
    cancelled = [
        at(0, "dispatched", step=0, activity="reserve"),
        at(1, "step_started", step=0, activity="reserve"),
        at(2, "step_completed", step=0, activity="reserve"),
        requested,
        at(4, "cancelled", step=1, activity="charge", by="bob", detail="cancelled by bob: ordered twice"),
        at(5, "compensating", step=1, activity="charge", detail="undoing reserve (by release)"),
    ]
    undoing = project("wf", [*cancelled, requested.model_copy(update={"at": start + timedelta(seconds=6)})])
    assert undoing is not None
    assert (undoing.state, undoing.cancelled) == ("compensating", "cancelled by bob: ordered twice")
    ended = project("wf", [*cancelled, at(7, "compensated"), at(8, "cancel_requested", by="carol")])
    assert ended is not None
    assert (ended.state, ended.cancelled) == ("cancelled", "cancelled by bob: ordered twice")
    completed = [at(0, "dispatched", step=0, activity="reserve"), at(1, "completed", step=0, activity="reserve")]
    late = project("wf", [*completed, at(2, "cancel_requested", by="carol")])
    assert late is not None
    assert (late.state, late.cancelled) == ("completed", None)
    early = project("wf", cancelled[:4])
    assert early is not None
    assert early.cancelled == "requested by bob: ordered twice", "in time, the request shows until it holds"
