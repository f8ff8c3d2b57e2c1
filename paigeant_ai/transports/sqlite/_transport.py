"""`SQLiteTransport`: every address a queue in one table of one SQLite file, and the stores every process shares."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ...contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ...exceptions import TransportError, UserError
from ...settings import Settings
from ..base import Delivery, TransportBase, check_lease_settings, dead_letter_headers, ensure_bytes
from . import _queue as q
from ._boards import SQLiteCancelBoard, SQLiteRegistryBoard
from ._consumer import LIVE_WITHIN, Handle, SQLiteConsumer
from ._db import Database
from ._progress import PROGRESS_RETENTION, SQLiteProgressReader, append_progress
from ._stores import (
    SQLiteDedupeStore,
    SQLiteJoinStore,
    SQLiteReplayCache,
    SQLiteWaitingStore,
    SQLiteWorkflowStore,
    claim_key,
    release_key,
)
from ._sweep import SWEEP_EVERY, sweep

__all__ = ("SQLiteTransport",)

logger = logging.getLogger("paigeant_ai.transports.sqlite")


class SQLiteTransport(TransportBase):
    """A durable transport in one SQLite file, for one machine: no server to run.

    Several worker processes on the machine share the file; share one instance between the dispatcher and the
    workers of a process. Use a local disk: SQLite's locks do not hold on network file systems.

    Args:
        path: The database file; defaults to `PAIGEANT_SQLITE_PATH` (`./paigeant.sqlite3`, in the working
            directory). Created with its tables on first use.
        namespace: Kept apart from other namespaces in the same file; defaults to `PAIGEANT_NAMESPACE`.
        visibility_timeout: Seconds after which the deliveries of a process that stopped renewing its leases (it
            died) are delivered again.
        max_deliveries: Deliveries after which an unsettled message goes to `dead-letter` instead.
        trim_length: `events` and `dead-letter` keep at most this many messages (the oldest are dropped).
        poll_interval: Longest wait, in seconds, before a consumer looks for what other processes published.
        synchronous: `full` (default): a commit is on disk before `publish` returns, so a power cut loses
            nothing that was acknowledged. `normal`: faster; a power cut (not a crash of the process) may lose the
            last commits.
    """

    name = "sqlite"
    process_local = False
    requeue_lag = 0.0  # a delayed or retried message stays a row, counted by `pending()` all along
    progress_retention = PROGRESS_RETENTION

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str | None = None,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 10,
        trim_length: int = 10_000,
        poll_interval: float = 0.5,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        settings = Settings.from_env()
        self.path = Path(path if path is not None else settings.sqlite_path).expanduser().absolute()
        self.namespace = namespace or settings.namespace
        check_lease_settings(
            visibility_timeout=visibility_timeout,
            max_deliveries=max_deliveries,
            trim_length=trim_length,
            poll_interval=poll_interval,
        )
        if synchronous not in ("full", "normal"):
            raise UserError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.visibility_timeout = visibility_timeout
        self.max_deliveries = max_deliveries
        self.trim_length = trim_length
        self.poll_interval = poll_interval
        self.consumer_name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.db = Database(self.path, synchronous=synchronous.upper())
        self._consumers: set[SQLiteConsumer] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.progress_arrived = asyncio.Event()
        """Set, then cleared, by every append of this process: wakes its progress readers at once."""

    @property
    def location(self) -> str:
        """Where it keeps its data, for banners and logs: the file's absolute path."""
        return str(self.path)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self.db.opened:
            return
        await self.db.open()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="paigeant-sqlite-sweep")

    async def disconnect(self) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await self.db.close()

    async def _sweep_forever(self) -> None:
        """Delete what expired, now and then every `SWEEP_EVERY` seconds (Redis expires its keys by itself)."""
        ns = self.namespace
        while True:
            try:
                await self.db.call(lambda db: sweep(db, ns), doing="deleting expired rows")
            except TransportError as exc:
                logger.warning("%s; trying again in %gs", exc, SWEEP_EVERY)
            await asyncio.sleep(SWEEP_EVERY)

    # -- the Transport protocol ------------------------------------------------------------------------------

    async def publish(
        self,
        address: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        ensure_bytes(body)
        header_json = q.dump_headers(headers)
        keep = self.trim_length if address in RESERVED_ADDRESSES else None
        ns = self.namespace
        await self.db.call(
            lambda db: q.insert(db, ns, address, body, header_json, delay, keep), doing=f"publishing to {address!r}"
        )
        self._wake(address)

    async def consume(self, address: str, *, prefetch: int = 10) -> SQLiteConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        taken = {c.name for c in self._consumers}
        name = next(n for n in self._names() if n not in taken)
        consumer = SQLiteConsumer(self, address, name, prefetch)
        await consumer.start()
        self._consumers.add(consumer)
        return consumer

    async def ack(self, delivery: Delivery) -> None:
        handle = self._handle(delivery)
        try:
            acked = await self.db.call(
                lambda db: q.ack(db, handle.row_id, handle.consumer.name, handle.delivery_count),
                doing=f"acknowledging a delivery from {delivery.address!r}",
            )
        finally:  # settled, or failed: no longer renewed either way (see `SQLiteConsumer.settled`)
            handle.consumer.settled(handle)
        if acked is False:  # its lease lapsed and a consumer took it again: that delivery settles it
            logger.warning("not acknowledging a delivery from %r that was delivered again since", delivery.address)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        handle = self._handle(delivery)
        visible_at = time.time() + max(0.0, delay)
        try:
            await self.db.call(
                lambda db: db.execute(
                    # Unless its lease lapsed and a consumer (another, or this one again) took it since.
                    "UPDATE messages SET visible_at = ?, lease_owner = NULL, lease_until = NULL "
                    "WHERE id = ? AND lease_owner = ? AND delivery_count = ?",
                    (visible_at, handle.row_id, handle.consumer.name, handle.delivery_count),
                ),
                doing=f"handing back a delivery from {delivery.address!r}",
            )
        finally:
            handle.consumer.settled(handle)
        self._wake(delivery.address)

    async def give_back(self, delivery: Delivery) -> None:
        await self.retry_later(delivery, 0)  # it keeps its count: taken again, it is a redelivery

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        handle = self._handle(delivery)
        headers = q.dump_headers(dead_letter_headers(delivery, reason))
        ns, keep, owner = self.namespace, self.trim_length, handle.consumer.name
        try:
            moved = await self.db.call(
                lambda db: q.move(
                    db, handle.row_id, owner, handle.delivery_count, ns, DEAD_LETTER, delivery.body, headers, keep
                ),
                doing=f"dead-lettering a delivery from {delivery.address!r}",
            )
        finally:
            handle.consumer.settled(handle)
        if moved:
            self._wake(DEAD_LETTER)
        else:  # its lease lapsed and a consumer took it again: that delivery settles it
            logger.warning("not dead-lettering a delivery from %r that was delivered again since", delivery.address)

    async def pending(self, address: str) -> int:
        ns = self.namespace
        return await self.db.call(
            lambda db: db.execute(
                "SELECT count(*) FROM messages WHERE ns = ? AND address = ?", (ns, address)
            ).fetchone()[0],
            write=False,
            doing=f"counting the messages of {address!r}",
        )

    # -- who consumes (`ConsumerWatch`), from each consumer's heartbeat --------------------------------------

    async def consumers(self, address: str) -> int:
        """The consumers of `address` whose last heartbeat is recent (a live one beats every few seconds)."""
        ns, since = self.namespace, time.time() - LIVE_WITHIN
        return await self.db.call(
            lambda db: db.execute(
                "SELECT count(*) FROM consumers WHERE ns = ? AND address = ? AND closed = 0 AND seen > ?",
                (ns, address, since),
            ).fetchone()[0],
            write=False,
            doing=f"counting the consumers of {address!r}",
        )

    async def consumed_addresses(self) -> list[str]:
        ns, since = self.namespace, time.time() - LIVE_WITHIN
        rows = await self.db.call(
            lambda db: db.execute(
                "SELECT DISTINCT address FROM consumers WHERE ns = ? AND closed = 0 AND seen > ? ORDER BY address",
                (ns, since),
            ).fetchall(),
            write=False,
            doing="listing the consumed addresses",
        )
        return [row[0] for row in rows]

    async def last_consumed(self, address: str) -> datetime | None:
        ns = self.namespace
        seen = await self.db.call(
            lambda db: db.execute(
                "SELECT max(seen) FROM consumers WHERE ns = ? AND address = ?", (ns, address)
            ).fetchone()[0],
            write=False,
            doing=f"reading when {address!r} was last consumed",
        )
        return None if seen is None else datetime.fromtimestamp(min(seen, time.time()), UTC)

    # -- claims (`SharedClaims`) -----------------------------------------------------------------------------

    async def claim(self, key: str, value: str, *, ttl: float) -> str | None:
        """Set `key` to `value` for `ttl` seconds unless it is set; `None` if this call set it, else its value."""
        ns = self.namespace
        held = await self.db.call(lambda db: claim_key(db, ns, key, value.encode(), ttl), doing=f"claiming {key!r}")
        return None if held is None else held.decode(errors="replace")

    async def release(self, key: str, value: str) -> None:
        ns = self.namespace
        await self.db.call(lambda db: release_key(db, ns, key, value.encode()), doing=f"releasing {key!r}")

    # -- shared stores (`SharedStores`) ----------------------------------------------------------------------

    def dedupe_store(self) -> SQLiteDedupeStore:
        return SQLiteDedupeStore(self)

    def replay_cache(self) -> SQLiteReplayCache:
        return SQLiteReplayCache(self)

    def waiting_store(self) -> SQLiteWaitingStore:
        return SQLiteWaitingStore(self)

    def workflow_store(self) -> SQLiteWorkflowStore:
        return SQLiteWorkflowStore(self)

    def join_store(self) -> SQLiteJoinStore:
        """Where the branches of parallel groups meet (see `paigeant_ai._join`)."""
        return SQLiteJoinStore(self)

    # -- progress (`ProgressStreams`), cancellations (`Cancellations`), the registry (`Advertising`) --------

    async def append_progress(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        await append_progress(self, correlation_id, body, headers)

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> SQLiteProgressReader:
        return SQLiteProgressReader(self, correlation_id, after)

    def cancel_board(self) -> SQLiteCancelBoard:
        return SQLiteCancelBoard(self)

    def registry_board(self) -> SQLiteRegistryBoard:
        return SQLiteRegistryBoard(self)

    # -- helpers of the consumers ----------------------------------------------------------------------------

    def consumer_closed(self, consumer: SQLiteConsumer) -> None:
        """Forget `consumer`, which closed."""
        self._consumers.discard(consumer)

    def _wake(self, address: str) -> None:
        """Tell this process's consumers of `address` at once that something may be ready there."""
        for consumer in self._consumers:
            if consumer.address == address:
                consumer.wake.set()

    def _names(self) -> Iterator[str]:
        yield self.consumer_name
        n = 2
        while True:
            yield f"{self.consumer_name}-{n}"
            n += 1

    def _handle(self, delivery: Delivery) -> Handle:
        handle = delivery.handle
        if not isinstance(handle, Handle) or handle.consumer.transport is not self:
            raise TransportError("this delivery was not handed out by this transport")
        return handle
