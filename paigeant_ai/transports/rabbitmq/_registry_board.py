"""The registry board of a `RabbitMQTransport`: a stream of worker records, read from ten minutes back.

A post is a persistent message, confirmed by the broker, on the durable stream `<namespace>.@registry` (`x-queue-type:
stream`, `x-max-age` an hour, in segments of 8 MiB); its headers name the worker and the time (Unix seconds) until which
the record is kept. Each transport object has one `RegistryStreamReader`, which reads the stream from
`REGISTRY_RETENTION` seconds back (a timestamp offset) into a map of each worker's latest record. Each read catches
up first with a marker, as the cancel board's reader does when it opens (see `_cancel_board`): a read sees every post
confirmed before it, as on Redis, so a dispatcher never refuses a step whose worker advertised a moment ago.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..._registry import REGISTRY_RETENTION
from ...exceptions import TransportError
from ..base import MAX_REGISTRY_RECORD_BYTES, check_registry_post
from ._cancel_board import CancelStreamReader, _seconds  # pyright: ignore[reportPrivateUsage]
from ._wire import header_text

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

__all__ = ("REGISTRY_STREAM", "RabbitMQRegistryBoard", "RegistryStreamReader", "registry_stream_arguments")

REGISTRY_STREAM = "@registry"
"""The stream's name after `<namespace>.`."""
WORKER_HEADER = "x-paigeant-worker"
"""The worker a record is of."""
UNTIL_HEADER = "x-paigeant-registry-until"
"""Unix seconds until which a record is kept."""


def registry_stream_arguments() -> dict[str, Any]:
    """The arguments the registry stream is declared with."""
    # Retention drops whole segments: small ones keep the stream near an hour of heartbeats, not 500 MB of them.
    return {"x-queue-type": "stream", "x-max-age": "1h", "x-stream-max-segment-size-bytes": 8 * 2**20}


CATCH_UP_WITHIN = 5.0
"""Seconds a read of the registry waits for its marker to come back before it gives up (a dispatcher then goes on
without the check, with a warning)."""


class RabbitMQRegistryBoard:
    """The registry board of a `RabbitMQTransport`: posts go to the stream, reads come from this process's reader."""

    def __init__(self, transport: RabbitMQTransport) -> None:
        self.transport = transport

    async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
        check_registry_post(worker_id, record, ttl)
        until = time.time() + min(ttl, REGISTRY_RETENTION)
        reader = self.transport.registry_reader()
        await reader.publish(record, {WORKER_HEADER: worker_id, UNTIL_HEADER: f"{until:.3f}"})
        reader.latest[worker_id] = (record, until)

    async def records(self) -> list[bytes]:
        """The records still kept, with every post confirmed before this read: the reader catches up each time."""
        reader = self.transport.registry_reader()
        await reader.open()
        await reader.catch_up()
        return reader.current()

    async def open(self) -> None:
        await self.transport.registry_reader().open()

    async def close(self) -> None:
        """Nothing to do: the reader is the transport's, closed by its `disconnect()`."""


class RegistryStreamReader(CancelStreamReader):
    """Reads the registry stream of one transport object into `latest`: each worker's latest record."""

    stream = REGISTRY_STREAM

    def __init__(self, transport: RabbitMQTransport) -> None:
        super().__init__(transport)
        self.latest: dict[str, tuple[bytes, float]] = {}  # worker ID -> (record, Unix seconds it is kept until)

    async def catch_up(self) -> None:
        """Return once every record posted before the call is in `latest` (a marker's round trip).

        A reader whose marker does not come back (its subscription was lost with a broker restart and not yet
        restored) is dropped, so that the next read starts afresh on a channel of its own.
        """
        try:
            await self._catch_up(within=min(self.transport.timeout, CATCH_UP_WITHIN))
        except TransportError:
            self.transport.drop_registry_reader(self)
            raise

    def current(self) -> list[bytes]:
        """The records still kept."""
        now = time.time()
        for worker_id in [key for key, (_, until) in self.latest.items() if until <= now]:
            del self.latest[worker_id]
        return [record for record, _ in self.latest.values()]

    async def _declare(self) -> None:
        await self.transport.declare_registry_stream()

    def _arguments(self) -> dict[str, Any]:
        return registry_stream_arguments()

    def _offset(self) -> str | datetime:
        return datetime.now(UTC) - timedelta(seconds=REGISTRY_RETENTION)

    def _take(self, body: bytes, headers: Mapping[str, Any]) -> None:
        worker_id = header_text(headers.get(WORKER_HEADER))
        until = _seconds(header_text(headers.get(UNTIL_HEADER)))
        if not worker_id or until is None or len(body) > MAX_REGISTRY_RECORD_BYTES:
            return  # not a record a board posted: readers verify what they keep anyway
        self.latest[worker_id] = (bytes(body), min(until, time.time() + REGISTRY_RETENTION))
