"""`RedisTransport`: Redis Streams, one stream and one consumer group per address.

What it keeps in Redis, for the namespace `paigeant`:

- `paigeant.<address>`: a stream with one consumer group, `workers`. Every `consume()` is a named consumer of
  that group, reading in batches with `XREADGROUP`. An entry is acknowledged (`XACK`) only when it is settled.
- `paigeant:delayed:<address>`: a sorted set of messages due later (delayed publishes and `retry_later`). The
  consumers of the address move due messages into the stream, atomically, so several workers can share it.
- `paigeant:done:<key>`: the markers of `RedisDedupeStore`.
- `paigeant:consumers:<address>`: when each consumer of the address was last seen (its heartbeat), for
  `consumers()`: who serves a step, and since when nobody does.
- `paigeant:dispatched:<correlation id>`: the claims of dispatchers on correlation IDs (`claim()`).

A consumer holds a lease on what it took: it renews the idle time of its entries every third of
`visibility_timeout`. When a process dies, its leases lapse and a live consumer claims the entries
(`XAUTOCLAIM`); an entry delivered more than `max_deliveries` times is moved to `dead-letter` with the reason.
Settled entries beyond `trim_length` are trimmed by the consumers, after every `trim_length / 10` settlements,
at least every second while they settle and when they close; an entry that is not yet delivered or not yet
acknowledged is never trimmed. `events` and `dead-letter` are capped at `trim_length` entries.

Commands go out in pipelines, one at a time: what the steps in flight ask of Redis while a pipeline waits for its
replies goes out together in the next one. In a pipeline, the publishes are one script call (with one marker
against a resent pipeline adding them twice), the acks one `XACK` per stream, the quick commands one script call,
and each consumer's read one script call that returns its entries packed in one string. This includes what other
code sends through `RedisTransport.client` (the replay cache, the dedupe store); blocking reads, and commands
outside a short list of quick ones, go out on their own. An ack is not waited for: like an AMQP ack, it is sent
before anything asked for after it, and a lost one means the entry is delivered again.

Durability is Redis's: run it with `appendonly yes` (see the README for the settings).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError('the Redis transport needs redis-py: pip install "paigeant-ai[redis]"') from _exc

from ..contracts import DEAD_LETTER, RESERVED_ADDRESSES
from ..exceptions import TransportError, UserError
from ..settings import Settings
from . import _redis_lua as lua
from ._redis_types import RedisCommands, Script, as_commands, as_script
from .base import ConsumerBase, Delivery, TransportBase, dead_letter_headers, encode_body

if TYPE_CHECKING:
    from ..contracts import PaigeantMessage

__all__ = ("RedisDedupeStore", "RedisTransport")

logger = logging.getLogger("paigeant_ai.transports.redis")

GROUP = "workers"
"""The consumer group of every stream."""
_PUBLISH_MARKER_MS = 10 * 60 * 1000
"""How long a PUBLISH call is remembered, so that redis-py's retry of it after a lost reply adds nothing."""
_PUBLISHES_PER_CALL = 500
"""Most messages one PUBLISH call appends, so that no call keeps Redis busy for long."""
_PIPELINED = frozenset(
    {
        *("GET", "SET", "EXISTS", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "TTL", "PTTL", "INCR", "INCRBY"),
        *("HGET", "HSET", "HDEL", "HMGET", "HEXISTS", "SADD", "SREM", "SISMEMBER"),
        *("ZADD", "ZREM", "ZSCORE", "ZCARD", "XADD", "XACK", "XLEN", "EVALSHA"),
    }
)
"""The commands that go out in the shared pipelines: quick ones, none that blocks."""
_MERGED = frozenset(
    {
        *("GET", "SET", "EXISTS", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "INCR", "INCRBY"),
        *("HGET", "HSET", "HDEL", "SADD", "SREM", "XACK", "XADD", "XLEN"),
    }
)
"""The pipelined commands that go out together in MANY calls: those whose reply a script returns unchanged."""
_MERGED_OPTIONS = frozenset({"keys", "get"})
"""The redis-py options a merged command may carry (others change how its reply is read)."""
_MERGED_PER_CALL = 1000
"""Most commands one MANY call runs."""
_MERGED_MAX_WORDS = 64
"""Longer commands go out on their own (a script can unpack only so many words into one call)."""
_TURNS_TO_FILL = 4
"""Most turns of the event loop a pipeline waits for more commands, while each turn adds some."""
_EMPTY_READS_BEFORE_BLOCKING = 2
"""Reads in the shared pipeline that find nothing before a consumer blocks on a connection of its own."""

_Entries = list[tuple[bytes, dict[bytes, bytes]]]
_T = TypeVar("_T")


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
    if not headers:
        return b"{}"
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":")).encode()


def _load_headers(raw: bytes | None) -> dict[str, str]:
    if raw is None or raw == b"{}":
        return {}
    try:
        loaded = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(loaded, dict):
        return {}
    headers = cast("dict[object, object]", loaded)
    if all(type(v) is str for v in headers.values()):  # JSON keys are strings already
        return cast("dict[str, str]", headers)
    return {str(k): str(v) for k, v in headers.items()}


def _deliveries_before(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:  # an entry someone added by hand
        return 0


def _from_fields(entry_id: bytes, fields: dict[bytes, bytes], times: int) -> tuple[bytes, bytes, bytes, int]:
    """(id, body, headers, deliveries) of an entry read as fields, delivered `times` times now."""
    deliveries = _deliveries_before(fields.get(b"deliveries")) + times
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


@dataclass(slots=True)
class _Scripts:
    publish: Script
    publish_later: Script
    read: Script
    promote: Script
    trim: Script
    retry: Script
    dead_letter: Script
    give_back: Script
    claim: Script
    renew: Script
    pending: Script

    @classmethod
    def register(cls, client: aioredis.Redis) -> _Scripts:
        return cls(
            publish=as_script(client, lua.PUBLISH),
            publish_later=as_script(client, lua.PUBLISH_LATER),
            read=as_script(client, lua.READ),
            promote=as_script(client, lua.PROMOTE),
            trim=as_script(client, lua.TRIM),
            retry=as_script(client, lua.RETRY),
            dead_letter=as_script(client, lua.DEAD_LETTER),
            give_back=as_script(client, lua.GIVE_BACK),
            claim=as_script(client, lua.CLAIM),
            renew=as_script(client, lua.RENEW),
            pending=as_script(client, lua.PENDING),
        )


class _Handle(NamedTuple):
    consumer: _RedisConsumer
    entry_id: bytes


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
        if not isinstance(exc, RedisError):
            return
        doing = self.doing if self.about is None else f"{self.doing} {self.about!r}"
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            self.transport.generation += 1
            raise TransportError(f"Redis at {_redact(self.transport.url)} is unreachable while {doing}: {exc}") from exc
        raise TransportError(f"Redis refused {doing}: {exc}") from exc


# -- pipelining ------------------------------------------------------------------------------------------------

_Request = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
_Publish = tuple[str, bytes, bytes, int, "asyncio.Future[None]"]


class _Batch:
    """What goes to Redis in one pipeline, each request with the future its caller awaits."""

    __slots__ = ("acks", "commands", "merged", "publishes", "size")

    def __init__(self) -> None:
        self.size = 0  # requests added
        self.publishes: list[_Publish] = []
        self.acks: dict[str, list[tuple[bytes, asyncio.Future[None]]]] = {}
        self.merged: list[_Request] = []  # sent together in MANY calls
        self.commands: list[_Request] = []  # sent one by one

    def __bool__(self) -> bool:
        return bool(self.publishes or self.acks or self.merged or self.commands)

    def drop_cancelled(self) -> None:
        """Forget the requests whose callers stopped waiting before they were sent: they are not sent."""
        self.publishes = [publish for publish in self.publishes if not publish[-1].cancelled()]
        self.merged = [request for request in self.merged if not request[-1].cancelled()]
        self.commands = [request for request in self.commands if not request[-1].cancelled()]

    def futures(self) -> Iterator[asyncio.Future[Any]]:
        yield from (future for *_, future in self.publishes)
        for acks in self.acks.values():
            yield from (future for _, future in acks)
        yield from (future for *_, future in self.merged)
        yield from (future for *_, future in self.commands)

    def split(self) -> Iterator[_Batch]:
        """One batch for each request, acks first."""
        for stream, acks in self.acks.items():
            for ack in acks:
                (batch := _Batch()).acks[stream] = [ack]
                yield batch
        for publish in self.publishes:
            (batch := _Batch()).publishes.append(publish)
            yield batch
        for request in (*self.merged, *self.commands):
            (batch := _Batch()).commands.append(request)
            yield batch


class _Pipeliner:
    """Sends what is asked of Redis while a pipeline waits for its replies as the next pipeline.

    With fifty steps in flight, each step's own commands (a publish, an ack, a dedupe check...) would cost fifty
    writes, fifty reads and fifty connection checkouts; batched they cost one of each. In a pipeline, the
    publishes go out as PUBLISH calls of up to `_PUBLISHES_PER_CALL` messages, each with one duplicate marker;
    the acks as one `XACK` per stream; the quick commands of `_MERGED` as MANY calls. One pipeline is on the
    wire at a time (two cost more per command in CPU than they save in waiting). A caller's commands are awaited
    one after the other, so no order is lost.
    """

    def __init__(self, client: _PipelinedRedis, namespace: str) -> None:
        self.client = client
        self._publish_sha = client.register_script(lua.PUBLISH).sha
        self._many_sha = client.register_script(lua.MANY).sha
        self._next = _Batch()
        self._sender: asyncio.Task[None] | None = None
        self._load_scripts = False
        self._markers = f"{namespace}:published:{uuid.uuid4().hex}:"  # then the number of the PUBLISH call
        self._calls = 0

    def command(self, args: tuple[Any, ...], options: dict[str, Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if args[0] in _MERGED and len(args) <= _MERGED_MAX_WORDS and not options.keys() - _MERGED_OPTIONS:
            self._next.merged.append((args, options, future))
        else:
            self._next.commands.append((args, options, future))
        self._next.size += 1
        self._wake()
        return future

    def publish(self, stream: str, body: bytes, headers: bytes, maxlen: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.publishes.append((stream, body, headers, maxlen, future))
        self._next.size += 1
        self._wake()
        return future

    def ack(self, stream: str, entry_id: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.acks.setdefault(stream, []).append((entry_id, future))
        self._next.size += 1
        self._wake()
        return future

    async def drain(self) -> None:
        """Wait until everything asked so far has been answered."""
        while self._sender is not None:
            await asyncio.wait([self._sender])

    def _wake(self) -> None:
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all(), name="paigeant-redis-pipeline")

    async def _send_all(self) -> None:
        try:
            while self._next:
                # Turns of the loop, until one adds nothing: the steps that are ready add their commands.
                for _ in range(_TURNS_TO_FILL):
                    size = self._next.size
                    await asyncio.sleep(0)
                    if self._next.size == size:
                        break
                batch, self._next = self._next, _Batch()
                batch.drop_cancelled()
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: _Batch) -> None:
        pipe = self.client.pipeline(transaction=False)
        answers: list[Callable[[Any], None]] = []
        # Acks first: nobody waits for them, so a command asked for after an ack must not run before it.
        for stream, acks in batch.acks.items():
            pipe.pipeline_execute_command("XACK", stream, GROUP, *(entry_id for entry_id, _ in acks))
            answers.append(functools.partial(_resolve_all, [future for _, future in acks]))
        for chunk in _chunks(batch.publishes, _PUBLISHES_PER_CALL):
            pipe.pipeline_execute_command(*self._publish_call(chunk))
            answers.append(functools.partial(self._published, chunk))
        for chunk in _chunks(batch.merged, _MERGED_PER_CALL):
            pipe.pipeline_execute_command(*self._many_call(chunk))
            answers.append(functools.partial(self._answered, chunk))
        for args, options, future in batch.commands:
            pipe.pipeline_execute_command(*args, **options)
            answers.append(functools.partial(_resolve, future))
        try:
            if self._load_scripts:  # Redis restarted and forgot them
                self._load_scripts = False
                await self.client.script_load(lua.PUBLISH)
                await self.client.script_load(lua.MANY)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except DataError as exc:
            # Arguments that cannot be sent: packing them failed, so nothing went out. Only their command fails.
            requests = list(batch.split())
            if len(requests) == 1:
                _resolve_all(list(batch.futures()), exc)
            for request in requests if len(requests) > 1 else ():
                await self._send(request)
            return
        except asyncio.CancelledError:
            for future in batch.futures():
                future.cancel()
            raise
        except Exception as exc:
            _resolve_all(list(batch.futures()), exc)
            return
        try:
            for answer, reply in zip(answers, replies, strict=True):
                answer(reply)
        except Exception as exc:  # a reply of an unexpected shape: no caller may wait for ever
            _resolve_all(list(batch.futures()), exc)

    def _publish_call(self, chunk: list[_Publish]) -> list[Any]:
        self._calls += 1
        marker = f"{self._markers}{self._calls}"  # the same when redis-py sends the pipeline again
        call: list[Any] = ["EVALSHA", self._publish_sha, len(chunk) + 1, *(stream for stream, *_ in chunk), marker]
        for _, body, headers, maxlen, _ in chunk:
            call += (body, headers, maxlen)
        call.append(_PUBLISH_MARKER_MS)
        return call

    def _published(self, chunk: list[_Publish], reply: Any) -> None:
        if isinstance(reply, NoScriptError):  # nothing ran: again, once the script is loaded
            self._load_scripts = True
            self._next.publishes[:0] = chunk
        elif isinstance(reply, Exception):
            _resolve_all([future for *_, future in chunk], reply)
        else:
            outcome, error = cast("list[bytes]", reply)
            for flag, (*_, future) in zip(outcome, chunk, strict=True):
                _resolve(future, None if flag == ord("1") else ResponseError(error.decode(errors="replace")))

    def _many_call(self, chunk: list[_Request]) -> list[Any]:
        call: list[Any] = ["EVALSHA", self._many_sha, 0]
        for args, _, _ in chunk:
            call.append(len(args))
            call += args
        return call

    def _answered(self, chunk: list[_Request], reply: Any) -> None:
        if isinstance(reply, NoScriptError):
            self._load_scripts = True
            self._next.merged[:0] = chunk
        elif isinstance(reply, Exception):
            _resolve_all([future for *_, future in chunk], reply)
        else:
            callbacks = self.client.response_callbacks
            for (args, options, future), answer in zip(chunk, cast("list[Any]", reply), strict=True):
                callback = callbacks.get(args[0])
                if callback is not None and not isinstance(answer, Exception):
                    answer = callback(answer, **{k: v for k, v in options.items() if k != "keys"})
                _resolve(future, answer)


def _chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _resolve(future: asyncio.Future[Any], reply: object) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _resolve_all(futures: list[asyncio.Future[Any]], reply: object) -> None:
    if isinstance(reply, Exception):
        for future in futures:
            _resolve(future, reply)
    else:
        for future in futures:
            _resolve(future, None)


class _PipelinedRedis(aioredis.Redis):
    """A redis-py client whose quick commands go out in the shared pipelines of a `_Pipeliner`."""

    pipeliner: _Pipeliner | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        pipeliner = self.pipeliner
        if pipeliner is None or args[0] not in _PIPELINED:
            return await super().execute_command(*args, **options)
        return await pipeliner.command(args, options)


# -- the transport ---------------------------------------------------------------------------------------------


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
        self._client: _PipelinedRedis | None = None
        self._pipeliner: _Pipeliner | None = None
        self._scripts: _Scripts | None = None
        self._consumers: set[_RedisConsumer] = set()
        self._streams: dict[str, str] = {}

    # -- naming and plumbing ---------------------------------------------------------------------------------

    def stream_key(self, address: str) -> str:
        """The stream of `address`."""
        key = self._streams.get(address)
        if key is None:
            key = self._streams[address] = f"{self.namespace}.{address}"
        return key

    def delayed_key(self, address: str) -> str:
        """The sorted set of `address`'s delayed messages."""
        return f"{self.namespace}:delayed:{address}"

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
    def scripts(self) -> _Scripts:
        if self._scripts is None:
            raise TransportError("the Redis transport is not connected: call `await transport.connect()` first")
        return self._scripts

    def _pipelined(self) -> _Pipeliner:
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
        client = cast("_PipelinedRedis", _PipelinedRedis.from_pool(pool))
        try:
            with self.errors("connecting"):
                await as_commands(client).ping()
        except TransportError:
            await client.aclose()
            raise
        client.pipeliner = _Pipeliner(client, self.namespace)
        self._client, self._scripts, self._pipeliner = client, _Scripts.register(client), client.pipeliner

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
        body: bytes | PaigeantMessage,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        data = body if type(body) is bytes else encode_body(body)
        header_json = _dump_headers(headers)
        with self.errors("publishing to", address):
            if delay > 0:
                member = f"{uuid.uuid4().hex}{0:010d}{len(header_json):010d}".encode() + header_json + data
                await self.scripts.publish_later(keys=[self.delayed_key(address)], args=[_ms(delay), member])
                self._expect_due(address, delay)
            else:
                maxlen = self.trim_length if address in RESERVED_ADDRESSES else 0
                await self._pipelined().publish(self.stream_key(address), data, header_json, maxlen)

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
                args=[*args, delivery.delivery_count, uuid.uuid4().hex],
            )
        handle.consumer.settled(handle.entry_id)
        if delay > 0:
            self._expect_due(delivery.address, delay)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        handle = self._handle(delivery)
        await self._dead_letter_entry(handle.consumer.stream, handle.entry_id, delivery, reason)
        handle.consumer.settled(handle.entry_id)

    async def pending(self, address: str) -> int:
        with self.errors("counting the messages of", address):
            count = await self.scripts.pending(keys=[self.stream_key(address), self.delayed_key(address)], args=[GROUP])
        return int(count)

    # -- who consumes (`ConsumerWatch`), from each consumer's heartbeat --------------------------------------

    def consumers_key(self, address: str) -> str:
        """The sorted set of `address`'s consumers, each scored by when it was last seen (negated once closed)."""
        return f"{self.namespace}:consumers:{address}"

    async def consumers(self, address: str) -> int:
        """The consumers of `address` whose last heartbeat is recent (a live one beats every few seconds)."""
        return (await self._watch(address))[0]

    async def consumed_addresses(self) -> list[str]:
        prefix = self.consumers_key("")
        with self.errors("listing the consumers of namespace", self.namespace):
            keys = [key async for key in self.client.scan_iter(match=_glob(prefix) + "*")]
        addresses = sorted(key.decode().removeprefix(prefix) for key in keys)
        return [address for address in addresses if (await self._watch(address))[0]]

    async def last_consumed(self, address: str) -> datetime | None:
        ago = (await self._watch(address))[1]
        return None if ago is None else datetime.now(UTC) - timedelta(milliseconds=ago)

    async def _watch(self, address: str) -> tuple[int, int | None]:
        """(live consumers of `address`, ms since one was last seen or `None` if none ever was), in Redis's clock."""
        with self.errors("counting the consumers of", address):
            reply = await self.client.register_script(_WATCH)(
                keys=[self.consumers_key(address)], args=[_ms(_LIVE_WITHIN)]
            )
        live, ago = (int(value) for value in cast("list[int]", reply))
        return live, None if ago < 0 else ago

    # -- claims (`SharedClaims`) -----------------------------------------------------------------------------

    async def claim(self, key: str, value: str, *, ttl: float) -> str | None:
        """Set `<namespace>:<key>` to `value` for `ttl` seconds unless it is set (`SET NX GET`); `None` if this
        call set it, else the value it holds."""
        command = ("SET", f"{self.namespace}:{key}", value, "NX", "GET", "PX", _ms(ttl))
        with self.errors("claiming", key):
            held: bytes | None = await self._pipelined().command(command, {"get": True})
        return None if held is None else held.decode(errors="replace")

    async def release(self, key: str, value: str) -> None:
        with self.errors("releasing", key):
            await self.client.register_script(_RELEASE)(keys=[f"{self.namespace}:{key}"], args=[value])

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
        with self.errors("creating the consumer group of", stream):
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _dead_letter_entry(self, stream: str, entry_id: bytes, delivery: Delivery, reason: str) -> None:
        headers = _dump_headers(dead_letter_headers(delivery, reason))
        with self.errors("dead-lettering a delivery from", delivery.address):
            await self.scripts.dead_letter(
                keys=[stream, self.stream_key(DEAD_LETTER)],
                args=[GROUP, entry_id, delivery.body, headers, self.trim_length],
            )


class _RedisConsumer(ConsumerBase):
    """One named consumer of an address's group.

    A background task reads entries into a local buffer, never holding more than `prefetch` entries read or
    handed out and not yet settled; `__anext__` only takes from that buffer, so cancelling it loses nothing.
    Another task renews the leases of what this consumer holds, and a third records its heartbeat.
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
        self._settled_since_trim = 0
        self._trim_every = max(1, transport.trim_length // 10)
        self._empty_reads = 0

    async def start(self) -> None:
        await self.transport._ensure_group(self.stream)
        await self._give_back([])  # what a previous process of the same name left unacknowledged
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._fetch_forever(), name=f"paigeant-redis-fetch-{self.address}"),
            asyncio.create_task(self._renew_forever(), name=f"paigeant-redis-renew-{self.address}"),
            asyncio.create_task(self._beat_forever(), name=f"paigeant-redis-beat-{self.address}"),
        ]

    # -- the consumer protocol -------------------------------------------------------------------------------

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
                args=[GROUP, self.name, _ms(t.visibility_timeout), self._cursor, room, _ms(forget_after)],
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
                block = max(1, min(_ms(wait), _ms(t.poll_interval)))
                reply: object = await t.client.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=room, block=block)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await t._ensure_group(self.stream)  # the stream or its group was deleted: Redis lost its data
                return
        # RESP2 replies [[stream, entries]], RESP3 {stream: entries} (a `protocol=3` URL).
        streams = cast("dict[bytes, _Entries] | list[tuple[bytes, _Entries]] | None", reply) or ()
        for _stream, entries in streams.items() if isinstance(streams, dict) else streams:
            await self._take(_from_fields(entry_id, fields, 1) for entry_id, fields in entries)

    async def _take(self, entries: Iterable[tuple[bytes, bytes, bytes, int]]) -> None:
        """Buffer what was read or claimed, as (id, body, headers, deliveries); dead-letter what came too often."""
        t = self.transport
        address, buffer, limit = self.address, self._buffer, t.max_deliveries
        poison: list[Delivery] = []
        for entry_id, body, headers, count in entries:
            delivery = Delivery(address, body, _load_headers(headers), count, _Handle(self, entry_id))
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
                await t._dead_letter_entry(self.stream, delivery.handle.entry_id, delivery, reason)
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
            await t.client.register_script(_BEAT)(
                keys=[t.consumers_key(self.address)], args=[self.name, int(closing), _BEATS_KEPT_MS]
            )

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
        except TransportError as exc:  # it stops counting as live after `_LIVE_WITHIN` anyway
            logger.warning("recording that %s stopped: %s", self.name, exc)


_BEAT_EVERY = 5.0
"""Seconds between a consumer's heartbeats, whatever its `visibility_timeout` (so every process agrees)."""
_LIVE_WITHIN = 15.0
"""A consumer whose last heartbeat is older than this many seconds is gone (its process died)."""
_BEATS_KEPT_MS = 24 * 3600 * 1000
"""How long a consumer's last heartbeat is remembered (to say since when a step has had no consumer)."""

_BEAT = """
-- KEYS: the consumers of an address. ARGV: consumer, 1 if it closes, ms to remember a heartbeat.
-- Scores the consumer with the time now, in Redis's clock (negated once it closed); forgets old heartbeats.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kept = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2] == '1' and -now or now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], kept - now, now - kept)
redis.call('PEXPIRE', KEYS[1], kept)
return 1
"""

_WATCH = """
-- KEYS: the consumers of an address. ARGV: ms within which a heartbeat makes a consumer live.
-- Returns {live consumers, ms since a consumer was last seen, or -1 if none was}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live, last = 0, -1
local scored = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 2, #scored, 2 do
  local seen = tonumber(scored[i])
  if seen > now - tonumber(ARGV[1]) then live = live + 1 end
  last = math.max(last, math.abs(seen))
end
if last < 0 then return {live, -1} end
return {live, math.max(0, now - last)}
"""

_RELEASE = """
-- KEYS: a claim. ARGV: the value of the claim to release.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _glob(text: str) -> str:
    """`text` as a literal in a `SCAN MATCH` pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


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
            return bool(await self.transport._pipelined().command(("EXISTS", self.key(key)), {}))

    async def mark_done(self, key: str) -> None:
        with self.transport.errors("recording a step's completion"):
            await self.transport._pipelined().command(("SET", self.key(key), b"1", "NX", "PX", _ms(self.ttl)), {})
