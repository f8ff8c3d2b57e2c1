"""`RedisTransport`: Redis Streams, one stream and one consumer group per address (the keys: see the package).

Its consumers are `RedisConsumer`s (`_consumer.py`); every quick command goes out in the shared pipeline of
`_pipeline.py`; the scripts that move entries atomically are in `_lua.py`. Durability is Redis's: run it with
`appendonly yes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, cast

from redis.exceptions import ClusterDownError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ...exceptions import TransportError, UserError
from ...settings import Settings
from ..base import Delivery, TransportBase, check_lease_settings, dead_letter_headers, ensure_bytes, redact_url
from ._cancel_board import RedisCancelBoard
from ._connect import is_cluster, open_client
from ._consumer import LIVE_WITHIN, Handle, RedisConsumer
from ._joins import RedisJoinStore
from ._layout import address_key
from ._pipeline import PipelinedCluster, PipelinedRedis, Pipeliner
from ._progress import PROGRESS_RETENTION, RedisProgressReader, append_progress
from ._registry_board import RedisRegistryBoard
from ._stores import RedisDedupeStore, RedisReplayCache, RedisWaitingStore, RedisWorkflowStore
from ._types import RedisCommands, Scripts, as_commands
from ._wire import GROUP, dump_headers, ms

__all__ = ("RedisTransport",)

logger = logging.getLogger("paigeant_ai.transports.redis")


class _Errors:
    """Translates redis-py's exceptions raised while `doing` something (to `about`) into `TransportError`."""

    __slots__ = ("about", "doing", "transport")

    def __init__(self, transport: RedisTransport, doing: str, about: str | None) -> None:
        self.transport = transport
        self.doing = doing
        self.about = about

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not isinstance(exc, RedisError | RedisClusterException):
            return
        doing = self.doing if self.about is None else f"{self.doing} {self.about!r}"
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | RedisClusterException | ClusterDownError):
            self.transport.generation += 1
            raise TransportError(
                f"Redis at {redact_url(self.transport.url)} is unreachable while {doing}: {exc}"
            ) from exc
        raise TransportError(f"Redis refused {doing}: {exc}") from exc


class RedisTransport(TransportBase):
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
            commands wait for a free one (on a cluster: at most, to each node).
        min_replicas_acked: Replicas that must hold a publish (a workflow's next step) before it counts as sent,
            and so before the step that sent it is acknowledged: after the publishes of each pipeline, a `WAIT`
            for this many replicas, up to `replica_ack_timeout`; short of them, the publishes fail and the worker
            sends them again. 0 (the default) does not wait: a failover may lose the latest writes (see
            docs/deployment.md).
        replica_ack_timeout: Seconds a `WAIT` for `min_replicas_acked` replicas lasts at most.
    """

    name = "redis"
    process_local = False
    requeue_lag = 1.0  # kept as it was; a `retry_later` moves an entry and counts it in one script

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
        min_replicas_acked: int = 0,
        replica_ack_timeout: float = 1.0,
    ) -> None:
        settings = Settings.from_env()
        self.url = url or settings.redis_url
        self.namespace = namespace or settings.namespace
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        check_lease_settings(
            visibility_timeout=visibility_timeout,
            max_deliveries=max_deliveries,
            trim_length=trim_length,
            poll_interval=poll_interval,
        )
        if max_connections < 2:
            raise UserError("max_connections must be at least 2")
        if min_replicas_acked < 0 or replica_ack_timeout <= 0:
            raise UserError("min_replicas_acked must be 0 or more and replica_ack_timeout a positive number of seconds")
        self.min_replicas_acked = min_replicas_acked
        self.replica_ack_timeout = replica_ack_timeout
        self.visibility_timeout = visibility_timeout
        self.max_deliveries = max_deliveries
        self.trim_length = trim_length
        self.poll_interval = poll_interval
        self.reconnect_attempts = reconnect_attempts
        self.max_connections = max_connections
        self.generation = 0
        """Bumped whenever Redis could not be reached: deliveries handed out before may never be settled, so
        their leases are no longer renewed and they return to the stream after `visibility_timeout`."""
        self._client: PipelinedRedis | PipelinedCluster | None = None
        self._pipeliner: Pipeliner | None = None
        self._scripts: Scripts | None = None
        self._consumers: set[RedisConsumer] = set()
        self._streams: dict[str, str] = {}

    # -- naming and plumbing ---------------------------------------------------------------------------------

    def stream_key(self, address: str) -> str:
        """The stream of `address`."""
        key = self._streams.get(address)
        if key is None:
            key = self._streams[address] = address_key(self.namespace, address)
        return key

    def delayed_key(self, address: str) -> str:
        """The sorted set of `address`'s delayed messages."""
        return address_key(self.namespace, address, "delayed")

    @property
    def client(self) -> RedisCommands:
        """The connected redis-py client. Its quick commands go out in the transport's pipelines.

        Raises:
            TransportError: The transport is not connected.
        """
        if self._client is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return as_commands(self._client)

    @property
    def scripts(self) -> Scripts:
        if self._scripts is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return self._scripts

    @property
    def cluster(self) -> bool:
        """True when connected to a Redis Cluster (a `redis+cluster://` URL)."""
        return is_cluster(self._client)

    @property
    def connected(self) -> bool:
        """True between `connect()` and `disconnect()`."""
        return self._client is not None

    def pipelined(self, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """Queue one quick command (`"SET", key, value`, with redis-py's options) in the next shared pipeline.

        The same as calling it on `client`, without redis-py's own work on the way.
        """
        return self._pipelined().command(args, options)

    def _pipelined(self) -> Pipeliner:
        if self._pipeliner is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return self._pipeliner

    def errors(self, doing: str, about: str | None = None) -> _Errors:
        """A context that translates the redis-py exceptions raised in it into `TransportError`.

        Args:
            doing: What was being done, for the message: `"publishing to"`.
            about: What it was done to, quoted after `doing` (an address, a stream).
        """
        return _Errors(self, doing, about)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        client = open_client(self.url, max_connections=self.max_connections, retry_attempts=self.reconnect_attempts)
        try:
            with self.errors("connecting"):
                await as_commands(client).ping()
        except TransportError:
            await client.aclose()
            raise
        client.pipeliner = Pipeliner(
            client, self.namespace, min_replicas=self.min_replicas_acked, wait_ms=ms(self.replica_ack_timeout)
        )
        self._client, self._scripts, self._pipeliner = client, Scripts.register(client), client.pipeliner

    async def disconnect(self) -> None:
        for consumer in list(self._consumers):
            try:
                await consumer.aclose()
            except TransportError:
                logger.warning("could not hand back the deliveries of %s", consumer.name, exc_info=True)
        client, pipeliner = self._client, self._pipeliner
        self._client, self._scripts, self._pipeliner = None, None, None
        if pipeliner is not None:
            await pipeliner.drain()
        if client is not None:
            await client.aclose()

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
        header_json = dump_headers(headers)
        with self.errors("publishing to", address):
            if delay > 0:
                member = f"{uuid.uuid4().hex}{0:010d}{len(header_json):010d}".encode() + header_json + body
                await self.scripts.publish_later(keys=[self.delayed_key(address)], args=[ms(delay), member])
                self._expect_due(address, delay)
            else:
                maxlen = self.trim_length if address in RESERVED_ADDRESSES else 0
                await self._pipelined().publish(self.stream_key(address), body, header_json, maxlen)

    async def consume(self, address: str, *, prefetch: int = 10) -> RedisConsumer:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        taken = {c.name for c in self._consumers if c.address == address}
        name = next(n for n in self._names() if n not in taken)
        consumer = RedisConsumer(self, address, name, prefetch)
        await consumer.start()
        self._consumers.add(consumer)
        return consumer

    async def ack(self, delivery: Delivery) -> None:
        """Settle the delivery: its `XACK` goes out in the next pipeline, before any command asked for later.

        Like an AMQP ack, it is not waited for: if it is lost with the connection or the process, the entry is
        delivered again after `visibility_timeout`, and the worker recognises the completed step.
        """
        handle = self._handle(delivery)
        self._pipelined().ack(handle.consumer.stream, handle.entry_id).add_done_callback(self._ack_settled)
        handle.consumer.settled(handle.entry_id)

    def _ack_settled(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None:
            return
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            self.generation += 1
        logger.warning("an ack was lost (%s); its delivery comes back after the visibility timeout", error)

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        handle = self._handle(delivery)
        args = [GROUP, handle.entry_id, round(delay * 1000) if delay > 0 else 0]
        with self.errors("handing back a delivery from", delivery.address):
            await self.scripts.retry(
                keys=[handle.consumer.stream, self.delayed_key(delivery.address)],
                args=[*args, delivery.delivery_count, uuid.uuid4().hex, handle.consumer.name],
            )
        handle.consumer.settled(handle.entry_id)
        if delay > 0:
            self._expect_due(delivery.address, delay)

    async def give_back(self, delivery: Delivery) -> None:
        await self.retry_later(delivery, 0)  # re-added with its count: read again, it is a redelivery

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        handle = self._handle(delivery)
        await self.dead_letter_entry(handle.consumer.stream, handle.entry_id, delivery, reason)
        handle.consumer.settled(handle.entry_id)

    async def pending(self, address: str) -> int:
        with self.errors("counting the messages of", address):
            count = await self.scripts.pending(keys=[self.stream_key(address), self.delayed_key(address)], args=[GROUP])
        return int(count)

    # -- who consumes (`ConsumerWatch`), from each consumer's heartbeat --------------------------------------

    def consumers_key(self, address: str) -> str:
        """The sorted set of `address`'s consumers, each scored by when it was last seen (negated once closed)."""
        return address_key(self.namespace, address, "consumers")

    async def consumers(self, address: str) -> int:
        """The consumers of `address` whose last heartbeat is recent (a live one beats every few seconds)."""
        return (await self._watch(address))[0]

    async def consumed_addresses(self) -> list[str]:
        prefix, suffix = self.stream_key(""), ":consumers"
        with self.errors("listing the consumers of namespace", self.namespace):
            keys = [key async for key in self.client.scan_iter(match=_glob(prefix[:-1]) + "*}" + suffix)]
        addresses = sorted(key.decode().removeprefix(prefix[:-1]).removesuffix("}" + suffix) for key in keys)
        return [address for address in addresses if (await self._watch(address))[0]]

    async def last_consumed(self, address: str) -> datetime | None:
        ago = (await self._watch(address))[1]
        return None if ago is None else datetime.now(UTC) - timedelta(milliseconds=ago)

    async def _watch(self, address: str) -> tuple[int, int | None]:
        """(live consumers of `address`, ms since one was last seen or `None` if none ever was), in Redis's clock."""
        with self.errors("counting the consumers of", address):
            reply = await self.scripts.watch(keys=[self.consumers_key(address)], args=[ms(LIVE_WITHIN)])
        live, ago = (int(value) for value in cast("list[int]", reply))
        return live, None if ago < 0 else ago

    # -- claims (`SharedClaims`) -----------------------------------------------------------------------------

    async def claim(self, key: str, value: str, *, ttl: float) -> str | None:
        """Set `<namespace>:<key>` to `value` for `ttl` seconds unless it is set (`SET NX GET`); `None` if this
        call set it, else the value it holds."""
        command = ("SET", f"{self.namespace}:{key}", value, "NX", "GET", "PX", ms(ttl))
        with self.errors("claiming", key):
            held: bytes | None = await self._pipelined().command(command, {"get": True})
        return None if held is None else held.decode(errors="replace")

    async def release(self, key: str, value: str) -> None:
        with self.errors("releasing", key):
            await self.scripts.release(keys=[f"{self.namespace}:{key}"], args=[value])

    # -- shared stores (`SharedStores`) ----------------------------------------------------------------------

    def dedupe_store(self) -> RedisDedupeStore:
        return RedisDedupeStore(self)

    def replay_cache(self) -> RedisReplayCache:
        return RedisReplayCache(self)

    def waiting_store(self) -> RedisWaitingStore:
        return RedisWaitingStore(self)

    def workflow_store(self) -> RedisWorkflowStore:
        return RedisWorkflowStore(self)

    # -- progress (`ProgressStreams`) -------------------------------------------------------------------------

    progress_retention = PROGRESS_RETENTION

    async def append_progress(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        await append_progress(self, correlation_id, body, headers)

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> RedisProgressReader:
        return RedisProgressReader(self, correlation_id, after)

    def join_store(self) -> RedisJoinStore:
        """Where the branches of parallel groups meet (see `paigeant_ai._join`)."""
        return RedisJoinStore(self)

    # -- cancellations (`Cancellations`) ---------------------------------------------------------------------

    def cancel_board(self) -> RedisCancelBoard:
        return RedisCancelBoard(self)

    # -- the registry (`Advertising`) ------------------------------------------------------------------------

    def registry_board(self) -> RedisRegistryBoard:
        return RedisRegistryBoard(self)

    # -- helpers of the consumers ----------------------------------------------------------------------------

    def consumer_closed(self, consumer: RedisConsumer) -> None:
        """Forget `consumer`, which closed."""
        self._consumers.discard(consumer)

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

    def _expect_due(self, address: str, delay: float) -> None:
        for consumer in self._consumers:
            if consumer.address == address:
                consumer.expect_due(delay)

    async def ensure_group(self, stream: str) -> None:
        """Create `stream` and its consumer group unless they exist."""
        with self.errors("creating the consumer group of", stream):
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def dead_letter_entry(self, stream: str, entry_id: bytes, delivery: Delivery, reason: str) -> None:
        """Move the entry of `delivery` from `stream` to `dead-letter`, with `reason`, in one script."""
        headers = dump_headers(dead_letter_headers(delivery, reason))
        with self.errors("dead-lettering a delivery from", delivery.address):
            if self.cluster:  # the two streams are in different slots: copy first, then acknowledge
                await self._dead_letter_across_slots(stream, entry_id, delivery.body, headers)
                return
            await self.scripts.dead_letter(
                keys=[stream, self.stream_key(DEAD_LETTER)],
                args=[GROUP, entry_id, delivery.body, headers, self.trim_length],
            )

    async def _dead_letter_across_slots(self, stream: str, entry_id: bytes, body: bytes, headers: bytes) -> None:
        """Dead-letter an entry still pending: its copy is in `dead-letter` before it is acknowledged, so a crash
        between the two leaves it pending (delivered again, and dead-lettered again: two copies), never lost."""
        held = await self.client.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        if not held:
            return  # settled meanwhile, or another consumer's since its lease lapsed and it was claimed
        await self._pipelined().publish(self.stream_key(DEAD_LETTER), body, headers, self.trim_length)
        await self.client.xack(stream, GROUP, entry_id)


def _glob(text: str) -> str:
    """`text` as a literal in a `SCAN MATCH` pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
