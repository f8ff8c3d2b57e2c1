"""Every example runs on RabbitMQ and on Redis as a user would run it: its own process, `PAIGEANT_TRANSPORT` set,
signing keys in the environment, and the worker in burst mode in the same process.

Each run gets its own `PAIGEANT_NAMESPACE`, so runs never see each other's queues; the namespace's queues, streams
and keys are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from paigeant_ai import cli

from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    delete_rabbitmq_namespace,
    delete_redis_namespace,
    require_rabbitmq,
    require_redis,
)
from .test_examples import progress, run_example, undone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Keys made as a user makes them (`paigeant keys generate`), named by the environment: the examples run
    dispatcher and worker in one process, which signs with its key and trusts its own JWKS."""
    directory = tmp_path_factory.mktemp("keys")
    assert cli.main(["keys", "generate", "examples", "--out-dir", str(directory)]) == 0
    return {
        "PAIGEANT_SIGNING_KEY_FILE": str(directory / "examples.private.jwk.json"),
        "PAIGEANT_TRUSTED_KEYS_FILE": str(directory / "examples.jwks.json"),
    }


BROKERS: dict[str, tuple[Callable[[], None], dict[str, str], Callable[[str], Coroutine[Any, Any, None]]]] = {
    "rabbitmq": (require_rabbitmq, {"PAIGEANT_RABBITMQ_URL": RABBITMQ_URL}, delete_rabbitmq_namespace),
    "redis": (require_redis, {"PAIGEANT_REDIS_URL": REDIS_URL}, delete_redis_namespace),
}


@pytest.fixture(
    params=[
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def broker_env(request: pytest.FixtureRequest, signing_keys: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment of one example run on one broker, in a namespace of its own."""
    transport: str = request.param
    require, urls, delete_namespace = BROKERS[transport]
    require()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    # Signed, as in production: the keys are set and the unsigned opt-out is off.
    yield {
        "PAIGEANT_TRANSPORT": transport,
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_ALLOW_UNSIGNED": "0",
        **urls,
        **signing_keys,
    }
    asyncio.run(delete_namespace(namespace))


def test_onboarding(broker_env: dict[str, str]) -> None:
    out = run_example("examples.onboarding", env=broker_env)
    lines = out.splitlines()
    assert lines[0].startswith("dispatched onboarding workflow ")
    assert lines[0].endswith(f"on the {broker_env['PAIGEANT_TRANSPORT']} transport")
    done = [line.split()[4] for line in lines if " done " in line]
    assert done == ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]
    assert any(" retry " in line and "setup-payment-method" in line for line in lines)
    assert '"welcome_email": "Welcome aboard! Your premium account is ready."' in out


def test_order_processing_saga(broker_env: dict[str, str]) -> None:
    out = run_example("examples.order_processing", env=broker_env)
    assert f"on the {broker_env['PAIGEANT_TRANSPORT']} transport" in out
    assert out.count(" retry   step 2 process-payment: ConnectionError: payment provider timed out") == 2
    assert "falling back to 'charge-backup'" in out
    assert undone(out) == [("check-inventory", "release-inventory"), ("validate-order", "notify-customer")]
    assert "stock: SKU-BOOK 5, SKU-LAMP 0\ncharged: 0.00, refunded: 0.00\n" in out
    assert "customer told: Your order ord-1001 is cancelled: we could not take the payment" in out
    assert ": compensated\n" in out


def test_order_processing_cancelled(broker_env: dict[str, str]) -> None:
    out = run_example("examples.order_processing", "--cancel-after", "generate-shipping-label", env=broker_env)
    assert progress(out, "done") == ["validate-order", "check-inventory", "process-payment", "update-inventory"]
    assert "the carrier booking was called off mid-way" in out
    assert undone(out) == [
        ("process-payment", "refund-payment"),
        ("check-inventory", "release-inventory"),
        ("validate-order", "notify-customer"),
    ]
    assert "charged: 39.90, refunded: 39.90" in out
    assert ": cancelled\n" in out


def test_support_ticket(broker_env: dict[str, str]) -> None:
    out = run_example("examples.support_ticket", env=broker_env)
    route = "classify-ticket-priority -> route-to-specialist -> research-customer-history -> generate-response"
    assert f"plan: {route}\n" in out
    assert "revised classify-ticket-priority added schedule-follow-up" in out
    assert "waiting step 3 generate-response: waiting for approval of send_response" in out
    assert "approved by the support lead" in out
    done = [line.split()[4] for line in out.splitlines() if " done " in line]
    # A step's `done` is reported once its successor's publish is confirmed; on a broker the successor can be
    # delivered, run and reported first, so the last two lines may come in either order.
    assert sorted(done[-2:]) == ["generate-response", "schedule-follow-up"]
    assert "result: Hi X, sorry for the trouble." in out
