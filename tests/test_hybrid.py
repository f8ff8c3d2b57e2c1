"""One workflow across transports, in one process: steps on in-memory, Redis and RabbitMQ (see `paigeant_ai._routes`).

Every transport is real (the shared test brokers, each in a namespace of its own, deleted afterwards); the workers
sign and verify as in production. Worker processes and a kill -9 are in `tests.test_hybrid_processes`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from logfire.testing import CaptureLogfire
from pydantic import ValidationError

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    InMemoryTransport,
    NonRetryableError,
    Parallel,
    RetryActivity,
    UnknownTransport,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai.approval import get_waiting_store
from paigeant_ai.contracts import EVENTS
from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports import Transport

from .brokers import RABBITMQ_URL, REDIS_URL, clean, dead_letters, make_transport
from .test_parallel import asks_approval

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq, pytest.mark.usefixtures("signed_with_one_key")]


@pytest.fixture(autouse=True)
def no_transport_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAIGEANT_TRANSPORTS", "PAIGEANT_HOME_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def places() -> AsyncIterator[dict[str, Transport]]:
    """Three connected transports by name: `local` in memory, `store` on Redis, `ship` on RabbitMQ."""
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    made = {"local": InMemoryTransport(), "store": make_transport("redis", namespace)}
    made["ship"] = make_transport("rabbitmq", namespace)
    for transport in made.values():
        await transport.connect()
    try:
        yield made
    finally:
        for transport in made.values():
            await transport.disconnect()
            await clean(transport, namespace)


def _on(kind: str) -> tuple[asyncio.Event, list[WorkflowEvent], Any]:
    seen: list[WorkflowEvent] = []
    happened = asyncio.Event()

    def record(event: WorkflowEvent) -> None:
        seen.append(event)
        if event.kind == kind:
            happened.set()

    return happened, seen, record


def _traces(ctx: ActivityContext) -> list[str]:
    """The trace ids the earlier steps saw."""
    return [str(trace) for trace in cast(list[Any], ctx.payload["traces"])]


def _trace_id(ctx: ActivityContext) -> str:
    return ctx.message.headers.get("traceparent", "-untraced").split("-")[1]


@activity(name="hybrid-take")
async def take(ctx: ActivityContext) -> dict[str, Any]:
    return {"taken": ctx.payload["order"], "traces": [_trace_id(ctx)]}


@activity(name="hybrid-bill")
async def bill(ctx: ActivityContext) -> dict[str, Any]:
    return {"billed": True, "traces": [*_traces(ctx), _trace_id(ctx)]}


@activity(name="hybrid-ship")
async def ship(ctx: ActivityContext) -> dict[str, Any]:
    return {"shipped": True, "traces": [*_traces(ctx), _trace_id(ctx)]}


ROUTE = [
    ActivitySpec(name="hybrid-take", transport="local"),
    ActivitySpec(name="hybrid-bill", transport="store"),
    ActivitySpec(name="hybrid-ship", transport="ship"),
]


async def test_a_workflow_runs_in_memory_then_on_redis_then_on_rabbitmq(
    places: dict[str, Transport], capfire: CaptureLogfire
) -> None:
    done, events, record = _on("completed")
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    workers = [
        Worker(places["local"], [take], transports=places, home="local", on_event=record),
        Worker(places["store"], [bill], transports=places, home="local", on_event=record),
        Worker(places["ship"], [ship], transports=places, home="local", on_event=record),
    ]
    cid = await dispatcher.dispatch_workflow(ROUTE, {"order": 7})
    async with workers[0], workers[1], workers[2]:
        await asyncio.wait_for(done.wait(), 30)
    completed = next(event for event in events if event.kind == "completed")
    assert completed.correlation_id == cid
    assert completed.payload is not None
    traces = completed.payload.pop("traces")
    assert completed.payload == {"order": 7, "taken": 7, "billed": True, "shipped": True}
    assert isinstance(traces, list)
    assert len(traces) == 3
    assert len(set(traces)) == 1  # one trace across the three transports
    hops = [span for span in capfire.exporter.exported_spans_as_dict() if span["name"].startswith("paigeant.hop")]
    assert len(hops) == 3
    assert {span["context"]["trace_id"] for span in hops} == {int(str(traces[0]), 16)}
    assert [w.stats.completed_steps for w in workers] == [1, 1, 1]
    # Every worker published its events on the home transport; none went to the others' `events`.
    assert await places["local"].pending(EVENTS) > 0
    assert await places["store"].pending(EVENTS) == 0
    assert await places["ship"].pending(EVENTS) == 0
    for transport in places.values():
        assert await dead_letters(transport) == []


async def test_a_step_naming_an_unknown_transport_is_refused_at_dispatch(places: dict[str, Transport]) -> None:
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    with pytest.raises(UnknownTransport) as refused:
        await dispatcher.dispatch_workflow([*ROUTE, ActivitySpec(name="hybrid-post", transport="post")])
    assert str(refused.value) == (
        "step 'hybrid-post' names transport 'post', which is not configured here (local, ship, store): add it to "
        "PAIGEANT_TRANSPORTS (or transports={...}) of the dispatcher and of every worker"
    )
    assert await places["local"].pending("hybrid-take") == 0  # nothing was sent


async def test_a_url_only_selects_among_configured_transports(places: dict[str, Transport]) -> None:
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    assert dispatcher.routes.resolve(REDIS_URL) is places["store"]
    with pytest.raises(UnknownTransport):  # never a connection to a host a message names
        await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-take", transport="redis://203.0.113.9:6379/0")])
    with pytest.raises(ValidationError, match="may not carry credentials"):
        ActivitySpec(name="hybrid-take", transport="amqp://guest:guest@127.0.0.1:5672/")
    for hostless in ("://", "redis://", "memory://"):  # the in-memory transport has no URL: nothing names it
        with pytest.raises(UnknownTransport):
            dispatcher.routes.resolve(hostless)


async def test_a_parallel_group_naming_a_transport_is_refused_at_dispatch(places: dict[str, Transport]) -> None:
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    group = Parallel(ActivitySpec(name="hybrid-bill", transport="store"), "hybrid-ship")
    with pytest.raises(UserError, match="run on the transport of the step before it"):
        await dispatcher.dispatch_workflow(["hybrid-take", group])


async def test_the_next_hop_is_acked_here_only_once_its_transport_confirmed_it(
    places: dict[str, Transport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ refuses the successor once: the step's delivery on Redis is not acked, is delivered again, and its
    second run sends the successor; nothing is lost and nothing dead-lettered."""
    from paigeant_ai import _long_steps

    monkeypatch.setattr(_long_steps, "GIVE_BACK_PAUSE", 0.01)
    runs: list[str] = []

    @activity(name="hybrid-bill")
    async def counted_bill(ctx: ActivityContext) -> dict[str, Any]:
        runs.append(ctx.idempotency_key)
        return await bill.run(ctx)  # type: ignore[return-value]

    rabbit, refused = places["ship"], asyncio.Event()
    publish = rabbit.publish

    async def refuse_once(address: str, body: bytes, **options: Any) -> None:
        if address == "hybrid-ship" and not refused.is_set():
            refused.set()
            raise TransportError("publishing to 'hybrid-ship': RabbitMQ refused the message (negative confirm)")
        await publish(address, body, **options)

    monkeypatch.setattr(rabbit, "publish", refuse_once)
    done, events, record = _on("completed")
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    await dispatcher.dispatch_workflow(ROUTE, {"order": 1})
    async with (
        Worker(places["local"], [take], transports=places, home="local", on_event=record),
        Worker(places["store"], [counted_bill], transports=places, home="local", on_event=record),
        Worker(places["ship"], [ship], transports=places, home="local", on_event=record) as shipper,
    ):
        await asyncio.wait_for(done.wait(), 30)
    assert refused.is_set()
    assert len(runs) == 2
    assert len(set(runs)) == 1  # the same step, run again from its redelivery on Redis
    assert shipper.stats.completed_steps == 1
    assert [event.kind for event in events].count("completed") == 1
    for transport in places.values():
        assert await dead_letters(transport) == []


async def test_a_compensation_on_another_transport_is_confirmed_there_before_the_failed_step_is_acked(
    places: dict[str, Transport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed Redis step's compensation goes back to the in-memory transport, which refuses it once: the
    delivery on Redis is not acked, is delivered again, and its second failure sends the compensation."""
    from paigeant_ai import _long_steps

    monkeypatch.setattr(_long_steps, "GIVE_BACK_PAUSE", 0.01)
    attempts: list[int] = []
    undone: list[str] = []

    @activity(name="hybrid-undo-take")
    async def undo_take(ctx: ActivityContext) -> None:
        undone.append(ctx.correlation_id)

    @activity(name="hybrid-take", compensate=undo_take)
    async def reversible_take(ctx: ActivityContext) -> dict[str, int]:
        return {"taken": 1}

    @activity(name="hybrid-bill")
    async def declined(ctx: ActivityContext) -> None:
        attempts.append(ctx.attempt)
        raise NonRetryableError("card declined")

    local, refused = places["local"], asyncio.Event()
    publish = local.publish

    async def refuse_once(address: str, body: bytes, **options: Any) -> None:
        if address == "hybrid-undo-take" and not refused.is_set():
            refused.set()
            raise TransportError("publishing to 'hybrid-undo-take': the broker refused the message")
        await publish(address, body, **options)

    monkeypatch.setattr(local, "publish", refuse_once)
    compensated, _, record = _on("compensated")
    dispatcher = WorkflowDispatcher(local, transports=places)
    cid = await dispatcher.dispatch_workflow(ROUTE[:2])
    async with (
        Worker(local, [reversible_take], transports=places, home="local", on_event=record),
        Worker(places["store"], [declined], transports=places, home="local", on_event=record),
    ):
        await asyncio.wait_for(compensated.wait(), 30)
    assert refused.is_set()
    assert attempts == [0, 0], "the same attempt, delivered again on Redis"
    assert undone == [cid]
    for transport in places.values():
        assert await dead_letters(transport) == []


async def test_a_hop_that_arrives_on_another_transport_than_its_steps_is_dead_lettered(
    places: dict[str, Transport],
) -> None:
    """A copy of a signed hop for the Redis step, put on the in-memory queue of the same name, never runs there."""
    ran: list[str] = []

    @activity(name="hybrid-bill")
    async def stray(ctx: ActivityContext) -> None:
        ran.append(ctx.correlation_id)

    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-bill", transport="store")])
    async with await places["store"].consume("hybrid-bill") as consumer:
        delivery = await asyncio.wait_for(anext(consumer), 10)
        await places["store"].ack(delivery)
    await places["local"].publish("hybrid-bill", delivery.body, headers=delivery.headers)
    worker = Worker(places["local"], [stray], transports=places)
    await worker.run(burst=True)
    assert ran == []
    [letter] = await dead_letters(places["local"])
    assert "misrouted: the hop was sent on transport 'store'" in letter.headers["x-paigeant-reason"]


async def test_a_hop_copied_onto_another_transport_is_refused_there_though_its_step_names_none(
    places: dict[str, Transport],
) -> None:
    """The step after a Redis step names no transport, so it runs on Redis: a copy of its signed hop put on the
    RabbitMQ queue of its name is dead-lettered there, unrun, and that worker goes on with its next delivery."""
    ran: list[str] = []

    @activity(name="hybrid-ship")
    async def counted_ship(ctx: ActivityContext) -> dict[str, bool]:
        ran.append(ctx.correlation_id)
        return {"shipped": True}

    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    cid = await dispatcher.dispatch_workflow([ROUTE[1], ActivitySpec(name="hybrid-ship")], {"traces": []})
    await Worker(places["store"], [bill], transports=places).run(burst=True)
    async with await places["store"].consume("hybrid-ship") as consumer:
        delivery = await asyncio.wait_for(anext(consumer), 10)
        await places["store"].ack(delivery)
    await places["ship"].publish("hybrid-ship", delivery.body, headers=delivery.headers)
    own = await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-ship", transport="ship")])
    done, events, record = _on("completed")
    refused = asyncio.Event()

    def note(event: WorkflowEvent) -> None:
        record(event)
        if event.kind == "rejected":
            refused.set()

    async with Worker(places["ship"], [counted_ship], transports=places, home="local", on_event=note):
        await asyncio.wait_for(asyncio.gather(done.wait(), refused.wait()), 30)
    assert ran == [own], "the copy never ran; the worker ran the hop sent to it"
    [letter] = await dead_letters(places["ship"])
    assert "misrouted: the hop was sent on transport 'store'" in letter.headers["x-paigeant-reason"]
    assert cid not in [event.correlation_id for event in events if event.kind == "step_completed"]


async def test_a_cancel_reaches_a_step_on_another_transport(places: dict[str, Transport]) -> None:
    ran: list[str] = []

    @activity(name="hybrid-ship")
    async def never(ctx: ActivityContext) -> None:
        ran.append(ctx.correlation_id)

    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    cid = await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-ship", transport="ship")])
    await dispatcher.cancel(cid, "changed my mind")
    cancelled, _, record = _on("cancelled")
    async with Worker(places["ship"], [never], transports=places, home="local", on_event=record):
        await asyncio.wait_for(cancelled.wait(), 30)
    assert ran == []


async def test_a_failure_on_redis_undoes_the_in_memory_step_there_after_its_retry(
    places: dict[str, Transport],
) -> None:
    """Retries stay on the failing step's transport; the compensation of a step goes back to the one it ran on."""
    attempts: list[int] = []
    undone: list[str] = []

    @activity(name="hybrid-undo-take")
    async def undo_take(ctx: ActivityContext) -> None:
        undone.append(ctx.correlation_id)

    @activity(name="hybrid-take", compensate=undo_take)
    async def reversible_take(ctx: ActivityContext) -> dict[str, int]:
        return {"taken": 1}

    @activity(name="hybrid-bill")
    async def failing_bill(ctx: ActivityContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 0:
            raise RetryActivity("the bank is busy", delay=0.05)
        raise NonRetryableError("card declined")

    compensated, events, record = _on("compensated")
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    cid = await dispatcher.dispatch_workflow(ROUTE[:2])
    async with (
        Worker(places["local"], [reversible_take], transports=places, home="local", on_event=record),
        Worker(places["store"], [failing_bill], transports=places, home="local", on_event=record),
    ):
        await asyncio.wait_for(compensated.wait(), 30)
    assert attempts == [0, 1]
    assert undone == [cid]
    assert "faulted" in [event.kind for event in events]


async def test_a_fallback_runs_on_its_steps_transport_and_a_dead_letter_stays_where_its_step_failed(
    places: dict[str, Transport],
) -> None:
    @activity(name="hybrid-bill")
    async def declined(ctx: ActivityContext) -> None:
        raise NonRetryableError("card declined")

    @activity(name="hybrid-bill-by-invoice")
    async def invoice(ctx: ActivityContext) -> dict[str, bool]:
        return {"invoiced": True}

    @activity(name="hybrid-ship")
    async def lost(ctx: ActivityContext) -> None:
        raise NonRetryableError("no such address")

    faulted, events, record = _on("faulted")
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    route = [
        ActivitySpec(name="hybrid-bill", transport="store", fallbacks=("hybrid-bill-by-invoice",)),
        ActivitySpec(name="hybrid-ship", transport="ship"),
    ]
    await dispatcher.dispatch_workflow(route)
    async with (
        Worker(places["store"], [declined, invoice], transports=places, home="local", on_event=record),
        Worker(places["ship"], [lost], transports=places, home="local", on_event=record),
    ):
        await asyncio.wait_for(faulted.wait(), 30)
    assert [(event.kind, event.activity) for event in events if event.kind == "step_completed"] == [
        ("step_completed", "hybrid-bill-by-invoice")
    ]
    [letter] = await dead_letters(places["ship"])
    assert "no such address" in letter.headers["x-paigeant-reason"]
    assert await dead_letters(places["store"]) == []
    assert await dead_letters(places["local"]) == []


def test_named_transports_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from paigeant_ai._routes import Routes

    monkeypatch.setenv("PAIGEANT_TRANSPORTS", f"store={REDIS_URL}; ship=amqp://guest:guest@127.0.0.1:5672/")
    monkeypatch.setenv("PAIGEANT_HOME_TRANSPORT", "store")
    monkeypatch.setenv("PAIGEANT_NAMESPACE", "paigeant-test-unused")  # nothing is connected
    assert Routes(make_transport("redis", "paigeant-test-other")).own_name is None  # another namespace: not `store`
    own = make_transport("redis", "paigeant-test-unused")
    routes = Routes(own)
    assert routes.own_name == "store"
    assert routes.home is own
    assert routes.resolve("ship").name == "rabbitmq"
    assert routes.resolve("amqp://127.0.0.1:5672") is routes.resolve("ship")  # its URL, without the credentials
    monkeypatch.setenv("PAIGEANT_TRANSPORTS", f"store={REDIS_URL};orders={REDIS_URL}")
    assert Routes(own).resolve("orders") is own  # two names of one broker and namespace: both its own
    monkeypatch.setenv("PAIGEANT_HOME_TRANSPORT", "elsewhere")
    with pytest.raises(UserError, match="home transport 'elsewhere' is not one of the named transports"):
        Routes(own)
    monkeypatch.setenv("PAIGEANT_TRANSPORTS", "store")
    with pytest.raises(UserError, match="is not name=url"):
        Routes(own)
    monkeypatch.setenv("PAIGEANT_TRANSPORTS", "store=http://127.0.0.1/")
    with pytest.raises(UserError, match="use redis://, rediss://, unix://, amqp://, amqps:// or sqlite:///path"):
        Routes(own)


async def test_a_parallel_group_runs_where_its_predecessor_ran_and_is_undone_there(
    places: dict[str, Transport],
) -> None:
    """The group after a Redis step runs on Redis (its join store is there), the step after it on RabbitMQ; when
    that one fails, each branch's compensation goes back to Redis, where the branches ran."""
    undone: list[str] = []

    @activity(name="hybrid-unreserve")
    async def unreserve(ctx: ActivityContext) -> None:
        undone.append(ctx.message.routing_slip.undoing.activity if ctx.message.routing_slip.undoing else "?")

    def branch(name: str) -> Any:
        @activity(name=name, compensate=unreserve)
        async def reserve(ctx: ActivityContext) -> dict[str, str]:
            return {"reserved": name}

        return reserve

    shelf, truck = branch("hybrid-shelf"), branch("hybrid-truck")

    @activity(name="hybrid-ship")
    async def lost(ctx: ActivityContext) -> None:
        raise NonRetryableError("no such address")

    compensated, events, record = _on("compensated")
    dispatcher = WorkflowDispatcher(places["local"], transports=places)
    await dispatcher.dispatch_workflow(
        [ROUTE[1], Parallel(shelf, truck), ActivitySpec(name="hybrid-ship", transport="ship")], {"traces": []}
    )
    async with (
        Worker(places["store"], [bill, shelf, truck], transports=places, home="local", on_event=record),
        Worker(places["ship"], [lost], transports=places, home="local", on_event=record),
    ):
        await asyncio.wait_for(compensated.wait(), 30)
    assert sorted(undone) == ["hybrid-shelf", "hybrid-truck"]
    assert "faulted" in [event.kind for event in events]


async def test_a_dispatcher_closes_the_transports_it_made_and_only_those(
    places: dict[str, Transport], monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = str(cast(Any, places["store"]).namespace)
    monkeypatch.setenv("PAIGEANT_NAMESPACE", namespace)
    monkeypatch.setenv("PAIGEANT_TRANSPORTS", f"store={REDIS_URL};ship={RABBITMQ_URL}")
    async with WorkflowDispatcher(places["local"]) as dispatcher:
        made = [dispatcher.routes.resolve("store"), dispatcher.routes.resolve("ship")]
        assert all(transport not in places.values() for transport in made)
        await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-bill", transport="store")])
    assert await places["store"].pending("hybrid-bill") == 1
    for transport in made:
        with pytest.raises(TransportError, match="not connected"):
            await transport.pending("hybrid-bill")
    await dispatcher.dispatch_workflow([ActivitySpec(name="hybrid-ship", transport="ship")])  # connects anew
    await dispatcher.aclose()
    assert await places["ship"].pending("hybrid-ship") == 1
    monkeypatch.delenv("PAIGEANT_TRANSPORTS")
    async with WorkflowDispatcher(places["local"], transports=places) as given:
        await given.dispatch_workflow([ActivitySpec(name="hybrid-bill", transport="store")])
    assert await places["store"].pending("hybrid-bill") == 2  # what it was given stays open


@pytest.mark.parametrize("action", ["resume", "cancel"])
async def test_a_waiting_branch_is_sent_back_to_the_transport_it_waits_on(
    places: dict[str, Transport], action: str
) -> None:
    """A group after a Redis step runs on Redis; its branch that waits for an approval is resumed, or released by
    a cancel, on Redis, by a dispatcher on another transport."""

    @activity(name="hybrid-research")
    async def research(ctx: ActivityContext) -> dict[str, str]:
        return {"found": "yes"}

    waiting = get_waiting_store(places["store"])
    ended, events, record = _on("completed" if action == "resume" else "cancelled")
    waited = asyncio.Event()

    def note(event: WorkflowEvent) -> None:
        record(event)
        if event.kind == "waiting":
            waited.set()

    dispatcher = WorkflowDispatcher(places["local"], transports=places, waiting_store=waiting)
    route = [ROUTE[1], Parallel("hybrid-ask", "hybrid-research")]
    cid = await dispatcher.dispatch_workflow(route, {"traces": []})
    worker = Worker(
        places["store"],
        [bill, asks_approval("hybrid-ask"), research],
        transports=places,
        home="local",
        on_event=note,
        waiting_store=waiting,
    )
    async with worker:
        await asyncio.wait_for(waited.wait(), 30)
        parked = await waiting.get(cid)
        assert parked is not None
        assert parked.transport == "store"  # signed with the record
        if action == "resume":
            await dispatcher.resume(cid, approve_all=True, approver="support:ann")
        else:
            await dispatcher.cancel(cid, "no longer needed", by="support:bob")
        await asyncio.wait_for(ended.wait(), 30)
    assert await places["local"].pending("hybrid-ask") == 0
    if action == "resume":
        [completed] = [event for event in events if event.kind == "completed"]
        assert {"billed", "hybrid-ask", "hybrid-research"} <= set(completed.payload or {})  # both branches joined
    for transport in places.values():
        assert await dead_letters(transport) == []
