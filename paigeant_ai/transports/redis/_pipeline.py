"""The auto-pipeline: every quick command a process asks of Redis goes out in one shared pipeline at a time.

Design note (read this before simplifying it away).

What it batches. While one pipeline is on the wire, whatever the steps in flight ask of Redis (a publish, an ack,
a dedupe check, a replay-cache lookup, a consumer's read...) is queued in the next `_Batch`; when the reply
comes, the next batch goes out as one pipeline. In it:

- the publishes are PUBLISH script calls of up to `_PUBLISHES_PER_CALL` messages each;
- the acks are one `XACK` per stream;
- the quick commands of `_MERGED` (those whose reply a script returns unchanged: GET, SET, EXISTS, XADD, ...)
  are MANY script calls of up to `_MERGED_PER_CALL` commands, each command at most `_MERGED_MAX_WORDS` words
  and with only the redis-py options of `_MERGED_OPTIONS`;
- the other commands of `_PIPELINED` (quick ones that never block) go out one by one in the same pipeline,
  among them the transport's own script calls (`EVALSHA`): a consumer's read, for one, is the READ script,
  which returns its entries packed in one string; after `_EMPTY_READS_BEFORE_BLOCKING` empty reads
  (`_consumer.py`) a consumer blocks on a connection of its own instead.

Anything else (blocking reads, SCAN, transactions the stores open themselves) goes out on its own connection.
Code outside the transport shares the pipeline without knowing it: `PipelinedRedis.execute_command` routes the
quick commands of `RedisTransport.client` here, so the Redis stores batch too.

Why. With fifty steps in flight, each step's own commands would cost fifty writes, fifty reads and fifty
connection checkouts per round; batched they cost one of each, and Redis runs one script call instead of fifty
commands. One pipeline is on the wire at a time: two cost more CPU per command than they save in waiting.
`bench/throughput.py` measures it.

Invariants.

- An ack is not awaited (as in AMQP): it goes first in the next pipeline, so any command asked for after it
  runs after it. A lost ack only means the entry is delivered again after the visibility timeout, and the
  worker recognises the completed step; the transport bumps its `generation` when the connection was lost.
- A caller's own commands are awaited one after the other, so its order is kept; across callers there is no
  order but the pipeline's.
- redis-py sends a pipeline again after a lost connection. So that a resent PUBLISH call adds nothing twice,
  each call carries a marker key (`<namespace>:published:<random>:<call number>`; on a cluster, where a call
  publishes to one stream, `<stream>:published:...`, in the stream's slot), set by the script with an
  expiry of `_PUBLISH_MARKER_MS`, holding the call's outcome: a call whose marker exists adds nothing and
  answers with the outcome of its first run.
- A request whose caller was cancelled before it was sent is dropped; one whose arguments cannot be packed
  (`DataError`) fails alone: the batch is split and sent again request by request.
- Every future is resolved, whatever happens: with its reply, its error, or the batch's error.
- After Redis restarts and forgets the scripts (`NoScriptError`), the unrun calls are queued again in front of
  the next batch and the scripts loaded first.

What breaks if it is reverted. Every step costs several round trips and connection checkouts again, and the
throughput on Redis under load falls with them (run `bench/throughput.py` before and after). Awaiting acks adds
a round trip to every hop; dropping the marker lets a reconnect publish a step twice (the next worker sees the
second copy as a replay); sending two pipelines at once can run an ack after a command asked for later.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import DataError, NoScriptError, ResponseError

from . import _lua as lua
from ._types import as_script
from ._wire import GROUP

__all__ = ("PipelinedRedis", "Pipeliner")

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
_T = TypeVar("_T")
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


class Pipeliner:
    """Sends what is asked of Redis while a pipeline waits for its replies as the next pipeline (see above)."""

    def __init__(
        self, client: PipelinedRedis | PipelinedCluster, namespace: str, *, min_replicas: int = 0, wait_ms: int = 1000
    ) -> None:
        self.client = client
        self.min_replicas = min_replicas
        """Replicas that must have every write of a batch with publishes before those publishes count as done
        (`WAIT`); 0 to answer as soon as the master has them."""
        self.wait_ms = wait_ms
        self.cluster = isinstance(client, PipelinedCluster)
        """On a Redis Cluster, no call may touch keys of two slots: a PUBLISH call carries the messages of one
        stream (its marker tagged as the stream), and the MANY calls are not made (each command goes on its own)."""
        self.namespace = namespace
        self._publish_sha = as_script(client, lua.PUBLISH).sha
        self._many_sha = as_script(client, lua.MANY).sha
        self._next = _Batch()
        self._sender: asyncio.Task[None] | None = None
        self._load_scripts = False
        self._markers = f"published:{uuid.uuid4().hex}:"  # then the number of the PUBLISH call
        self._calls = 0

    def command(self, args: tuple[Any, ...], options: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue one command (`("SET", key, value)`, with redis-py's options) in the next pipeline."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if (
            not self.cluster
            and args[0] in _MERGED
            and len(args) <= _MERGED_MAX_WORDS
            and not options.keys() - _MERGED_OPTIONS
        ):
            self._next.merged.append((args, options, future))
        else:
            self._next.commands.append((args, options, future))
        self._next.size += 1
        self._wake()
        return future

    def publish(self, stream: str, body: bytes, headers: bytes, maxlen: int) -> asyncio.Future[None]:
        """Queue one publish (capped at `maxlen` entries if not 0) in the next pipeline's PUBLISH call."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.publishes.append((stream, body, headers, maxlen, future))
        self._next.size += 1
        self._wake()
        return future

    def ack(self, stream: str, entry_id: bytes) -> asyncio.Future[None]:
        """Queue one `XACK`, sent before anything asked for after it."""
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
                try:
                    await self._send(batch)
                except Exception as exc:  # building the pipeline failed: no caller may wait for ever
                    _resolve_all(list(batch.futures()), exc)
        finally:
            self._sender = None

    async def _send(self, batch: _Batch) -> None:
        pipe: Any = self.client.pipeline(transaction=False)
        # A cluster's pipeline queues with `execute_command`; a plain one runs it at once unless told to queue.
        queue: Callable[..., Any] = pipe.execute_command if self.cluster else pipe.pipeline_execute_command
        answers: list[Callable[[Any], None]] = []
        # Acks first: nobody waits for them, so a command asked for after an ack must not run before it.
        for stream, acks in batch.acks.items():
            queue("XACK", stream, GROUP, *(entry_id for entry_id, _ in acks))
            answers.append(functools.partial(_resolve_all, [future for _, future in acks]))
        held: list[tuple[asyncio.Future[None], Exception | None]] | None = None
        if self.min_replicas and batch.publishes:
            held = []  # the publishes' outcomes, given once the replicas have them (or in time did not)
        for chunk in self._publish_chunks(batch.publishes):
            queue(*self._publish_call(chunk))
            answers.append(functools.partial(self._published, chunk, held=held))
        for chunk in _chunks(batch.merged, _MERGED_PER_CALL):
            queue(*self._many_call(chunk))
            answers.append(functools.partial(self._answered, chunk))
        for args, options, future in batch.commands:
            queue(*args, **options)
            answers.append(functools.partial(_resolve, future))
        waits: list[Any] = []
        if held is not None:
            for where in self._wait_targets(batch.publishes, waits):
                queue("WAIT", self.min_replicas, self.wait_ms, **where)
                answers.append(waits.append)
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
            if held is not None:
                self._replicated(held, waits)
        except Exception as exc:  # a reply of an unexpected shape: no caller may wait for ever
            _resolve_all(list(batch.futures()), exc)

    def _publish_chunks(self, publishes: list[_Publish]) -> Iterator[list[_Publish]]:
        """The PUBLISH calls of a batch: up to `_PUBLISHES_PER_CALL` messages each, of one stream on a cluster."""
        if not self.cluster:
            yield from _chunks(publishes, _PUBLISHES_PER_CALL)
            return
        streams: dict[str, list[_Publish]] = {}
        for publish in publishes:
            streams.setdefault(publish[0], []).append(publish)
        for same_stream in streams.values():
            yield from _chunks(same_stream, _PUBLISHES_PER_CALL)

    def _publish_call(self, chunk: list[_Publish]) -> list[Any]:
        self._calls += 1
        # The same when redis-py sends the pipeline again; on a cluster, in the slot of the call's one stream.
        marker = f"{chunk[0][0] if self.cluster else self.namespace}:{self._markers}{self._calls}"
        call: list[Any] = ["EVALSHA", self._publish_sha, len(chunk) + 1, *(stream for stream, *_ in chunk), marker]
        for _, body, headers, maxlen, _ in chunk:
            call += (body, headers, maxlen)
        call.append(_PUBLISH_MARKER_MS)
        return call

    def _wait_targets(self, publishes: list[_Publish], waits: list[Any]) -> list[dict[str, Any]]:
        """Where a `WAIT` goes after the publishes: on the pipeline's connection, or to each master written to. A
        master that cannot be told (in a failover) adds an error to `waits`: the publishes fail, to be sent again."""
        if not isinstance(self.client, PipelinedCluster):
            return [{}]
        nodes: dict[str, Any] = {}
        for stream in {stream for stream, *_ in publishes}:
            try:
                node = self.client.get_node_from_key(stream)
            except Exception as exc:  # no master serves the slot now
                waits.append(exc)
                continue
            if node is None:
                waits.append(ResponseError(f"no master is known for {stream!r}"))
            else:
                nodes[node.name] = node
        return [{"target_nodes": node} for node in nodes.values()]

    def _replicated(self, held: list[tuple[asyncio.Future[None], Exception | None]], waits: list[Any]) -> None:
        """Answer the held publishes: refused, unless every `WAIT` counted `min_replicas` replicas."""
        short = [reply for reply in waits if isinstance(reply, Exception) or int(reply) < self.min_replicas]
        error = None
        if short:
            reached = "an unknown number of" if isinstance(short[0], Exception) else str(int(short[0]))
            error = ResponseError(
                f"the write reached {reached} replicas, not the {self.min_replicas} of min_replicas_acked, within "
                f"{self.wait_ms} ms; it is sent again (lower min_replicas_acked or bring the replicas back)"
            )
        for future, outcome in held:
            _resolve(future, outcome or error)

    def _published(
        self,
        chunk: list[_Publish],
        reply: Any,
        held: list[tuple[asyncio.Future[None], Exception | None]] | None = None,
    ) -> None:
        if isinstance(reply, NoScriptError):  # nothing ran: again, once the script is loaded
            self._load_scripts = True
            self._next.publishes[:0] = chunk
        elif isinstance(reply, Exception):
            _resolve_all([future for *_, future in chunk], reply)
        else:
            outcome, error = cast("list[bytes]", reply)
            for flag, (*_, future) in zip(outcome, chunk, strict=True):
                refused = None if flag == ord("1") else ResponseError(error.decode(errors="replace"))
                if held is None:
                    _resolve(future, refused)
                else:
                    held.append((future, refused))

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


class PipelinedRedis(aioredis.Redis):
    """A redis-py client whose quick commands go out in the shared pipelines of a `Pipeliner`."""

    pipeliner: Pipeliner | None = None
    sentinels: list[aioredis.Redis] = []
    """The clients of the sentinels that name this client's master (if they do), closed with it."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        pipeliner = self.pipeliner
        if pipeliner is None or args[0] not in _PIPELINED:
            return await super().execute_command(*args, **options)
        return await pipeliner.command(args, options)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


class PipelinedCluster(RedisCluster):
    """A redis-py Redis Cluster client whose quick commands go out in the shared pipelines of a `Pipeliner`."""

    pipeliner: Pipeliner | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        pipeliner = self.pipeliner
        if pipeliner is None or args[0] not in _PIPELINED or "target_nodes" in options:
            return await super().execute_command(*args, **options)
        return await pipeliner.command(args, options)


# -- the transport ---------------------------------------------------------------------------------------------
