"""The transport seam: a small protocol that moves bytes and headers between named addresses.

A transport knows nothing of slips or agents. It owns delivery: at-least-once hand-over to consumers, `ack`,
delayed publishing (for retries), `retry_later` and `dead_letter`. Anything not acked when its consumer stops,
or when its process dies, is delivered again.

Addresses are logical names (`validate-customer-data`, `events`, `dead-letter`); each transport maps them to its
own queues or streams, `<namespace>.<address>`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from .._escape import escape_control
from ..exceptions import TransportError, UserError

if TYPE_CHECKING:
    from ..approval import WaitingStore
    from ..security import ReplayCache
    from ..store import WorkflowStore
    from ..worker import DedupeStore

__all__ = (
    "MAX_CANCEL_RECORDS",
    "MAX_CANCEL_RECORD_BYTES",
    "MAX_REGISTRY_RECORD_BYTES",
    "REASON_HEADER",
    "SOURCE_HEADER",
    "AckDeadline",
    "Advertising",
    "CancelBoard",
    "Cancellations",
    "Consumer",
    "ConsumerBase",
    "ConsumerWatch",
    "Delivery",
    "ProgressEntry",
    "ProgressReader",
    "ProgressStreams",
    "RegistryBoard",
    "SharedClaims",
    "SharedStores",
    "Transport",
    "TransportBase",
    "dead_letter_headers",
    "redact_url",
)

REASON_HEADER = "x-paigeant-reason"
"""Header that carries why a message was dead-lettered."""
SOURCE_HEADER = "x-paigeant-source"
"""Header that carries the address a dead-lettered message came from."""
MAX_CANCEL_RECORDS = 16
"""Cancel records a board keeps per correlation ID: the oldest are kept, later posts are ignored."""
MAX_CANCEL_RECORD_BYTES = 16 * 1024
"""The largest cancel record a board accepts."""
MAX_REGISTRY_RECORD_BYTES = 256 * 1024
"""The largest worker record a registry board accepts."""


@dataclass(slots=True, eq=False)
class Delivery:
    """One message handed to a consumer, to be settled exactly once with `ack`, `retry_later` or `dead_letter`.

    Attributes:
        address: The logical address it was consumed from.
        body: The message bytes, as published.
        headers: String headers, as published.
        delivery_count: 1 on first delivery, more when redelivered after a consumer stopped or died.
        handle: The transport's own reference to the delivery (a delivery tag, a stream entry id...).
        received_at: When this process received it (`time.monotonic()`): a broker's ack deadline runs from then.
    """

    address: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict[str, str])
    delivery_count: int = 1
    handle: Any = None
    received_at: float = field(default_factory=time.monotonic)

    @property
    def redelivered(self) -> bool:
        """True if this message was handed out before and not acked."""
        return self.delivery_count > 1


@runtime_checkable
class Consumer(Protocol):
    """An async iterator of deliveries from one address. `aclose` gives unacked deliveries back to the broker."""

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> Delivery: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """What every transport implements: in memory, RabbitMQ and Redis Streams alike.

    Besides its methods, a transport declares what the code around it may count on (`TransportBase` gives the
    cautious answers), so that no code decides anything by a transport's name or class.
    """

    name: str
    """What it is called in logs and banners (`inmemory`, `rabbitmq`, `redis`); never a reason to behave otherwise."""
    process_local: bool
    """True if only this process can reach its addresses (in memory): nothing outside can send, receive or
    tamper with a message, so a key made for the process may sign, and a worker on it serves this process only."""
    requeue_lag: float
    """Seconds for which a delayed or retried message may be counted by no `pending()` while the broker moves it
    back into its queue: how long a burst-mode worker waits for quiet before it believes its queues drained."""

    async def connect(self) -> None:
        """Open connections and declare what is needed. Idempotent."""
        ...

    async def disconnect(self) -> None:
        """Close connections; unacked deliveries go back to the broker. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def publish(
        self,
        address: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Hand a message to the broker; returns once the broker has it safely (confirmed, persisted).

        Args:
            address: Where to publish: an activity name, `events` or `dead-letter`.
            body: The bytes, exactly as they are to be delivered (a sealed message: see `paigeant_ai._sealing`).
            headers: String headers that travel beside the body.
            delay: Seconds before the message becomes visible to consumers.
        """
        ...

    async def consume(self, address: str, *, prefetch: int = 10) -> Consumer:
        """Start consuming `address`, with at most `prefetch` unacked deliveries handed out at once."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """Settle a delivery as done: it is never delivered again."""
        ...

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        """Give the delivery back, unchanged, to be delivered again after `delay` seconds."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the delivery to `dead-letter` with `reason` in its headers, and settle it."""
        ...

    async def give_back(self, delivery: Delivery) -> None:
        """Hand an unsettled delivery back to the broker now, as its redelivery: the next consumer sees it
        `redelivered`, as if its consumer had died. For a delivery whose settling failed while the connection lived
        (a refused publish): without it the broker would wait for the consumer to go before delivering it again."""
        ...

    async def pending(self, address: str) -> int:
        """How many messages at `address` are waiting or delayed and not yet settled (used by burst mode)."""
        ...


@runtime_checkable
class AckDeadline(Protocol):
    """A capability: the broker takes back a delivery held unacked for too long (RabbitMQ's consumer timeout), so a
    worker hands back what it still holds before then (see `paigeant_ai._long_steps`)."""

    lease: float
    """Seconds of the lease of a step whose delivery was handed back while it runs (renewed every third of it)."""

    def detach_after(self, longest_step: float) -> float | None:
        """Seconds after which a consumer opened from now on, for steps of up to `longest_step` seconds, hands back
        a delivery it still holds; None if it never needs to."""
        ...


@runtime_checkable
class ConsumerWatch(Protocol):
    """A capability beside `Transport`: telling who consumes its addresses, so nobody dispatches into the void.

    In memory and on Redis every answer is known (Redis from each consumer's heartbeat); RabbitMQ tells how many
    consumers a queue has now, but not which queues have some, nor since when.
    """

    async def consumers(self, address: str) -> int | None:
        """How many live consumers `address` has now (0 if its queue does not exist); `None` if unknown."""
        ...

    async def consumed_addresses(self) -> list[str] | None:
        """The addresses with at least one live consumer, sorted; `None` if this transport cannot tell."""
        ...

    async def last_consumed(self, address: str) -> datetime | None:
        """When a consumer of `address` was last seen alive (about now, if one is); `None` if never or unknown."""
        ...


@runtime_checkable
class SharedClaims(Protocol):
    """A capability: keys claimed once, in a store every process of the namespace shares (Redis: `SET NX`)."""

    async def claim(self, key: str, value: str, *, ttl: float) -> str | None:
        """Set `key` to `value` for `ttl` seconds unless it is set; `None` if this call set it, else its value."""
        ...

    async def release(self, key: str, value: str) -> None:
        """Delete `key` if it still holds `value`."""
        ...


@runtime_checkable
class SharedStores(Protocol):
    """A capability: stores that every process on this transport shares, on the transport's own connection.

    A transport that offers it (Redis) is where the worker, the signer and `get_waiting_store` /
    `get_workflow_store` keep their state by default; on any other, each process keeps its own in memory.
    Each call returns a new store object over the same shared data.
    """

    def dedupe_store(self) -> DedupeStore:
        """Where workers remember the steps they completed, so a redelivered step is skipped."""
        ...

    def replay_cache(self) -> ReplayCache:
        """Where signers remember the hops they settled, so a replayed hop is refused."""
        ...

    def waiting_store(self) -> WaitingStore:
        """Where parked workflows wait to be resumed."""
        ...

    def workflow_store(self) -> WorkflowStore:
        """Where the workflows' events are projected into their status."""
        ...


@runtime_checkable
class CancelBoard(Protocol):
    """Where cancel records are posted and read by every process on a transport (opaque bytes, verified by readers).

    Records are a list, not one value: a reader verifies each and acts on the first valid one, so whoever can write
    to the broker cannot block a genuine cancel by writing garbage first. A board never parses a record, and never
    raises on foreign data it finds: it hands the bytes over.
    """

    async def post(self, correlation_id: str, record: bytes, *, ttl: float) -> None:
        """Add `record` for `correlation_id`, kept at least `ttl` seconds; returns once it is safe (confirmed).

        The same bytes posted again are kept once (for the longer of the two ttls where the board can tell);
        past `MAX_CANCEL_RECORDS` records a post is ignored, with a warning.

        Raises:
            UserError: The record is over `MAX_CANCEL_RECORD_BYTES`, or the correlation ID is empty or over 200
                characters, or `ttl` is not positive (or longer than the board keeps anything).
        """
        ...

    async def records(self, correlation_id: str) -> list[bytes]:
        """Every record posted for `correlation_id` (oldest first, at most `MAX_CANCEL_RECORDS`), [] if none."""
        ...

    async def cancelled_among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        """For those of `correlation_ids` that have records, their records: one round trip however many ids."""
        ...

    async def open(self) -> None:
        """Get ready to answer (RabbitMQ: start reading the stream and catch up with it). Idempotent."""
        ...

    async def close(self) -> None:
        """Stop using the board (what it shares with the transport is closed with the transport)."""
        ...


@runtime_checkable
class Cancellations(Protocol):
    """A capability of a transport: its cancel board."""

    def cancel_board(self) -> CancelBoard:
        """A board over the transport's cancel records (every call a new object over the same records)."""
        ...


@runtime_checkable
class RegistryBoard(Protocol):
    """Where each worker posts what it serves, one record per worker, read by every process on a transport.

    Records are opaque bytes, verified by readers (see `paigeant_ai._registry`): a board never parses one, and never
    raises on foreign data it finds. A post replaces the worker's earlier record.
    """

    async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
        """Make `record` the record of `worker_id`, kept at least `ttl` seconds unless posted again.

        Raises:
            UserError: The record is over `MAX_REGISTRY_RECORD_BYTES`, the worker ID is empty or over 200
                characters, or `ttl` is not positive.
        """
        ...

    async def records(self) -> list[bytes]:
        """The latest record of every worker that posted within its ttl (in no particular order)."""
        ...

    async def open(self) -> None:
        """Get ready to answer (RabbitMQ: start reading the stream and catch up with it). Idempotent."""
        ...

    async def close(self) -> None:
        """Stop using the board (what it shares with the transport is closed with the transport)."""


@dataclass(frozen=True, slots=True)
class ProgressEntry:
    """One entry of a workflow's progress stream: opaque bytes and headers, verified by whoever reads them.

    Attributes:
        position: Where it is in the stream, as the transport names it (only that transport reads it back).
        body: The bytes, as appended.
        headers: The headers, as appended.
    """

    position: str
    body: bytes
    headers: dict[str, str]


@runtime_checkable
class ProgressReader(Protocol):
    """Reads one workflow's progress stream forward, from where it was opened."""

    async def read(self, wait: float) -> list[ProgressEntry]:
        """The entries after those returned so far (oldest first); [] if none arrived within `wait` seconds."""
        ...

    async def aclose(self) -> None:
        """Stop reading. Idempotent."""
        ...


@runtime_checkable
class Advertising(Protocol):
    """A capability of a transport: its registry board, where workers advertise the activities they serve."""

    def registry_board(self) -> RegistryBoard:
        """A board over the transport's registry (every call a new object over the same records)."""
        ...


def check_registry_post(worker_id: str, record: bytes, ttl: float) -> None:
    """Raise the `UserError` a board's `post` raises for a bad worker ID, record or ttl."""
    if not 0 < len(worker_id) <= 200:
        raise UserError("a worker ID must have 1 to 200 characters")
    if len(record) > MAX_REGISTRY_RECORD_BYTES:
        raise UserError(
            f"a worker record may have at most {MAX_REGISTRY_RECORD_BYTES} bytes, not {len(record)}: "
            "split the worker's activities over more workers"
        )
    if not 0 < ttl < float("inf"):
        raise UserError(f"a registry record's ttl must be a positive number of seconds, not {ttl!r}")


@runtime_checkable
class ProgressStreams(Protocol):
    """A capability: a durable, bounded stream of progress per workflow that anyone may read from any position.

    A stream holds opaque bytes (signed batches of events): it never parses them, and hands over whatever it finds,
    foreign data included.
    """

    progress_retention: float
    """Seconds a workflow's stream is kept after its last entry (RabbitMQ: after the entry is written)."""

    async def append_progress(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Append an entry to `correlation_id`'s stream; returns once the broker has it."""
        ...

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> ProgressReader:
        """A reader of `correlation_id`'s stream from just after `position` `after` (None: from its first entry)."""
        ...


class TransportBase:
    """What every transport shares: `async with transport:` connects, and disconnects on the way out.

    Its declarations are the cautious ones, for a broker with other processes on it and a lag before a delayed
    message is counted again; a transport that offers better says so.
    """

    process_local: bool = False
    requeue_lag: float = 1.0

    async def connect(self) -> None:  # pragma: no cover - every transport has its own
        raise NotImplementedError

    async def disconnect(self) -> None:  # pragma: no cover - every transport has its own
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()


class ConsumerBase:
    """What every consumer shares: it iterates over itself, and `async with` closes it."""

    async def aclose(self) -> None:  # pragma: no cover - every consumer has its own
        raise NotImplementedError

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class BufferedConsumer(ConsumerBase):
    """A consumer whose background tasks fill a buffer (Redis, SQLite): it hands out what is buffered, raises the
    failure that stopped its fetching, and ends once closed. A subclass records each delivery it hands out."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self._closed = False

    def _handed_out(self, delivery: Delivery) -> None:  # pragma: no cover - every consumer has its own
        raise NotImplementedError

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise TransportError(f"consuming {self.address!r} failed: {self._failure}") from self._failure
            if self._buffer:
                delivery = self._buffer.popleft()
                self._handed_out(delivery)
                return delivery
            self._arrived.clear()
            await self._arrived.wait()


def check_lease_settings(
    *, visibility_timeout: float, max_deliveries: int, trim_length: int, poll_interval: float
) -> None:
    """Raise the `UserError` naming the setting, for the settings of a transport that leases deliveries."""
    if visibility_timeout <= 0:
        raise UserError("visibility_timeout must be a positive number of seconds")
    if max_deliveries < 1:
        raise UserError("max_deliveries must be at least 1")
    if trim_length < 1:
        raise UserError("trim_length must be at least 1")
    if poll_interval <= 0:
        raise UserError("poll_interval must be a positive number of seconds")


def dead_letter_headers(delivery: Delivery, reason: str) -> dict[str, str]:
    """The headers a dead-lettered copy of `delivery` carries."""
    return {**delivery.headers, REASON_HEADER: escape_control(reason)[:2000], SOURCE_HEADER: delivery.address}


_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(text: str) -> list[str]:
    """The URLs of `text`, several separated by commas (a cluster's nodes). A comma splits only where a new URL
    starts, so a password or a list of hosts with a comma in it stays whole."""
    return _NEXT_URL.split(text)


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***` (the user, host, port and path kept), for logs and errors; each
    of several URLs separated by commas (a cluster's nodes)."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(redact_url(part) for part in urls)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL Python can parse (an unclosed IPv6 bracket...): hide whatever precedes an @
        scheme, sep, rest = url.partition("://")
        credentials, at, host = rest.rpartition("@")
        return f"{scheme}{sep}***@{host}" if at and credentials else url
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # verbatim: an IPv6 host keeps its brackets, and the port stays
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def ensure_bytes(body: object) -> None:
    """Raise a `UserError` naming the fix when `body`, given to `publish`, is not bytes."""
    if not isinstance(body, bytes):
        raise UserError(
            f"publish takes the message's bytes, not {type(body).__name__}: send a PaigeantMessage with "
            "WorkflowDispatcher.dispatch_workflow, or its bytes (`message.to_json()`, signed with `MessageSigner.sign` "
            "first on a transport whose workers check signatures)"
        )
