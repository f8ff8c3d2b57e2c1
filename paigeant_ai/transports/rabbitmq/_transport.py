"""`RabbitMQTransport`: durable quorum queues, publisher confirms, manual acks (what it declares: see the package)."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import socket
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec
from aiormq.abc import AbstractConnection

from ...contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ...exceptions import TransportError, UserError
from ...settings import Settings
from ..base import Delivery, TransportBase, dead_letter_headers, ensure_bytes, redact_url
from ._cancel_board import CANCEL_STREAM, CancelStreamReader, RabbitMQCancelBoard, cancel_stream_arguments
from ._consumer import RabbitMQConsumer, ack, requeue, underlay
from ._errors import BROKER_ERRORS, CONNECTION_LOST, broker_errors, cancelling, channel_ready, explain, on_channel
from ._nodes import NodesConnection, node_urls, open_connection
from ._progress import (
    PROGRESS_RETENTION,
    PROGRESS_STREAM,
    RabbitMQProgressReader,
    append_progress,
    progress_stream_arguments,
)
from ._registry_board import REGISTRY_STREAM, RabbitMQRegistryBoard, RegistryStreamReader, registry_stream_arguments
from ._timeouts import broker_version, detach_after, own_consumer_timeout, per_consumer_timeout
from ._wire import dead_letter_to

__all__ = ("DELAY_BUCKETS", "RabbitMQTransport")

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


class RabbitMQTransport(TransportBase):
    """A transport on RabbitMQ: durable quorum queues, publisher confirms, manual acks.

    Args:
        url: The AMQP URL; defaults to `PAIGEANT_RABBITMQ_URL` (`amqp://guest:guest@127.0.0.1:5672/`). For a
            cluster, the URLs of several nodes (a list, or one string of URLs separated by commas): the transport
            connects to the first that answers and, when it loses that node, reconnects to the next (see
            `node_url`).
        namespace: The prefix of every queue; defaults to `PAIGEANT_NAMESPACE` (`paigeant`).
        max_deliveries: The poison limit: a message handed out this many times without being settled (its
            consumers died or went away) moves to the dead-letter queue; `None` for no limit.
        max_length: `events` and `dead-letter` keep at most this many messages, dropping the oldest; `None`
            for no limit.
        timeout: Seconds an operation waits for the broker, including a reconnect in progress, before it
            fails with `TransportError`.
        reconnect_interval: Seconds between reconnection attempts after the connection is lost.
        connection_name: How the connection appears in RabbitMQ's management tools.
        consumer_timeout: Seconds the broker lets a consumer hold a delivery unacked (its `consumer_timeout`);
            defaults to `PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT` (1800, RabbitMQ's default). A worker hands back what
            it still holds after half of it (see `detach_after`).
        lease: Seconds of the lease of a step whose delivery was handed back while it runs; defaults to
            `PAIGEANT_STEP_LEASE` (60). Another worker takes such a step over within about two leases of its
            worker's death.

    `max_deliveries` and `max_length` are arguments of the queues: RabbitMQ refuses to declare an existing queue
    with other values, so every process of a namespace must use the same ones (or delete the queues first).
    """

    name = "rabbitmq"
    process_local = False
    requeue_lag = 1.0  # a retry waits in a delay queue, then is dead-lettered back: for that moment nothing counts it

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        namespace: str | None = None,
        max_deliveries: int | None = 10,
        max_length: int | None = 10_000,
        timeout: float = 30.0,
        reconnect_interval: float = 2.0,
        connection_name: str | None = None,
        consumer_timeout: float | None = None,
        lease: float | None = None,
    ) -> None:
        settings = Settings.from_env()
        self.urls = node_urls(url or settings.rabbitmq_url)
        """The address of each node, in the order they are tried."""
        self.url = ",".join(self.urls)
        self.namespace = namespace or settings.namespace
        if max_deliveries is not None and max_deliveries < 1:
            raise UserError("max_deliveries must be at least 1 (or None for no limit)")
        if max_length is not None and max_length < 1:
            raise UserError("max_length must be at least 1 (or None for no limit)")
        self.max_deliveries = max_deliveries
        self.max_length = max_length
        self.consumer_timeout = settings.rabbitmq_consumer_timeout if consumer_timeout is None else consumer_timeout
        self.lease = settings.step_lease if lease is None else lease
        if not 0 < self.consumer_timeout < math.inf:
            raise UserError(
                "consumer_timeout must be a positive number of seconds (PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT)"
            )
        if not 0 < self.lease < math.inf:
            raise UserError("lease must be a positive number of seconds (PAIGEANT_STEP_LEASE)")
        self.server_version: tuple[int, int, int] | None = None
        """The broker's version, once connected (None if it does not say)."""
        self._own_timeout_ms: int | None = None
        self.timeout = timeout
        self.reconnect_interval = reconnect_interval
        self.connection_name = connection_name or f"paigeant {socket.gethostname()} pid {os.getpid()}"
        self._connection: NodesConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._admin: AbstractRobustChannel | None = None
        self._publishing: aiormq.Channel | None = None  # the open channel under `_publisher`
        self._consumers: set[RabbitMQConsumer] = set()
        self._declared: set[str] = set()
        self._queues: dict[str, str] = {}  # address -> its declared queue, looked up on every publish
        self._declaring: dict[str, asyncio.Future[int]] = {}
        self._connect_lock = asyncio.Lock()
        self._cancel_reader: CancelStreamReader | None = None
        self._registry_reader: RegistryStreamReader | None = None
        self._closing: set[asyncio.Future[None]] = set()  # readers dropped, closing in the background

    def __repr__(self) -> str:
        return f"RabbitMQTransport({redact_url(self.url)!r}, namespace={self.namespace!r})"

    @property
    def node_url(self) -> str | None:
        """The URL of the node the transport is connected to (or reconnecting to), its password hidden; `None`
        before `connect()`."""
        return self._connection.node_url if self._connection is not None else None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connection is not None:
                return
            connection = await open_connection(
                self.urls,
                within=self.timeout,
                reconnect_interval=self.reconnect_interval,
                client_properties={"connection_name": self.connection_name},
            )
            try:
                with broker_errors("opening channels"):
                    self._publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    self._admin = await connection.channel(publisher_confirms=False)
                self._connection = connection
                self.server_version = _server_version(connection)
                await self._declare(self.queue_name(DEAD_LETTER), self.queue_arguments(DEAD_LETTER))
            except BaseException:
                self._connection = self._publisher = self._admin = None
                with suppress(*BROKER_ERRORS):
                    await connection.close()
                raise

    async def disconnect(self) -> None:
        reader, self._cancel_reader = self._cancel_reader, None
        if reader is not None:
            await reader.close()
        registry, self._registry_reader = self._registry_reader, None
        if registry is not None:
            await registry.close()
        for consumer in list(self._consumers):
            with suppress(TransportError):
                await consumer.aclose()
        connection, self._connection = self._connection, None
        self._publisher = self._admin = self._publishing = None
        if connection is not None:
            with suppress(*BROKER_ERRORS):
                await connection.close()

    # -- queues ----------------------------------------------------------------------------------------------

    def queue_name(self, address: str) -> str:
        """The RabbitMQ queue of `address`."""
        return f"{self.namespace}.{address}"

    def _delay_queue_name(self, address: str, bucket: str) -> str:
        # `@` never occurs in an activity name, so a delay queue cannot clash with an activity's queue.
        return f"{self.queue_name(address)}@delay-{bucket}"

    def queue_arguments(self, address: str) -> dict[str, Any]:
        """The arguments the queue of `address` is declared with."""
        if address in RESERVED_ADDRESSES:
            bounded = {"x-max-length": self.max_length} if self.max_length is not None else {}
            return {"x-queue-type": "quorum", **bounded}
        arguments = dead_letter_to(self.queue_name(DEAD_LETTER))
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

        ready = await on_channel(admin, f"declaring queue {name!r}", declare, self.timeout)
        self._declared.add(name)
        return ready

    async def _ensure_queue(self, address: str) -> str:
        name = self.queue_name(address)
        if name not in self._declared:
            await self._declare_once(name, self.queue_arguments(address))
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
            count += await self._declare(self._delay_queue_name(address, bucket), dead_letter_to(target))
        return count

    async def _ensure_delay_queue(self, address: str, delay: float) -> str:
        target = await self._ensure_queue(address)
        bucket = next(bucket for bucket, bound in DELAY_BUCKETS if delay <= bound)
        name = self._delay_queue_name(address, bucket)
        if name not in self._declared:
            await self._declare_once(name, dead_letter_to(target))
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
        ensure_bytes(body)
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
                    raise TransportError(f"publishing to {queue!r}: {explain(exc)}") from exc
            except (*CONNECTION_LOST, asyncio.CancelledError, TimeoutError) as exc:
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise
                raise TransportError(
                    f"publishing to {queue!r}: no confirm from RabbitMQ ({explain(exc)}); "
                    "the message may or may not have been published"
                ) from exc
            except aiormq.exceptions.DeliveryError as exc:
                await self._renew_publishing(channel)
                raise TransportError(f"publishing to {queue!r}: {explain(exc)}") from exc
            except BROKER_ERRORS as exc:
                raise TransportError(f"publishing to {queue!r}: {explain(exc)}") from exc
            # Unroutable: the queue was deleted after it was declared here. Nothing was enqueued, so declare it
            # again and publish once more.
            self._forget(queue)
            await self._redeclare(queue)

    async def _publishing_channel(self, queue: str) -> aiormq.Channel:
        """The channel under the publisher, opened again after a reconnect; while it is being restored, wait."""
        publisher = self._require()[1]
        action = f"publishing to {queue!r}"
        await channel_ready(publisher, action, self.timeout)
        with broker_errors(action):
            channel = await underlay(publisher)
        self._publishing = channel
        return channel

    async def _renew_publishing(self, channel: aiormq.Channel) -> None:
        """Close the publishing channel after a negative confirm; the next publish opens a new one.

        On a cluster, a channel that started publishing to a quorum queue just as its leader's node died can be
        refused every message after the queue elected its new leader; a new channel is not.
        """
        if self._publishing is channel:
            self._publishing = None
        with suppress(*BROKER_ERRORS):
            await channel.close()

    async def _redeclare(self, queue: str) -> None:
        if queue == self.queue_name(CANCEL_STREAM):
            await self._declare(queue, cancel_stream_arguments())
            return
        if queue == self.queue_name(REGISTRY_STREAM):
            await self._declare(queue, registry_stream_arguments())
            return
        if queue == self.queue_name(PROGRESS_STREAM):
            await self._declare(queue, progress_stream_arguments())
            return
        address, _, bucket = queue.removeprefix(f"{self.namespace}.").partition("@delay-")
        if bucket:
            await self._declare(queue, dead_letter_to(await self._ensure_queue(address)))
        else:
            await self._declare(queue, self.queue_arguments(address))

    # -- consuming -------------------------------------------------------------------------------------------

    async def consume(self, address: str, *, prefetch: int = 10) -> RabbitMQConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        connection = self._require()[0]
        name = await self._ensure_queue(address)
        with broker_errors(f"consuming {name!r}"):
            channel = await connection.channel(publisher_confirms=False)
        consumer = RabbitMQConsumer(self, address, name, channel)
        try:
            with broker_errors(f"consuming {name!r}"):
                await channel.set_qos(prefetch_count=prefetch)  # a robust channel sets it again when reopened
            await consumer.subscribe()
        except BaseException:
            with suppress(*BROKER_ERRORS):
                await channel.close()
            raise
        self._consumers.add(consumer)
        return consumer

    # -- the broker's ack deadline (`AckDeadline`) ------------------------------------------------------------

    def detach_after(self, longest_step: float) -> float:
        """Seconds after which a consumer opened from now on, for steps of up to `longest_step` seconds, hands back
        a delivery it still holds: half the broker's timeout. A broker that accepts a consumer's own timeout
        (RabbitMQ 3.11.15 and later) is asked for one past twice the longest step, so no running step is handed
        back; on an older one, `consumer_timeout`, the broker's own, applies.
        """
        if per_consumer_timeout(self.server_version):
            own = own_consumer_timeout(longest_step)
            self._own_timeout_ms = math.ceil(own * 1000)
            return detach_after(own)
        return detach_after(self.consumer_timeout)

    def consume_arguments(self) -> dict[str, Any] | None:
        """The arguments of `basic.consume`: the consumer's own timeout, when it asks for one."""
        return {"x-consumer-timeout": self._own_timeout_ms} if self._own_timeout_ms is not None else None

    # -- settling --------------------------------------------------------------------------------------------

    def _owner(self, delivery: Delivery) -> tuple[RabbitMQConsumer, int]:
        handle = delivery.handle
        owner = handle[0] if isinstance(handle, tuple) else None
        if not isinstance(owner, RabbitMQConsumer) or owner.transport is not self:
            raise TransportError("this delivery was not handed out by this transport")
        return owner, handle[1]

    async def ack(self, delivery: Delivery) -> None:
        consumer, token = self._owner(delivery)
        message = consumer.handed.pop(token, None)
        if message is not None:
            await ack(message, delivery.address)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        consumer, token = self._owner(delivery)
        if token in consumer.handed:
            await self.publish(delivery.address, delivery.body, headers=delivery.headers, delay=delay)
            await self.ack(delivery)

    async def give_back(self, delivery: Delivery) -> None:
        consumer, token = self._owner(delivery)
        message = consumer.handed.pop(token, None)
        if message is not None:
            await requeue(message, delivery.address)

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
        ready = await self._declare(self.queue_name(address), self.queue_arguments(address))
        delayed = await self._count_delayed(address)
        held = sum(consumer.unsettled for consumer in self._consumers if consumer.address == address)
        return ready + delayed + held

    # -- cancellations (`Cancellations`) ---------------------------------------------------------------------

    def cancel_board(self) -> RabbitMQCancelBoard:
        return RabbitMQCancelBoard(self)

    def cancel_reader(self) -> CancelStreamReader:
        """This transport object's one reader of the cancellations stream (opened by the boards, closed by
        `disconnect()`)."""
        self._require()
        if self._cancel_reader is None:
            self._cancel_reader = CancelStreamReader(self)
        return self._cancel_reader

    async def declare_cancel_stream(self) -> None:
        """Declare the cancellations stream unless this transport has (idempotent)."""
        name = self.queue_name(CANCEL_STREAM)
        if name not in self._declared:
            await self._declare_once(name, cancel_stream_arguments())

    # -- the registry (`Advertising`) ------------------------------------------------------------------------

    def registry_board(self) -> RabbitMQRegistryBoard:
        return RabbitMQRegistryBoard(self)

    def registry_reader(self) -> RegistryStreamReader:
        """This transport object's one reader of the registry stream (opened by the boards, closed by
        `disconnect()`)."""
        self._require()
        if self._registry_reader is None:
            self._registry_reader = RegistryStreamReader(self)
        return self._registry_reader

    def drop_registry_reader(self, reader: RegistryStreamReader) -> None:
        """Forget `reader` (it no longer reads the stream) and close it in the background; the next read makes
        a new one."""
        if self._registry_reader is reader:
            self._registry_reader = None
            closing = asyncio.ensure_future(reader.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def declare_registry_stream(self) -> None:
        """Declare the registry stream unless this transport has (idempotent)."""
        name = self.queue_name(REGISTRY_STREAM)
        if name not in self._declared:
            await self._declare_once(name, registry_stream_arguments())

    # -- progress (`ProgressStreams`) -------------------------------------------------------------------------

    progress_retention = PROGRESS_RETENTION

    async def append_progress(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        await append_progress(self, correlation_id, body, headers)

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> RabbitMQProgressReader:
        reader = RabbitMQProgressReader(self, correlation_id, after)
        await reader.open()
        return reader

    async def declare_progress_stream(self) -> None:
        """Declare the progress stream unless this transport has (idempotent)."""
        name = self.queue_name(PROGRESS_STREAM)
        if name not in self._declared:
            await self._declare_once(name, progress_stream_arguments())

    # -- who consumes (`ConsumerWatch`) ----------------------------------------------------------------------

    async def consumers(self, address: str) -> int:
        """How many consumers the queue of `address` has now, as RabbitMQ counts them; 0 if it does not exist."""
        name = self.queue_name(address)
        action = f"counting the consumers of {name!r}"
        with broker_errors(action):
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

    def consumer_closed(self, consumer: RabbitMQConsumer) -> None:
        """Forget `consumer`, which closed."""
        self._consumers.discard(consumer)

    def _underlay_connection(self, action: str) -> AbstractConnection:
        underlay = self._require()[0].transport
        if underlay is None:
            raise TransportError(f"{action}: the connection to RabbitMQ is being restored; try again")
        return underlay.connection


def _server_version(connection: AbstractRobustConnection) -> tuple[int, int, int] | None:
    """The version the broker announced when `connection` opened."""
    underlay = connection.transport
    return broker_version(underlay.connection.server_properties or {}) if underlay is not None else None
