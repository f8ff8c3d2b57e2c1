"""The cancel board of a `RabbitMQTransport`: a stream every process reads from its first entry.

A post is a persistent message, confirmed by the broker, on the durable stream `<namespace>.@cancellations`
(`x-queue-type: stream`; an activity name cannot start with `@`, so no activity's queue can take its name). Its
body is the record, its headers the correlation ID and the time (Unix seconds) until which it must be kept. The
stream keeps its entries `CANCEL_RETENTION` (`x-max-age`, 8 days), so that is the longest ttl a post may ask for.

Each transport object has one `CancelStreamReader`: it consumes the stream from `first` on a channel of its own
into a `CancelBook`, so reads are local. It subscribes again from `first` after a reconnect, or when the broker
cancels it (the stream was deleted); records read twice are one. Opening it catches up: it publishes a marker with
a fresh nonce and returns once it has read the marker back, so everything posted before is in the book.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Collection, Mapping
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from aio_pika.abc import AbstractRobustChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage

from ...exceptions import TransportError, UserError
from .._cancel_book import CancelBook, check_post, readable_id, warn_full
from ..base import MAX_CANCEL_RECORD_BYTES
from ._consumer import Resubscribing, underlay
from ._errors import BROKER_ERRORS, broker_errors
from ._wire import header_text

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

__all__ = (
    "CANCEL_RETENTION",
    "CANCEL_STREAM",
    "CancelStreamReader",
    "RabbitMQCancelBoard",
    "cancel_stream_arguments",
)

logger = logging.getLogger("paigeant_ai.transports.rabbitmq")

CANCEL_STREAM = "@cancellations"
"""The stream's name after `<namespace>.`."""
CANCEL_RETENTION = 8 * 24 * 3600.0
"""Seconds the stream keeps an entry (its `x-max-age`): the longest ttl a post may ask for."""
FOR_HEADER = "x-paigeant-cancel-for"
"""The correlation ID a record cancels."""
UNTIL_HEADER = "x-paigeant-cancel-until"
"""Unix seconds until which a record must be kept."""
MARKER_HEADER = "x-paigeant-cancel-marker"
"""The nonce of a catch-up marker (no record)."""
_PREFETCH = 1000  # a stream consumer must have one; acks are sent as entries are read
_PERSISTENT = 2


def cancel_stream_arguments() -> dict[str, Any]:
    """The arguments the cancellations stream is declared with."""
    return {"x-queue-type": "stream", "x-max-age": f"{round(CANCEL_RETENTION / 86400)}D"}


class RabbitMQCancelBoard:
    """The cancel board of a `RabbitMQTransport`: posts go to the stream, reads come from this process's reader.

    A read opens the reader first if nobody has (`open()` does it ahead); a post made here is in this process's
    records as soon as it returns.
    """

    def __init__(self, transport: RabbitMQTransport) -> None:
        self.transport = transport

    async def post(self, correlation_id: str, record: bytes, *, ttl: float) -> None:
        check_post(correlation_id, record, ttl)
        if ttl > CANCEL_RETENTION:
            raise UserError(
                f"RabbitMQ keeps cancel records at most {CANCEL_RETENTION:g}s (8 days, the stream's x-max-age); "
                f"post with a ttl of at most that, not {ttl:g}s"
            )
        reader = self.transport.cancel_reader()
        if reader.book.full(correlation_id, record):
            warn_full(correlation_id)
            return
        headers = {FOR_HEADER: correlation_id, UNTIL_HEADER: f"{time.time() + ttl:.3f}"}
        await reader.publish(record, headers)
        reader.book.add(correlation_id, record, asyncio.get_running_loop().time() + ttl)

    async def records(self, correlation_id: str) -> list[bytes]:
        book = await self._book()
        return book.records(correlation_id) if readable_id(correlation_id) else []

    async def cancelled_among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        book = await self._book()
        return book.among([cid for cid in correlation_ids if readable_id(cid)])

    async def open(self) -> None:
        await self.transport.cancel_reader().open()

    async def close(self) -> None:
        """Nothing to do: the reader is the transport's, closed by its `disconnect()`."""

    async def _book(self) -> CancelBook:
        reader = self.transport.cancel_reader()
        await reader.open()
        return reader.book


class CancelStreamReader(Resubscribing):
    """Reads the cancellations stream of one transport object into its `book`, from the first entry on."""

    _doing = "reading"
    stream = CANCEL_STREAM

    def __init__(self, transport: RabbitMQTransport) -> None:
        self.transport = transport
        self.queue = transport.queue_name(self.stream)
        self.book = CancelBook()
        self._channel: AbstractRobustChannel | None = None
        self._tag: str | None = None
        self._caught_up = False
        self._closed = False
        self._opening = asyncio.Lock()
        self._subscribing = asyncio.Lock()
        self._resubscribing: asyncio.Task[None] | None = None
        self._markers: dict[str, asyncio.Future[None]] = {}

    async def open(self) -> None:
        """Start reading if not yet, then catch up once: return when every earlier post is in the book."""
        if self._caught_up:
            return
        async with self._opening:
            if self._caught_up:
                return
            if self._closed:
                raise TransportError("the cancel board's reader is closed: the transport was disconnected")
            if self._channel is None:
                await self._start()
            await self._catch_up()
            self._caught_up = True

    async def close(self) -> None:
        """Stop reading (the broker forgets the consumer with its channel)."""
        if self._closed:
            return
        self._closed = True
        if self._resubscribing is not None:
            self._resubscribing.cancel()
        for marker in self._markers.values():
            if not marker.done():
                marker.set_exception(TransportError("the transport was disconnected while its cancel board caught up"))
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.reopen_callbacks.discard(self._on_reopen)
            with suppress(*BROKER_ERRORS, TimeoutError):
                async with asyncio.timeout(self.transport.timeout):
                    await channel.close()

    async def publish(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Publish to the stream and wait for the broker's confirm (declaring the stream the first time)."""
        await self._declare()
        properties = spec.Basic.Properties(headers=dict(headers), delivery_mode=_PERSISTENT)
        await self.transport._send(body, properties, self.queue)

    # -- reading ---------------------------------------------------------------------------------------------

    async def _start(self) -> None:
        connection = self.transport._require()[0]
        await self._declare()
        with broker_errors(f"reading {self.queue!r}"):
            channel = await connection.channel(publisher_confirms=False)
        try:
            with broker_errors(f"reading {self.queue!r}"):
                await channel.set_qos(prefetch_count=_PREFETCH)  # a robust channel sets it again when reopened
            self._channel = channel
            channel.reopen_callbacks.add(self._on_reopen)
            await self.subscribe()
        except BaseException:
            self._channel = None
            with suppress(*BROKER_ERRORS):
                await channel.close()
            raise

    async def subscribe(self) -> None:
        """Consume the stream from its first entry on the channel as it now is, unless already consuming there."""
        robust = self._channel
        if robust is None or self._closed:
            return
        async with self._subscribing:
            with broker_errors(f"reading {self.queue!r}"):
                async with asyncio.timeout(self.transport.timeout):
                    await robust.ready()
                    channel = await underlay(robust)
                    if self._tag is not None and self._tag in channel.consumers:
                        return
                    await channel.queue_declare(self.queue, durable=True, arguments=self._arguments())
                    consumed = await channel.basic_consume(
                        self.queue, self._on_message, arguments={"x-stream-offset": self._offset()}
                    )
                    self._tag = consumed.consumer_tag
            cancels: set[Any] | None = getattr(channel, "on_consumer_cancel_callbacks", None)  # aiormq 7 and later
            if cancels is not None:
                cancels.add(self._on_cancelled)

    async def _declare(self) -> None:
        await self.transport.declare_cancel_stream()

    def _arguments(self) -> dict[str, Any]:
        return cancel_stream_arguments()

    def _offset(self) -> str | datetime:
        """Where reading starts: the first entry (a cancel is kept as long as the stream keeps it)."""
        return "first"

    async def _on_message(self, message: DeliveredMessage) -> None:
        try:
            headers = message.header.properties.headers or {}
            marker = header_text(headers.get(MARKER_HEADER))
            if marker is None:
                self._take(message.body, headers)
            elif (waiting := self._markers.get(marker)) is not None and not waiting.done():
                waiting.set_result(None)  # a catch-up's marker: everything before it has been read
        finally:
            # Not once this reader closes its channel: an ack sent after its `channel.close`, and read by the broker
            # after the channel is gone, is an error on the whole connection (CHANNEL_ERROR).
            if not self._closed and not message.channel.is_closed:
                with suppress(*BROKER_ERRORS):
                    await message.channel.basic_ack(cast(int, message.delivery_tag), wait=False)

    def _take(self, body: bytes, headers: Mapping[str, Any]) -> None:
        """Put one entry of the stream (no marker) in the book; ignore anything that is no cancel record."""
        correlation_id = header_text(headers.get(FOR_HEADER))
        until = _seconds(header_text(headers.get(UNTIL_HEADER)))
        if correlation_id is None or not readable_id(correlation_id) or until is None:
            logger.debug("ignoring a message on %r that is no cancel record (no correlation ID or expiry)", self.queue)
            return
        if len(body) > MAX_CANCEL_RECORD_BYTES:
            logger.debug("ignoring a cancel record on %r over %d bytes", self.queue, MAX_CANCEL_RECORD_BYTES)
            return
        left = min(until - time.time(), CANCEL_RETENTION)
        if not self.book.add(correlation_id, bytes(body), asyncio.get_running_loop().time() + left):
            logger.debug("ignoring a cancel record for %r from %r: it has enough records", correlation_id, self.queue)

    async def _catch_up(self, within: float | None = None) -> None:
        nonce = uuid.uuid4().hex
        seen = self._markers[nonce] = asyncio.get_running_loop().create_future()
        within = self.transport.timeout if within is None else within
        try:
            await self.publish(b"", {MARKER_HEADER: nonce})
            async with asyncio.timeout(within):
                await seen
        except TimeoutError as exc:
            raise TransportError(
                f"catching up with {self.queue!r}: the marker published to it did not come back within "
                f"{within:g}s; check that RabbitMQ runs with streams enabled (3.9 or later)"
            ) from exc
        finally:
            del self._markers[nonce]
            if seen.done() and not seen.cancelled():
                seen.exception()  # retrieved, also when the publish failed before it was awaited


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
