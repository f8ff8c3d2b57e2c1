"""The redis-py calls paigeant makes, typed once.

redis-py's annotations change between releases (since 8.2 every command returns `Awaitable[Any] | Any`, one
signature for the sync and the asyncio client), so the rest of the package never types against them: it sees the
client and the Lua scripts through the protocols below, and `as_commands` / `as_script` are the only casts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import _lua as lua

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    Client = aioredis.Redis | RedisCluster
    """A client of one Redis server (or Sentinel-managed master), or of a Redis Cluster."""

__all__ = ("RedisCommands", "Script", "Scripts", "as_commands", "as_script")

Value = str | bytes | int | float


class Script(Protocol):
    """A registered Lua script: `await script(keys=[...], args=[...])` runs it (by SHA, loading it if needed)."""

    sha: str

    def __call__(self, keys: Sequence[Value] = ..., args: Sequence[Value] = ...) -> Awaitable[Any]: ...


class RedisCommands(Protocol):
    """The commands of an asyncio redis-py client that paigeant and its stores use, with their reply types."""

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...

    async def get(self, name: str) -> bytes | None: ...

    async def set(
        self, name: str, value: Value, *, nx: bool = False, px: int | None = None, get: bool = False
    ) -> Any: ...

    async def incr(self, name: str, amount: int = 1) -> int: ...

    async def pttl(self, name: str) -> int: ...

    async def delete(self, *names: str) -> int: ...

    async def exists(self, *names: str) -> int: ...

    async def hget(self, name: str, key: str) -> bytes | None: ...

    async def hset(self, name: str, key: str, value: Value) -> int: ...

    async def hexists(self, name: str, key: str) -> bool: ...

    async def hmget(self, name: str, keys: list[bytes]) -> list[bytes | None]: ...

    async def eval(self, script: str, numkeys: int, *keys_and_args: Value) -> Any: ...

    async def script_load(self, script: str) -> str: ...

    async def zrange(self, name: str, start: int, end: int) -> list[bytes]: ...

    async def zrevrange(self, name: str, start: int, end: int) -> list[bytes]: ...

    async def zrem(self, name: str, *values: Value) -> int: ...

    async def zcard(self, name: str) -> int: ...

    async def zscore(self, name: str, value: Value) -> float | None: ...

    def scan_iter(self, match: str | None = None, count: int | None = None) -> AsyncIterator[bytes]: ...

    def zscan_iter(self, name: str, match: str | None = None) -> AsyncIterator[tuple[bytes, float]]: ...

    async def xlen(self, name: str) -> int: ...

    async def xgroup_create(self, name: str, groupname: str, id: str = "$", mkstream: bool = False) -> Any: ...

    async def xreadgroup(
        self,
        groupname: str,
        consumername: str,
        streams: Mapping[str, str],
        count: int | None = None,
        block: int | None = None,
    ) -> Any: ...

    async def xpending_range(
        self, name: str, groupname: str, min: Value, max: Value, count: int
    ) -> list[dict[str, Any]]: ...

    async def xack(self, name: str, groupname: str, *ids: Value) -> int: ...

    async def zadd(self, name: str, mapping: Mapping[str, float]) -> int: ...

    async def xinfo_groups(self, name: str) -> list[dict[str, Any]]: ...

    async def xinfo_consumers(self, name: str, groupname: str) -> list[dict[str, Any]]: ...

    def pipeline(self, transaction: bool = True) -> Any: ...

    def register_script(self, script: str) -> Script: ...


def as_commands(client: Client) -> RedisCommands:
    """`client`, seen through `RedisCommands`."""
    return cast("RedisCommands", client)


def as_script(client: Client, source: str) -> Script:
    """`source` registered on `client`, seen through `Script`."""
    # Typed for the plain client alone before redis-py 6, though a cluster client has it too.
    return cast("Script", cast(Any, client).register_script(source))


@dataclass(slots=True)
class Scripts:
    """The Lua scripts of `_lua`, registered on one client (each runs by its SHA, loaded again if Redis forgot it)."""

    publish: Script
    publish_later: Script
    read: Script
    promote: Script
    trim: Script
    retry: Script
    dead_letter: Script
    give_back: Script
    claim: Script
    renew: Script
    pending: Script
    beat: Script
    watch: Script
    release: Script
    claim_hop: Script
    renew_hop: Script
    settle_hop: Script

    @classmethod
    def register(cls, client: Client) -> Scripts:
        return cls(
            publish=as_script(client, lua.PUBLISH),
            publish_later=as_script(client, lua.PUBLISH_LATER),
            read=as_script(client, lua.READ),
            promote=as_script(client, lua.PROMOTE),
            trim=as_script(client, lua.TRIM),
            retry=as_script(client, lua.RETRY),
            dead_letter=as_script(client, lua.DEAD_LETTER),
            give_back=as_script(client, lua.GIVE_BACK),
            claim=as_script(client, lua.CLAIM),
            renew=as_script(client, lua.RENEW),
            pending=as_script(client, lua.PENDING),
            beat=as_script(client, lua.BEAT),
            watch=as_script(client, lua.WATCH),
            release=as_script(client, lua.RELEASE),
            claim_hop=as_script(client, lua.CLAIM_HOP),
            renew_hop=as_script(client, lua.RENEW_HOP),
            settle_hop=as_script(client, lua.SETTLE_HOP),
        )
