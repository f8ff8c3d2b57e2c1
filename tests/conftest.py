from __future__ import annotations

import os
import socket

import pytest
from pydantic_ai import models

models.ALLOW_MODEL_REQUESTS = False

RABBITMQ_URL = os.environ.get("PAIGEANT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PAIGEANT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


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
