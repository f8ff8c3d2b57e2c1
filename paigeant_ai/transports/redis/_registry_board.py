"""`RedisRegistryBoard`: the registry of a `RedisTransport`, one hash of records and one sorted set of expiries.

`<namespace>:{registry}` maps each worker ID to its latest record; `<namespace>:{registry}:until` scores each
worker ID with the time (Unix ms) until which its record is kept. A post sets both; a read first drops the records
whose time has passed. Both keys expire `REGISTRY_RETENTION` after the last post, so a namespace nobody uses any more
leaves nothing behind. Both scripts put up with keys that hold something else: a read finds nothing there, a post
replaces them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from ..base import MAX_REGISTRY_RECORD_BYTES, check_registry_post
from ._layout import registry_keys
from ._types import Script, as_script
from ._wire import ms

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._transport import RedisTransport

__all__ = ("POST_RECORD", "READ_RECORDS", "RedisRegistryBoard")

_DROP_EXPIRED = """
local function wrong(key, kind)
  local found = redis.call('TYPE', key).ok
  return found ~= kind and found ~= 'none'
end
if wrong(KEYS[1], 'hash') or wrong(KEYS[2], 'zset') then redis.call('DEL', KEYS[1], KEYS[2]) end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, worker in ipairs(expired) do redis.call('HDEL', KEYS[1], worker) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
"""

POST_RECORD = (
    """
-- KEYS: the records, their expiries. ARGV: now (ms), the worker ID, its record, ms to keep it.
"""
    + _DROP_EXPIRED
    + """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[4]), ARGV[2])
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left < tonumber(ARGV[4]) then redis.call('PEXPIRE', key, ARGV[4]) end
end
return 1
"""
)

READ_RECORDS = (
    """
-- KEYS: the records, their expiries. ARGV: now (ms). Returns every record still kept.
"""
    + _DROP_EXPIRED
    + """
return redis.call('HVALS', KEYS[1])
"""
)


class RedisRegistryBoard:
    """The registry board of a `RedisTransport`, shared by every process on the same Redis and namespace."""

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport
        self._scripts: tuple[aioredis.Redis, Script, Script] | None = None

    @property
    def keys(self) -> list[str]:
        """The hash of records and the sorted set of their expiries."""
        return registry_keys(self.transport.namespace)

    async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
        check_registry_post(worker_id, record, ttl)
        post = self._script(POST_RECORD)
        with self.transport.errors("posting the registry record of", worker_id):
            await post(keys=self.keys, args=[_now(), worker_id, record, max(1, ms(ttl))])

    async def records(self) -> list[bytes]:
        read = self._script(READ_RECORDS)
        with self.transport.errors("reading the registry"):
            found = await read(keys=self.keys, args=[_now()])
        # Anyone who can write to Redis can write here: a record too large for a board to accept is not read.
        return [
            bytes(record) for record in cast("list[bytes]", found or []) if len(record) <= MAX_REGISTRY_RECORD_BYTES
        ]

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _script(self, source: str) -> Script:
        """`source` registered on the transport's client as it now is (a reconnect brings a new client)."""
        client = cast("aioredis.Redis", self.transport.client)
        if self._scripts is None or self._scripts[0] is not client:
            self._scripts = (client, as_script(client, POST_RECORD), as_script(client, READ_RECORDS))
        return self._scripts[1] if source is POST_RECORD else self._scripts[2]


def _now() -> int:
    return int(time.time() * 1000)
