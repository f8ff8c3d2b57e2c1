"""`RedisCancelBoard`: the cancel records of a `RedisTransport`, one Redis list per correlation ID.

The list `<namespace>:{w:<correlation id>}:cancel` holds the records, oldest first, each once, at most
`MAX_CANCEL_RECORDS`; it expires when the longest-lived of them may go (a later post extends the expiry, never
shortens it). Both scripts put up with a key that holds something else: a read finds nothing there, a post replaces
it. Their calls go out in the transport's shared pipeline, so a read of many IDs is one round trip.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection
from typing import TYPE_CHECKING, cast

from redis.exceptions import ResponseError

from .._cancel_book import check_post, readable_id, warn_full
from ..base import MAX_CANCEL_RECORDS
from ._layout import workflow_key
from ._types import Script, as_script
from ._wire import ms

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._transport import RedisTransport

__all__ = ("POST_CANCEL", "READ_CANCELS", "RedisCancelBoard")

POST_CANCEL = """
-- KEYS: a correlation ID's cancel records. ARGV: the record, ms to keep it at least, the most records.
-- Returns 'added', 'known' (the same bytes are there: only the expiry may grow) or 'full' (nothing changed).
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'list' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local outcome = 'added'
if redis.call('LPOS', KEYS[1], ARGV[1]) then
  outcome = 'known'
elseif redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'full'
else
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
local left = redis.call('PTTL', KEYS[1])
if left >= 0 and left < tonumber(ARGV[2]) or left == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return outcome
"""

READ_CANCELS = """
-- KEYS: correlation IDs' cancel records. ARGV: the most records per ID.
-- Returns, for each key in order, its records oldest first ({} for a missing key or one that is not a list).
local found = {}
for i, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'list' then
    found[i] = redis.call('LRANGE', key, 0, tonumber(ARGV[1]) - 1)
  else
    found[i] = {}
  end
end
return found
"""

_KEYS_PER_CALL = 1000
"""Most IDs one read script call looks at; the calls of one read still go out in the same pipeline."""


class RedisCancelBoard:
    """The cancel board of a `RedisTransport`, shared by every process on the same Redis and namespace.

    Args:
        transport: The Redis transport whose connection and namespace it uses.
    """

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport
        self._scripts: tuple[aioredis.Redis, Script, Script] | None = None

    def key(self, correlation_id: str) -> str:
        """The list of `correlation_id`'s records."""
        return workflow_key(self.transport.namespace, correlation_id, "cancel")

    async def post(self, correlation_id: str, record: bytes, *, ttl: float) -> None:
        check_post(correlation_id, record, ttl)
        post = self._script(POST_CANCEL)
        with self.transport.errors("posting a cancel record for", correlation_id):
            outcome = await post(keys=[self.key(correlation_id)], args=[record, max(1, ms(ttl)), MAX_CANCEL_RECORDS])
        if outcome in (b"full", "full"):
            warn_full(correlation_id)

    async def records(self, correlation_id: str) -> list[bytes]:
        # Read before every step: one command in the transport's shared pipeline, not a script call of its own.
        if not readable_id(correlation_id):
            return []
        with self.transport.errors("reading the cancel records of", correlation_id):
            try:
                found = await self.transport.pipelined("LRANGE", self.key(correlation_id), 0, MAX_CANCEL_RECORDS - 1)
            except ResponseError:  # not a list: nothing a board posted (the next post replaces it)
                return []
        return [bytes(record) for record in cast("list[bytes]", found or [])]

    async def cancelled_among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        ids = list(dict.fromkeys(cid for cid in correlation_ids if readable_id(cid)))
        if not ids:
            return {}
        read = self._script(READ_CANCELS)
        size = 1 if self.transport.cluster else _KEYS_PER_CALL  # on a cluster, each workflow's key is in its own slot
        chunks = [ids[start : start + size] for start in range(0, len(ids), size)]
        with self.transport.errors("reading the cancel records"):
            # Asked for together, the calls go out in one pipeline.
            replies = await asyncio.gather(
                *(read(keys=[self.key(cid) for cid in chunk], args=[MAX_CANCEL_RECORDS]) for chunk in chunks)
            )
        found: dict[str, list[bytes]] = {}
        for cid, records in zip(ids, itertools.chain.from_iterable(replies), strict=True):
            if records:
                found[cid] = [bytes(record) for record in cast("list[bytes]", records)]
        return found

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _script(self, source: str) -> Script:
        """`source` registered on the transport's client as it now is (a reconnect brings a new client)."""
        client = cast("aioredis.Redis", self.transport.client)
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, as_script(client, POST_CANCEL), as_script(client, READ_CANCELS))
        return self._scripts[1] if source is POST_CANCEL else self._scripts[2]
