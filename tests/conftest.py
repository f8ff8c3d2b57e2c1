from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
from joserfc.jwk import Key
from pydantic_ai import models

from paigeant_ai.security import generate_key
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

TEST_KEY = generate_key("paigeant-tests")
"""The key of `signed_with_one_key`, made once for the whole run."""


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


@pytest.fixture
def signed_with_one_key(monkeypatch: pytest.MonkeyPatch) -> Key:
    """One key for the dispatchers and workers of a test, as in production: a real broker refuses to run without.

    A module takes it for all its tests with `pytestmark = pytest.mark.usefixtures("signed_with_one_key")`.
    """
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(TEST_KEY.as_dict(private=True)))
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps({"keys": [TEST_KEY.as_dict(private=False)]}))
    monkeypatch.delenv("PAIGEANT_ALLOW_UNSIGNED", raising=False)
    return TEST_KEY
