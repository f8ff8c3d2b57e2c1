"""Raw relays: the baseline a paigeant transport is compared to, with the bare client and no paigeant code.

A relay moves messages of a paigeant hop's size through three queues, one consumer per queue passing each message
on to the next, with the guarantees a paigeant hop keeps: on RabbitMQ durable quorum queues, persistent messages,
a publisher confirm awaited before the ack, prefetch = concurrency; on Redis one stream and consumer group per
queue, `XREADGROUP` of up to `concurrency` entries, the next stream's `XADD`s confirmed before the entries are
acknowledged (the `XACK` rides with the next read, as paigeant's pipeline sends it with its next batch).

Loaded, every message is queued first and the relay is timed draining them (hops per second). One at a time, a
message is sent only when the last one is through, and each hop's gap is recorded: from the moment a stage is
about to publish to the moment the next stage receives, what a paigeant hop adds between two steps.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ("RelayRun", "relays", "run_relay")

STAGES = 3


@dataclass
class RelayRun:
    """What one relay run measured."""

    hops_per_second: float
    gaps: list[float] = field(default_factory=list[float])
    """One at a time: seconds from a stage's publish to the next stage's receipt, one per hop between stages."""


class Flow:
    """The messages through a relay: how many left the last stage, and (one at a time) the gap of each hop."""

    def __init__(self, count: int, *, timed: bool) -> None:
        self.count = count
        self.timed = timed
        self.through = 0
        self.gaps: list[float] = []
        self.done = asyncio.Event()
        self._moved = asyncio.Event()
        self._sent_at: float | None = None

    def received(self, stage: int) -> None:
        """Stage `stage` has a message: the end of the gap that the previous stage's `sending` started."""
        if self.timed and stage > 0 and self._sent_at is not None:
            self.gaps.append(time.perf_counter() - self._sent_at)
            self._sent_at = None

    def sending(self, at: float | None = None) -> None:
        """A stage is about to publish to the next one (or began to, at `at`, a `time.perf_counter()`)."""
        if self.timed:
            self._sent_at = time.perf_counter() if at is None else at

    def finished(self, messages: int = 1) -> None:
        """`messages` left the last stage."""
        self.through += messages
        self._moved.set()
        if self.through >= self.count:
            self.done.set()

    async def wait_through(self, messages: int) -> None:
        """Until `messages` in all have left the last stage."""
        while self.through < messages:
            self._moved.clear()
            await self._moved.wait()


class Relay(Protocol):
    """Three queues on one broker and the bare client's consumers that pass messages along them."""

    async def send(self, count: int) -> None:
        """Publish `count` messages to the first queue."""
        ...

    async def start(self, flow: Flow, concurrency: int) -> None:
        """Start the consumers of the three queues."""
        ...

    async def aclose(self) -> None:
        """Stop the consumers and delete the queues."""
        ...


async def run_relay(
    make: Callable[[int], Awaitable[Relay]], count: int, concurrency: int, size: int, *, one_at_a_time: bool
) -> RelayRun:
    """Move `count` messages of `size` bytes through a relay, all queued first or one at a time."""
    flow = Flow(count, timed=one_at_a_time)
    made = await make(size)
    try:
        if one_at_a_time:
            await made.start(flow, concurrency)
            started = time.perf_counter()
            for sent in range(1, count + 1):
                await made.send(1)
                await flow.wait_through(sent)
        else:
            await made.send(count)
            started = time.perf_counter()
            await made.start(flow, concurrency)
            await flow.done.wait()
        seconds = time.perf_counter() - started
    finally:
        await made.aclose()
    return RelayRun(count * STAGES / seconds, flow.gaps)


# -- in memory -----------------------------------------------------------------------------------------------


class MemoryRelay:
    """Three `asyncio.Queue`s: the cost of moving a message between tasks, for scale."""

    def __init__(self, size: int) -> None:
        self.body = b"x" * size
        self.queues = [asyncio.Queue[bytes]() for _ in range(STAGES)]
        self.tasks: list[asyncio.Task[None]] = []

    async def send(self, count: int) -> None:
        for _ in range(count):
            self.queues[0].put_nowait(self.body)

    async def start(self, flow: Flow, concurrency: int) -> None:
        async def stage(i: int) -> None:
            while True:
                item = await self.queues[i].get()
                flow.received(i)
                if i < STAGES - 1:
                    flow.sending()
                    self.queues[i + 1].put_nowait(item)
                else:
                    flow.finished()

        self.tasks = [asyncio.create_task(stage(i)) for i in range(STAGES) for _ in range(concurrency)]

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def memory_relay(size: int) -> Relay:
    return MemoryRelay(size)


# -- RabbitMQ ------------------------------------------------------------------------------------------------


class RabbitMQRelay:
    """aio-pika: durable quorum queues, persistent messages, confirms awaited before each ack."""

    def __init__(self, connection: Any, publisher: Any, names: list[str], size: int) -> None:
        self.connection = connection
        self.publisher = publisher
        self.names = names
        self.body = b"x" * size
        self.consumers: list[Any] = []  # their channels, closed before the queues are deleted

    @classmethod
    async def open(cls, url: str, size: int) -> RabbitMQRelay:
        import aio_pika

        connection = await aio_pika.connect_robust(url)
        publisher = await connection.channel(publisher_confirms=True)
        names = [f"bench-raw-{uuid.uuid4().hex[:8]}.{i}" for i in range(STAGES)]
        for name in names:
            await publisher.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        return cls(connection, publisher, names, size)

    async def publish(self, body: bytes, queue: str) -> None:
        import aio_pika

        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.publisher.default_exchange.publish(message, routing_key=queue)  # waits for the confirm

    async def send(self, count: int) -> None:
        await asyncio.gather(*(self.publish(self.body, self.names[0]) for _ in range(count)))

    async def start(self, flow: Flow, concurrency: int) -> None:
        for i, name in enumerate(self.names):
            channel = await self.connection.channel()
            self.consumers.append(channel)
            await channel.set_qos(prefetch_count=concurrency)
            queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await queue.consume(self.stage(i, flow))

    def stage(self, i: int, flow: Flow) -> Callable[[Any], Awaitable[None]]:
        async def on_message(message: Any) -> None:
            flow.received(i)
            if i < STAGES - 1:
                flow.sending()
                await self.publish(message.body, self.names[i + 1])
            await message.ack()
            if i == STAGES - 1:
                flow.finished()

        return on_message

    async def aclose(self) -> None:
        try:
            for channel in self.consumers:
                await channel.close()
            admin = await self.connection.channel()
            for name in self.names:
                await admin.queue_delete(name)
        finally:
            await self.connection.close()


def rabbitmq_relay(url: str) -> Callable[[int], Awaitable[Relay]]:
    async def make(size: int) -> Relay:
        return await RabbitMQRelay.open(url, size)

    return make


# -- Redis ---------------------------------------------------------------------------------------------------


class RedisRelay:
    """redis-py: a stream and group per queue; each batch's `XADD`s confirmed before its `XACK`."""

    def __init__(self, client: Any, size: int) -> None:
        self.client = client
        self.names = [f"bench-raw-{uuid.uuid4().hex[:8]}.{i}" for i in range(STAGES)]
        self.body = b"x" * size
        self.tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, url: str, size: int) -> RedisRelay:
        import redis.asyncio as redis

        made = cls(redis.Redis.from_url(url), size)
        for name in made.names:
            await made.client.xgroup_create(name, "g", id="0", mkstream=True)
        return made

    async def send(self, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _ in range(count):
            pipe.xadd(self.names[0], {"body": self.body})
        await pipe.execute()

    async def start(self, flow: Flow, concurrency: int) -> None:
        self.tasks = [asyncio.create_task(self.stage(i, flow, concurrency)) for i in range(STAGES)]

    async def stage(self, i: int, flow: Flow, concurrency: int) -> None:
        settled: list[bytes] = []  # relayed and confirmed: acknowledged with the next read
        while not flow.done.is_set():
            read = self.client.pipeline(transaction=False)
            if settled:
                read.xack(self.names[i], "g", *settled)
            read.xreadgroup("g", f"c{i}", {self.names[i]: ">"}, count=concurrency, block=100)
            replies: list[Any] = await read.execute()
            entries = [entry for _, batch in replies[-1] or [] for entry in batch]
            if entries:
                flow.received(i)
            if entries and i < STAGES - 1:
                flow.sending()
                publish = self.client.pipeline(transaction=False)
                for _, fields in entries:
                    publish.xadd(self.names[i + 1], fields)
                await publish.execute()  # raises if any XADD failed: nothing is acknowledged then
            settled = [entry_id for entry_id, _ in entries]
            if entries and i == STAGES - 1:
                flow.finished(len(entries))

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.delete(*self.names)
        await self.client.aclose()


def redis_relay(url: str) -> Callable[[int], Awaitable[Relay]]:
    async def make(size: int) -> Relay:
        return await RedisRelay.open(url, size)

    return make


def relays(rabbitmq_url: str, redis_url: str) -> dict[str, Callable[[int], Awaitable[Relay]]]:
    """How to open each transport's relay."""
    from ._sqlite_raw import sqlite_relay  # the standard library only: no extra to import

    return {
        "inmemory": memory_relay,
        "rabbitmq": rabbitmq_relay(rabbitmq_url),
        "redis": redis_relay(redis_url),
        "sqlite": sqlite_relay,
    }
