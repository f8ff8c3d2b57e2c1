"""The transport seam: a small protocol that moves bytes and headers between named addresses.

A transport knows nothing of slips or agents. It owns delivery: at-least-once hand-over to consumers, `ack`,
delayed publishing (for retries), `retry_later` and `dead_letter`. Anything not acked when its consumer stops,
or when its process dies, is delivered again.

Addresses are logical names (`validate-customer-data`, `events`, `dead-letter`); each transport maps them to its
own queues or streams, `<namespace>.<address>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from ..contracts import PaigeantMessage

__all__ = (
    "REASON_HEADER",
    "SOURCE_HEADER",
    "Consumer",
    "ConsumerBase",
    "ConsumerWatch",
    "Delivery",
    "SharedClaims",
    "Transport",
    "TransportBase",
    "encode_body",
)

REASON_HEADER = "x-paigeant-reason"
"""Header that carries why a message was dead-lettered."""
SOURCE_HEADER = "x-paigeant-source"
"""Header that carries the address a dead-lettered message came from."""


@dataclass(slots=True, eq=False)
class Delivery:
    """One message handed to a consumer, to be settled exactly once with `ack`, `retry_later` or `dead_letter`.

    Attributes:
        address: The logical address it was consumed from.
        body: The message bytes, as published.
        headers: String headers, as published.
        delivery_count: 1 on first delivery, more when redelivered after a consumer stopped or died.
        handle: The transport's own reference to the delivery (a delivery tag, a stream entry id...).
    """

    address: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict[str, str])
    delivery_count: int = 1
    handle: Any = None

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
    """What every transport implements: in memory, RabbitMQ and Redis Streams alike."""

    name: str

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
        body: bytes | PaigeantMessage,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Hand a message to the broker; returns once the broker has it safely (confirmed, persisted).

        Args:
            address: Where to publish: an activity name, `events` or `dead-letter`.
            body: The bytes, or a `PaigeantMessage` that is encoded as JSON.
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

    async def pending(self, address: str) -> int:
        """How many messages at `address` are waiting or delayed and not yet settled (used by burst mode)."""
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


class TransportBase:
    """What every transport shares: `async with transport:` connects, and disconnects on the way out."""

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


def encode_body(body: bytes | PaigeantMessage) -> bytes:
    """The bytes to send for `body`."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return body.to_json()


def dead_letter_headers(delivery: Delivery, reason: str) -> dict[str, str]:
    """The headers a dead-lettered copy of `delivery` carries."""
    return {**delivery.headers, REASON_HEADER: reason[:2000], SOURCE_HEADER: delivery.address}
