"""`RedisJoinStore`: where the branches of parallel groups meet, in Redis (a `JoinStore`, see `paigeant_ai._join`).

Each group is one hash, `<namespace>:{j:<correlation id>/<step>}`: a field `r:<branch key>` per stored result, and
`failed` (the signed `GroupMark` of the branch that failed the group) once one did; and beside it `<that key>:wait`,
the key of the branch that is parked, if one is. Each change is one script, so the count a worker reads is the one
its own result made, and the results a failing branch reads are those stored before its mark.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._layout import group_key
from ._wire import ms

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ("RedisJoinStore",)

_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) else redis.call('PERSIST', KEYS[1]) end
local failed = redis.call('HGET', KEYS[1], 'failed')
local count = redis.call('HLEN', KEYS[1])
if failed then count = count - 1 end
return {count, failed}
"""

_FAIL = """
redis.call('HSETNX', KEYS[1], 'failed', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

_REPLACE = """
if redis.call('HGET', KEYS[1], 'failed') == ARGV[1] then redis.call('HSET', KEYS[1], 'failed', ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
"""

_HOLD = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

_ALL = "return redis.call('HGETALL', KEYS[1])"


class RedisJoinStore:
    """The results of parallel groups' branches, in the Redis of `transport`, shared by every worker on it.

    Args:
        transport: A `RedisTransport` whose connection and namespace the store uses.
    """

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport

    def key(self, group: str) -> str:
        """The hash of one group."""
        return group_key(self.transport.namespace, group)

    async def add(self, group: str, key: str, record: bytes, *, ttl: float) -> tuple[int, bytes | None]:
        with self.transport.errors("storing a branch's result", group):
            keep = ms(ttl) if ttl > 0 else 0  # 0: until the group is joined or fails
            count, failed = await self.transport.client.eval(_ADD, 1, self.key(group), f"r:{key}", record, keep)
        return int(count), failed if isinstance(failed, bytes) else None

    async def records(self, group: str) -> dict[str, bytes]:
        with self.transport.errors("reading a group's results", group):
            flat = await self.transport.client.eval(_ALL, 1, self.key(group))
        return _results(flat)

    async def fail(self, group: str, mark: bytes, *, ttl: float) -> tuple[bytes, dict[str, bytes]]:
        with self.transport.errors("marking a group failed", group):
            flat = await self.transport.client.eval(_FAIL, 1, self.key(group), mark, ms(ttl))
        return _fields(flat).get("failed", mark), _results(flat)

    async def replace_mark(self, group: str, old: bytes, new: bytes) -> tuple[bytes, dict[str, bytes]]:
        with self.transport.errors("marking a group failed", group):
            flat = await self.transport.client.eval(_REPLACE, 1, self.key(group), old, new)
        return _fields(flat).get("failed", new), _results(flat)

    async def delete(self, group: str) -> None:
        with self.transport.errors("forgetting a joined group", group):
            await self.transport.client.delete(self.key(group), self.wait_key(group))

    def wait_key(self, group: str) -> str:
        """The key of the branch of `group` that is parked, if one is (a group's branches park one at a time)."""
        return f"{self.key(group)}:wait"

    async def hold_wait(self, group: str, key: str, *, ttl: float) -> str:
        with self.transport.errors("holding a group's wait", group):
            holder = await self.transport.client.eval(_HOLD, 1, self.wait_key(group), key, ms(ttl))
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def release_wait(self, group: str, key: str) -> None:
        with self.transport.errors("releasing a group's wait", group):
            await self.transport.client.eval(_RELEASE, 1, self.wait_key(group), key)


def _fields(flat: Any) -> dict[str, bytes]:
    items: list[bytes] = list(flat or [])
    return {items[i].decode(): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _results(flat: Any) -> dict[str, bytes]:
    return {name[2:]: value for name, value in _fields(flat).items() if name.startswith("r:")}
