from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic_ai import models

from paigeant_ai.transports import Transport

from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    TRANSPORTS,
    clean,
    make_transport,
    require_rabbitmq,
    require_redis,
    require_server,
)

__all__ = ("RABBITMQ_URL", "REDIS_URL", "require_rabbitmq", "require_redis", "require_server")

models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """A connected transport of each kind, in a namespace of its own (see `tests/brokers.py`)."""
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    async with make_transport(request.param, namespace) as made:
        yield made
    await clean(made, namespace)
