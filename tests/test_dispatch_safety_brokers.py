"""Reused correlation IDs, steps no worker consumes and stalled workflows, against the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import aio_pika
import aiormq.exceptions
import pytest
import redis.asyncio as aioredis

from paigeant_ai import MessageTooLarge, NoWorker, WorkflowDispatcher, WorkflowEvent, WorkflowExists
from paigeant_ai.cli import main
from paigeant_ai.store import WorkflowStatus, mark_stalled, project
from paigeant_ai.transports.rabbitmq import RabbitMQTransport
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.transports.redis import _consumer as redis_consumer

from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    delete_queues,
    delete_redis_namespace,
    redis_command_line,
    require_rabbitmq,
    require_redis,
)


def pending_at(activity: str, at: datetime) -> WorkflowStatus:
    event = WorkflowEvent(kind="dispatched", correlation_id="order-1", activity=activity, step=0, at=at)
    event.remaining = [activity]
    status = project("order-1", [event])
    assert status is not None
    return status


# -- RabbitMQ ------------------------------------------------------------------------------------------------


@pytest.fixture
async def rabbitmq() -> AsyncIterator[RabbitMQTransport]:
    require_rabbitmq()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    transport = RabbitMQTransport(RABBITMQ_URL, namespace=namespace, connection_name=namespace)
    async with transport:
        yield transport
    await delete_queues(transport._declared)


async def queue_exists(name: str) -> bool:
    async with await aio_pika.connect(RABBITMQ_URL) as connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True


@pytest.mark.rabbitmq
async def test_rabbitmq_counts_consumers_without_creating_queues(rabbitmq: RabbitMQTransport) -> None:
    assert await rabbitmq.consumers("valdate") == 0
    assert not await queue_exists(rabbitmq.queue_name("valdate"))  # asking created no queue for a misspelt step
    await rabbitmq.publish("validate", b"x")
    assert await rabbitmq.consumers("validate") == 0
    async with await rabbitmq.consume("validate"), await rabbitmq.consume("validate"):
        assert await rabbitmq.consumers("validate") == 2
        assert await rabbitmq.last_consumed("validate") is not None
    assert (
        await settled_count(rabbitmq, "validate") == 0
    )  # RabbitMQ counts a closed channel's consumer out a moment later
    assert await rabbitmq.consumed_addresses() is None  # AMQP cannot list queues
    assert await rabbitmq.last_consumed("validate") is None


async def settled_count(transport: RabbitMQTransport, address: str) -> int:
    for _ in range(100):
        if not await transport.consumers(address):
            break
        await asyncio.sleep(0.02)
    return await transport.consumers(address)


@pytest.mark.rabbitmq
async def test_rabbitmq_require_workers(rabbitmq: RabbitMQTransport) -> None:
    dispatcher = WorkflowDispatcher(rabbitmq, allow_unsigned=True)
    async with await rabbitmq.consume("validate") as consumer:
        with pytest.raises(NoWorker) as raised:
            await dispatcher.dispatch_workflow(["valdate"], require_workers=True)
        assert str(raised.value) == "no worker consumes 'valdate': start a worker for it, or fix the step's name"
        assert not await queue_exists(rabbitmq.queue_name("valdate"))
        correlation_id = await dispatcher.dispatch_workflow(["validate"], require_workers=True)
        delivery = await asyncio.wait_for(anext(consumer), 10)
        assert correlation_id.encode() in delivery.body
        await rabbitmq.ack(delivery)


@pytest.mark.rabbitmq
async def test_rabbitmq_without_a_shared_store_the_dispatcher_remembers(rabbitmq: RabbitMQTransport) -> None:
    dispatcher = WorkflowDispatcher(rabbitmq, allow_unsigned=True)
    assert dispatcher.claims is None
    await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1")
    assert await dispatcher.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1") == "order-1"
    with pytest.raises(WorkflowExists):
        await dispatcher.dispatch_workflow(["validate"], {"n": 2}, correlation_id="order-1")
    assert await rabbitmq.pending("validate") == 1


@pytest.mark.rabbitmq
async def test_rabbitmq_a_shared_store_can_be_passed(rabbitmq: RabbitMQTransport, redis_namespace: str) -> None:
    async with RedisTransport(REDIS_URL, namespace=redis_namespace) as claims:
        first = WorkflowDispatcher(rabbitmq, allow_unsigned=True, claims=claims)
        second = WorkflowDispatcher(rabbitmq, allow_unsigned=True, claims=claims)
        await first.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1")
        assert await second.dispatch_workflow(["validate"], {"n": 1}, correlation_id="order-1") == "order-1"
        with pytest.raises(WorkflowExists):
            await second.dispatch_workflow(["validate"], {"n": 2}, correlation_id="order-1")
    assert await rabbitmq.pending("validate") == 1


@pytest.mark.rabbitmq
async def test_rabbitmq_a_workflow_at_an_unconsumed_queue_is_stalled(rabbitmq: RabbitMQTransport) -> None:
    now = datetime.now(UTC)
    [status] = await mark_stalled([pending_at("valdate", now - timedelta(minutes=3))], rabbitmq, after=60)
    assert (status.state, status.stalled) == ("stalled", "no worker consumes 'valdate' for 3m")
    async with await rabbitmq.consume("valdate"):
        [status] = await mark_stalled([pending_at("valdate", now - timedelta(minutes=3))], rabbitmq, after=60)
        assert status.state == "pending"


# -- Redis ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_namespace() -> AsyncIterator[str]:
    require_redis()
    name = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_redis_namespace(name)


@pytest.fixture
async def redis(redis_namespace: str) -> AsyncIterator[RedisTransport]:
    async with RedisTransport(REDIS_URL, namespace=redis_namespace) as transport:
        yield transport


@pytest.mark.redis
async def test_redis_counts_the_consumers_seen_recently(redis: RedisTransport) -> None:
    assert await redis.consumers("validate") == 0
    assert await redis.last_consumed("validate") is None
    async with await redis.consume("validate"), await redis.consume("validate"), await redis.consume("enrich"):
        assert await redis.consumers("validate") == 2
        assert await redis.consumed_addresses() == ["enrich", "validate"]
    # A consumer that closed stops counting at once, and is remembered as last seen now.
    assert await redis.consumers("validate") == 0
    last = await redis.last_consumed("validate")
    assert last is not None
    assert abs((datetime.now(UTC) - last).total_seconds()) < 5
    assert await redis.consumed_addresses() == []


@pytest.mark.redis
async def test_redis_a_consumer_that_stopped_beating_is_not_counted(redis: RedisTransport) -> None:
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        # A worker that died 2 minutes ago, as its heartbeat tells (scores are ms in Redis's clock).
        seconds, micros = await raw.time()
        now_ms = seconds * 1000 + micros // 1000
        await raw.zadd(redis.consumers_key("validate"), {"dead-worker": now_ms - 120_000})
        assert await redis.consumers("validate") == 0
        last = await redis.last_consumed("validate")
        assert last is not None
        assert 110 < (datetime.now(UTC) - last).total_seconds() < 130
        async with await redis.consume("validate"):
            assert await redis.consumers("validate") == 1
            ttl = await raw.pttl(redis.consumers_key("validate"))
            assert 0 < ttl <= 24 * 3600 * 1000
    finally:
        await raw.aclose()


@pytest.mark.redis
async def test_redis_a_live_consumer_keeps_beating(redis: RedisTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_consumer, "_BEAT_EVERY", 0.1)
    async with await redis.consume("validate") as consumer:
        key = redis.consumers_key("validate")
        first = await redis.client.zscore(key, consumer.name)
        await asyncio.sleep(0.5)
        later = await redis.client.zscore(key, consumer.name)
        assert first is not None
        assert later is not None
        assert later > first > 0
        assert await redis.consumers("validate") == 1


@pytest.mark.redis
async def test_redis_require_workers_names_the_steps_that_are_served(redis: RedisTransport) -> None:
    dispatcher = WorkflowDispatcher(redis, allow_unsigned=True)
    async with await redis.consume("validate") as consumer, await redis.consume("enrich"):
        with pytest.raises(NoWorker) as raised:
            await dispatcher.dispatch_workflow(["valdate", "enrich"], require_workers=True)
        assert str(raised.value) == (
            "no worker consumes 'valdate': start a worker for it, or fix the step's name "
            "(did you mean 'validate'? workers consume: enrich, validate)"
        )
        assert await redis.pending("valdate") == 0
        await dispatcher.dispatch_workflow(["validate", "enrich"], require_workers=True)
        delivery = await asyncio.wait_for(anext(consumer), 10)
        await redis.ack(delivery)


@pytest.mark.redis
async def test_redis_claims_are_shared_by_every_process(redis_namespace: str) -> None:
    async with (
        RedisTransport(REDIS_URL, namespace=redis_namespace) as one,
        RedisTransport(REDIS_URL, namespace=redis_namespace) as other,
    ):
        await WorkflowDispatcher(one, allow_unsigned=True).dispatch_workflow(
            ["validate"], {"n": 1}, obo_token="t", correlation_id="order-1"
        )
        elsewhere = WorkflowDispatcher(other, allow_unsigned=True)
        again = await elsewhere.dispatch_workflow(["validate"], {"n": 1}, obo_token="t", correlation_id="order-1")
        assert again == "order-1"
        with pytest.raises(WorkflowExists, match="workflow 'order-1' was already dispatched"):
            await elsewhere.dispatch_workflow(["validate"], {"n": 1}, obo_token="u", correlation_id="order-1")
        assert await other.pending("validate") == 1
        ttl = await other.client.pttl(f"{redis_namespace}:dispatched:order-1")
        assert 6 * 24 * 3600 * 1000 < ttl <= 7 * 24 * 3600 * 1000


@pytest.mark.redis
async def test_redis_a_failed_dispatch_releases_the_shared_claim(redis: RedisTransport) -> None:
    dispatcher = WorkflowDispatcher(redis, allow_unsigned=True, max_message_bytes=2000)
    with pytest.raises(MessageTooLarge):
        await dispatcher.dispatch_workflow(["validate"], {"blob": "x" * 5000}, correlation_id="order-1")
    assert await redis.client.exists(f"{redis.namespace}:dispatched:order-1") == 0
    other = WorkflowDispatcher(redis, allow_unsigned=True)
    assert await other.dispatch_workflow(["validate"], {"blob": "ref:1"}, correlation_id="order-1") == "order-1"
    assert await redis.pending("validate") == 1
    assert await redis.client.exists(f"{redis.namespace}:dispatched:order-1") == 1


@pytest.mark.redis
async def test_redis_a_step_left_by_its_worker_stalls_after_a_while(redis: RedisTransport) -> None:
    status = pending_at("validate", datetime.now(UTC) - timedelta(hours=1))
    async with await redis.consume("validate"):
        pass
    # Its worker left just now: the workflow is not stalled yet, though its last event is an hour old.
    [marked] = await mark_stalled([status], redis, after=60)
    assert marked.state == "pending"
    later = datetime.now(UTC) + timedelta(minutes=3, seconds=5)  # Redis's clock counts in ms
    [marked] = await mark_stalled([status], redis, after=60, now=later)
    assert (marked.state, marked.stalled) == ("stalled", "no worker consumes 'validate' for 3m")


# -- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def cli_namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = redis_command_line(monkeypatch, STALL_AFTER="0")
    yield name
    asyncio.run(delete_redis_namespace(name))


@pytest.mark.redis
def test_the_cli_shows_a_workflow_stalled_at_a_misspelt_step(
    cli_namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def dispatch() -> None:
        async with RedisTransport(REDIS_URL, namespace=cli_namespace) as transport:
            dispatcher = WorkflowDispatcher(transport)
            await dispatcher.dispatch_workflow(["valdate", "enrich"], {"n": 1}, correlation_id="order-1")

    asyncio.run(dispatch())
    assert main(["workflows"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["STATE", "UPDATED", "(UTC)", "CORRELATION", "ID", "STEP", "/", "REASON"]
    assert row.startswith("stalled ")
    assert row.endswith("order-1         no worker consumes 'valdate' for 0s")

    assert main(["status", "order-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workflow order-1: stalled\n")
    assert "  stalled: no worker consumes 'valdate' for 0s\n" in out

    # Read as stored, without asking the broker, it is as its events tell.
    assert main(["workflows", "--no-sync"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("pending ")
