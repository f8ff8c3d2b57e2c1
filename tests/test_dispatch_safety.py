"""Nothing a user dispatches is silently dropped or stuck: argument shapes, reused correlation IDs, steps that
no worker consumes, and workflows stalled at such a step, on the in-memory transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    MessageTooLarge,
    NoWorker,
    TransportError,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    WorkflowExists,
    activity,
)
from paigeant_ai import dispatch as dispatch_module
from paigeant_ai.contracts import EVENTS
from paigeant_ai.store import WorkflowStatus, mark_stalled, project


@activity(name="validate")
async def validate(ctx: ActivityContext) -> dict[str, bool]:
    return {"valid": True}


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


# -- argument shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activities", "variables", "message"),
    [
        ("validate", {}, r"activities must be a list of steps, not one string: write \['validate'\]"),
        (42, {}, r"activities must be a list of steps \(ActivitySpec objects, activities or names\), not int"),
        ({"validate": 1}, {}, r"activities must be a list of steps .*, not dict"),
        ({"validate", "create"}, {}, r"activities must be a list of steps .*, not set"),
        (b"validate", {}, r"activities must be a list of steps .*, not bytes"),
        (["validate"], [("order_id", 42)], r"variables must be a mapping of names to JSON values, .* not list"),
        (["validate"], "order_id=42", r"variables must be a mapping of names to JSON values, .* not str"),
        (["validate"], {1: "x"}, r"variable names must be strings: 1 is int; write '1'"),
        (["validate"], {"ok": 1, ("a", "b"): 2}, r"variable names must be strings: \('a', 'b'\) is tuple"),
    ],
)
async def test_wrong_shapes_are_refused_in_one_sentence(
    transport: InMemoryTransport, activities: Any, variables: Any, message: str
) -> None:
    with pytest.raises(UserError, match=message) as raised:
        await WorkflowDispatcher(transport).dispatch_workflow(activities, variables)
    assert type(raised.value) is UserError
    assert "\n" not in str(raised.value)
    assert await transport.consumed_addresses() == []
    for address in ("validate", "v", "create", EVENTS):
        assert await transport.pending(address) == 0  # nothing was published, not even to a one-letter step


@pytest.mark.parametrize("correlation_id", ["", 42])
async def test_a_correlation_id_must_be_a_non_empty_string(transport: InMemoryTransport, correlation_id: Any) -> None:
    with pytest.raises(UserError, match=r"correlation_id must be a non-empty string \(or None for a new one\)"):
        await WorkflowDispatcher(transport).dispatch_workflow(["validate"], correlation_id=correlation_id)
    assert await transport.pending("validate") == 0


# -- correlation IDs in use ----------------------------------------------------------------------------------


async def test_the_same_id_and_content_again_is_a_safe_retry(transport: InMemoryTransport) -> None:
    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport, on_event=events.append)
    first = await dispatcher.dispatch_workflow(["validate"], {"n": 1}, obo_token="t", correlation_id="order-1")
    again = await dispatcher.dispatch_workflow(["validate"], {"n": 1}, obo_token="t", correlation_id="order-1")
    assert first == again == "order-1"
    assert await transport.pending("validate") == 1
    assert [event.kind for event in events] == ["dispatched"]


@pytest.mark.parametrize(
    "changed",
    [
        {"activities": ["validate", "create"]},
        {"variables": {"n": 2}},
        {"obo_token": "someone-else"},
    ],
)
async def test_the_same_id_with_other_content_is_refused(transport: InMemoryTransport, changed: dict[str, Any]) -> None:
    dispatcher = WorkflowDispatcher(transport)
    original: dict[str, Any] = {"activities": ["validate"], "variables": {"n": 1}, "obo_token": "t"}
    await dispatcher.dispatch_workflow(**original, correlation_id="order-1")
    with pytest.raises(
        WorkflowExists, match=r"^workflow 'order-1' was already dispatched .*new correlation_id"
    ) as raised:
        await dispatcher.dispatch_workflow(**{**original, **changed}, correlation_id="order-1")
    assert raised.value.correlation_id == "order-1"
    assert isinstance(raised.value, UserError)
    assert await transport.pending("validate") == 1


async def test_dispatchers_sharing_a_transport_share_their_claims(transport: InMemoryTransport) -> None:
    await WorkflowDispatcher(transport).dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1")
    other = WorkflowDispatcher(transport)
    assert await other.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1") == "order-1"
    with pytest.raises(WorkflowExists):
        await other.dispatch_workflow(["validate"], {"n": 2}, correlation_id="order-1")
    assert await transport.pending("validate") == 1


async def test_a_dispatch_too_large_releases_its_claim(transport: InMemoryTransport) -> None:
    dispatcher = WorkflowDispatcher(transport, max_message_bytes=2000)
    with pytest.raises(MessageTooLarge):
        await dispatcher.dispatch_workflow(["validate"], {"blob": "x" * 5000}, correlation_id="order-1")
    # The corrected retry, under the same ID, is not taken for another workflow.
    assert await dispatcher.dispatch_workflow(["validate"], {"blob": "ref:1"}, correlation_id="order-1") == "order-1"
    assert await transport.pending("validate") == 1
    with pytest.raises(WorkflowExists):  # now the ID is taken, by the workflow that went out
        await dispatcher.dispatch_workflow(["validate"], {"blob": "ref:2"}, correlation_id="order-1")


async def test_a_broker_error_releases_the_claim() -> None:
    transport = InMemoryTransport()  # not connected: publishing fails
    dispatcher = WorkflowDispatcher(transport)
    with pytest.raises(TransportError, match="not connected"):
        await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1")
    async with transport:
        assert await dispatcher.dispatch_workflow(["validate"], {"n": 2}, correlation_id="order-1") == "order-1"
        assert await transport.pending("validate") == 1
        with pytest.raises(WorkflowExists):
            await WorkflowDispatcher(transport).dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1")


async def test_a_dispatcher_remembers_a_bounded_number_of_ids(
    transport: InMemoryTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch_module, "REMEMBERED_DISPATCHES", 3)
    dispatcher = WorkflowDispatcher(transport)
    for n in range(10):
        await dispatcher.dispatch_workflow(["validate"], correlation_id=f"order-{n}")
    assert list(dispatcher._dispatched) == ["order-7", "order-8", "order-9"]
    with pytest.raises(WorkflowExists):  # the transport's claims still know the older ones
        await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-0")


async def test_new_ids_are_not_claimed(transport: InMemoryTransport) -> None:
    dispatcher = WorkflowDispatcher(transport)
    ids = {await dispatcher.dispatch_workflow(["validate"], {"n": 1}) for _ in range(3)}
    assert len(ids) == 3
    assert await transport.pending("validate") == 3
    assert transport._claims == {}


# -- steps nobody consumes -----------------------------------------------------------------------------------


async def test_require_workers_refuses_a_step_nobody_consumes(transport: InMemoryTransport) -> None:
    dispatcher = WorkflowDispatcher(transport)
    async with await transport.consume("validate") as worker_queue:
        with pytest.raises(NoWorker) as raised:
            await dispatcher.dispatch_workflow(["valdate"], {"n": 1}, correlation_id="order-1", require_workers=True)
        assert str(raised.value) == (
            "no worker consumes 'valdate': start a worker for it, or fix the step's name "
            "(did you mean 'validate'? workers consume: validate)"
        )
        assert (raised.value.activity, raised.value.served) == ("valdate", ["validate"])
        assert await transport.pending("valdate") == 0
        # Refused, it kept no claim: the corrected plan goes out under the same ID.
        await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1", require_workers=True)
        delivery = await asyncio.wait_for(anext(worker_queue), 5)
        assert b'"correlation_id":"order-1"' in delivery.body


async def test_a_worker_serves_a_workflow_dispatched_with_require_workers(transport: InMemoryTransport) -> None:
    completed = asyncio.Event()

    def note(event: WorkflowEvent) -> None:
        if event.kind == "completed":
            completed.set()

    worker = Worker(transport, [validate], on_event=note)
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0)  # the worker opens its consumers
    try:
        await WorkflowDispatcher(transport).dispatch_workflow(["validate"], require_workers=True)
        await asyncio.wait_for(completed.wait(), 10)
    finally:
        worker.stop()
        await running


async def test_require_workers_with_no_worker_at_all(transport: InMemoryTransport) -> None:
    with pytest.raises(NoWorker, match=r"no worker consumes 'validate': .* \(no worker consumes any step on this"):
        await WorkflowDispatcher(transport).dispatch_workflow(["validate"], require_workers=True)
    assert await transport.pending("validate") == 0
    # Without it the dispatcher does not ask: the message waits for a worker to come.
    await WorkflowDispatcher(transport).dispatch_workflow(["validate"])
    assert await transport.pending("validate") == 1


class BlindTransport(InMemoryTransport):
    """A transport that cannot tell who consumes, as one of a user's own may not."""

    async def consumers(self, address: str) -> int | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return None


async def test_require_workers_on_a_transport_that_cannot_tell(caplog: pytest.LogCaptureFixture) -> None:
    async with BlindTransport() as transport:
        with caplog.at_level(logging.WARNING, logger="paigeant_ai.dispatch"):
            await WorkflowDispatcher(transport).dispatch_workflow(["validate"], require_workers=True)
        assert await transport.pending("validate") == 1
    assert "inmemory cannot tell whether a worker consumes 'validate'; dispatching anyway" in caplog.text


async def test_the_in_memory_transport_tells_who_consumes(transport: InMemoryTransport) -> None:
    assert await transport.consumers("validate") == 0
    assert await transport.last_consumed("validate") is None
    async with (
        await transport.consume("validate"),
        await transport.consume("validate"),
        await transport.consume(EVENTS),
    ):
        assert await transport.consumers("validate") == 2
        assert await transport.consumed_addresses() == ["events", "validate"]
    before = datetime.now(UTC)
    assert await transport.consumers("validate") == 0
    last = await transport.last_consumed("validate")
    assert last is not None
    assert last <= before


# -- stalled workflows ---------------------------------------------------------------------------------------


def pending_at(activity: str, at: datetime, correlation_id: str = "order-1") -> WorkflowStatus:
    event = WorkflowEvent(kind="dispatched", correlation_id=correlation_id, activity=activity, step=0, at=at)
    event.remaining = [activity]
    status = project(correlation_id, [event])
    assert status is not None
    return status


async def test_a_workflow_at_a_step_nobody_consumes_is_stalled(transport: InMemoryTransport) -> None:
    now = datetime.now(UTC)
    old = pending_at("valdate", now - timedelta(minutes=3))
    recent = pending_at("valdate", now - timedelta(seconds=20), "order-2")
    (marked, fresh) = await mark_stalled([old, recent], transport, after=60, now=now)
    assert (marked.state, marked.stalled) == ("stalled", "no worker consumes 'valdate' for 3m")
    assert (fresh.state, fresh.stalled) == ("pending", None)
    assert "stalled" not in fresh.model_dump()  # absent unless stalled, as before


async def test_a_workflow_whose_step_has_a_consumer_is_not_stalled(transport: InMemoryTransport) -> None:
    now = datetime.now(UTC)
    async with await transport.consume("validate"):
        [status] = await mark_stalled([pending_at("validate", now - timedelta(hours=3))], transport, after=60)
        assert status.state == "pending"
    # The consumer just left: it is the time since then that counts, not the workflow's age.
    [status] = await mark_stalled([pending_at("validate", now - timedelta(hours=3))], transport, after=60)
    assert status.state == "pending"
    later = datetime.now(UTC) + timedelta(minutes=5)
    [status] = await mark_stalled([pending_at("validate", now - timedelta(hours=3))], transport, now=later)
    assert (status.state, status.stalled) == ("stalled", "no worker consumes 'validate' for 5m")


async def test_only_pending_and_running_workflows_can_stall(transport: InMemoryTransport) -> None:
    at = datetime.now(UTC) - timedelta(days=3)
    waiting = pending_at("approve", at).model_copy(update={"state": "waiting"})
    completed = pending_at("approve", at).model_copy(update={"state": "completed", "current_activity": None})
    [still_waiting, still_completed] = await mark_stalled([waiting, completed], transport)
    assert (still_waiting.state, still_completed.state) == ("waiting", "completed")
    [stalled] = await mark_stalled([pending_at("approve", at)], transport)
    assert stalled.stalled == "no worker consumes 'approve' for 3d"


class _FlakyOnce(InMemoryTransport):
    """A broker blip: the first publish to a step fails, and so does releasing the claim afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = {"publish", "release"}

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if address != EVENTS and "publish" in self.failures:
            self.failures.discard("publish")
            raise TransportError("the broker went away")
        await super().publish(address, body, headers=headers, delay=delay)

    async def release(self, key: str, value: str) -> None:
        if "release" in self.failures:
            self.failures.discard("release")
            raise TransportError("the broker went away")
        await super().release(key, value)


async def test_a_retry_after_a_failed_dispatch_whose_claim_stayed_sends_the_workflow() -> None:
    async with _FlakyOnce() as transport:
        dispatcher = WorkflowDispatcher(transport)
        with pytest.raises(TransportError):
            await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-42")
        other_process = WorkflowDispatcher(transport)  # the claim is shared: it stayed, marked as not yet sent
        assert await other_process.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-42") == "order-42"
        assert await transport.pending("validate") == 1
        assert await other_process.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-42") == "order-42"
        assert await transport.pending("validate") == 1, "once sent and confirmed, a retry starts nothing"
