"""The transport contract, and what only Redis Streams does, against the real Redis on 127.0.0.1 (DB 15)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ResponseError as RedisResponseError

from paigeant_ai import ActivityContext, ActivitySpec, PaigeantMessage, Worker, WorkflowDispatcher, WorkflowEvent
from paigeant_ai.exceptions import TransportError, UserError
from paigeant_ai.transports import Transport, get_transport
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER
from paigeant_ai.transports.redis import GROUP, RedisDedupeStore, RedisTransport

from .brokers import REDIS_URL, delete_redis_namespace, require_redis
from .transport_contract import TransportContract, address, receive, receive_nothing

pytestmark = pytest.mark.redis


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    require_redis()
    name = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    yield name
    await delete_redis_namespace(name)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the test database, to look inside and to play a crashed worker."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


class TestRedisContract(TransportContract):
    @pytest.fixture(autouse=True)
    def _namespace(self, namespace: str) -> None:
        self.namespace = namespace

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        async with self.new_transport() as transport:
            yield transport

    def new_transport(self) -> RedisTransport:
        return RedisTransport(REDIS_URL, namespace=self.namespace)


def test_get_transport_builds_it_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "redis")
    monkeypatch.setenv("PAIGEANT_REDIS_URL", "redis://:secret@redis.example:6380/2")
    monkeypatch.setenv("PAIGEANT_NAMESPACE", "orders")
    transport = get_transport()
    assert isinstance(transport, RedisTransport)
    assert transport.url == "redis://:secret@redis.example:6380/2"
    assert transport.namespace == "orders"
    assert transport.stream_key("charge-card") == "orders:{q:charge-card}"
    explicit = get_transport("redis", url="redis://127.0.0.1:6379/3", namespace="billing")
    assert isinstance(explicit, RedisTransport)
    assert (explicit.url, explicit.namespace) == ("redis://127.0.0.1:6379/3", "billing")


def test_settings_are_checked() -> None:
    with pytest.raises(UserError, match="visibility_timeout"):
        RedisTransport(visibility_timeout=0)
    with pytest.raises(UserError, match="max_deliveries"):
        RedisTransport(max_deliveries=0)
    with pytest.raises(UserError, match="trim_length"):
        RedisTransport(trim_length=0)


async def test_unreachable_redis_is_a_transport_error_without_the_password() -> None:
    transport = RedisTransport("redis://:hunter2@127.0.0.1:1/0", reconnect_attempts=0)
    with pytest.raises(TransportError, match=r"Redis at redis://:\*\*\*@127\.0\.0\.1:1/0 is unreachable") as info:
        await transport.connect()
    assert "hunter2" not in str(info.value)


async def test_a_dead_consumers_entries_are_claimed(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, visibility_timeout=0.5) as transport:
        where = address()
        stream = transport.stream_key(where)
        await transport.publish(where, b"first")
        await transport.publish(where, b"second")
        await raw.xgroup_create(stream, GROUP, id="0", mkstream=True)
        # A worker reads both entries, then its process dies: nobody renews its leases.
        await raw.xreadgroup(GROUP, "dead-worker", {stream: ">"}, count=10)
        assert (await raw.xpending(stream, GROUP))["pending"] == 2
        started = time.monotonic()
        async with await transport.consume(where) as consumer:
            deliveries = [await receive(consumer), await receive(consumer)]
            assert sorted(d.body for d in deliveries) == [b"first", b"second"]
            assert all(d.delivery_count == 2 and d.redelivered for d in deliveries)
            assert time.monotonic() - started >= 0.4  # not before the visibility timeout
            for delivery in deliveries:
                await transport.ack(delivery)
        assert await transport.pending(where) == 0


async def test_a_live_consumer_keeps_what_it_holds(namespace: str) -> None:
    async with (
        RedisTransport(REDIS_URL, namespace=namespace, visibility_timeout=0.3) as one,
        RedisTransport(REDIS_URL, namespace=namespace, visibility_timeout=0.3) as other,
    ):
        where = address()
        await one.publish(where, b"long step")
        async with await one.consume(where) as slow:
            delivery = await receive(slow)
            async with await other.consume(where) as idle:
                # The step runs for several visibility timeouts; its lease is renewed, so nobody else takes it.
                await receive_nothing(idle, within=1.5)
            await one.ack(delivery)
        assert await one.pending(where) == 0


async def test_a_delivery_that_could_not_be_settled_returns_after_an_outage(namespace: str) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, visibility_timeout=0.3) as transport:
        where = address()
        await transport.publish(where, b"stranded")
        async with await transport.consume(where, prefetch=1) as consumer:
            first = await receive(consumer)
            # Redis was unreachable past the retries: the worker could not settle what it held, and never will.
            # Its lease lapses, the delivery comes back and its prefetch slot is free again.
            transport.generation += 1
            again = await receive(consumer, within=5)
            assert (again.body, again.delivery_count) == (b"stranded", 2)
            assert again.handle.entry_id == first.handle.entry_id
            await transport.ack(again)
        assert await transport.pending(where) == 0


async def test_a_poison_message_goes_to_dead_letter_by_delivery_count(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, visibility_timeout=0.2, max_deliveries=2) as transport:
        where = address()
        stream = transport.stream_key(where)
        await transport.publish(where, b"kills its worker", headers={"k": "v"})
        await raw.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await raw.xreadgroup(GROUP, "crashed-1", {stream: ">"}, count=1)  # delivery 1, then a crash
        async with await transport.consume(where) as consumer:
            second = await receive(consumer)  # delivery 2, claimed from the crashed worker
            assert second.delivery_count == 2
        # Closing without an ack hands it back; a third delivery would exceed max_deliveries.
        async with await transport.consume(where) as consumer:
            await receive_nothing(consumer, within=0.5)
        assert await transport.pending(where) == 0
        async with await transport.consume("dead-letter") as dead:
            letter = await receive(dead)
            await transport.ack(letter)
        assert letter.body == b"kills its worker"
        assert letter.headers["k"] == "v"
        assert letter.headers[SOURCE_HEADER] == where
        assert letter.headers[REASON_HEADER].startswith("delivered 3 times without being settled (max_deliveries is 2)")


async def test_a_waiting_consumer_asks_the_count_only_of_an_entry_added_again(
    namespace: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An idle consumer waits in a blocking read (for up to `poll_interval`): an entry published once reaches it with
    # no second round trip; an entry added again after a delivery still comes with its count, from Redis's hash.
    async with RedisTransport(REDIS_URL, namespace=namespace, poll_interval=5.0) as transport:
        where = address()
        stream = transport.stream_key(where)
        hmget = transport.client.hmget
        asked: list[list[bytes]] = []

        async def spying_hmget(name: str, keys: list[bytes]) -> list[bytes | None]:
            asked.append(keys)
            return await hmget(name, keys)

        monkeypatch.setattr(transport.client, "hmget", spying_hmget)
        async with await transport.consume(where) as consumer:
            await asyncio.sleep(0.3)  # its reads found nothing: it blocks now
            await transport.publish(where, b"once")
            first = await receive(consumer)
            assert first.delivery_count == 1
            assert asked == []
            await asyncio.sleep(0.3)
            await transport.retry_later(first, 0)
            again = await receive(consumer)
            assert (again.body, again.delivery_count) == (b"once", 2)
            assert asked == [[again.handle.entry_id]]
            await transport.ack(again)
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await raw.xrange(stream))
        assert [b"fresh" in entry_fields for _, entry_fields in entries] == [True, False]


async def test_trimming_never_drops_an_entry_that_is_not_settled(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, trim_length=10) as transport:
        where = address()
        stream = transport.stream_key(where)
        for i in range(50):
            await transport.publish(where, str(i).encode())
        async with await transport.consume(where, prefetch=5) as consumer:
            held = await receive(consumer)  # the oldest entry stays unacknowledged
            for _ in range(49):
                await transport.ack(await receive(consumer))
            # Everything after `held` is settled, but it is older than all of them: nothing may go.
            assert await raw.xlen(stream) == 50
            assert await transport.pending(where) == 1
            await transport.ack(held)
        assert await raw.xlen(stream) == 10
        # Entries not yet delivered are never trimmed either.
        for i in range(50):
            await transport.publish(where, f"more-{i}".encode())
        async with await transport.consume(where, prefetch=5) as consumer:
            for _ in range(5):
                await transport.ack(await receive(consumer))
            assert await transport.pending(where) == 45
            assert await raw.xlen(stream) >= 45
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await raw.xrange(stream))
            bodies = [fields[b"body"] for _, fields in entries]
            assert bodies[-45:] == [f"more-{i}".encode() for i in range(5, 50)]


async def test_reserved_streams_are_capped(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, trim_length=5) as transport:
        for i in range(20):
            await transport.publish("events", str(i).encode())
        assert await raw.xlen(transport.stream_key("events")) == 5


async def test_delayed_messages_move_once_with_several_workers(namespace: str) -> None:
    transports = [RedisTransport(REDIS_URL, namespace=namespace, poll_interval=0.05) for _ in range(3)]
    where = address()
    for transport in transports:
        await transport.connect()
    try:
        for i in range(60):
            await transports[0].publish(where, str(i).encode(), delay=0.2 + (i % 3) * 0.1)
        assert await transports[0].pending(where) == 60
        seen: list[bytes] = []

        async def drain(transport: RedisTransport) -> None:
            async with await transport.consume(where, prefetch=10) as consumer:
                while True:
                    try:
                        delivery = await receive(consumer, within=1.0)
                    except TimeoutError:
                        return
                    seen.append(delivery.body)
                    await transport.ack(delivery)

        await asyncio.gather(*(drain(transport) for transport in transports))
        assert sorted(seen) == sorted(str(i).encode() for i in range(60))
        assert await transports[0].pending(where) == 0
    finally:
        for transport in transports:
            await transport.disconnect()


async def test_a_lost_stream_is_recreated(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace, poll_interval=0.1) as transport:
        where = address()
        async with await transport.consume(where) as consumer:
            await raw.delete(transport.stream_key(where))  # as if Redis restarted without persistence
            await asyncio.sleep(0.3)
            await transport.publish(where, b"after the loss")
            delivery = await receive(consumer)
            assert delivery.body == b"after the loss"
            await transport.ack(delivery)


async def test_quick_commands_share_pipelines_and_keep_their_own_replies(namespace: str) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        client = transport.client
        key, text = f"{namespace}:n", f"{namespace}:text"
        await client.set(text, "not a number")
        replies = await asyncio.gather(
            client.set(key, 1),
            client.set(key, 2, nx=True),
            client.incr(key),
            client.get(key),
            client.exists(key, f"{namespace}:absent"),
            client.set(key, 5, get=True),
            client.incr(text),
            client.set(f"{namespace}:bad", object()),  # pyright: ignore[reportArgumentType]
            client.hset(f"{namespace}:h", "field", "v"),
            client.hexists(f"{namespace}:h", "field"),
            return_exceptions=True,
        )
        assert replies[:6] == [True, None, 2, b"2", 1, b"2"]
        assert isinstance(replies[6], RedisResponseError)  # only the command Redis refused fails
        assert isinstance(replies[7], RedisDataError)  # only the command that cannot be sent fails
        assert replies[8:] == [1, True]
        assert await client.get(key) == b"5"


async def test_a_resent_publish_call_adds_none_of_its_messages(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        first, second = transport.stream_key("first"), transport.stream_key("second")
        marker = f"{namespace}:published:resent"
        for _ in range(2):  # the pipeline, then redis-py's resend of it after the connection dropped
            await transport.scripts.publish(
                keys=[first, second, first, marker], args=[b"a", b"{}", 0, b"b", b"{}", 0, b"c", b"{}", 0, 60_000]
            )
        for stream, bodies in ((first, [b"a", b"c"]), (second, [b"b"])):
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await raw.xrange(stream))
            assert [fields[b"body"] for _, fields in entries] == bodies


async def test_bodies_and_headers_come_back_byte_for_byte(namespace: str) -> None:
    messages = [
        (b"", {}),
        (b"two\nlines and spaces \r\n", {"x": "a b\nc"}),
        (bytes(range(256)) * 40, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "k": "é 中"}),
    ]
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        where = address()
        await asyncio.gather(*(transport.publish(where, body, headers=headers) for body, headers in messages))
        async with await transport.consume(where, prefetch=10) as consumer:
            received = [await receive(consumer) for _ in messages]
            for delivery in received:
                await transport.ack(delivery)
        assert [(d.body, d.headers, d.delivery_count) for d in received] == [(b, h, 1) for b, h in messages]
        assert await transport.pending(where) == 0


async def test_dedupe_store_remembers_with_an_expiry(namespace: str, raw: aioredis.Redis) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        store = RedisDedupeStore(transport, ttl=60)
        assert not await store.is_done("wf-1:0:charge")
        await store.mark_done("wf-1:0:charge")
        assert await store.is_done("wf-1:0:charge")
        assert not await store.is_done("wf-1:1:notify")
        ttl = await raw.pttl(store.key("wf-1:0:charge"))
        assert 0 < ttl <= 60_000
        with pytest.raises(UserError, match="ttl"):
            RedisDedupeStore(transport, ttl=0)


async def test_the_worker_skips_a_redelivered_step_that_completed(namespace: str) -> None:
    runs: list[str] = []

    async def charge(ctx: ActivityContext) -> dict[str, str]:
        runs.append(ctx.idempotency_key)
        return {"charged": "yes"}

    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        message = PaigeantMessage.new([ActivitySpec(name="charge")], {"amount": 5})
        await transport.publish("charge", message.to_json())
        await transport.publish("charge", message.to_json())  # the same step, delivered again
        # Two workers in different processes would share only Redis: each gets its own store object.
        first = Worker(transport, [charge], dedupe=RedisDedupeStore(transport), allow_unsigned=True)
        await first.run(burst=True)
        second = Worker(transport, [charge], dedupe=RedisDedupeStore(transport), allow_unsigned=True)
        await transport.publish("charge", message.to_json())
        await second.run(burst=True)
        assert runs == [message.idempotency_key]
        assert (first.stats.duplicates, second.stats.duplicates) == (1, 1)
        assert await RedisDedupeStore(transport).is_done(message.idempotency_key)
        assert isinstance(Worker(transport, [charge], allow_unsigned=True).dedupe, RedisDedupeStore)  # the default


async def test_streams_stay_bounded_after_10_000_workflows(namespace: str, raw: aioredis.Redis) -> None:
    async def reserve(ctx: ActivityContext) -> None:
        return None

    async def notify(ctx: ActivityContext) -> None:
        return None

    trim_length, workflows = 500, 10_000
    async with RedisTransport(REDIS_URL, namespace=namespace, trim_length=trim_length) as transport:
        dispatcher = WorkflowDispatcher(transport, allow_unsigned=True, publish_events=False)
        all_done = asyncio.Event()
        completed = 0

        def count(event: WorkflowEvent) -> None:
            nonlocal completed
            completed += event.kind == "completed"
            if completed >= workflows:
                all_done.set()

        worker = Worker(
            transport, [reserve, notify], concurrency=100, allow_unsigned=True, publish_events=False, on_event=count
        )
        started = time.monotonic()
        running = asyncio.create_task(worker.run())
        for first in range(0, workflows, 500):  # the worker runs while they are dispatched
            batch = range(first, first + 500)
            await asyncio.gather(*(dispatcher.dispatch_workflow(["reserve", "notify"], {"n": n}) for n in batch))
        try:
            await asyncio.wait_for(all_done.wait(), 50)
        finally:
            worker.stop()
            await running
        elapsed = time.monotonic() - started
        assert worker.stats.completed_workflows == workflows
        lengths = {name: await raw.xlen(transport.stream_key(name)) for name in ("reserve", "notify")}
        print(f"\n{workflows:,} two-step workflows in {elapsed:.1f}s; stream lengths {lengths}")
        assert all(length <= trim_length for length in lengths.values())
        assert await transport.pending("reserve") == await transport.pending("notify") == 0


async def test_a_lapsed_holder_cannot_hand_back_what_another_consumer_took_over(
    namespace: str, raw: aioredis.Redis
) -> None:
    """A worker whose lease lapsed (its process stalled) and then hands its delivery back must not take the entry
    from the consumer that claimed it meanwhile: that would add a redelivery that takes the running claim over."""
    async with RedisTransport(REDIS_URL, namespace=namespace) as stalled:
        where = address()
        stream = stalled.stream_key(where)
        await stalled.publish(where, b"work")
        async with await stalled.consume(where) as first:
            late = await receive(first)
            entry_id = (await raw.xpending_range(stream, GROUP, "-", "+", 10))[0]["message_id"]
            await raw.xclaim(stream, GROUP, "other-worker", 0, [entry_id])  # its lease lapsed: another took it
            await stalled.give_back(late)
            await stalled.retry_later(late, 0)
            await receive_nothing(first, within=0.5)
            held = await raw.xpending_range(stream, GROUP, "-", "+", 10)
            assert [(p["message_id"], p["consumer"]) for p in held] == [(entry_id, b"other-worker")]
            assert await raw.xlen(stream) == 1
