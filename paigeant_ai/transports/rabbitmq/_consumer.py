"""`RabbitMQConsumer`: deliveries from one queue, on a channel of its own."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage

from ...exceptions import TransportError
from ..base import ConsumerBase, Delivery
from ._errors import BROKER_ERRORS, broker_errors, explain
from ._wire import to_delivery

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

__all__ = ("RabbitMQConsumer", "Resubscribing", "ack", "underlay")

logger = logging.getLogger("paigeant_ai.transports.rabbitmq")


class Resubscribing:
    """What subscribes again by itself: when its robust channel is reopened after a reconnect, and when the broker
    cancels its consumer (its queue was deleted). A subclass sets `transport`, `queue`, `_tag`, `_closed` and
    `_resubscribing`, registers `_on_reopen` with its channel and `_on_cancelled` with the channel underneath, and
    implements `subscribe`."""

    transport: RabbitMQTransport
    queue: str
    _tag: str | None
    _closed: bool
    _resubscribing: asyncio.Task[None] | None
    _doing = "consuming"
    """What it does with its queue, for the log."""

    async def subscribe(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

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
        """Subscribe again until it works or this is closed."""
        try:
            while not self._closed:
                try:
                    await self.subscribe()
                    return
                except TransportError as exc:
                    interval = self.transport.reconnect_interval
                    logger.warning("%s %r again failed (%s); retrying in %gs", self._doing, self.queue, exc, interval)
                    await asyncio.sleep(interval)
        finally:
            self._resubscribing = None


class RabbitMQConsumer(Resubscribing, ConsumerBase):
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
        self._buffer: asyncio.Queue[tuple[DeliveredMessage, float] | None] = asyncio.Queue()
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
        arguments = self.transport.queue_arguments(self.address)
        async with self._subscribing:
            with broker_errors(f"consuming {self.queue!r}"):
                async with asyncio.timeout(self.transport.timeout):
                    await self.channel.ready()  # reopened with its prefetch set: a consumer before it gets no limit
                    channel = await underlay(self.channel)
                    if self._closed or (self._tag is not None and self._tag in channel.consumers):
                        return
                    await channel.queue_declare(self.queue, durable=True, arguments=arguments)
                    arguments = self.transport.consume_arguments()
                    consuming = await channel.basic_consume(self.queue, self._on_delivery, arguments=arguments)
                    self._tag = consuming.consumer_tag
            cancels: set[Any] | None = getattr(channel, "on_consumer_cancel_callbacks", None)  # aiormq 7 and later
            if cancels is not None:
                cancels.add(self._on_cancelled)

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        if not self._closed:
            self._buffer.put_nowait((message, time.monotonic()))  # the broker's ack deadline runs from now

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            received = await self._buffer.get()  # cancelling here loses nothing: the buffer keeps the message
            if received is None:
                self._buffer.put_nowait(None)  # wake any other waiter too
                raise StopAsyncIteration
            message, received_at = received
            if from_closed_channel(message):
                continue  # its channel died; the broker delivers it again on the restored one
            token = next(self._ids)
            self.handed[token] = message
            delivery = to_delivery(self.address, message, (self, token), self.transport)
            delivery.received_at = received_at
            return delivery

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
        self.transport.consumer_closed(self)
        down = self.channel.is_closed
        try:
            with broker_errors(f"closing the consumer of {self.address!r}"):
                async with asyncio.timeout(self.transport.timeout):
                    await self.channel.close()  # also keeps a reconnect from restoring this consumer
        except TransportError:
            if not down:
                raise  # when the connection is down, the broker has taken the deliveries back already


async def ack(message: DeliveredMessage, address: str) -> None:
    try:
        # Refused once the channel closed: the broker has taken the delivery back by then. An ack has no reply in
        # AMQP; waiting for it to reach the socket would only hold the caller up.
        await message.channel.basic_ack(cast(int, message.delivery_tag), wait=False)  # deliveries carry one
    except BROKER_ERRORS as exc:
        raise TransportError(f"acknowledging a delivery from {address!r}: {explain(exc)}") from exc


async def requeue(message: DeliveredMessage, address: str) -> None:
    """Return `message` to its queue as a redelivery (`basic.reject` with requeue: the broker counts it)."""
    try:
        await message.channel.basic_reject(cast(int, message.delivery_tag), requeue=True, wait=False)
    except BROKER_ERRORS as exc:
        raise TransportError(f"handing back a delivery from {address!r}: {explain(exc)}") from exc


async def underlay(channel: AbstractRobustChannel) -> aiormq.Channel:
    """The aiormq channel under `channel`, as it now is (a reconnect replaces it)."""
    return cast(aiormq.Channel, await channel.get_underlay_channel())


def from_closed_channel(message: DeliveredMessage) -> bool:
    return message.channel.is_closed
