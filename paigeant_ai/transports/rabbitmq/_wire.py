"""How paigeant's deliveries look on RabbitMQ: string headers, delivery counts, dead-lettering queue arguments."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiormq.abc import DeliveredMessage

from ...contracts import DEAD_LETTER
from ..base import REASON_HEADER, SOURCE_HEADER, Delivery

if TYPE_CHECKING:
    from ._transport import RabbitMQTransport

__all__ = ("dead_letter_to", "header_text", "string_headers", "to_delivery")

_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death"})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def to_delivery(address: str, message: DeliveredMessage, handle: Any, transport: RabbitMQTransport) -> Delivery:
    """The `Delivery` of `message`, its headers as strings, and its count from RabbitMQ's own header."""
    raw: Mapping[str, Any] = message.header.properties.headers or {}
    headers = string_headers(raw)
    if address == DEAD_LETTER and REASON_HEADER not in headers:
        headers.update(_broker_dead_letter_headers(raw, transport))
    return Delivery(address, message.body, headers, _delivery_count(message, raw), handle)


def _delivery_count(message: DeliveredMessage, raw: Mapping[str, Any]) -> int:
    """How often the broker handed `message` out, this time included, as the broker alone tells.

    A quorum queue writes its count in `x-delivery-count`, but a classic queue passes on whatever the publisher
    put there; so the header counts only when the broker's own `redelivered` flag says the message came back, and
    a first delivery is 1 whatever its headers claim.
    """
    if not message.redelivered:
        return 1
    count = raw.get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
        return count + 1
    return 2


def _broker_dead_letter_headers(raw: Mapping[str, Any], transport: RabbitMQTransport) -> dict[str, str]:
    """Reason and source of a letter RabbitMQ dead-lettered itself (the poison limit)."""
    deaths = raw.get("x-death")
    # The most recent death comes first; a delayed message also carries the expiry that ended its delay.
    last: Mapping[str, Any] = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    reason = header_text(last.get("reason", raw.get("x-first-death-reason")))
    queue = header_text(last.get("queue", raw.get("x-first-death-queue")))
    if not reason:
        return {}
    if reason == "delivery_limit":
        detail = (
            f"poison message: handed out {transport.max_deliveries} times without being settled "
            "(its consumers kept failing or dying); RabbitMQ's delivery limit moved it here"
        )
    else:
        detail = f"dead-lettered by RabbitMQ ({reason})"
    source = queue.removeprefix(f"{transport.namespace}.") if queue else ""
    return {REASON_HEADER: detail, SOURCE_HEADER: source}


def dead_letter_to(queue: str) -> dict[str, Any]:
    """Quorum queue arguments that dead-letter to `queue`, at least once (never dropped on the way)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
    }


def string_headers(raw: Mapping[str, Any]) -> dict[str, str]:
    """The headers as strings, without the ones RabbitMQ sets itself (delivery count, death records)."""
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if key in _BROKER_HEADERS or key.startswith(_BROKER_HEADER_PREFIXES):
            continue
        text = header_text(value)
        if text is not None:
            headers[key] = text
    return headers


def header_text(value: Any) -> str | None:
    """A header's value as a string; `None` for what is no string header (tables, arrays, timestamps)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    return None  # tables, arrays and timestamps are not string headers
