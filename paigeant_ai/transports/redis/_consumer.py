"""`RedisConsumer`: one named consumer of an address's consumer group, with its leases and heartbeat."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple, cast

from redis.exceptions import ResponseError

from ...exceptions import TransportError
from ..base import BufferedConsumer, Delivery
from ._wire import GROUP, load_headers, ms

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ("LIVE_WITHIN", "Handle", "RedisConsumer")

logger = logging.getLogger("paigeant_ai.transports.redis")

_EMPTY_READS_BEFORE_BLOCKING = 2
"""Reads in the shared pipeline that find nothing before a consumer blocks on a connection of its own."""

_Entries = list[tuple[bytes, dict[bytes, bytes]]]

_BEAT_EVERY = 5.0
"""Seconds between a consumer's heartbeats, whatever its `visibility_timeout` (so every process agrees)."""
LIVE_WITHIN = 15.0
"""A consumer whose last heartbeat is older than this many seconds is gone (its process died)."""
_BEATS_KEPT_MS = 24 * 3600 * 1000
"""How long a consumer's last heartbeat is remembered (to say since when a step has had no consumer)."""


def _count(raw: object) -> int:
    """A delivery count the transport's scripts recorded (see `_lua`), or 0."""
    try:
        return max(0, int(cast("bytes", raw))) if raw is not None else 0
    except ValueError:
        return 0


def _from_fields(entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> tuple[bytes, bytes, bytes, int]:
    """(id, body, headers, deliveries) of an entry read as fields, delivered `deliveries` times in all, as Redis
    counts them: a `deliveries` field in the entry, which any publisher can write, counts for nothing."""
    return entry_id, fields.get(b"body", b""), fields.get(b"headers", b"{}"), deliveries


def _unpack_entries(packed: bytes) -> Iterator[tuple[bytes, bytes, bytes, int]]:
    """(id, body, headers, deliveries) of each entry the READ script packed, delivered once more now."""
    position, end = 0, len(packed)
    while position < end:
        line_end = packed.index(b"\n", position)
        entry_id, before, headers_length, body_length = packed[position:line_end].split(b" ")
        headers_end = line_end + 1 + int(headers_length)
        position = headers_end + int(body_length)
        yield entry_id, packed[headers_end:position], packed[line_end + 1 : headers_end], int(before) + 1


class Handle(NamedTuple):
    """What `Delivery.handle` holds on Redis: who handed the entry out, and its id in the stream."""

    consumer: RedisConsumer
    entry_id: bytes


class RedisConsumer(BufferedConsumer):
    """One named consumer of an address's group.

    A background task reads entries into a local buffer, never holding more than `prefetch` entries read or
    handed out and not yet settled; `__anext__` only takes from that buffer, so cancelling it loses nothing.
    Another task renews the leases of what this consumer holds, and a third records its heartbeat.
    """

    def __init__(self, transport: RedisTransport, address: str, name: str, prefetch: int) -> None:
        super().__init__(address)
        self.transport = transport
        self.name = name
        self.prefetch = prefetch
        self.stream = transport.stream_key(address)
        self._unacked: dict[bytes, int] = {}  # entry id -> the transport's generation when handed out
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._cursor: bytes = b"0-0"
        self._due_at = 0.0
        self._settled_since_trim = 0
        self._trim_every = max(1, transport.trim_length // 10)
        self._empty_reads = 0

    async def start(self) -> None:
        await self.transport.ensure_group(self.stream)
        await self._give_back([])  # what a previous process of the same name left unacknowledged
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._fetch_forever(), name=f"paigeant-redis-fetch-{self.address}"),
            asyncio.create_task(self._renew_forever(), name=f"paigeant-redis-renew-{self.address}"),
            asyncio.create_task(self._beat_forever(), name=f"paigeant-redis-beat-{self.address}"),
        ]

    # -- the consumer protocol -------------------------------------------------------------------------------

    def _handed_out(self, delivery: Delivery) -> None:
        self._unacked[delivery.handle.entry_id] = self.transport.generation

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await _cancel_all(self._tasks)
        never_handed_out = [delivery.handle.entry_id for delivery in self._buffer]
        self._buffer.clear()
        self._unacked.clear()
        self._arrived.set()
        self._room.set()
        self.transport.consumer_closed(self)
        if self.transport.connected:
            await self._give_back(never_handed_out)
            await self._last_beat()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def settled(self, entry_id: bytes) -> None:
        self._settled_since_trim += 1
        if self._unacked.pop(entry_id, None) is not None:
            self._room.set()

    def expect_due(self, delay: float) -> None:
        self._due_at = min(self._due_at, asyncio.get_running_loop().time() + delay)

    def _room_left(self) -> int:
        return self.prefetch - len(self._unacked) - len(self._buffer)

    async def _give_back(self, never_handed_out: list[bytes]) -> None:
        t = self.transport
        with t.errors("handing back the deliveries of", self.name):
            await t.scripts.give_back(keys=[self.stream], args=[GROUP, self.name, t.trim_length, *never_handed_out])

    # -- background work -------------------------------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        claim_interval = self.transport.visibility_timeout / 4
        next_claim = next_trim = 0.0
        failures = 0
        while not self._closed:
            try:
                while self._room_left() <= 0:
                    self._room.clear()
                    await self._room.wait()
                now = loop.time()
                if now >= self._due_at:
                    self._due_at = now + await self._promote_due()
                if now >= next_claim:
                    more = await self._claim()
                    next_claim = now if more else now + claim_interval
                    if self._room_left() <= 0:
                        continue
                if self._settled_since_trim >= self._trim_every or (self._settled_since_trim and now >= next_trim):
                    await self._trim()
                    next_trim = now + 1.0
                wake = min(self._due_at, next_claim)
                if self._settled_since_trim:
                    wake = min(wake, next_trim)
                await self._read(wake - loop.time())
                failures = 0
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

    async def _promote_due(self) -> float:
        """Move due delayed messages into the stream; the seconds until it is worth looking again."""
        t = self.transport
        with t.errors("moving due messages into", self.stream):
            wait_ms = await t.scripts.promote(keys=[t.delayed_key(self.address), self.stream], args=[100])
        if wait_ms < 0:
            return t.poll_interval
        return min(wait_ms / 1000, t.poll_interval)

    async def _trim(self) -> None:
        """Trim the settled entries beyond `trim_length`, never one that is pending or not yet delivered."""
        t = self.transport
        self._settled_since_trim = 0
        with t.errors("trimming", self.stream):
            await t.scripts.trim(keys=[self.stream], args=[GROUP, t.trim_length])

    async def _claim(self) -> bool:
        """Claim entries whose consumer stopped renewing them; True if more may be waiting."""
        room = self._room_left()
        if room <= 0:
            return True
        t = self.transport
        forget_after = max(600.0, 10 * t.visibility_timeout)
        with t.errors("claiming abandoned entries of", self.stream):
            cursor, claimed = await t.scripts.claim(
                keys=[self.stream],
                args=[GROUP, self.name, ms(t.visibility_timeout), self._cursor, room, ms(forget_after)],
            )
        self._cursor = cursor
        await self._take(
            _from_fields(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)), int(times))
            for entry_id, flat, times in claimed
        )
        return cursor != b"0-0"

    async def _read(self, wait: float) -> None:
        """Read new entries in the shared pipeline; after a few empty reads, block for up to `wait` seconds."""
        t = self.transport
        room = self._room_left()
        if room <= 0:
            return
        with t.errors("reading from", self.stream):
            try:
                packed = await t.scripts.read(keys=[self.stream], args=[GROUP, self.name, room])
                if packed:
                    self._empty_reads = 0
                    await self._take(_unpack_entries(packed))
                    return
                self._empty_reads += 1
                if self._empty_reads <= _EMPTY_READS_BEFORE_BLOCKING:
                    return  # again in the next pipeline, which adds what this process publishes meanwhile
                self._empty_reads = 0
                block = max(1, min(ms(wait), ms(t.poll_interval)))
                reply: object = await t.client.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=room, block=block)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await t.ensure_group(self.stream)  # the stream or its group was deleted: Redis lost its data
                return
        # RESP2 replies [[stream, entries]], RESP3 {stream: entries} (a `protocol=3` URL).
        streams = cast("dict[bytes, _Entries] | list[tuple[bytes, _Entries]] | None", reply) or ()
        for _stream, entries in streams.items() if isinstance(streams, dict) else streams:
            if entries:
                before = await self._deliveries_before(entries)
                await self._take(
                    _from_fields(entry_id, fields, before.get(entry_id, 0) + 1) for entry_id, fields in entries
                )

    async def _deliveries_before(self, entries: _Entries) -> dict[bytes, int]:
        """How often each entry a blocking read returned was delivered before it was (re-)added, from the
        `@deliveries` hash: asked only about entries without the field `fresh` (see `_lua`), so an entry
        published once costs no second round trip before its worker sees it."""
        unknown = [entry_id for entry_id, fields in entries if b"fresh" not in fields]
        if not unknown:
            return {}
        t = self.transport
        with t.errors("reading from", self.stream):
            counts = await t.client.hmget(f"{self.stream}@deliveries", unknown)
        return {entry_id: _count(count) for entry_id, count in zip(unknown, counts, strict=True)}

    async def _take(self, entries: Iterable[tuple[bytes, bytes, bytes, int]]) -> None:
        """Buffer what was read or claimed, as (id, body, headers, deliveries); dead-letter what came too often."""
        t = self.transport
        address, buffer, limit = self.address, self._buffer, t.max_deliveries
        poison: list[Delivery] = []
        for entry_id, body, headers, count in entries:
            delivery = Delivery(address, body, load_headers(headers), count, Handle(self, entry_id))
            (buffer if count <= limit else poison).append(delivery)
        if buffer:
            self._arrived.set()
        for delivery in poison:
            reason = (
                f"delivered {delivery.delivery_count} times without being settled (max_deliveries is {limit}); "
                "the process handling it may crash on it"
            )
            logger.warning("dead-lettering an entry of %r: %s", address, reason)
            try:
                await t.dead_letter_entry(self.stream, delivery.handle.entry_id, delivery, reason)
            except TransportError:
                # It stays with this consumer, unrenewed: it is claimed again after the visibility timeout.
                logger.warning("could not dead-letter an entry of %r", address, exc_info=True)

    async def _renew_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.transport.visibility_timeout / 3)
            try:
                await self._renew()
            except TransportError as exc:
                logger.warning("renewing the leases of %s: %s", self.name, exc)

    async def _renew(self) -> None:
        """Renew the leases of what this consumer holds; let go of what it can no longer vouch for."""
        t = self.transport
        stale = [entry_id for entry_id, generation in self._unacked.items() if generation != t.generation]
        for entry_id in stale:
            # Redis was unreachable since it was handed out: its worker may never settle it.
            del self._unacked[entry_id]
        held = [*self._unacked, *(delivery.handle.entry_id for delivery in self._buffer)]
        lost: set[bytes] = set()
        if held:
            with t.errors("renewing the leases of", self.name):
                mine = set(await t.scripts.renew(keys=[self.stream], args=[GROUP, self.name, *held]))
            # Claimed by another consumer, or settled meanwhile. (What arrived during the call is not in `held`.)
            lost = set(held) - mine
            for entry_id in lost:
                self._unacked.pop(entry_id, None)
            if lost:
                self._buffer = deque(d for d in self._buffer if d.handle.entry_id not in lost)
        if stale or lost:
            self._room.set()

    async def _beat(self, *, closing: bool = False) -> None:
        """Record that this consumer is alive now (or, closing, that it stopped now), for `consumers()`."""
        t = self.transport
        with t.errors("recording the heartbeat of", self.name):
            await t.scripts.beat(keys=[t.consumers_key(self.address)], args=[self.name, int(closing), _BEATS_KEPT_MS])

    async def _beat_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(_BEAT_EVERY)
            try:
                await self._beat()
            except TransportError as exc:
                logger.warning("recording the heartbeat of %s: %s", self.name, exc)

    async def _last_beat(self) -> None:
        try:
            await self._beat(closing=True)
        except TransportError as exc:  # it stops counting as live after `LIVE_WITHIN` anyway
            logger.warning("recording that %s stopped: %s", self.name, exc)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to end.

    Cancelling again until they do: on Python 3.11, `asyncio.wait_for` inside redis-py can swallow a
    cancellation that arrives just as a command completes.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("a background task of the Redis transport failed", exc_info=task.exception())
