"""`InMemoryTransport`: the default for development and the double every test can use.

It keeps the same promises as the real brokers within one process: deliveries are handed out up to the prefetch
limit, unacked ones come back when their consumer closes, delayed messages appear after their delay, and
dead letters keep their reason. It is not durable across processes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ..exceptions import TransportError
from ._cancel_book import CancelBook, check_post, readable_id, warn_full
from ._memory_progress import MemoryProgress, MemoryProgressReader
from .base import ConsumerBase, Delivery, TransportBase, check_registry_post, dead_letter_headers, ensure_bytes

__all__ = ("InMemoryCancelBoard", "InMemoryRegistryBoard", "InMemoryTransport")


@dataclass(slots=True)
class _Entry:
    body: bytes
    headers: dict[str, str]
    delivery_count: int = 0


@dataclass(slots=True)
class _Queue:
    ready: deque[_Entry] = field(default_factory=deque[_Entry])
    delayed: int = 0
    unacked: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ready_bytes: int = 0

    def put(self, entry: _Entry) -> None:
        self.ready.append(entry)
        self.ready_bytes += len(entry.body)
        self.arrived.set()

    def take(self) -> _Entry:
        entry = self.ready.popleft()
        self.ready_bytes -= len(entry.body)
        return entry


class InMemoryTransport(TransportBase):
    """A transport that lives in this process's memory.

    Share one instance between the dispatcher and the workers of a process. `max_length` (messages) and
    `max_bytes` bound the queues nobody may be reading (`events`, `dead-letter`): past either, the oldest
    entries are dropped. It also tells who consumes each address, holds the claims dispatchers make on
    correlation IDs (the latest `max_length`), for every dispatcher that shares it, and its cancel board.
    """

    name = "inmemory"
    process_local = True
    requeue_lag = 0.0  # a delayed message is counted by `pending()` until it is delivered
    progress_retention = 24 * 3600.0

    def __init__(self, *, namespace: str = "paigeant", max_length: int = 10_000, max_bytes: int = 16 * 2**20) -> None:
        self.namespace = namespace
        self.max_length = max_length
        self.max_bytes = max_bytes
        self._queues: dict[str, _Queue] = {}
        self._connected = False
        self._consumers: set[_MemoryConsumer] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._ids = itertools.count(1)
        self._last_consumed: dict[str, datetime] = {}
        self._claims: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (value, monotonic expiry)
        self._cancelled = CancelBook()
        self._registry: dict[str, tuple[bytes, float]] = {}  # worker ID -> (record, monotonic expiry)
        self._progress = MemoryProgress(max_entries=1000, max_workflows=1000, retention=self.progress_retention)

    async def connect(self) -> None:
        self._connected = True

    async def disconnect(self) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._connected = False

    def _queue(self, address: str) -> _Queue:
        self._require_connected()
        queue = self._queues.get(address)
        if queue is None:
            queue = self._queues[address] = _Queue()
        return queue

    async def publish(
        self,
        address: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        ensure_bytes(body)
        queue = self._queue(address)
        entry = _Entry(body, dict(headers or {}))
        if delay > 0:
            self._put_later(queue, entry, delay)
            return
        queue.put(entry)
        if address in RESERVED_ADDRESSES:
            self._cap(queue)

    def _cap(self, queue: _Queue) -> None:
        while len(queue.ready) > 1 and (len(queue.ready) > self.max_length or queue.ready_bytes > self.max_bytes):
            queue.take()

    def _put_later(self, queue: _Queue, entry: _Entry, delay: float) -> None:
        queue.delayed += 1

        def release() -> None:
            self._timers.discard(timer)
            queue.delayed -= 1
            queue.put(entry)

        timer = asyncio.get_running_loop().call_later(delay, release)
        self._timers.add(timer)

    async def consume(self, address: str, *, prefetch: int = 10) -> _MemoryConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        consumer = _MemoryConsumer(self, address, self._queue(address), prefetch)
        self._consumers.add(consumer)
        return consumer

    def _owner(self, delivery: Delivery) -> _MemoryConsumer:
        handle = delivery.handle
        owner = handle[0] if isinstance(handle, tuple) else None
        if not isinstance(owner, _MemoryConsumer) or owner.transport is not self:
            raise TransportError("this delivery was not handed out by this transport")
        return owner

    async def ack(self, delivery: Delivery) -> None:
        self._owner(delivery).settle(delivery)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        owner = self._owner(delivery)
        if owner.settle(delivery):
            entry = _Entry(delivery.body, dict(delivery.headers), delivery.delivery_count)
            if delay > 0:
                self._put_later(owner.queue, entry, delay)
            else:
                owner.queue.put(entry)

    async def give_back(self, delivery: Delivery) -> None:
        await self.retry_later(delivery, 0)  # it keeps its count: handed out again, it is a redelivery

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        owner = self._owner(delivery)
        if owner.settle(delivery):
            await self.publish(DEAD_LETTER, delivery.body, headers=dead_letter_headers(delivery, reason))

    async def pending(self, address: str) -> int:
        queue = self._queue(address)
        return len(queue.ready) + queue.delayed + queue.unacked

    # -- who consumes (`ConsumerWatch`) and claims (`SharedClaims`), within this process ------------------------

    async def consumers(self, address: str) -> int:
        self._require_connected()
        return sum(1 for consumer in self._consumers if consumer.address == address)

    async def consumed_addresses(self) -> list[str]:
        self._require_connected()
        return sorted({consumer.address for consumer in self._consumers})

    async def last_consumed(self, address: str) -> datetime | None:
        if await self.consumers(address):
            return datetime.now(UTC)
        return self._last_consumed.get(address)

    async def claim(self, key: str, value: str, *, ttl: float) -> str | None:
        now = time.monotonic()
        held = self._claims.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._claims[key] = (value, now + ttl)
        self._claims.move_to_end(key)
        while len(self._claims) > self.max_length:
            self._claims.popitem(last=False)
        return None

    async def release(self, key: str, value: str) -> None:
        held = self._claims.get(key)
        if held is not None and held[0] == value:
            del self._claims[key]

    # -- cancellations (`Cancellations`) ---------------------------------------------------------------------

    def cancel_board(self) -> InMemoryCancelBoard:
        """A board over this transport's cancel records, which only this process sees."""
        return InMemoryCancelBoard(self._cancelled)

    # -- the registry (`Advertising`) ------------------------------------------------------------------------

    def registry_board(self) -> InMemoryRegistryBoard:
        """A board over this transport's registry, which only this process sees."""
        return InMemoryRegistryBoard(self._registry)

    # -- progress (`ProgressStreams`) -------------------------------------------------------------------------

    async def append_progress(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        self._require_connected()
        self._progress.append(correlation_id, body, headers)

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> MemoryProgressReader:
        self._require_connected()
        return self._progress.reader(correlation_id, after)

    def _require_connected(self) -> None:
        if not self._connected:
            raise TransportError("the in-memory transport is not connected: call `await transport.connect()` first")


class _MemoryConsumer(ConsumerBase):
    def __init__(self, transport: InMemoryTransport, address: str, queue: _Queue, prefetch: int) -> None:
        self.transport = transport
        self.address = address
        self.queue = queue
        self.prefetch = prefetch
        self._unacked: dict[int, _Entry] = {}
        self._slot = asyncio.Event()
        self._slot.set()
        self._closed = False

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if len(self._unacked) >= self.prefetch:
                self._slot.clear()
                await self._slot.wait()
                continue
            if not self.queue.ready:
                self.queue.arrived.clear()
                await self.queue.arrived.wait()
                continue
            entry = self.queue.take()
            entry.delivery_count += 1
            tag = next(self.transport._ids)
            self._unacked[tag] = entry
            self.queue.unacked += 1
            if self.queue.ready:
                self.queue.arrived.set()  # wake the next competing consumer
            return Delivery(self.address, entry.body, dict(entry.headers), entry.delivery_count, (self, tag))

    def settle(self, delivery: Delivery) -> bool:
        """Forget the delivery; False if it was already settled or given back."""
        entry = self._unacked.pop(delivery.handle[1], None)
        if entry is None:
            return False
        self.queue.unacked -= 1
        self._slot.set()
        return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for entry in self._unacked.values():
            self.queue.unacked -= 1
            self.queue.put(entry)
        self._unacked.clear()
        self._slot.set()
        self.queue.arrived.set()
        self.transport._consumers.discard(self)
        self.transport._last_consumed[self.address] = datetime.now(UTC)


class InMemoryCancelBoard:
    """The cancel board of an `InMemoryTransport`: records in its memory, each kept until its ttl has passed."""

    def __init__(self, book: CancelBook) -> None:
        self._book = book

    async def post(self, correlation_id: str, record: bytes, *, ttl: float) -> None:
        check_post(correlation_id, record, ttl)
        if not self._book.add(correlation_id, record, asyncio.get_running_loop().time() + ttl):
            warn_full(correlation_id)

    async def records(self, correlation_id: str) -> list[bytes]:
        return self._book.records(correlation_id) if readable_id(correlation_id) else []

    async def cancelled_among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        return self._book.among([cid for cid in correlation_ids if readable_id(cid)])

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None


class InMemoryRegistryBoard:
    """The registry board of an `InMemoryTransport`: each worker's latest record, kept until its ttl has passed."""

    def __init__(self, records: dict[str, tuple[bytes, float]]) -> None:
        self._records = records

    async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
        check_registry_post(worker_id, record, ttl)
        self._records[worker_id] = (record, time.monotonic() + ttl)

    async def records(self) -> list[bytes]:
        now = time.monotonic()
        for worker_id in [key for key, (_, until) in self._records.items() if until <= now]:
            del self._records[worker_id]
        return [record for record, _ in self._records.values()]

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None
