"""The three transports, for tests that must behave the same on each: in memory, Redis and RabbitMQ.

`conftest.transport` is the fixture that runs a test on all three (the broker ones marked `redis` / `rabbitmq`),
each in a namespace of its own that is deleted afterwards; a module with a `transport` fixture of its own keeps it.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

from paigeant_ai import InMemoryTransport, get_transport
from paigeant_ai.transports import Transport

# The brokers the tests use; point them elsewhere with these two variables (see the README's Development section).
RABBITMQ_URL = os.environ.get("PAIGEANT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PAIGEANT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_redis() -> None:
    """Skip unless the Redis of `PAIGEANT_TEST_REDIS_URL` answers (fail in CI)."""
    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)


def require_rabbitmq() -> None:
    """Skip unless the RabbitMQ of `PAIGEANT_TEST_RABBITMQ_URL` answers (fail in CI)."""
    parts = urlsplit(RABBITMQ_URL)
    require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)


def require_server(name: str, host: str, port: int) -> None:
    """Skip when a broker is absent locally; fail in CI, where it must be there."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc}); start it to run this test"
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI must provide it (.ci/run starts it).")
        pytest.skip(message)


TRANSPORTS = [
    "inmemory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
]


def make_transport(name: str, namespace: str) -> Transport:
    """A transport of kind `name` on the test brokers, in `namespace`."""
    if name == "inmemory":
        return InMemoryTransport()
    if name == "redis":
        require_redis()
        return get_transport("redis", url=REDIS_URL, namespace=namespace)
    require_rabbitmq()
    return get_transport("rabbitmq", url=RABBITMQ_URL, namespace=namespace)


async def clean(transport: Transport, namespace: str) -> None:
    """Delete what `transport` left on its broker in `namespace`."""
    if transport.name == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}[.:]*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    elif transport.name == "rabbitmq":
        import aio_pika

        declared: set[str] = getattr(transport, "_declared", set())
        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            channel = await connection.channel()
            for queue in sorted(declared):
                await channel.queue_delete(queue)
