"""How a hop ends is a pure function of what the step raised or returned, its spec and its attempt: a table."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.exceptions import UserError as PydanticAIUserError

from paigeant_ai._outcome import Advance, End, Fault, Outcome, Park, Retry, classify, completed
from paigeant_ai.contracts import ActivitySpec, RetryPolicy
from paigeant_ai.exceptions import EndWorkflow, NonRetryableError, ParkWorkflow, RetryActivity

SPEC = ActivitySpec(name="charge-card", timeout=5.0, retry=RetryPolicy(max_attempts=3))
ONCE = ActivitySpec(name="charge-card", retry=RetryPolicy(max_attempts=1))
DEFAULTS = ActivitySpec(name="charge-card")  # no policy or timeout of its own: 3 attempts, 300 seconds
PARK = ParkWorkflow.__new__(ParkWorkflow)  # what it waits for does not matter to the outcome


@pytest.mark.parametrize(
    ("raised", "spec", "attempt", "outcome"),
    [
        pytest.param(
            EndWorkflow("out of stock", output={"stock": 0}),
            SPEC,
            0,
            End({"stock": 0}, "out of stock"),
            id="end",
        ),
        pytest.param(
            EndWorkflow("done", output={"when": object()}),
            SPEC,
            0,
            Fault("activity 'charge-card' returned a value that is not JSON: input was not a valid JSON value"),
            id="end-with-output-that-is-not-json",
        ),
        pytest.param(PARK, SPEC, 0, Park(PARK), id="park"),
        pytest.param(NonRetryableError("card stolen"), SPEC, 0, Fault("NonRetryableError: card stolen"), id="fatal"),
        pytest.param(
            UsageLimitExceeded("too many tokens"),
            SPEC,
            0,
            Fault(f"UsageLimitExceeded: {UsageLimitExceeded('too many tokens')}"),
            id="usage-limit",
        ),
        pytest.param(PydanticAIUserError("bad tool"), SPEC, 0, Fault("UserError: bad tool"), id="pydantic-ai-misuse"),
        pytest.param(RetryActivity("busy", delay=2.0), SPEC, 0, Retry(1, "RetryActivity: busy", 2.0), id="retry"),
        pytest.param(RetryActivity(), SPEC, 1, Retry(2, "RetryActivity: retry requested"), id="retry-backoff"),
        pytest.param(
            RetryActivity("busy"),
            SPEC,
            2,
            Fault("retries exhausted after 3 attempts: RetryActivity: busy"),
            id="retry-exhausted",
        ),
        pytest.param(TimeoutError(), SPEC, 0, Retry(1, "timed out after 5s"), id="timeout"),
        pytest.param(
            TimeoutError(),
            SPEC,
            2,
            Fault("retries exhausted after 3 attempts: timed out after 5s"),
            id="timeout-on-the-last-attempt",
        ),
        pytest.param(TimeoutError(), DEFAULTS, 0, Retry(1, "timed out after 300s"), id="timeout-by-default"),
        pytest.param(TimeoutError("socket"), SPEC, 0, Retry(1, "TimeoutError: socket"), id="its-own-timeout-error"),
        pytest.param(asyncio.CancelledError(), SPEC, 0, Retry(1, "cancelled from inside"), id="cancelled-inside"),
        pytest.param(ValueError("boom"), SPEC, 1, Retry(2, "ValueError: boom"), id="crash"),
        pytest.param(KeyError(), DEFAULTS, 2, Fault("retries exhausted after 3 attempts: KeyError"), id="default"),
        pytest.param(ValueError("boom"), ONCE, 0, Fault("retries exhausted after 1 attempt: ValueError: boom")),
    ],
)
def test_what_a_raised_exception_comes_to(raised: BaseException, spec: ActivitySpec, attempt: int, outcome: Outcome):
    assert classify(raised, spec, attempt) == outcome


class Receipt(BaseModel):
    receipt_id: str


@pytest.mark.parametrize(
    ("output", "outcome"),
    [
        pytest.param({"charged": True}, Advance({"charged": True}), id="mapping"),
        pytest.param(Receipt(receipt_id="r-1"), Advance({"receipt_id": "r-1"}), id="model"),
        pytest.param(42, Advance({"charge-card": 42}), id="value"),
        pytest.param(None, Advance({}), id="nothing"),
        pytest.param(
            {1, 2},
            Fault(
                "NonRetryableError: activity 'charge-card' returned a value that is not JSON: "
                "input was not a valid JSON value"
            ),
            id="not-json",
        ),
        pytest.param(
            {"total": math.nan},
            Fault(
                "its output holds nan at ['total']; JSON has no NaN or infinity: use null, a string or a finite "
                "number there"
            ),
            id="nan",
        ),
        pytest.param(
            {"blob": "x" * 2000},
            Fault(
                "its output would make the next message about 2523 bytes, over the limit of 2048; store large "
                "outputs elsewhere and put a reference in the payload"
            ),
            id="too-large",
        ),
    ],
)
def test_what_a_returned_output_comes_to(output: Any, outcome: Outcome) -> None:
    assert completed(output, SPEC, 0, 2048) == outcome


def test_an_end_whose_output_holds_nan_faults_instead_of_ending() -> None:
    outcome = classify(EndWorkflow("closed", output={"score": math.inf}), ActivitySpec(name="score"), 0)
    assert isinstance(outcome, Fault)
    assert "its output holds inf at ['score']" in outcome.reason


def test_an_output_json_cannot_encode_faults_instead_of_failing_the_worker() -> None:
    outcome = completed({"when": object()}, ActivitySpec(name="stamp"), 100, 10_000)
    assert isinstance(outcome, Fault)
    assert outcome.reason.startswith("activity 'stamp' returned a value that is not JSON")
