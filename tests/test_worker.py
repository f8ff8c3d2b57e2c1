"""The worker's behaviour, on each transport: in memory, Redis and RabbitMQ (the `transport` fixture of conftest)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    InMemoryTransport,
    NonRetryableError,
    PaigeantMessage,
    RetryActivity,
    RetryPolicy,
    Transport,
    TransportError,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    _long_steps,
    activity,
)
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER, Delivery

from .brokers import dead_letters

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0)
pytestmark = pytest.mark.usefixtures("signed_with_one_key")


@activity
async def first(ctx: ActivityContext) -> dict[str, int]:
    return {"a": 1}


@activity
async def second(ctx: ActivityContext) -> dict[str, int]:
    value = ctx.payload["a"]
    assert isinstance(value, int)
    return {"b": value + 1}


async def test_a_workflow_runs_every_step_in_order(transport: Transport) -> None:
    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport)
    correlation_id = await dispatcher.dispatch_workflow(activities=[first, second], variables={"start": True})
    worker = Worker(transport, [first, second], on_event=events.append)
    await worker.run(burst=True)

    done = [e for e in events if e.kind == "completed"]
    assert len(done) == 1
    assert done[0].correlation_id == correlation_id
    assert done[0].payload == {"start": True, "a": 1, "b": 2}
    assert [(e.kind, e.activity) for e in events if e.kind.startswith("step_")] == [
        ("step_started", "first"),
        ("step_completed", "first"),
        ("step_started", "second"),
        ("step_completed", "second"),
    ]
    assert worker.stats.completed_workflows == 1


async def test_seed_style_specs_and_handwritten_handlers(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport)
    await dispatcher.dispatch_workflow(
        activities=[ActivitySpec(name="validate-customer-data"), ActivitySpec(name="send-welcome-email")],
        variables={"customer_email": "new.customer@example.com"},
    )
    async with await transport.consume("validate-customer-data") as consumer:
        delivery = await anext(consumer)
        message = PaigeantMessage.from_json(delivery.body)
        assert message.payload["customer_email"] == "new.customer@example.com"
        message.payload["valid"] = True
        message.routing_slip.mark_complete("validate-customer-data")
        await transport.publish(message.routing_slip.current or "", message.next_hop().to_json())
        await transport.ack(delivery)

    async with await transport.consume("send-welcome-email") as consumer:
        forwarded = PaigeantMessage.from_json((await anext(consumer)).body)
    assert forwarded.payload == {"customer_email": "new.customer@example.com", "valid": True}
    assert [entry.name for entry in forwarded.routing_slip.completed] == ["validate-customer-data"]


async def test_retry_then_success(transport: Transport) -> None:
    calls: list[int] = []

    @activity(retry=FAST)
    async def flaky(ctx: ActivityContext) -> dict[str, str]:
        calls.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("provider unavailable")
        return {"ok": "yes"}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([flaky])
    worker = Worker(transport, [flaky], on_event=events.append, rng=random.Random(0))
    await worker.run(burst=True)

    assert calls == [0, 1, 2]
    retried = [e.detail for e in events if e.kind == "step_retried"]
    assert retried == [
        "ConnectionError: provider unavailable; attempt 2 in 0.01s",
        "ConnectionError: provider unavailable; attempt 3 in 0.02s",
    ]
    completed = next(e for e in events if e.kind == "completed")
    assert completed.payload == {"ok": "yes"}
    assert worker.stats.retried == 2
    assert await dead_letters(transport) == []


async def test_retry_exhausted_faults_and_dead_letters(transport: Transport) -> None:
    @activity(retry=FAST)
    async def always_down(ctx: ActivityContext) -> None:
        raise RetryActivity("still down", delay=0.01)

    events: list[WorkflowEvent] = []
    correlation_id = await WorkflowDispatcher(transport).dispatch_workflow([always_down, second])
    worker = Worker(transport, [always_down, second], on_event=events.append)
    await worker.run(burst=True)

    assert [e.kind for e in events if e.kind in ("step_retried", "faulted", "completed")] == [
        "step_retried",
        "step_retried",
        "faulted",
    ]
    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER] == (
        "step 'always-down' failed: retries exhausted after 3 attempts: RetryActivity: still down"
    )
    assert letter.headers[SOURCE_HEADER] == "always-down"
    faulted = PaigeantMessage.from_json(letter.body)
    assert faulted.correlation_id == correlation_id
    assert faulted.routing_slip.completed[-1].outcome == "failed"
    assert faulted.routing_slip.current == "always-down"
    assert worker.stats.faulted == 1


async def test_non_retryable_failure_faults_at_once(transport: Transport) -> None:
    calls = 0

    @activity(retry=FAST)
    async def refuse(ctx: ActivityContext) -> None:
        nonlocal calls
        calls += 1
        raise NonRetryableError("customer is on the sanctions list")

    await WorkflowDispatcher(transport).dispatch_workflow([refuse])
    worker = Worker(transport, [refuse])
    await worker.run(burst=True)

    assert calls == 1
    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER] == "step 'refuse' failed: NonRetryableError: customer is on the sanctions list"


async def test_a_step_over_its_timeout_is_retried(transport: Transport) -> None:
    @activity(timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
    async def slow(ctx: ActivityContext) -> dict[str, int]:
        if ctx.attempt == 0:
            await asyncio.sleep(10)
        return {"attempts": ctx.attempt + 1}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([slow])
    await Worker(transport, [slow], on_event=events.append).run(burst=True)
    assert [e.detail for e in events if e.kind == "step_retried"] == [
        pytest.approx("timed out after 0.05s; attempt 2 in 0.01s")  # pyright: ignore[reportUnknownMemberType]
    ]
    assert next(e for e in events if e.kind == "completed").payload == {"attempts": 2}


def good_message(name: str = "first") -> PaigeantMessage:
    return PaigeantMessage.new([ActivitySpec(name=name)], {"n": 1})


@pytest.mark.parametrize(
    ("body", "address", "reason"),
    [
        (b"\x00\x01garbage", "first", "malformed JSON"),
        (
            good_message().to_json().replace(b'"v":1', b'"v":7'),
            "first",
            "wire version 7 is newer than this worker reads (1): upgrade the worker",
        ),
        (b'{"v": 1, "message_id": "m"}', "first", "invalid message: correlation_id: Field required"),
        (
            good_message("second").to_json(),
            "first",
            "misrouted: the message is for step 'second' but arrived on 'first'",
        ),
        (good_message("mystery").to_json(), "mystery", "unknown activity 'mystery'; this worker runs: first, second"),
        (
            PaigeantMessage.new([ActivitySpec(name="first")], {"blob": "x" * 5000}).to_json(),
            "first",
            "message too large:",
        ),
    ],
    ids=["garbage", "wrong-version", "missing-fields", "misrouted", "unknown-activity", "too-large"],
)
async def test_bad_messages_go_to_the_dead_letter_queue_and_the_worker_keeps_going(
    transport: Transport, body: bytes, address: str, reason: str
) -> None:
    events: list[WorkflowEvent] = []
    worker = Worker(transport, [first, second], on_event=events.append, max_message_bytes=4096)
    await transport.publish(address, body)
    await WorkflowDispatcher(transport).dispatch_workflow([first, second])
    if address == "mystery":
        # Nobody consumes an unknown queue; a worker that is handed such a message directly still refuses it.
        async with await transport.consume("mystery") as consumer:
            await worker.process(await anext(consumer))
    await worker.run(burst=True)

    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER].startswith(reason)
    assert letter.headers[SOURCE_HEADER] == address
    assert letter.body == body
    assert worker.stats.rejected == 1
    assert worker.stats.completed_workflows == 1, "the valid workflow next to it completed"


async def test_a_worker_stopped_mid_step_leaves_the_message_for_redelivery(transport: Transport) -> None:
    started = asyncio.Event()
    runs: list[int] = []

    @activity
    async def long_step(ctx: ActivityContext) -> dict[str, bool]:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            started.set()
            await asyncio.sleep(30)
        return {"done": True}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([long_step, second], {"a": 1})
    crashed = Worker(transport, [long_step, second], shutdown_timeout=0.05)
    running = asyncio.create_task(crashed.run())
    await asyncio.wait_for(started.wait(), 5)
    crashed.stop()
    await running
    assert crashed.stats.completed_steps == 0
    assert await pending_soon(transport, "long-step", 1) == 1  # a broker requeues an unacked message on its own time

    restarted = Worker(transport, [long_step, second], on_event=events.append)
    await restarted.run(burst=True)
    assert runs == [0, 0], "the same attempt ran again"
    completed = next(e for e in events if e.kind == "completed")
    assert completed.payload == {"a": 1, "done": True, "b": 2}


async def test_graceful_stop_lets_running_steps_finish(transport: Transport) -> None:
    started = asyncio.Event()

    @activity
    async def short_step(ctx: ActivityContext) -> dict[str, bool]:
        started.set()
        await asyncio.sleep(0.1)
        return {"done": True}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([short_step])
    worker = Worker(transport, [short_step], on_event=events.append, shutdown_timeout=5)
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await running
    assert [e.kind for e in events][-1] == "completed"
    assert await transport.pending("short-step") == 0


async def test_a_redelivered_completed_step_is_not_run_again(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = 0

    @activity
    async def charge(ctx: ActivityContext) -> dict[str, str]:
        nonlocal runs
        runs += 1
        return {"charged": ctx.idempotency_key}

    ack = transport.ack
    lost = asyncio.Event()

    async def ack_lost_once(delivery: Delivery) -> None:
        if not lost.is_set():
            lost.set()
            raise TransportError("the connection dropped before the broker got the ack")
        await ack(delivery)

    monkeypatch.setattr(transport, "ack", ack_lost_once)
    await WorkflowDispatcher(transport).dispatch_workflow([charge])
    worker = Worker(transport, [charge])
    async with worker:
        await asyncio.wait_for(lost.wait(), 5)
    # The step completed but its ack never arrived: the broker delivers the same hop again.
    await worker.run(burst=True)
    assert runs == 1
    assert worker.stats.duplicates == 1


def _set_on_completed(completed: asyncio.Event) -> Callable[[WorkflowEvent], None]:
    def on_event(event: WorkflowEvent) -> None:
        if event.kind == "completed":
            completed.set()

    return on_event


@pytest.mark.parametrize(("refusals", "pauses"), [(1, ["0.01s"]), (3, ["0.01s", "0.02s", "0.04s"])])
async def test_a_successor_the_broker_refuses_is_sent_again_after_a_pause_that_grows(
    refusals: int,
    pauses: list[str],
    transport: Transport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused publish (RabbitMQ's negative confirm) leaves the connection up: the step's delivery goes back to
    the broker, rather than waiting with this worker until it stops, and its redelivery runs the step again and
    sends the successor. It goes back after a pause that doubles each time: without it, a broker that keeps refusing
    would have the step run in a tight loop, and its delivery dead-lettered as poison within a moment."""
    monkeypatch.setattr(_long_steps, "GIVE_BACK_PAUSE", 0.01)
    runs: list[str] = []

    @activity(name="first")
    async def counted_first(ctx: ActivityContext) -> dict[str, int]:
        runs.append("first")
        return {"a": 1}

    publish = transport.publish
    left = refusals

    async def refuse_the_successor(address: str, body: bytes, **options: Any) -> None:
        nonlocal left
        if address == "second" and left:
            left -= 1
            raise TransportError("publishing to 'second': RabbitMQ refused the message (negative publisher confirm)")
        await publish(address, body, **options)

    monkeypatch.setattr(transport, "publish", refuse_the_successor)
    events: list[WorkflowEvent] = []
    completed = asyncio.Event()

    def record(event: WorkflowEvent) -> None:
        events.append(event)
        if event.kind == "completed":
            completed.set()

    await WorkflowDispatcher(transport).dispatch_workflow([counted_first, second])
    with caplog.at_level("WARNING", logger="paigeant_ai.worker"):
        async with Worker(transport, [counted_first, second], on_event=record):
            await asyncio.wait_for(completed.wait(), 10)
    assert runs == ["first"] * (refusals + 1)
    assert [event.payload for event in events if event.kind == "completed"] == [{"a": 1, "b": 2}]
    given_back = [r.getMessage().rpartition(" in ")[2] for r in caplog.records if "handing it back" in r.getMessage()]
    assert given_back == pauses
    assert await dead_letters(transport) == []


async def test_a_worker_that_stops_hands_back_at_once_what_it_waited_to_hand_back(
    transport: Transport, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_long_steps, "GIVE_BACK_PAUSE", 60.0)
    publish = transport.publish
    refused = asyncio.Event()

    async def refuse_the_successor_once(address: str, body: bytes, **options: Any) -> None:
        if address == "second":
            monkeypatch.setattr(transport, "publish", publish)
            refused.set()
            raise TransportError("publishing to 'second': RabbitMQ refused the message (negative publisher confirm)")
        await publish(address, body, **options)

    monkeypatch.setattr(transport, "publish", refuse_the_successor_once)
    await WorkflowDispatcher(transport).dispatch_workflow([first, second])
    worker = Worker(transport, [first, second], shutdown_timeout=600)
    with caplog.at_level("WARNING", logger="paigeant_ai.worker"):
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(refused.wait(), 10)
        worker.stop()  # the delivery goes back to the broker now, instead of waiting out the pause with the worker
        await asyncio.wait_for(running, 30)
    assert any("handing it back in 60s" in r.getMessage() for r in caplog.records)
    completed = asyncio.Event()
    async with Worker(transport, [first, second], on_event=_set_on_completed(completed)):
        await asyncio.wait_for(completed.wait(), 10)
    assert await dead_letters(transport) == []


async def test_concurrency_limits_steps_in_flight(transport: Transport) -> None:
    running = 0
    peak = 0

    @activity
    async def busy(ctx: ActivityContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    dispatcher = WorkflowDispatcher(transport)
    for _ in range(30):
        await dispatcher.dispatch_workflow([busy])
    worker = Worker(transport, [busy], concurrency=4)
    await worker.run(burst=True)
    assert peak == 4
    assert worker.stats.completed_workflows == 30


async def test_outputs_must_be_json(transport: Transport) -> None:
    @activity
    async def returns_object(ctx: ActivityContext) -> dict[str, object]:
        return {"when": object()}

    await WorkflowDispatcher(transport).dispatch_workflow([returns_object])
    await Worker(transport, [returns_object]).run(burst=True)
    [letter] = await dead_letters(transport)
    assert "returned a value that is not JSON" in letter.headers[REASON_HEADER]


async def test_scalar_outputs_are_stored_under_the_activity_name(transport: Transport) -> None:
    @activity(name="score-lead")
    def score(ctx: ActivityContext) -> int:  # sync activities run in a thread
        return 42

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([score])
    await Worker(transport, [score], on_event=events.append).run(burst=True)
    assert next(e for e in events if e.kind == "completed").payload == {"score-lead": 42}


async def test_dispatch_refuses_an_oversize_first_message(transport: Transport) -> None:
    from paigeant_ai import MessageTooLarge

    dispatcher = WorkflowDispatcher(transport, max_message_bytes=1000)
    with pytest.raises(MessageTooLarge, match="over the limit of 1000"):
        await dispatcher.dispatch_workflow([first], {"blob": "x" * 2000})
    assert await transport.pending("first") == 0


def test_worker_configuration_errors_name_the_problem() -> None:
    transport = InMemoryTransport()  # on any transport alike: the constructor refuses before anything connects
    with pytest.raises(UserError, match="at least one activity"):
        Worker(transport, [])
    with pytest.raises(UserError, match="two activities are named 'first'"):
        Worker(transport, [first, first])


async def test_dispatch_rejects_bad_input(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport)
    with pytest.raises(UserError, match="at least one activity"):
        await dispatcher.dispatch_workflow([])
    with pytest.raises(UserError, match="invalid activity name 'bad name'"):
        await dispatcher.dispatch_workflow(["bad name"])
    with pytest.raises(UserError, match="cannot dispatch"):
        await dispatcher.dispatch_workflow(["first"], {"x": object()})


async def test_events_never_carry_tokens(transport: Transport) -> None:
    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([first], obo_token="secret-user-token")
    await Worker(transport, [first], on_event=events.append).run(burst=True)
    assert "secret-user-token" not in json.dumps([e.model_dump(mode="json") for e in events])


async def test_a_worker_whose_consumer_dies_stops_with_an_error(transport: Transport) -> None:
    from paigeant_ai import TransportError

    worker = Worker(transport, [first])
    running = asyncio.create_task(worker.run())
    for _ in range(200):  # until it consumes (on a loaded machine, opening the cancel board and queue takes a while)
        if worker._pumps:  # pyright: ignore[reportPrivateUsage]
            break
        await asyncio.sleep(0.05)
    await transport.disconnect()  # the consumer ends under the worker's feet
    with pytest.raises(TransportError, match="consuming paigeant-consume-first stopped: the consumer ended"):
        await asyncio.wait_for(running, 5)


async def test_end_workflow_completes_early_with_its_reason(transport: Transport) -> None:
    from paigeant_ai import EndWorkflow

    @activity
    async def check_stock(ctx: ActivityContext) -> None:
        raise EndWorkflow("out of stock: SKU-42", output={"in_stock": False})

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([first, check_stock, second])
    worker = Worker(transport, [first, check_stock, second], on_event=events.append)
    await worker.run(burst=True)

    completed = next(e for e in events if e.kind == "completed")
    assert completed.detail == "out of stock: SKU-42 (skipped: second)"
    assert completed.payload == {"a": 1, "in_stock": False}
    assert [e.activity for e in events if e.kind == "step_started"] == ["first", "check-stock"]
    assert await dead_letters(transport) == []


async def test_an_output_too_large_for_the_next_message_faults_instead_of_looping(transport: Transport) -> None:
    @activity
    async def bloat(ctx: ActivityContext) -> dict[str, str]:
        return {"report": "x" * 5000}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([bloat, second], {"a": 1})
    worker = Worker(transport, [bloat, second], on_event=events.append, max_message_bytes=4096)
    await worker.run(burst=True)
    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER].startswith("step 'bloat' failed: its output would make the next message")
    assert [e.kind for e in events].count("step_started") == 1
    assert await transport.pending("second") == 0


async def test_a_naive_expiry_is_refused_and_the_worker_keeps_going(transport: Transport) -> None:
    raw = json.loads(good_message().to_json())
    raw["expires_at"] = "2999-01-01T00:00:00"  # no time zone
    await transport.publish("first", json.dumps(raw).encode())
    await WorkflowDispatcher(transport).dispatch_workflow([first])
    worker = Worker(transport, [first], concurrency=1)
    await worker.run(burst=True)
    [letter] = await dead_letters(transport)
    assert "expires_at: Input should have timezone info" in letter.headers[REASON_HEADER]
    assert worker.stats.completed_workflows == 1


async def test_an_activity_that_cancels_itself_is_retried_not_left_hanging(transport: Transport) -> None:
    @activity(retry=FAST)
    async def cancels(ctx: ActivityContext) -> dict[str, int]:
        if ctx.attempt == 0:
            raise asyncio.CancelledError
        return {"attempts": ctx.attempt + 1}

    events: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport).dispatch_workflow([cancels])
    await asyncio.wait_for(Worker(transport, [cancels], on_event=events.append).run(burst=True), 10)
    assert next(e for e in events if e.kind == "completed").payload == {"attempts": 2}


async def test_a_failing_worker_dead_letters_the_message_instead_of_holding_it(transport: Transport) -> None:
    class BrokenDedupe:
        async def is_done(self, key: str) -> bool:
            raise RuntimeError("dedupe store unavailable")

        async def mark_done(self, key: str) -> None: ...

    await WorkflowDispatcher(transport).dispatch_workflow([first])
    worker = Worker(transport, [first], dedupe=BrokenDedupe())
    await asyncio.wait_for(worker.run(burst=True), 10)
    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER] == (
        "the worker failed on this message: RuntimeError: dedupe store unavailable"
    )


async def test_the_dispatcher_takes_sync_callbacks_and_survives_their_failure(transport: Transport) -> None:
    seen: list[WorkflowEvent] = []
    await WorkflowDispatcher(transport, on_event=seen.append).dispatch_workflow([first])
    assert [e.kind for e in seen] == ["dispatched"]

    def broken(event: WorkflowEvent) -> None:
        raise RuntimeError("observer down")

    await WorkflowDispatcher(transport, on_event=broken).dispatch_workflow([first])
    assert await transport.pending("first") == 2


async def pending_soon(transport: Transport, address: str, expected: int, within: float = 5.0) -> int:
    """How many messages wait on `address`, once that is `expected` or `within` seconds have passed."""
    count = await transport.pending(address)
    for _ in range(round(within / 0.05)):
        if count == expected:
            break
        await asyncio.sleep(0.05)
        count = await transport.pending(address)
    return count


class SlowCounts(InMemoryTransport):
    """Counts a queue as a broker does, in a round trip: steps run while the worker counts its queues."""

    async def pending(self, address: str) -> int:
        await asyncio.sleep(0.1)
        return await super().pending(address)


async def test_burst_does_not_stop_while_a_step_it_counted_past_hands_its_workflow_on() -> None:
    ran: list[str] = []

    @activity(name="pay", retry=RetryPolicy(max_attempts=2, initial_interval=0.15, jitter=0))
    async def pay(ctx: ActivityContext) -> None:
        ran.append(f"pay {ctx.attempt}")
        if ctx.attempt == 0:
            raise ConnectionError("the provider timed out")

    @activity(name="ship")
    async def ship(ctx: ActivityContext) -> None:
        await asyncio.sleep(0.5)
        ran.append("ship")

    async with SlowCounts() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([pay, ship])
        # `ship` is counted first, empty; then the retry of `pay` runs and hands on to `ship` before `pay` is
        # counted, empty too: the worker must not take that for drained, and stop `ship` half-way.
        await Worker(transport, [ship, pay], shutdown_timeout=0.05).run(burst=True)

        assert ran == ["pay 0", "pay 1", "ship"]
        assert await transport.pending("ship") == 0
