"""Where workers claim the hops they run, so that no hop runs twice (see `MessageSigner.claim`).

A hop is claimed, atomically, when it starts, with a digest of what it says, and settled when its worker settles it:

| the cache holds               | a fresh copy (not redelivered)   | the broker's redelivery             |
|-------------------------------|----------------------------------|-------------------------------------|
| nothing                       | claims it: it runs               | claims it: it runs                  |
| the same hop, running         | `running`: a replay, refused      | takes it over: it runs (its worker died) |
| the same hop, running, lease lapsed | takes it over: it runs     | takes it over: it runs              |
| the same hop, settled         | `settled`: a replay, refused      | `settled`: skipped (its ack was lost) |
| the hop with other content    | `duplicate`: skipped              | `duplicate`: skipped                |

A claim carries the random token of the copy that made it (`holder`): asked again by that copy, it is `claimed`.
Redis clients send a request again when a dropped connection lost its reply, and a worker must not refuse, as a
replay, the hop it has just claimed itself.

A running claim carries a lease (the step's timeout and a margin): a copy that arrives after it lapsed belongs to
a hop whose worker is gone (a poison message sent back from the dead-letter queue) and may run. A worker that
handed its delivery back to the broker while the step runs (see `paigeant_ai._long_steps`) renews the lease
(`ReplayCache.renew`) until the hop is settled, so the watch copy it left behind takes the hop over only once that
worker is gone; a renewed claim is not taken over by the broker's redelivery either (that worker handed its
delivery back: a redelivery of it is left over, an ack that failed), only once its lease lapsed. Only hops whose
signature a trusted key made are claimed, so a forger cannot block a message id.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ("ClaimState", "InMemoryReplayCache", "RenewState", "ReplayCache")

ClaimState = Literal["claimed", "running", "settled", "duplicate", "forgotten"]
"""What claiming a hop found: `claimed` (it runs), `running` or `settled` (the same hop, elsewhere or before),
`duplicate` (the same id with other content), `forgotten` (an in-memory cache that may have evicted it)."""
RenewState = Literal["renewed", "gone", "taken"]
"""What renewing a claim found: `renewed`, `gone` (settled, forgotten, another hop's), `taken` (another holder's)."""


class ReplayCache(Protocol):
    """Claims hops when they start and remembers them once settled (by `message_id`, with a digest of their content)."""

    async def claim(
        self,
        message_id: str,
        digest: str,
        *,
        sent_at: float,
        redelivered: bool,
        lease: float,
        ttl: float,
        holder: str = "",
    ) -> ClaimState:
        """Claim the hop `message_id` (content `digest`, signed at or after `sent_at`, a Unix time), atomically.

        Args:
            message_id: The hop's id.
            digest: A digest of exactly what its signature covers.
            sent_at: A signed time the hop was made after (its workflow's start, or its last logged step's end).
            redelivered: The broker delivered this copy before: it may take over a running claim.
            lease: Seconds the claim stays running before another copy may take it over.
            ttl: Seconds the claim is remembered.
            holder: A random token of the copy that claims: only it renews the claim (see `renew`), and its own
                running claim asked again is `claimed` (a store's client may send a request twice when a dropped
                connection lost the reply: the copy must not be refused as a replay of itself).
        """
        ...

    async def renew(self, message_id: str, digest: str, lease: float, holder: str = "") -> RenewState:
        """Extend the running claim of the hop `message_id` (content `digest`), held by `holder`, to `lease` seconds
        from now.

        Returns:
            `renewed`; `gone` when there is no such running claim (the hop was settled, forgotten, or is another
            hop's); `taken` when another copy of the hop took the claim over.
        """
        ...

    async def settle(self, message_id: str, digest: str, ttl: float) -> None:
        """Record that the hop `message_id` was settled, for `ttl` seconds."""
        ...


@dataclass(slots=True)
class _Entry:
    digest: str
    settled: bool
    lease_until: float
    expires: float
    sent_at: float
    holder: str = ""
    held: bool = False  # renewed by a worker that handed its delivery back: no broker redelivery takes it over


class InMemoryReplayCache:
    """Claimed hops in this process's memory, at most `max_entries`, each for its `ttl`.

    Each worker (each `MessageSigner`) has its own; workers in other processes do not see it, so a hop replayed to
    another replica runs again there: share a Redis store between replicas (`PAIGEANT_SHARED_STORE_URL`). When
    it is full, the hops made longest ago are evicted, and the newest of their times becomes a horizon: a hop made
    at or before it that is not in the cache may have been evicted, so it is refused (`forgotten`) rather than
    silently run again. A hop's time is what its signature vouches for: its workflow's start, or the end of the
    last step in its log; so on a busy worker, a step that follows a long wait (a parked step resumed, a late
    retry) can be refused too, and the cure for both is a shared store.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self.horizon: float | None = None
        """Creation time (Unix) of the newest hop evicted while unexpired; None until one was."""
        self._entries: dict[str, _Entry] = {}
        self._by_age: list[tuple[float, str]] = []  # (sent_at, message_id): a heap, the oldest first

    async def claim(
        self,
        message_id: str,
        digest: str,
        *,
        sent_at: float,
        redelivered: bool,
        lease: float,
        ttl: float,
        holder: str = "",
    ) -> ClaimState:
        now = time.time()
        entry = self._entries.get(message_id)
        if entry is not None and entry.expires < now:
            del self._entries[message_id]
            entry = None
        if entry is None:
            if self.horizon is not None and sent_at <= self.horizon:
                return "forgotten"
            self._entries[message_id] = _Entry(digest, False, now + lease, now + ttl, sent_at, holder)
            heapq.heappush(self._by_age, (sent_at, message_id))
            self._evict(now)
            return "claimed"
        if entry.digest != digest:
            return "duplicate"
        if entry.settled:
            return "settled"
        if holder and entry.holder == holder:  # its own claim, asked again
            return "claimed"
        if (redelivered and not entry.held) or entry.lease_until < now:
            entry.lease_until, entry.held, entry.holder = now + lease, False, holder
            return "claimed"
        return "running"

    async def renew(self, message_id: str, digest: str, lease: float, holder: str = "") -> RenewState:
        now = time.time()
        entry = self._entries.get(message_id)
        if entry is None or entry.expires < now or entry.settled or entry.digest != digest:
            return "gone"
        if entry.holder != holder:
            return "taken"
        entry.lease_until, entry.held = now + lease, True
        return "renewed"

    async def settle(self, message_id: str, digest: str, ttl: float) -> None:
        now = time.time()
        entry = self._entries.get(message_id)
        if entry is None:
            self._entries[message_id] = entry = _Entry(digest, True, now, now + ttl, now)
            heapq.heappush(self._by_age, (now, message_id))
            self._evict(now)
        elif entry.digest == digest:
            entry.settled, entry.expires = True, max(entry.expires, now + ttl)

    def _evict(self, now: float) -> None:
        while len(self._entries) > self.max_entries and self._by_age:
            sent_at, message_id = heapq.heappop(self._by_age)
            entry = self._entries.get(message_id)
            if entry is None or entry.sent_at != sent_at:
                continue  # gone already
            del self._entries[message_id]
            if entry.expires >= now:  # forgotten before its time: whatever was made by then may be a replay
                self.horizon = sent_at if self.horizon is None else max(self.horizon, sent_at)
        if len(self._by_age) > 2 * self.max_entries + 1000:  # entries that expired or went meanwhile
            self._by_age = [(s, m) for s, m in self._by_age if (e := self._entries.get(m)) and e.sent_at == s]
            heapq.heapify(self._by_age)
