"""How a hop ends, as a value: the eight outcomes, and the pure functions that decide them.

A hop comes to exactly one outcome, and `paigeant_ai._settle.settle` acts on it:

| outcome   | what settling it does                                                                         |
|-----------|-----------------------------------------------------------------------------------------------|
| `Advance` | the output joins the payload; the next step's message is published (or the workflow completes) |
| `End`     | the activity ended the workflow early (`EndWorkflow`), as a business outcome                   |
| `Park`    | the step waits for input (`ParkWorkflow`): stored in the waiting store until it is resumed      |
| `Retry`   | the same step is published again, as the next attempt, after a delay                           |
| `Fault`   | the step failed for good: its next fallback runs, else the workflow faults and its completed    |
|           | steps are undone (or, with nothing to undo, a copy with the reason goes to the dead-letter queue) |
| `Halt`    | the workflow is cancelled or past its deadline: its completed steps are undone                 |
| `Skip`    | the hop already ran (a redelivery or a duplicate): acked, nothing runs                         |
| `Reject`  | nothing in the message is trusted: dead-lettered as it arrived, never retried                  |

`classify` decides what an exception raised by a step comes to; `completed` what a returned output does. Both
are pure: the same exception, spec and attempt always give the same outcome, which is why they are tested as a
table.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import JsonValue
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.exceptions import UserError as PydanticAIUserError
from pydantic_core import PydanticSerializationError

from ._sealing import NonFiniteNumber, check_finite_json, encode_output
from .activity import DEFAULT_TIMEOUT, to_payload_update
from .contracts import ActivitySpec, RetryPolicy
from .exceptions import EndWorkflow, NonRetryableError, ParkWorkflow, RetryActivity

__all__ = (
    "LOG_ENTRY_BYTES",
    "SIGNALS",
    "Advance",
    "End",
    "Fault",
    "Halt",
    "Outcome",
    "Park",
    "Reject",
    "Retry",
    "Skip",
    "classify",
    "completed",
    "describe",
)

LOG_ENTRY_BYTES = 512
"""About what a step's log entry and new ids add to a message."""

SIGNALS: tuple[type[Exception], ...] = (EndWorkflow, ParkWorkflow, RetryActivity, NonRetryableError)
"""What an activity raises to tell the worker what to do next, rather than because it failed."""

_NON_RETRYABLE: tuple[type[BaseException], ...] = (NonRetryableError, PydanticAIUserError, UsageLimitExceeded)
"""Failures another attempt cannot help: the model refused the request for good, a usage limit, a misuse."""


@dataclass(frozen=True, slots=True)
class Advance:
    """The step succeeded: `update` joins the payload and the workflow moves on (or completes)."""

    update: dict[str, JsonValue]


@dataclass(frozen=True, slots=True)
class End:
    """The step ended the workflow here (`EndWorkflow`): `update` joins the payload, the rest is skipped."""

    update: dict[str, JsonValue]
    reason: str


@dataclass(frozen=True, slots=True)
class Park:
    """The step waits for input (`ParkWorkflow`); `detail` says what for, once it is parked."""

    signal: ParkWorkflow
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    """The step runs again as `attempt` after `delay` seconds (`None`: the retry policy's backoff)."""

    attempt: int
    reason: str
    delay: float | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """The step fails for good with `reason`: its next fallback runs, if it has one and `fallback` allows it;
    else the workflow faults."""

    reason: str
    fallback: bool = True
    """False for a failure no other activity could help (the user's token refused)."""


@dataclass(frozen=True, slots=True)
class Halt:
    """The workflow stops before or during this step: cancelled (`by`, with the signed request `cancel`) or past
    its deadline (`expired`)."""

    cause: Literal["cancelled", "expired"]
    reason: str
    by: str | None = None
    cancel: str | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    """The hop already ran (a redelivery, or a duplicate a trusted upstream step sent again): nothing runs."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Nothing in the message can be trusted or run: it is dead-lettered as it arrived, with `reason`."""

    reason: str


Outcome = Advance | End | Park | Retry | Fault | Halt | Skip | Reject


def classify(exc: BaseException, spec: ActivitySpec, attempt: int) -> Outcome:
    """What a step that raised `exc` on `attempt` (0 is the first) comes to under `spec`.

    Control signals say what they ask for; failures another attempt cannot help fault the workflow; any other
    failure (a timeout, a crash of the activity, a cancellation from inside it) is retried while the retry policy
    allows, and faults the workflow once the attempts are exhausted.
    """
    if isinstance(exc, EndWorkflow):
        try:
            update = to_payload_update(exc.output, spec.name, spec.name)
            check_finite_json(encode_output(update), update, "its output")
        except (NonRetryableError, NonFiniteNumber) as bad:
            return Fault(str(bad))
        return End(update, exc.reason)
    if isinstance(exc, ParkWorkflow):
        return Park(exc)
    if isinstance(exc, _NON_RETRYABLE):
        return Fault(describe(exc))
    if isinstance(exc, RetryActivity):
        return _retry_or_fault(spec, attempt, describe(exc), exc.delay)
    if isinstance(exc, TimeoutError) and not str(exc):  # asyncio.timeout's own: the step overran its timeout
        return _retry_or_fault(spec, attempt, f"timed out after {spec.timeout or DEFAULT_TIMEOUT:g}s", None)
    if isinstance(exc, asyncio.CancelledError):  # raised by the activity itself (a cancelled inner call)
        return _retry_or_fault(spec, attempt, "cancelled from inside", None)
    return _retry_or_fault(spec, attempt, describe(exc), None)


def completed(output: Any, spec: ActivitySpec, arrived_bytes: int, max_bytes: int) -> Advance | Fault:
    """What a step that returned `output` comes to: the update it makes, unless it cannot be carried on.

    Args:
        output: What the activity returned.
        spec: The step's effective spec.
        arrived_bytes: The size of the message the step arrived in.
        max_bytes: The largest message allowed.
    """
    try:
        update = output if isinstance(output, dict) else to_payload_update(output, spec.name, spec.name)
    except NonRetryableError as exc:
        return Fault(describe(exc))
    update = update or {}
    try:
        encoded = encode_output(update)
        check_finite_json(encoded, update, "its output")
    except NonFiniteNumber as exc:
        return Fault(str(exc))
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        return Fault(f"activity {spec.name!r} returned a value that is not JSON: {exc}")
    projected = arrived_bytes + len(encoded) + LOG_ENTRY_BYTES
    if projected > max_bytes:  # fault now, while the slip still shows this step as current
        return Fault(
            f"its output would make the next message about {projected} bytes, over the limit of {max_bytes}; "
            "store large outputs elsewhere and put a reference in the payload"
        )
    return Advance(update)  # pyright: ignore[reportUnknownArgumentType]


def describe(exc: BaseException) -> str:
    """`exc` in one line: its type and, if it has one, its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_or_fault(spec: ActivitySpec, attempt: int, reason: str, delay: float | None) -> Retry | Fault:
    policy = spec.retry or RetryPolicy()
    next_attempt = attempt + 1
    if next_attempt >= policy.max_attempts:
        attempts = "1 attempt" if policy.max_attempts == 1 else f"{policy.max_attempts} attempts"
        return Fault(f"retries exhausted after {attempts}: {reason}")
    return Retry(next_attempt, reason, delay)
