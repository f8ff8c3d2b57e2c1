"""The progress streams of a `RabbitMQTransport`: one stream queue, `<namespace>.@progress`, shared by every workflow.

One shared stream rather than one per workflow: a RabbitMQ stream is a replicated log with files of its own, it
cannot expire when idle (`x-expires` does not apply to streams), so a stream per workflow would leave a queue
behind for every workflow ever run. The shared stream is bounded by age (`x-max-age`, `PROGRESS_RETENTION`) and
size (`x-max-length-bytes`, `PROGRESS_MAX_BYTES`), trimmed a segment at a time. The cost is on the reading side:
RabbitMQ 3.10 has no server-side filtering, so a watcher reads every workflow's entries from where it starts
(the first entry kept, or its offset) and keeps its own workflow's, named in the header `x-paigeant-progress-for`.
A watcher that resumes from an offset reads on from there only.

A reader consumes on a channel of its own, not robust: when the connection drops, `read` raises `TransportError`
and the watcher opens a new reader from its last offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aiormq import spec
from aiormq.abc import DeliveredMessage

from ...exceptions import TransportError
from ..base import ProgressEntry
from ._errors import BROKER_ERRORS, broker_errors
from ._wire import header_text, string_headers

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

__all__ = (
    "PROGRESS_FOR_HEADER",
    "PROGRESS_RETENTION",
    "PROGRESS_STREAM",
    "RabbitMQProgressReader",
    "progress_stream_arguments",
)

logger = logging.getLogger("paigeant_ai.transports.rabbitmq")

PROGRESS_STREAM = "@progress"
"""The stream's name after `<namespace>.`."""
PROGRESS_RETENTION = 24 * 3600.0
"""Seconds the stream keeps an entry (its `x-max-age`)."""
PROGRESS_MAX_BYTES = 2 * 2**30
"""The most bytes the stream keeps (its `x-max-length-bytes`); past it the oldest segment goes."""
PROGRESS_FOR_HEADER = "x-paigeant-progress-for"
"""The correlation ID an entry belongs to."""
_SEGMENT_BYTES = 64 * 2**20
_PREFETCH = 500
_PERSISTENT = 2


def progress_stream_arguments() -> dict[str, Any]:
    """The arguments the progress stream is declared with."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{round(PROGRESS_RETENTION / 3600)}h",
        "x-max-length-bytes": PROGRESS_MAX_BYTES,
        "x-stream-max-segment-size-bytes": _SEGMENT_BYTES,
    }


async def append_progress(
    transport: RabbitMQTransport, correlation_id: str, body: bytes, headers: Mapping[str, str]
) -> None:
    queue = transport.queue_name(PROGRESS_STREAM)
    await transport.declare_progress_stream()
    properties = spec.Basic.Properties(
        headers={**headers, PROGRESS_FOR_HEADER: correlation_id}, delivery_mode=_PERSISTENT
    )
    await transport._send(body, properties, queue)  # pyright: ignore[reportPrivateUsage]


class RabbitMQProgressReader:
    """Reads the shared stream from an offset and keeps one workflow's entries."""

    def __init__(self, transport: RabbitMQTransport, correlation_id: str, after: str | None) -> None:
        self.transport = transport
        self.correlation_id = correlation_id
        self.queue = transport.queue_name(PROGRESS_STREAM)
        self._after = int(after) if after is not None and after.isdigit() else -1
        self._found: asyncio.Queue[ProgressEntry | BaseException] = asyncio.Queue()
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._closed = False

    async def open(self) -> None:
        await self.transport.declare_progress_stream()
        connection = self.transport._underlay_connection(f"reading {self.queue!r}")  # pyright: ignore[reportPrivateUsage]
        with broker_errors(f"reading {self.queue!r}"):
            async with asyncio.timeout(self.transport.timeout):
                channel = self._channel = await connection.channel()
                await channel.basic_qos(prefetch_count=_PREFETCH)
                start: int | str = self._after + 1 if self._after >= 0 else "first"
                await channel.basic_consume(self.queue, self._on_message, arguments={"x-stream-offset": start})
        channel.closing.add_done_callback(self._on_closed)

    async def read(self, wait: float) -> list[ProgressEntry]:
        if self._closed:
            return []
        try:
            async with asyncio.timeout(wait):
                first = await self._found.get()
        except TimeoutError:
            return []
        items = [first]
        while not self._found.empty():
            items.append(self._found.get_nowait())
        entries: list[ProgressEntry] = []
        for item in items:
            if isinstance(item, BaseException):
                raise TransportError(f"reading {self.queue!r}: the channel closed ({item!r})")
            entries.append(item)
        return entries

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with suppress(*BROKER_ERRORS, TimeoutError):
                async with asyncio.timeout(self.transport.timeout):
                    await channel.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        headers: Mapping[str, Any] = message.header.properties.headers or {}
        try:
            offset = headers.get("x-stream-offset")
            # A consumer starts at the chunk that holds its offset: entries before it come again first.
            if isinstance(offset, int) and offset > self._after:
                self._after = offset
                if header_text(headers.get(PROGRESS_FOR_HEADER)) == self.correlation_id:
                    found = string_headers(headers)
                    found.pop(PROGRESS_FOR_HEADER, None)
                    found.pop("x-stream-offset", None)
                    self._found.put_nowait(ProgressEntry(str(offset), bytes(message.body), found))
        finally:
            # Not once this reader closes its channel: an ack sent after its `channel.close`, and read by the broker
            # after the channel is gone, is an error on the whole connection (CHANNEL_ERROR).
            if not self._closed and not message.channel.is_closed:
                with suppress(*BROKER_ERRORS):
                    await message.channel.basic_ack(cast(int, message.delivery_tag), wait=False)

    def _on_closed(self, closing: asyncio.Future[Any]) -> None:
        if not self._closed:
            reason = closing.exception() if not closing.cancelled() else None
            self._found.put_nowait(reason or TransportError("the channel closed"))
