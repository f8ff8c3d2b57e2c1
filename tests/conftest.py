from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest
from pydantic_ai import models

models.ALLOW_MODEL_REQUESTS = False

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
