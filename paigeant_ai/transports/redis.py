"""`RedisTransport`: Redis Streams, one stream and one consumer group per address.

What it keeps in Redis, for the namespace `paigeant`:

- `paigeant.<address>`: a stream with one consumer group, `workers`. Every `consume()` is a named consumer of
  that group, reading in batches with `XREADGROUP`. An entry is acknowledged (`XACK`) only when it is settled.
- `paigeant:delayed:<address>`: a sorted set of messages due later (delayed publishes and `retry_later`). The
  consumers of the address move due messages into the stream, atomically, so several workers can share it.
- `paigeant:done:<key>`: the markers of `RedisDedupeStore`.

A consumer holds a lease on what it took: it renews the idle time of its entries every third of
`visibility_timeout`. When a process dies, its leases lapse and a live consumer claims the entries
(`XAUTOCLAIM`); an entry delivered more than `max_deliveries` times is moved to `dead-letter` with the reason.
Settled entries are trimmed once a stream is longer than `trim_length`; an entry that is not yet delivered or
not yet acknowledged is never trimmed. `events` and `dead-letter` are capped at `trim_length` entries.

Durability is Redis's: run it with `appendonly yes` (see the README for the settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self, cast
from urllib.parse import urlsplit, urlunsplit

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError('the Redis transport needs redis-py: pip install "paigeant-ai[redis]"') from _exc

from ..contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ..exceptions import TransportError, UserError
from ..settings import Settings
from . import _redis_lua as lua
from .base import Delivery, dead_letter_headers, encode_body

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from ..contracts import PaigeantMessage

__all__ = ("RedisDedupeStore", "RedisTransport")

logger = logging.getLogger("paigeant_ai.transports.redis")

GROUP = "workers"
"""The consumer group of every stream."""
_PUBLISH_MARKER_MS = 10 * 60 * 1000
"""How long a publish is remembered, so that redis-py's retry of it after a lost reply adds nothing."""

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***" if parts.username else ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))


def _dump_headers(headers: Mapping[str, str] | None) -> bytes:
    return json.dumps(dict(headers or {}), ensure_ascii=False, separators=(",", ":")).encode()


def _load_headers(raw: bytes | None) -> dict[str, str]:
    try:
        loaded = json.loads(raw or b"{}")
    except ValueError:
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(k): str(v) for k, v in loaded.items()}  # pyright: ignore[reportUnknownVariableType]


def _deliveries_before(fields: dict[bytes, bytes]) -> int:
    try:
        return max(0, int(fields.get(b"deliveries", b"0")))
    except ValueError:  # an entry someone added by hand
        return 0


@dataclass(slots=True)
class _Scripts:
    publish: AsyncScript
    publish_later: AsyncScript
    promote: AsyncScript
    ack: AsyncScript
    retry: AsyncScript
    dead_letter: AsyncScript
    give_back: AsyncScript
    claim: AsyncScript
    renew: AsyncScript
    pending: AsyncScript

    @classmethod
    def register(cls, client: aioredis.Redis) -> _Scripts:
        return cls(
            publish=client.register_script(lua.PUBLISH),
            publish_later=client.register_script(lua.PUBLISH_LATER),
            promote=client.register_script(lua.PROMOTE),
            ack=client.register_script(lua.ACK),
            retry=client.register_script(lua.RETRY),
            dead_letter=client.register_script(lua.DEAD_LETTER),
            give_back=client.register_script(lua.GIVE_BACK),
            claim=client.register_script(lua.CLAIM),
            renew=client.register_script(lua.RENEW),
            pending=client.register_script(lua.PENDING),
        )


@dataclass(frozen=True, slots=True)
class _Handle:
    consumer: _RedisConsumer
    entry_id: bytes


class RedisTransport:
    """A transport over Redis Streams (Redis 7 or later).

    Share one instance between the dispatcher and the workers of a process.

    Args:
        url: The Redis URL; defaults to `PAIGEANT_REDIS_URL` (`redis://127.0.0.1:6379/0`).
        namespace: The prefix of every key; defaults to `PAIGEANT_NAMESPACE` (`paigeant`).
        consumer_name: This process's name in the consumer groups; unique per process. Defaults to
            `<host>-<pid>-<random>`. With a stable name, a restarted process takes back at once what its
            previous run left unacknowledged.
        visibility_timeout: Seconds after which the entries of a consumer that stopped renewing its leases
            (its process died) are claimed by another.
        max_deliveries: Deliveries after which an unacknowledged message goes to `dead-letter` instead.
        trim_length: Settled entries beyond this many are trimmed from each stream; `events` and
            `dead-letter` keep at most this many entries.
        poll_interval: Longest wait, in seconds, before a consumer looks again for delayed messages.
        reconnect_attempts: Retries of a command while Redis is unreachable (about one a second), so a
            restart of Redis goes unnoticed by the workflows.
        max_connections: Connections to Redis at most; each consumer keeps one for its blocking reads, other
            commands wait for a free one.
    """

    name = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        consumer_name: str | None = None,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 10,
        trim_length: int = 10_000,
        poll_interval: float = 1.0,
        reconnect_attempts: int = 20,
        max_connections: int = 100,
    ) -> None:
        settings = Settings.from_env()
        self.url = url or settings.redis_url
        self.namespace = namespace or settings.namespace
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if visibility_timeout <= 0:
            raise UserError("visibility_timeout must be a positive number of seconds")
        if max_deliveries < 1:
            raise UserError("max_deliveries must be at least 1")
        if trim_length < 1:
            raise UserError("trim_length must be at least 1")
        if poll_interval <= 0:
            raise UserError("poll_interval must be a positive number of seconds")
        if max_connections < 2:
            raise UserError("max_connections must be at least 2")
        self.visibility_timeout = visibility_timeout
        self.max_deliveries = max_deliveries
        self.trim_length = trim_length
        self.poll_interval = poll_interval
        self.reconnect_attempts = reconnect_attempts
        self.max_connections = max_connections
        self.generation = 0
        """Bumped whenever Redis could not be reached: deliveries handed out before may never be settled, so
        their leases are no longer renewed and they return to the stream after `visibility_timeout`."""
        self._client: aioredis.Redis | None = None
        self._scripts: _Scripts | None = None
        self._consumers: set[_RedisConsumer] = set()

    # -- naming and plumbing ---------------------------------------------------------------------------------

    def stream_key(self, address: str) -> str:
        """The stream of `address`."""
        return f"{self.namespace}.{address}"

    def delayed_key(self, address: str) -> str:
        """The sorted set of `address`'s delayed messages."""
        return f"{self.namespace}:delayed:{address}"

    @property
    def client(self) -> aioredis.Redis:
        """The connected redis-py client.

        Raises:
            TransportError: The transport is not connected.
        """
        if self._client is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return self._client

    @property
    def scripts(self) -> _Scripts:
        if self._scripts is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return self._scripts

    @contextlib.contextmanager
    def errors(self, doing: str) -> Generator[None]:
        """Translate redis-py's exceptions raised while `doing` something into `TransportError`."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.generation += 1
            raise TransportError(f"Redis at {_redact(self.url)} is unreachable while {doing}: {exc}") from exc
        except RedisError as exc:
            raise TransportError(f"Redis refused {doing}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        try:
            # A blocking pool: past `max_connections`, a command waits for a free connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=30.0,
                socket_timeout=30.0,
                socket_connect_timeout=5.0,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), self.reconnect_attempts),
            )
        except ValueError as exc:
            raise UserError(f"invalid Redis URL {_redact(self.url)!r}: {exc}; set PAIGEANT_REDIS_URL") from None
        client = aioredis.Redis.from_pool(pool)
        try:
            with self.errors("connecting"):
                await client.ping()
        except TransportError:
            await client.aclose()
            raise
        self._client = client
        self._scripts = _Scripts.register(client)

    async def disconnect(self) -> None:
        for consumer in list(self._consumers):
            try:
                await consumer.aclose()
            except TransportError:
                logger.warning("could not hand back the deliveries of %s", consumer.name, exc_info=True)
        client, self._client, self._scripts = self._client, None, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    # -- the Transport protocol ------------------------------------------------------------------------------

    async def publish(
        self,
        address: str,
        body: bytes | PaigeantMessage,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        data, header_json = encode_body(body), _dump_headers(headers)
        with self.errors(f"publishing to {address!r}"):
            if delay > 0:
                member = f"{uuid.uuid4().hex}{0:010d}{len(header_json):010d}".encode() + header_json + data
                await self.scripts.publish_later(keys=[self.delayed_key(address)], args=[_ms(delay), member])
                self._expect_due(address, delay)
            else:
                maxlen = self.trim_length if address in RESERVED_ADDRESSES else 0
                marker = f"{self.namespace}:published:{uuid.uuid4().hex}"  # the same on every retry of this call
                await self.scripts.publish(
                    keys=[self.stream_key(address), marker], args=[data, header_json, maxlen, _PUBLISH_MARKER_MS]
                )

    async def consume(self, address: str, *, prefetch: int = 10) -> _RedisConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        taken = {c.name for c in self._consumers if c.address == address}
        name = next(n for n in self._names() if n not in taken)
        consumer = _RedisConsumer(self, address, name, prefetch)
        await consumer.start()
        self._consumers.add(consumer)
        return consumer

    async def ack(self, delivery: Delivery) -> None:
        handle = self._handle(delivery)
        with self.errors(f"acknowledging a delivery from {delivery.address!r}"):
            await self.scripts.ack(keys=[handle.consumer.stream], args=[GROUP, handle.entry_id, self.trim_length])
        handle.consumer.settled(handle.entry_id)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        handle = self._handle(delivery)
        args = [GROUP, handle.entry_id, round(delay * 1000) if delay > 0 else 0]
        with self.errors(f"handing back a delivery from {delivery.address!r}"):
            await self.scripts.retry(
                keys=[handle.consumer.stream, self.delayed_key(delivery.address)],
                args=[*args, delivery.delivery_count, uuid.uuid4().hex, self.trim_length],
            )
        handle.consumer.settled(handle.entry_id)
        if delay > 0:
            self._expect_due(delivery.address, delay)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        handle = self._handle(delivery)
        await self._dead_letter_entry(handle.consumer.stream, handle.entry_id, delivery, reason)
        handle.consumer.settled(handle.entry_id)

    async def pending(self, address: str) -> int:
        with self.errors(f"counting the messages of {address!r}"):
            count = await self.scripts.pending(keys=[self.stream_key(address), self.delayed_key(address)], args=[GROUP])
        return int(count)

    # -- helpers of the consumers ----------------------------------------------------------------------------

    def _names(self) -> Iterator[str]:
        yield self.consumer_name
        n = 2
        while True:
            yield f"{self.consumer_name}-{n}"
            n += 1

    def _handle(self, delivery: Delivery) -> _Handle:
        handle = delivery.handle
        if not isinstance(handle, _Handle) or handle.consumer.transport is not self:
            raise TransportError("this delivery was not handed out by this transport")
        return handle

    def _expect_due(self, address: str, delay: float) -> None:
        for consumer in self._consumers:
            if consumer.address == address:
                consumer.expect_due(delay)

    async def _ensure_group(self, stream: str) -> None:
        with self.errors(f"creating the consumer group of {stream!r}"):
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _dead_letter_entry(self, stream: str, entry_id: bytes, delivery: Delivery, reason: str) -> None:
        headers = _dump_headers(dead_letter_headers(delivery, reason))
        with self.errors(f"dead-lettering a delivery from {delivery.address!r}"):
            await self.scripts.dead_letter(
                keys=[stream, self.stream_key(DEAD_LETTER)],
                args=[GROUP, entry_id, delivery.body, headers, self.trim_length],
            )


class _RedisConsumer:
    """One named consumer of an address's group.

    A background task reads entries into a local buffer, never holding more than `prefetch` entries read or
    handed out and not yet settled; `__anext__` only takes from that buffer, so cancelling it loses nothing.
    Another task renews the leases of what this consumer holds.
    """

    def __init__(self, transport: RedisTransport, address: str, name: str, prefetch: int) -> None:
        self.transport = transport
        self.address = address
        self.name = name
        self.prefetch = prefetch
        self.stream = transport.stream_key(address)
        self._buffer: deque[Delivery] = deque()
        self._unacked: dict[bytes, int] = {}  # entry id -> the transport's generation when handed out
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None
        self._closed = False
        self._cursor: bytes = b"0-0"
        self._due_at = 0.0

    async def start(self) -> None:
        await self.transport._ensure_group(self.stream)
        await self._give_back([])  # what a previous process of the same name left unacknowledged
        self._tasks = [
            asyncio.create_task(self._fetch_forever(), name=f"paigeant-redis-fetch-{self.address}"),
            asyncio.create_task(self._renew_forever(), name=f"paigeant-redis-renew-{self.address}"),
        ]

    # -- the consumer protocol -------------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise TransportError(f"consuming {self.address!r} failed: {self._failure}") from self._failure
            if self._buffer:
                delivery = self._buffer.popleft()
                self._unacked[delivery.handle.entry_id] = self.transport.generation
                return delivery
            self._arrived.clear()
            await self._arrived.wait()

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
        self.transport._consumers.discard(self)
        if self.transport._client is not None:
            await self._give_back(never_handed_out)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def settled(self, entry_id: bytes) -> None:
        if self._unacked.pop(entry_id, None) is not None:
            self._room.set()

    def expect_due(self, delay: float) -> None:
        self._due_at = min(self._due_at, asyncio.get_running_loop().time() + delay)

    def _room_left(self) -> int:
        return self.prefetch - len(self._unacked) - len(self._buffer)

    async def _give_back(self, never_handed_out: list[bytes]) -> None:
        t = self.transport
        with t.errors(f"handing back the deliveries of {self.name!r}"):
            await t.scripts.give_back(keys=[self.stream], args=[GROUP, self.name, t.trim_length, *never_handed_out])

    # -- background work -------------------------------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        claim_interval = self.transport.visibility_timeout / 4
        next_claim = 0.0
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
                await self._read(min(self._due_at, next_claim) - loop.time())
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
        with t.errors(f"moving due messages into {self.stream!r}"):
            wait_ms = await t.scripts.promote(keys=[t.delayed_key(self.address), self.stream], args=[100])
        if wait_ms < 0:
            return t.poll_interval
        return min(wait_ms / 1000, t.poll_interval)

    async def _claim(self) -> bool:
        """Claim entries whose consumer stopped renewing them; True if more may be waiting."""
        room = self._room_left()
        if room <= 0:
            return True
        t = self.transport
        forget_after = max(600.0, 10 * t.visibility_timeout)
        with t.errors(f"claiming abandoned entries of {self.stream!r}"):
            cursor, claimed = await t.scripts.claim(
                keys=[self.stream],
                args=[GROUP, self.name, _ms(t.visibility_timeout), self._cursor, room, _ms(forget_after)],
            )
        self._cursor = cursor
        for entry_id, flat, times in claimed:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            await self._accept(entry_id, fields, times)
        return cursor != b"0-0"

    async def _read(self, wait: float) -> None:
        t = self.transport
        room = self._room_left()
        if room <= 0:
            return
        block = max(1, min(_ms(wait), _ms(t.poll_interval)))
        with t.errors(f"reading from {self.stream!r}"):
            try:
                reply: object = await t.client.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=room, block=block)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await t._ensure_group(self.stream)  # the stream or its group was deleted: Redis lost its data
                return
        # RESP2 replies [[stream, entries]], RESP3 {stream: entries} (a `protocol=3` URL).
        streams = cast("dict[bytes, _Entries] | list[tuple[bytes, _Entries]] | None", reply) or ()
        for _stream, entries in streams.items() if isinstance(streams, dict) else streams:
            for entry_id, fields in entries:
                await self._accept(entry_id, fields, 1)

    async def _accept(self, entry_id: bytes, fields: dict[bytes, bytes], times: int) -> None:
        t = self.transport
        count = _deliveries_before(fields) + int(times)
        delivery = Delivery(
            self.address,
            fields.get(b"body", b""),
            _load_headers(fields.get(b"headers")),
            count,
            _Handle(self, entry_id),
        )
        if count <= t.max_deliveries:
            self._buffer.append(delivery)
            self._arrived.set()
            return
        reason = (
            f"delivered {count} times without being settled (max_deliveries is {t.max_deliveries}); "
            "the process handling it may crash on it"
        )
        logger.warning("dead-lettering an entry of %r: %s", self.address, reason)
        try:
            await t._dead_letter_entry(self.stream, entry_id, delivery, reason)
        except TransportError:
            # It stays with this consumer, unrenewed: it is claimed again after the visibility timeout.
            logger.warning("could not dead-letter an entry of %r", self.address, exc_info=True)

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
            with t.errors(f"renewing the leases of {self.name!r}"):
                mine = set(await t.scripts.renew(keys=[self.stream], args=[GROUP, self.name, *held]))
            # Claimed by another consumer, or settled meanwhile. (What arrived during the call is not in `held`.)
            lost = set(held) - mine
            for entry_id in lost:
                self._unacked.pop(entry_id, None)
            if lost:
                self._buffer = deque(d for d in self._buffer if d.handle.entry_id not in lost)
        if stale or lost:
            self._room.set()


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


class RedisDedupeStore:
    """Remembers completed steps in Redis, for every worker that shares it (`SET NX` with an expiry).

    Pass it to `Worker(..., dedupe=RedisDedupeStore(transport))` so that a step redelivered to another process
    after a crash is skipped if it already completed.

    Args:
        transport: The Redis transport whose connection and namespace it uses.
        ttl: Seconds a completed step is remembered; longer than any redelivery can take.
    """

    def __init__(self, transport: RedisTransport, *, ttl: float = 7 * 24 * 3600.0) -> None:
        if ttl <= 0:
            raise UserError("ttl must be a positive number of seconds")
        self.transport = transport
        self.ttl = ttl

    def key(self, idempotency_key: str) -> str:
        """The Redis key of `idempotency_key`."""
        return f"{self.transport.namespace}:done:{idempotency_key}"

    async def is_done(self, key: str) -> bool:
        with self.transport.errors("checking a step's completion"):
            return bool(await self.transport.client.exists(self.key(key)))

    async def mark_done(self, key: str) -> None:
        with self.transport.errors("recording a step's completion"):
            await self.transport.client.set(self.key(key), b"1", nx=True, px=_ms(self.ttl))
