"""The three transports, for tests that must behave the same on each: in memory, Redis and RabbitMQ.

Import `transport` into a test module to run its tests on all three (the broker ones marked `redis` / `rabbitmq`),
each in a namespace of its own that is deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from paigeant_ai import InMemoryTransport, get_transport
from paigeant_ai.transports import Transport

from .conftest import RABBITMQ_URL, REDIS_URL, require_rabbitmq, require_redis

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


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    async with make_transport(request.param, namespace) as made:
        yield made
    await clean(made, namespace)


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
