"""`SQLiteConsumer`: leases ready rows of one address, renews the leases of what it holds, and beats.

Waking up: a publish in this process sets the consumer's event at once; what other processes publish is found by
polling, every `_FIRST_POLL` seconds after something arrived, doubling while nothing does, up to the transport's
`poll_interval` (0.5 s by default), and never later than the next delayed message or lapsing lease is due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from ...exceptions import TransportError
from ..base import BufferedConsumer, Delivery
from . import _queue as q

if TYPE_CHECKING:
    from ._transport import SQLiteTransport

__all__ = ("LIVE_WITHIN", "Handle", "SQLiteConsumer")

logger = logging.getLogger("paigeant_ai.transports.sqlite")

_FIRST_POLL = 0.01
"""Seconds before the first look for messages from other processes after the last one arrived."""
_BEAT_EVERY = 5.0
"""Seconds between a consumer's heartbeats."""
LIVE_WITHIN = 15.0
"""A consumer whose last heartbeat is older than this many seconds is gone (its process died)."""


class Handle(NamedTuple):
    """What `Delivery.handle` holds on SQLite: who handed the row out, its id, and its delivery count, which tells
    this delivery from a later one of the same row (its lease lapsed and a consumer, maybe this one, took it again)."""

    consumer: SQLiteConsumer
    row_id: int
    delivery_count: int


class SQLiteConsumer(BufferedConsumer):
    """One consumer of an address: a background task leases rows into a local buffer (at most `prefetch` rows
    buffered or handed out and not settled); `__anext__` only takes from that buffer, so cancelling it loses
    nothing. Another task renews the leases every third of `visibility_timeout`, a third records its heartbeat."""

    def __init__(self, transport: SQLiteTransport, address: str, name: str, prefetch: int) -> None:
        super().__init__(address)
        self.transport = transport
        self.name = name
        self.prefetch = prefetch
        self.wake = asyncio.Event()
        self._unacked: dict[int, int] = {}  # row id -> the delivery count of the delivery handed out
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        t = self.transport
        await t.db.call(lambda db: q.give_back(db, self.name, None), doing=f"taking back the leases of {self.name}")
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._fetch_forever(), name=f"paigeant-sqlite-fetch-{self.address}"),
            asyncio.create_task(self._renew_forever(), name=f"paigeant-sqlite-renew-{self.address}"),
            asyncio.create_task(self._beat_forever(), name=f"paigeant-sqlite-beat-{self.address}"),
        ]

    # -- the consumer protocol -------------------------------------------------------------------------------

    def _handed_out(self, delivery: Delivery) -> None:
        self._unacked[delivery.handle.row_id] = delivery.handle.delivery_count

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        handed_out = list(self._unacked)  # the rest of what it holds, it never handed out
        self._buffer.clear()
        self._unacked.clear()
        self._arrived.set()
        self.transport.consumer_closed(self)
        if self.transport.db.opened:
            try:
                await self.transport.db.call(
                    lambda db: q.give_back(db, self.name, handed_out),
                    doing=f"handing back the deliveries of {self.name}",
                )
                await self._beat(closing=True)
            except TransportError:  # their leases lapse: they come back after the visibility timeout anyway
                logger.warning("could not hand back the deliveries of %s", self.name, exc_info=True)

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def settled(self, handle: Handle) -> None:
        """Stop renewing the lease of the delivery of `handle`: it was settled, or settling it failed. A delivery
        whose settling failed comes back once its lease lapses, as if this process had died, rather than be held
        while it lives. A later delivery of the same row keeps its lease."""
        if self._unacked.get(handle.row_id) == handle.delivery_count:
            del self._unacked[handle.row_id]
        self.wake.set()

    def _room_left(self) -> int:
        return self.prefetch - len(self._unacked) - len(self._buffer)

    # -- background work -------------------------------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        poll = _FIRST_POLL
        eager = True  # lease at once (a write); else look first (a read, which never waits for other processes)
        failures = 0
        while not self._closed:
            try:
                self.wake.clear()
                wait = self.transport.poll_interval
                if self._room_left() > 0:
                    due = 0.0 if eager else await self._next_ready()
                    if due == 0.0 and await self._take():
                        poll, eager = _FIRST_POLL, True
                        continue
                    wait = poll if due is None or due == 0.0 else max(0.001, min(poll, due))
                failures, eager = 0, False
                poll = min(poll * 2, self.transport.poll_interval)
                try:
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
                    poll, eager = _FIRST_POLL, True
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except TransportError as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("consuming %r: %s; trying again", self.address, exc)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
            except Exception as exc:
                logger.exception("consuming %r failed", self.address)
                self._failure = exc
                self._arrived.set()
                return

    async def _next_ready(self) -> float | None:
        """Seconds until a row of the address may be ready (0.0: one is now); None if it has none."""
        t = self.transport
        return await t.db.call(
            lambda db: q.next_ready(db, t.namespace, self.address),
            write=False,
            doing=f"looking for messages at {self.address!r}",
        )

    async def _take(self) -> int:
        """Lease ready rows into the buffer; dead-letter those delivered too often. How many were leased."""
        t = self.transport
        room = self._room_left()
        rows = await t.db.call(
            lambda db: q.claim_ready(db, t.namespace, self.address, self.name, room=room, lease=t.visibility_timeout),
            doing=f"consuming from {self.address!r}",
        )
        limit = t.max_deliveries
        for row in rows:
            delivery = Delivery(self.address, row.body, q.load_headers(row.headers), row.delivery_count)
            delivery.handle = Handle(self, row.id, row.delivery_count)
            if row.delivery_count <= limit:
                self._buffer.append(delivery)
            else:
                await self._poisoned(delivery)
        if self._buffer:
            self._arrived.set()
        return len(rows)

    async def _poisoned(self, delivery: Delivery) -> None:
        limit = self.transport.max_deliveries
        reason = (
            f"delivered {delivery.delivery_count} times without being settled (max_deliveries is {limit}); "
            "the process handling it may crash on it"
        )
        logger.warning("dead-lettering a message of %r: %s", self.address, reason)
        try:
            await self.transport.dead_letter(delivery, reason)
        except TransportError:  # it stays leased, unrenewed: it comes back after the visibility timeout
            logger.warning("could not dead-letter a message of %r", self.address, exc_info=True)

    async def _renew_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.transport.visibility_timeout / 3)
            try:
                await self._renew()
            except TransportError as exc:
                logger.warning("renewing the leases of %s: %s", self.name, exc)

    async def _renew(self) -> None:
        """Renew the leases of what this consumer holds; forget what was settled or taken over meanwhile."""
        t = self.transport
        held = [*self._unacked, *(delivery.handle.row_id for delivery in self._buffer)]
        if not held:
            return
        kept = await t.db.call(
            lambda db: q.renew(db, self.name, held, t.visibility_timeout), doing=f"renewing the leases of {self.name}"
        )
        lost = set(held) - kept
        if lost:
            for row_id in lost:
                self._unacked.pop(row_id, None)
            self._buffer = deque(d for d in self._buffer if d.handle.row_id not in lost)
            self.wake.set()

    async def _beat(self, *, closing: bool = False) -> None:
        t = self.transport
        await t.db.call(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO consumers (ns, address, name, seen, closed) VALUES (?, ?, ?, ?, ?)",
                (t.namespace, self.address, self.name, time.time(), int(closing)),
            ),
            doing=f"recording the heartbeat of {self.name}",
        )

    async def _beat_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(_BEAT_EVERY)
            try:
                await self._beat()
            except TransportError as exc:
                logger.warning("recording the heartbeat of %s: %s", self.name, exc)
