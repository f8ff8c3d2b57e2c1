"""Where a worker remembers the steps it completed, so that a redelivered step is not run again."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

__all__ = ("DedupeStore", "InMemoryDedupeStore")


class DedupeStore(Protocol):
    """Remembers which steps completed, so a redelivered step is not run again."""

    async def is_done(self, key: str) -> bool:
        """Whether the step with idempotency key `key` completed."""
        ...

    async def mark_done(self, key: str) -> None:
        """Remember that the step with idempotency key `key` completed."""
        ...


class InMemoryDedupeStore:
    """The steps this process completed, the most recent `max_keys` of them."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()

    async def is_done(self, key: str) -> bool:
        """Whether this process completed the step `key` (among its latest `max_keys`)."""
        return key in self._keys

    async def mark_done(self, key: str) -> None:
        """Remember the step `key`, forgetting the oldest beyond `max_keys`."""
        self._keys[key] = None
        if len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
