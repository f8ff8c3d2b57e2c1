"""How the Redis transport connects: one server, a Redis Cluster, or the master a set of Sentinels names.

The URL says which:

- `redis://[user:password@]host:port/db` (or `rediss://`, `unix://`): one server, through a blocking pool.
- `redis+cluster://[user:password@]host:port[,host:port...]` (or `rediss+cluster://`): a Redis Cluster, found from
  any of the nodes given. Every key of the transport carries a hash tag (see `_layout.py`), so each script stays in
  one slot.
- `redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/db]` (or `rediss+sentinel://`): the
  master that the Sentinels at those addresses name, followed to its replica when they fail it over. The user and
  password are the master's; the Sentinels are asked without them.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import ExponentialBackoff

from ...exceptions import UserError
from ..base import redact_url
from ._pipeline import PipelinedCluster, PipelinedRedis

__all__ = ("open_client",)

CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})


def open_client(url: str, *, max_connections: int, retry_attempts: int) -> PipelinedRedis | PipelinedCluster:
    """A client of the Redis (one server, cluster or Sentinel-managed master) that `url` names; not yet connected.

    Raises:
        UserError: `url` is not a Redis URL this transport reads.
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retry_attempts)
    timeouts: dict[str, Any] = {"socket_timeout": 30.0, "socket_connect_timeout": 5.0}
    scheme = url.partition("://")[0].lower()
    # After a failover, pooled connections to a server that died are stale: one idle this long is checked first.
    checked = {**timeouts, "health_check_interval": 5}
    try:
        if scheme in CLUSTER_SCHEMES:
            return _cluster(url, max_connections=max_connections, retry=retry, **checked)
        if scheme in SENTINEL_SCHEMES:
            return _sentinel(url, max_connections=max_connections, retry=retry, **checked)
        # A blocking pool: past `max_connections`, a command waits for a free connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=30.0, retry=retry, **timeouts
        )
    except ValueError as exc:
        raise UserError(f"invalid Redis URL {redact_url(url)!r}: {exc}; set PAIGEANT_REDIS_URL") from None
    return cast("PipelinedRedis", PipelinedRedis.from_pool(pool))


def _nodes(netloc: str, url: str) -> list[tuple[str, int]]:
    """The `host:port` pairs after the credentials of `netloc`."""
    hosts = netloc.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for node in filter(None, hosts.split(",")):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{node!r} is not host:port in {redact_url(url)!r}")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("it names no host:port")
    return nodes


def _credentials(netloc: str) -> dict[str, str]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return {}
    user, colon, password = userinfo.partition(":")
    found = {"username": unquote(user)} if user else {}
    if colon:
        found["password"] = unquote(password)
    return found


def _cluster(url: str, *, max_connections: int, retry: Retry, **timeouts: Any) -> PipelinedCluster:
    parts = urlsplit(url)
    if parts.path not in ("", "/"):
        raise ValueError("a Redis Cluster has only database 0: leave the path out")
    nodes = [ClusterNode(host, port) for host, port in _nodes(parts.netloc, url)]
    cluster: Any = PipelinedCluster  # abstract to the type checker before redis-py 6, though it is not
    return cluster(
        startup_nodes=nodes,
        max_connections=max_connections,
        retry=retry,
        ssl=parts.scheme.lower().startswith("rediss"),
        **_credentials(parts.netloc),
        **timeouts,
    )


def _sentinel(url: str, *, max_connections: int, retry: Retry, **timeouts: Any) -> PipelinedRedis:
    parts = urlsplit(url)
    name, _, db = parts.path.strip("/").partition("/")
    if not name or (db and not db.isdigit()):
        raise ValueError("give the master's name as the path: redis+sentinel://host:port,host:port/mymaster")
    tls: dict[str, Any] = {}
    if parts.scheme.lower().startswith("rediss"):
        tls["connection_class"] = SentinelManagedSSLConnection
    sentinel = Sentinel(_nodes(parts.netloc, url), socket_timeout=timeouts["socket_connect_timeout"])
    master = sentinel.master_for(
        name,
        redis_class=PipelinedRedis,
        max_connections=max_connections,
        retry=retry,
        db=int(db or 0),
        **tls,
        **_credentials(parts.netloc),
        **timeouts,
    )
    client = cast("PipelinedRedis", master)
    client.sentinels = list(sentinel.sentinels)
    return client


def is_cluster(client: Any) -> bool:
    """True if `client` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)
