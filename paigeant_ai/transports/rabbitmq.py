"""`RabbitMQTransport`: durable quorum queues on RabbitMQ 3.10+ through aio-pika, with no plugin.

What it declares, for the namespace `paigeant`:

- `paigeant.<address>`: one durable quorum queue per address. Consumers on it compete; messages are persistent.
  Its delivery limit ends a poison loop: a message handed out `max_deliveries` times without being settled (its
  consumers keep dying) moves to the dead-letter queue.
- `paigeant.dead-letter`: the dead-letter queue. Every letter says why in `x-paigeant-reason` and where it came
  from in `x-paigeant-source`. It and `paigeant.events` keep at most `max_length` messages, dropping the oldest.
- `paigeant.<address>@delay-<bound>`: delayed messages wait in one of a few queues per address, sorted by how
  long they wait, each message with its own expiry. When it expires, RabbitMQ dead-letters it back to
  `paigeant.<address>` (at-least-once dead-lettering, so nothing is lost on the way).

One connection reconnects by itself; it carries one channel for publishing (every publish waits for its own
confirm, while other publishes go out meanwhile), one for declarations and counts, and one per consumer (its
prefetch). Consumers resume after a reconnect, and after the broker cancels them (their queue was deleted);
deliveries handed out before a reconnect can no longer be acked and come back from the broker.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar, cast

try:
    import aio_pika
    import aiormq
    import aiormq.exceptions
    import pamqp.exceptions
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
    from aiormq import spec
    from aiormq.abc import AbstractConnection, DeliveredMessage
except ImportError as _exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError('the RabbitMQ transport needs aio-pika: pip install "paigeant-ai[rabbitmq]"') from _exc

from ..contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ..exceptions import TransportError, UserError
from ..settings import Settings
from .base import REASON_HEADER, SOURCE_HEADER, ConsumerBase, Delivery, TransportBase, dead_letter_headers, redact_url

__all__ = ("RabbitMQTransport",)

logger = logging.getLogger("paigeant_ai.transports.rabbitmq")

T = TypeVar("T")

DELAY_BUCKETS: tuple[tuple[str, float], ...] = (
    ("1s", 1.0),
    ("5s", 5.0),
    ("15s", 15.0),
    ("1m", 60.0),
    ("5m", 300.0),
    ("30m", 1800.0),
    ("2h", 7200.0),
    ("long", math.inf),
)
"""The delay queues of each address: a name suffix and the longest delay it holds. Each message expires on its
own; one that waits behind a longer-lived message of the same queue is held up to that queue's bound."""

_MAX_DELAY = (2**32 - 1) / 1000  # RabbitMQ's largest per-message TTL, in seconds
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death"})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")

_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    OSError,  # includes ConnectionError and TimeoutError
)
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
)


class RabbitMQTransport(TransportBase):
    """A transport on RabbitMQ: durable quorum queues, publisher confirms, manual acks.

    Args:
        url: The AMQP URL; defaults to `PAIGEANT_RABBITMQ_URL` (`amqp://guest:guest@127.0.0.1:5672/`).
        namespace: The prefix of every queue; defaults to `PAIGEANT_NAMESPACE` (`paigeant`).
        max_deliveries: The poison limit: a message handed out this many times without being settled (its
            consumers died or went away) moves to the dead-letter queue; `None` for no limit.
        max_length: `events` and `dead-letter` keep at most this many messages, dropping the oldest; `None`
            for no limit.
        timeout: Seconds an operation waits for the broker, including a reconnect in progress, before it
            fails with `TransportError`.
        reconnect_interval: Seconds between reconnection attempts after the connection is lost.
        connection_name: How the connection appears in RabbitMQ's management tools.

    `max_deliveries` and `max_length` are arguments of the queues: RabbitMQ refuses to declare an existing queue
    with other values, so every process of a namespace must use the same ones (or delete the queues first).
    """

    name = "rabbitmq"
    process_local = False
    requeue_lag = 1.0  # a retry waits in a delay queue, then is dead-lettered back: for that moment nothing counts it

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        max_deliveries: int | None = 10,
        max_length: int | None = 10_000,
        timeout: float = 30.0,
        reconnect_interval: float = 2.0,
        connection_name: str | None = None,
    ) -> None:
        settings = Settings.from_env()
        self.url = url or settings.rabbitmq_url
        self.namespace = namespace or settings.namespace
        if max_deliveries is not None and max_deliveries < 1:
            raise UserError("max_deliveries must be at least 1 (or None for no limit)")
        if max_length is not None and max_length < 1:
            raise UserError("max_length must be at least 1 (or None for no limit)")
        self.max_deliveries = max_deliveries
        self.max_length = max_length
        self.timeout = timeout
        self.reconnect_interval = reconnect_interval
        self.connection_name = connection_name or f"paigeant {socket.gethostname()} pid {os.getpid()}"
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._admin: AbstractRobustChannel | None = None
        self._publishing: aiormq.Channel | None = None  # the open channel under `_publisher`
        self._consumers: set[_RabbitMQConsumer] = set()
        self._declared: set[str] = set()
        self._queues: dict[str, str] = {}  # address -> its declared queue, looked up on every publish
        self._declaring: dict[str, asyncio.Future[int]] = {}
        self._connect_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RabbitMQTransport({redact_url(self.url)!r}, namespace={self.namespace!r})"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connection is not None:
                return
            try:
                connection = await aio_pika.connect_robust(
                    self.url,
                    timeout=self.timeout,
                    reconnect_interval=self.reconnect_interval,
                    client_properties={"connection_name": self.connection_name},
                )
            except (*_BROKER_ERRORS, ValueError) as exc:
                raise TransportError(
                    f"cannot connect to RabbitMQ at {redact_url(self.url)}: {_explain(exc)}; "
                    "check that it runs and that PAIGEANT_RABBITMQ_URL (or url=) points at it"
                ) from exc
            try:
                with _broker_errors("opening channels"):
                    self._publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    self._admin = await connection.channel(publisher_confirms=False)
                self._connection = connection
                await self._declare(self.queue_name(DEAD_LETTER), self._queue_arguments(DEAD_LETTER))
            except BaseException:
                self._connection = self._publisher = self._admin = None
                with suppress(*_BROKER_ERRORS):
                    await connection.close()
                raise

    async def disconnect(self) -> None:
        for consumer in list(self._consumers):
            with suppress(TransportError):
                await consumer.aclose()
        connection, self._connection = self._connection, None
        self._publisher = self._admin = self._publishing = None
        if connection is not None:
            with suppress(*_BROKER_ERRORS):
                await connection.close()

    # -- queues ----------------------------------------------------------------------------------------------

    def queue_name(self, address: str) -> str:
        """The RabbitMQ queue of `address`."""
        return f"{self.namespace}.{address}"

    def _delay_queue_name(self, address: str, bucket: str) -> str:
        # `@` never occurs in an activity name, so a delay queue cannot clash with an activity's queue.
        return f"{self.queue_name(address)}@delay-{bucket}"

    def _queue_arguments(self, address: str) -> dict[str, Any]:
        if address in RESERVED_ADDRESSES:
            bounded = {"x-max-length": self.max_length} if self.max_length is not None else {}
            return {"x-queue-type": "quorum", **bounded}
        arguments = _dead_letter_to(self.queue_name(DEAD_LETTER))
        if self.max_deliveries is not None:
            # RabbitMQ counts the returns: the message goes once it has come back more than this many times.
            arguments["x-delivery-limit"] = self.max_deliveries - 1
        return arguments

    async def _declare(self, name: str, arguments: dict[str, Any]) -> int:
        """Declare a durable queue (idempotent); return how many of its messages are ready for consumers."""
        admin = self._require()[2]

        async def declare() -> int:
            channel = await admin.get_underlay_channel()
            declared = await channel.queue_declare(name, durable=True, arguments=arguments)
            return declared.message_count or 0

        ready = await self._on_channel(admin, f"declaring queue {name!r}", declare)
        self._declared.add(name)
        return ready

    async def _on_channel(
        self, channel: AbstractRobustChannel, action: str, operation: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `operation`, which is safe to repeat; while its channel is down (a reconnect, or the broker closed
        it on an error), wait for the channel to be restored and run it again, up to `timeout` seconds in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                with _broker_errors(action):
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        return await operation()
            except TransportError as exc:
                if not isinstance(exc.__cause__, _CONNECTION_LOST) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.05)  # let the channel's close callback start its restore
            with _broker_errors(f"{action}: waiting for the connection to RabbitMQ"):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await channel.ready()

    async def _ensure_queue(self, address: str) -> str:
        name = self.queue_name(address)
        if name not in self._declared:
            await self._declare_once(name, self._queue_arguments(address))
        self._queues[address] = name
        return name

    async def _declare_once(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare `name` if no other task is declaring it already; then wait for that declaration."""
        declaring = self._declaring.get(name)
        if declaring is None:
            declaring = self._declaring[name] = asyncio.ensure_future(self._declare(name, arguments))
            declaring.add_done_callback(functools.partial(self._declaration_done, name))
        # Shielded: a caller that is cancelled must not cancel the declaration the others wait for.
        await asyncio.shield(declaring)

    def _forget(self, queue: str) -> None:
        """Declare `queue` again before the next publish to it (it was deleted behind this transport's back)."""
        self._declared.discard(queue)
        self._queues = {address: name for address, name in self._queues.items() if name != queue}

    def _declaration_done(self, name: str, declaring: asyncio.Future[int]) -> None:
        if self._declaring.get(name) is declaring:
            del self._declaring[name]
        if not declaring.cancelled():
            declaring.exception()  # retrieved here too: every waiter may have been cancelled

    async def _count_delayed(self, address: str) -> int:
        target = await self._ensure_queue(address)
        count = 0
        for bucket, _ in DELAY_BUCKETS:
            count += await self._declare(self._delay_queue_name(address, bucket), _dead_letter_to(target))
        return count

    async def _ensure_delay_queue(self, address: str, delay: float) -> str:
        target = await self._ensure_queue(address)
        bucket = next(bucket for bucket, bound in DELAY_BUCKETS if delay <= bound)
        name = self._delay_queue_name(address, bucket)
        if name not in self._declared:
            await self._declare_once(name, _dead_letter_to(target))
        return name

    def _require(self) -> tuple[AbstractRobustConnection, AbstractRobustChannel, AbstractRobustChannel]:
        if self._connection is None or self._publisher is None or self._admin is None:
            raise TransportError("the RabbitMQ transport is not connected: call `await transport.connect()` first")
        return self._connection, self._publisher, self._admin

    # -- publishing ------------------------------------------------------------------------------------------

    async def publish(
        self,
        address: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        self._require()
        if delay > 0:
            if delay > _MAX_DELAY:
                raise UserError(f"a delay of {delay:g}s is longer than RabbitMQ allows ({_MAX_DELAY:g}s)")
            queue = await self._ensure_delay_queue(address, delay)
            # The delay queue dead-letters the message to its address when it expires; RabbitMQ drops the
            # expiration on the way, so it does not expire again there.
            expiration: str | None = str(max(1, math.ceil(delay * 1000)))
        else:
            queue = self._queues.get(address) or await self._ensure_queue(address)
            expiration = None
        properties = spec.Basic.Properties(
            headers=dict(headers) if headers else None,
            delivery_mode=_PERSISTENT,
            expiration=expiration,
        )
        await self._send(body, properties, queue)

    async def _send(self, body: bytes, properties: spec.Basic.Properties, queue: str) -> None:
        """Publish and wait for the broker's confirm; while the connection is down, wait for it first.

        A publish is never sent twice over a lost connection: without its confirm nobody knows whether the broker
        has it, and a second identical copy would look like a replay to the next worker. The error says so, and
        the caller (a worker leaves its delivery unacked for redelivery) decides.
        """
        for attempt in range(2):
            channel = self._publishing
            if channel is None or channel.is_closed:
                channel = await self._publishing_channel(queue)
            try:
                # Publishes are pipelined: each waits for its own confirm, not for the socket or other publishes.
                await channel.basic_publish(
                    body, routing_key=queue, properties=properties, mandatory=True, timeout=self.timeout, wait=False
                )
                return
            except aiormq.exceptions.PublishError as exc:
                if attempt:
                    raise TransportError(f"publishing to {queue!r}: {_explain(exc)}") from exc
            except (*_CONNECTION_LOST, asyncio.CancelledError, TimeoutError) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelling():
                    raise
                raise TransportError(
                    f"publishing to {queue!r}: no confirm from RabbitMQ ({_explain(exc)}); "
                    "the message may or may not have been published"
                ) from exc
            except _BROKER_ERRORS as exc:
                raise TransportError(f"publishing to {queue!r}: {_explain(exc)}") from exc
            # Unroutable: the queue was deleted after it was declared here. Nothing was enqueued, so declare it
            # again and publish once more.
            self._forget(queue)
            await self._redeclare(queue)

    async def _publishing_channel(self, queue: str) -> aiormq.Channel:
        """The channel under the publisher, opened again after a reconnect; while it is being restored, wait."""
        publisher = self._require()[1]
        action = f"publishing to {queue!r}"
        await self._channel_ready(publisher, action)
        with _broker_errors(action):
            channel = await _underlay(publisher)
        self._publishing = channel
        return channel

    async def _channel_ready(self, channel: AbstractRobustChannel, action: str) -> None:
        """Wait, up to `timeout`, for a channel that is down (the connection is being restored) to be back."""
        if not channel.is_closed:
            return
        with _broker_errors(f"{action}: waiting for the connection to RabbitMQ"):
            async with asyncio.timeout(self.timeout):
                while channel.is_closed:
                    await channel.ready()
                    if channel.is_closed:
                        await asyncio.sleep(0.05)  # closed, and its restore not started yet

    async def _redeclare(self, queue: str) -> None:
        address, _, bucket = queue.removeprefix(f"{self.namespace}.").partition("@delay-")
        if bucket:
            await self._declare(queue, _dead_letter_to(await self._ensure_queue(address)))
        else:
            await self._declare(queue, self._queue_arguments(address))

    # -- consuming -------------------------------------------------------------------------------------------

    async def consume(self, address: str, *, prefetch: int = 10) -> _RabbitMQConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        connection = self._require()[0]
        name = await self._ensure_queue(address)
        with _broker_errors(f"consuming {name!r}"):
            channel = await connection.channel(publisher_confirms=False)
        consumer = _RabbitMQConsumer(self, address, name, channel)
        try:
            with _broker_errors(f"consuming {name!r}"):
                await channel.set_qos(prefetch_count=prefetch)  # a robust channel sets it again when reopened
            await consumer.subscribe()
        except BaseException:
            with suppress(*_BROKER_ERRORS):
                await channel.close()
            raise
        self._consumers.add(consumer)
        return consumer

    def _to_delivery(self, address: str, message: DeliveredMessage, handle: Any) -> Delivery:
        raw: Mapping[str, Any] = message.header.properties.headers or {}
        headers = _string_headers(raw)
        if address == DEAD_LETTER and REASON_HEADER not in headers:
            headers.update(self._broker_dead_letter_headers(raw))
        count = raw.get("x-delivery-count")
        if isinstance(count, int) and not isinstance(count, bool):
            delivery_count = count + 1
        else:
            delivery_count = 2 if message.redelivered else 1
        return Delivery(address, message.body, headers, delivery_count, handle)

    def _broker_dead_letter_headers(self, raw: Mapping[str, Any]) -> dict[str, str]:
        """Reason and source of a letter RabbitMQ dead-lettered itself (the poison limit)."""
        deaths = raw.get("x-death")
        # The most recent death comes first; a delayed message also carries the expiry that ended its delay.
        last: Mapping[str, Any] = (
            deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        )
        reason = _text(last.get("reason", raw.get("x-first-death-reason")))
        queue = _text(last.get("queue", raw.get("x-first-death-queue")))
        if not reason:
            return {}
        if reason == "delivery_limit":
            detail = (
                f"poison message: handed out {self.max_deliveries} times without being settled "
                "(its consumers kept failing or dying); RabbitMQ's delivery limit moved it here"
            )
        else:
            detail = f"dead-lettered by RabbitMQ ({reason})"
        source = queue.removeprefix(f"{self.namespace}.") if queue else ""
        return {REASON_HEADER: detail, SOURCE_HEADER: source}

    # -- settling --------------------------------------------------------------------------------------------

    def _owner(self, delivery: Delivery) -> tuple[_RabbitMQConsumer, int]:
        handle = delivery.handle
        owner = handle[0] if isinstance(handle, tuple) else None
        if not isinstance(owner, _RabbitMQConsumer) or owner.transport is not self:
            raise TransportError("this delivery was not handed out by this transport")
        return owner, handle[1]

    async def ack(self, delivery: Delivery) -> None:
        consumer, token = self._owner(delivery)
        message = consumer.handed.pop(token, None)
        if message is not None:
            await _ack(message, delivery.address)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        consumer, token = self._owner(delivery)
        if token in consumer.handed:
            await self.publish(delivery.address, delivery.body, headers=delivery.headers, delay=delay)
            await self.ack(delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        consumer, token = self._owner(delivery)
        if token in consumer.handed:
            await self.publish(DEAD_LETTER, delivery.body, headers=dead_letter_headers(delivery, reason))
            await self.ack(delivery)

    async def pending(self, address: str) -> int:
        """Messages ready or delayed at `address`, plus those handed out and unsettled in this process.

        RabbitMQ does not report deliveries other processes hold unacked, so they are not counted.
        """
        self._require()
        ready = await self._declare(self.queue_name(address), self._queue_arguments(address))
        delayed = await self._count_delayed(address)
        held = sum(consumer.unsettled for consumer in self._consumers if consumer.address == address)
        return ready + delayed + held

    # -- who consumes (`ConsumerWatch`) ----------------------------------------------------------------------

    async def consumers(self, address: str) -> int:
        """How many consumers the queue of `address` has now, as RabbitMQ counts them; 0 if it does not exist."""
        name = self.queue_name(address)
        action = f"counting the consumers of {name!r}"
        with _broker_errors(action):
            async with asyncio.timeout(self.timeout):
                # A channel of its own, not robust: the broker closes it when the queue does not exist.
                channel = await self._underlay_connection(action).channel()
                try:
                    declared = await channel.queue_declare(name, passive=True)  # never creates a misspelt queue
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return 0
                finally:
                    if not channel.is_closed:
                        await channel.close()
        return declared.consumer_count or 0

    async def consumed_addresses(self) -> list[str] | None:
        """`None`: AMQP cannot list queues (only RabbitMQ's management API can)."""
        return None

    async def last_consumed(self, address: str) -> datetime | None:
        """Now if the queue of `address` has a consumer; else `None`, as RabbitMQ does not say since when."""
        return datetime.now(UTC) if await self.consumers(address) else None

    def _underlay_connection(self, action: str) -> AbstractConnection:
        underlay = self._require()[0].transport
        if underlay is None:
            raise TransportError(f"{action}: the connection to RabbitMQ is being restored; try again")
        return underlay.connection


class _RabbitMQConsumer(ConsumerBase):
    """Deliveries from one queue, on a channel of its own whose prefetch bounds how many are unsettled.

    It consumes on the channel under the robust one, so a delivery costs no more than aiormq's own task: it
    subscribes again itself when the robust channel is reopened after a reconnect, and when the broker cancels it
    (its queue was deleted), declaring the queue first.
    """

    _ids = itertools.count(1)

    def __init__(self, transport: RabbitMQTransport, address: str, queue: str, channel: AbstractRobustChannel) -> None:
        self.transport = transport
        self.address = address
        self.queue = queue
        self.channel = channel
        self.handed: dict[int, DeliveredMessage] = {}
        self._buffer: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._closed = False
        self._tag: str | None = None
        self._subscribing = asyncio.Lock()
        self._resubscribing: asyncio.Task[None] | None = None
        channel.reopen_callbacks.add(self._on_reopen)

    @property
    def unsettled(self) -> int:
        """Deliveries received and not yet settled: handed out, or waiting in the buffer."""
        return len(self.handed) + self._buffer.qsize()

    async def subscribe(self) -> None:
        """Declare the queue and consume it on the channel as it now is, unless this consumer already does."""
        arguments = self.transport._queue_arguments(self.address)
        async with self._subscribing:
            with _broker_errors(f"consuming {self.queue!r}"):
                async with asyncio.timeout(self.transport.timeout):
                    await self.channel.ready()  # reopened with its prefetch set: a consumer before it gets no limit
                    channel = await _underlay(self.channel)
                    if self._closed or (self._tag is not None and self._tag in channel.consumers):
                        return
                    await channel.queue_declare(self.queue, durable=True, arguments=arguments)
                    self._tag = (await channel.basic_consume(self.queue, self._on_delivery)).consumer_tag
            cancels: set[Any] | None = getattr(channel, "on_consumer_cancel_callbacks", None)  # aiormq 7 and later
            if cancels is not None:
                cancels.add(self._on_cancelled)

    async def _on_reopen(self, channel: object) -> None:
        try:
            await self.subscribe()
        except TransportError:
            self._subscribe_later()  # aio-pika drops what a reopen callback raises

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self._tag:
            self._subscribe_later()

    def _subscribe_later(self) -> None:
        if not self._closed and self._resubscribing is None:
            self._resubscribing = asyncio.create_task(self._resubscribe(), name=f"paigeant-resubscribe-{self.queue}")

    async def _resubscribe(self) -> None:
        """Subscribe again until it works or the consumer is closed."""
        try:
            while not self._closed:
                try:
                    await self.subscribe()
                    return
                except TransportError as exc:
                    interval = self.transport.reconnect_interval
                    logger.warning("consuming %r again failed (%s); retrying in %gs", self.queue, exc, interval)
                    await asyncio.sleep(interval)
        finally:
            self._resubscribing = None

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        if not self._closed:
            self._buffer.put_nowait(message)

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            message = await self._buffer.get()  # cancelling here loses nothing: the buffer keeps the message
            if message is None:
                self._buffer.put_nowait(None)  # wake any other waiter too
                raise StopAsyncIteration
            if _from_closed_channel(message):
                continue  # its channel died; the broker delivers it again on the restored one
            token = next(self._ids)
            self.handed[token] = message
            return self.transport._to_delivery(self.address, message, (self, token))

    async def aclose(self) -> None:
        """Stop consuming; everything received and not settled goes back to the broker with the channel."""
        if self._closed:
            return
        self._closed = True
        self.channel.reopen_callbacks.discard(self._on_reopen)
        if self._resubscribing is not None:
            self._resubscribing.cancel()
        self.handed.clear()
        while not self._buffer.empty():
            self._buffer.get_nowait()
        self._buffer.put_nowait(None)
        self.transport._consumers.discard(self)
        down = self.channel.is_closed
        try:
            with _broker_errors(f"closing the consumer of {self.address!r}"):
                async with asyncio.timeout(self.transport.timeout):
                    await self.channel.close()  # also keeps a reconnect from restoring this consumer
        except TransportError:
            if not down:
                raise  # when the connection is down, the broker has taken the deliveries back already


async def _ack(message: DeliveredMessage, address: str) -> None:
    try:
        # Refused once the channel closed: the broker has taken the delivery back by then. An ack has no reply in
        # AMQP; waiting for it to reach the socket would only hold the caller up.
        await message.channel.basic_ack(cast(int, message.delivery_tag), wait=False)  # deliveries carry one
    except _BROKER_ERRORS as exc:
        raise TransportError(f"acknowledging a delivery from {address!r}: {_explain(exc)}") from exc


async def _underlay(channel: AbstractRobustChannel) -> aiormq.Channel:
    """The aiormq channel under `channel`, as it now is (a reconnect replaces it)."""
    return cast(aiormq.Channel, await channel.get_underlay_channel())


def _from_closed_channel(message: DeliveredMessage) -> bool:
    return message.channel.is_closed


def _dead_letter_to(queue: str) -> dict[str, Any]:
    """Quorum queue arguments that dead-letter to `queue`, at least once (never dropped on the way)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
    }


def _string_headers(raw: Mapping[str, Any]) -> dict[str, str]:
    """The headers as strings, without the ones RabbitMQ sets itself (delivery count, death records)."""
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if key in _BROKER_HEADERS or key.startswith(_BROKER_HEADER_PREFIXES):
            continue
        text = _text(value)
        if text is not None:
            headers[key] = text
    return headers


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    return None  # tables, arrays and timestamps are not string headers


@contextmanager
def _broker_errors(action: str) -> Generator[None]:
    """Translate aio-pika, aiormq and socket errors into `TransportError`, the cause chained."""
    try:
        yield
    except asyncio.CancelledError as exc:
        if _cancelling():
            raise
        # aiormq cancels what waits on a channel that closes under it: that is a lost connection, not a cancel.
        raise TransportError(f"{action}: the channel closed while waiting for RabbitMQ") from exc
    except _BROKER_ERRORS as exc:
        raise TransportError(f"{action}: {_explain(exc)}") from exc


def _cancelling() -> bool:
    """True if the current task is being cancelled (not merely woken by a channel that closed under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _explain(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.PublishError):
        return "RabbitMQ could not route the message to its queue (was the queue deleted?)"
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return "RabbitMQ refused the message (negative publisher confirm)"
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return (
            f"{exc}; the queue exists with other arguments: use the same max_deliveries and max_length in "
            "every process of the namespace, or delete the queue first"
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError):
        return f"{exc}; check the user and password in the URL"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"{exc}; the user lacks permissions on this virtual host"
    if isinstance(exc, aiormq.exceptions.ChannelInvalidStateError):
        return "the channel is closed (the connection was lost; it reconnects by itself)"
    if isinstance(exc, TimeoutError):
        return "RabbitMQ did not answer in time"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
