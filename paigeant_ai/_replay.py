"""Where a worker remembers the hops it settled, so that a copy of one is refused (see `MessageSigner.settled`)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

__all__ = ("InMemoryReplayCache", "ReplayCache")


class ReplayCache(Protocol):
    """Remembers the hops a worker settled (by `message_id`), with a digest of what each one said."""

    async def settled_digest(self, message_id: str) -> str | None:
        """The digest of the settled hop `message_id`, or None if it was not settled (or is forgotten)."""
        ...

    async def remember(self, message_id: str, digest: str, ttl: float) -> None:
        """Record that `message_id` was settled, for `ttl` seconds."""
        ...


class InMemoryReplayCache:
    """Settled hops, in this process's memory: the most recent `max_entries`, each for its `ttl`.

    Each worker (each `MessageSigner`) has its own; workers in other processes do not see it. On Redis, the
    default is the transport's shared cache (`RedisReplayCache`), which every worker shares.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def settled_digest(self, message_id: str) -> str | None:
        entry = self._entries.get(message_id)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._entries[message_id]
            return None
        return entry[0]

    async def remember(self, message_id: str, digest: str, ttl: float) -> None:
        self._entries.setdefault(message_id, (digest, time.monotonic() + ttl))
        self._entries.move_to_end(message_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
