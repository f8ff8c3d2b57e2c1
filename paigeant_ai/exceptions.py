"""One hierarchy of errors under `PaigeantError`, and the control signals activities raise.

Errors say something went wrong; control signals (`RetryActivity`, `NonRetryableError`) are how an activity tells
the worker what to do next, the way pydantic-ai keeps `ModelRetry` apart from `UserError`.
"""

from __future__ import annotations

__all__ = (
    "EndWorkflow",
    "InvalidMessage",
    "MessageTooLarge",
    "NonRetryableError",
    "PaigeantError",
    "RetryActivity",
    "SecurityError",
    "TransportError",
    "UserError",
)


class PaigeantError(Exception):
    """Root of every error paigeant-ai raises."""


class UserError(PaigeantError):
    """A misconfiguration; the message names the fix."""


class InvalidMessage(PaigeantError):
    """Bytes that are not a valid paigeant message: malformed JSON, an unknown version, a wrong shape."""


class MessageTooLarge(InvalidMessage):
    """A message over the configured size limit."""


class TransportError(PaigeantError):
    """A broker or connection failure, translated once at the transport boundary."""


class SecurityError(PaigeantError):
    """A message or token that failed verification. Never retried."""


class RetryActivity(Exception):
    """Raise inside an activity to ask for another attempt, after `delay` seconds if given.

    The retry counts against the activity's `RetryPolicy.max_attempts`.
    """

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class NonRetryableError(Exception):
    """Raise inside an activity when another attempt cannot help: the workflow faults at once."""


class EndWorkflow(Exception):
    """Raise inside an activity to end the workflow here, as a business outcome rather than a failure.

    The remaining steps are skipped (and logged as skipped), `output` is merged into the payload, and the
    workflow completes with `reason`: an out-of-stock order, a duplicate signup, a ticket closed by the customer.
    """

    def __init__(self, reason: str, *, output: dict[str, object] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = output or {}
