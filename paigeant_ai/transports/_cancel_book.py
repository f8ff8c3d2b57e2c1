"""What every cancel board shares: the limits a post is checked against, and the records held in this process.

The in-memory board is a `CancelBook`; the RabbitMQ board is one too, filled from the cancellations stream. A
book holds opaque bytes per correlation ID, each record with its own expiry on the event loop's clock, the same
bytes once, and at most `MAX_CANCEL_RECORDS` per ID (the oldest kept).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection

from ..exceptions import UserError
from .base import MAX_CANCEL_RECORD_BYTES, MAX_CANCEL_RECORDS

__all__ = ("MAX_CORRELATION_ID", "CancelBook", "check_post", "readable_id", "warn_full")

logger = logging.getLogger("paigeant_ai.transports")

MAX_CORRELATION_ID = 200
"""The longest correlation ID, in characters (as in `PaigeantMessage`)."""
_SWEEP_EVERY = 1024
"""Adds between two sweeps of the expired records of every ID (reads drop an ID's expired records themselves)."""


def check_post(correlation_id: str, record: bytes, ttl: float) -> None:
    """Raise a `UserError` naming the limit when a post breaks one."""
    if not readable_id(correlation_id):
        raise UserError(
            f"a correlation ID is a string of 1 to {MAX_CORRELATION_ID} characters, not {correlation_id!r:.60}"
        )
    if not isinstance(record, bytes):  # pyright: ignore[reportUnnecessaryIsInstance] - callers may not type-check
        raise UserError(f"a cancel record is bytes (the signed record), not {type(record).__name__}")
    if len(record) > MAX_CANCEL_RECORD_BYTES:
        raise UserError(
            f"a cancel record is at most {MAX_CANCEL_RECORD_BYTES} bytes (MAX_CANCEL_RECORD_BYTES); "
            f"this one is {len(record)}"
        )
    if not (ttl > 0 and math.isfinite(ttl)):
        raise UserError(f"ttl must be a positive number of seconds, not {ttl!r}")


def readable_id(correlation_id: object) -> bool:
    """True if `correlation_id` could have been posted; reads of any other ID find nothing rather than fail."""
    return isinstance(correlation_id, str) and 0 < len(correlation_id) <= MAX_CORRELATION_ID


def warn_full(correlation_id: str) -> None:
    """Log that a post for `correlation_id` was ignored: it has `MAX_CANCEL_RECORDS` records already."""
    logger.warning(
        "ignoring a cancel record for %r: it has %d records already (MAX_CANCEL_RECORDS)",
        correlation_id[:MAX_CORRELATION_ID],
        MAX_CANCEL_RECORDS,
    )


class CancelBook:
    """Cancel records held in this process, each until its own expiry (in `asyncio` loop time)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[bytes, float]] = {}  # id -> record -> expiry; dicts keep the oldest first
        self._adds = 0

    def add(self, correlation_id: str, record: bytes, expires_at: float) -> bool:
        """Hold `record` until `expires_at` (an identical record: until the later expiry); False if the ID is full."""
        now = _now()
        if expires_at <= now:
            return True  # expired already (read late from a stream): nothing to hold
        self._adds += 1
        if self._adds % _SWEEP_EVERY == 0:
            self.sweep(now)
        held = self._live(correlation_id, now)
        if held is None:
            held = self._records[correlation_id] = {}
        if record in held:
            held[record] = max(held[record], expires_at)
            return True
        if len(held) >= MAX_CANCEL_RECORDS:
            return False
        held[record] = expires_at
        return True

    def full(self, correlation_id: str, record: bytes) -> bool:
        """True if adding `record` would be ignored: the ID has `MAX_CANCEL_RECORDS` others already."""
        held = self._live(correlation_id, _now())
        return held is not None and record not in held and len(held) >= MAX_CANCEL_RECORDS

    def records(self, correlation_id: str) -> list[bytes]:
        """The live records of `correlation_id`, oldest first."""
        held = self._live(correlation_id, _now())
        return list(held) if held else []

    def among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        """The live records of those of `correlation_ids` that have some."""
        now = _now()
        found: dict[str, list[bytes]] = {}
        for correlation_id in correlation_ids:
            held = self._live(correlation_id, now)
            if held:
                found[correlation_id] = list(held)
        return found

    def clear(self) -> None:
        self._records.clear()

    def sweep(self, now: float) -> None:
        """Forget every expired record."""
        for correlation_id in list(self._records):
            self._live(correlation_id, now)

    def _live(self, correlation_id: str, now: float) -> dict[bytes, float] | None:
        held = self._records.get(correlation_id)
        if held is None:
            return None
        for record in [record for record, expires_at in held.items() if expires_at <= now]:
            del held[record]
        if not held:
            del self._records[correlation_id]
            return None
        return held


def _now() -> float:
    return asyncio.get_running_loop().time()
