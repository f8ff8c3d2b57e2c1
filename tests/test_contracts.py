from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from dirty_equals import IsDatetime, IsStr
from inline_snapshot import snapshot

from paigeant_ai import ActivitySpec, InvalidMessage, PaigeantMessage, RetryPolicy, RoutingSlip, UserError
from paigeant_ai.contracts import derive_message_id

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def onboarding_message() -> PaigeantMessage:
    return PaigeantMessage(
        message_id="m-1",
        correlation_id="c-1",
        routing_slip=RoutingSlip(
            itinerary=[
                ActivitySpec(name="validate-customer-data"),
                ActivitySpec(name="create-customer-account", retry=RetryPolicy(max_attempts=5), timeout=30),
            ]
        ),
        payload={"customer_email": "a@example.com"},
        created_at=T0,
    )


def test_seed_style_spec_needs_only_a_name() -> None:
    spec = ActivitySpec(name="validate-customer-data")
    assert spec.model_dump(mode="json") == snapshot(
        {
            "name": "validate-customer-data",
            "description": "",
            "arguments": {},
            "retry": None,
            "timeout": None,
            "required_scopes": [],
        }
    )


def test_wire_format_v1_shape() -> None:
    assert json.loads(onboarding_message().to_json()) == snapshot(
        {
            "v": 1,
            "message_id": "m-1",
            "correlation_id": "c-1",
            "routing_slip": {
                "itinerary": [
                    {
                        "name": "validate-customer-data",
                        "description": "",
                        "arguments": {},
                        "retry": None,
                        "timeout": None,
                        "required_scopes": [],
                    },
                    {
                        "name": "create-customer-account",
                        "description": "",
                        "arguments": {},
                        "retry": {
                            "max_attempts": 5,
                            "initial_interval": 1.0,
                            "backoff": 2.0,
                            "max_interval": 60.0,
                            "jitter": 0.1,
                        },
                        "timeout": 30.0,
                        "required_scopes": [],
                    },
                ],
                "completed": [],
                "current": "validate-customer-data",
                "compensations": [],
            },
            "payload": {"customer_email": "a@example.com"},
            "security": {"obo_token": None, "jws_signature": None},
            "headers": {},
            "attempt": 0,
            "created_at": "2026-01-02T03:04:05Z",
            "expires_at": None,
        }
    )


def test_round_trip_is_lossless() -> None:
    message = onboarding_message()
    assert PaigeantMessage.from_json(message.to_json()) == message


def test_mark_complete_logs_and_advances() -> None:
    slip = onboarding_message().routing_slip
    entry = slip.mark_complete("validate-customer-data", attempt=1, started_at=T0, output_keys=["valid"])
    assert entry.model_dump(mode="json") == snapshot(
        {
            "name": "validate-customer-data",
            "step": 0,
            "attempt": 1,
            "outcome": "completed",
            "started_at": "2026-01-02T03:04:05Z",
            "finished_at": IsStr(),
            "output_keys": ["valid"],
            "error": None,
        }
    )
    assert entry.finished_at == IsDatetime(ge=T0)
    assert slip.current == "create-customer-account"
    assert slip.step == 1
    assert not slip.is_complete
    slip.mark_complete("create-customer-account")
    assert slip.is_complete
    assert slip.current is None


def test_mark_complete_refuses_a_step_that_is_not_current() -> None:
    slip = onboarding_message().routing_slip
    with pytest.raises(UserError, match="cannot complete 'create-customer-account': the current step is 'validate"):
        slip.mark_complete("create-customer-account")


def test_message_ids_are_deterministic_per_hop() -> None:
    message = onboarding_message()
    assert message.next_hop(attempt=1).message_id == derive_message_id("c-1", 0, "validate-customer-data", 1)
    assert message.next_hop(attempt=1).message_id == message.next_hop(attempt=1).message_id
    assert message.next_hop(attempt=1).message_id != message.next_hop(attempt=2).message_id
    assert message.idempotency_key == "c-1:0:validate-customer-data"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\xffnot json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"v": 2, "message_id": "m"}', "wire version 2 is newer than this worker reads (1): upgrade the worker"),
        (b'{"v": "1", "message_id": "m"}', "unsupported wire version '1'; this worker reads version 1"),
        (b'{"message_id": "m"}', "unsupported wire version None"),
        (
            b'{"v": 1, "message_id": "m"}',
            "invalid message: correlation_id: Field required; routing_slip: Field required",
        ),
    ],
)
def test_invalid_messages_raise_one_clear_error(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=re.escape(reason)):
        PaigeantMessage.from_json(data)


def test_current_must_agree_with_the_itinerary() -> None:
    raw = json.loads(onboarding_message().to_json())
    raw["routing_slip"]["current"] = "send-welcome-email"
    with pytest.raises(InvalidMessage, match="current is 'send-welcome-email' but the itinerary's next step"):
        PaigeantMessage.from_json(json.dumps(raw))


def test_reserved_and_invalid_names_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        ActivitySpec(name="dead-letter")
    with pytest.raises(ValueError, match="pattern"):
        ActivitySpec(name="has space")


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(initial_interval=1, backoff=2, max_interval=5, jitter=0)
    assert [policy.delay_before(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 5.0]
    jittered = RetryPolicy(initial_interval=10, jitter=0.5)
    assert all(5 <= jittered.delay_before(1) <= 15 for _ in range(50))
