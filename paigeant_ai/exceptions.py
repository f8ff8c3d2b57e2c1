"""One hierarchy of errors under `PaigeantError`, and the control signals activities raise.

Errors say something went wrong; control signals (`RetryActivity`, `NonRetryableError`) are how an activity tells
the worker what to do next, the way pydantic-ai keeps `ModelRetry` apart from `UserError`.
"""

from __future__ import annotations

__all__ = (
    "EndWorkflow",
    "InvalidMessage",
    "InvalidPlan",
    "MessageTooLarge",
    "NoWorker",
    "NonFiniteNumber",
    "NonRetryableError",
    "PaigeantError",
    "ReplayedMessage",
    "RetryActivity",
    "SecurityError",
    "TokenError",
    "TransportError",
    "UserError",
    "WorkflowExists",
)


class PaigeantError(Exception):
    """Root of every error paigeant-ai raises."""


class UserError(PaigeantError):
    """A misconfiguration; the message names the fix."""


class NonFiniteNumber(UserError):
    """A NaN or an infinity where JSON values go (variables, step arguments, an activity's output): JSON has neither."""


class WorkflowExists(UserError):
    """A dispatch under a correlation ID already in use by a workflow with other activities, variables or token.

    Attributes:
        correlation_id: The ID in use.
    """

    def __init__(self, message: str, *, correlation_id: str) -> None:
        super().__init__(message)
        self.correlation_id = correlation_id


class NoWorker(UserError):
    """A dispatch with `require_workers=True` whose first step no worker consumes.

    Attributes:
        activity: The step nobody serves.
        served: The addresses that do have consumers, when the transport can tell.
    """

    def __init__(self, message: str, *, activity: str, served: list[str] | None = None) -> None:
        super().__init__(message)
        self.activity = activity
        self.served = served


class InvalidMessage(PaigeantError):
    """Bytes that are not a valid paigeant message: malformed JSON, an unknown version, a wrong shape."""


class MessageTooLarge(InvalidMessage):
    """A message over the configured size limit."""


class InvalidPlan(PaigeantError):
    """A route that cannot run: unknown or forbidden activities, or variables a step needs that nothing provides.

    The planner and revision tools hand its message back to the model as a retry, so the model can fix its plan.
    """


class TransportError(PaigeantError):
    """A broker or connection failure, translated once at the transport boundary."""


class SecurityError(PaigeantError):
    """A message or token that failed verification. Never retried.

    Attributes:
        code: A short name of the check that failed (`unsigned`, `bad_signature`, `unknown_kid`, ...), for counting.
    """

    def __init__(self, message: str, *, code: str = "security") -> None:
        super().__init__(message)
        self.code = code


class ReplayedMessage(SecurityError):
    """A hop whose `message_id` was already settled.

    Attributes:
        same_content: True for a copy of exactly what was settled (a replay, or the broker's own redelivery
            after a lost ack); False for the same hop produced anew by a trusted signer (an upstream step that
            re-ran after a crash), which is a duplicate to skip rather than an attack.
    """

    def __init__(self, message: str, *, same_content: bool) -> None:
        super().__init__(message, code="replayed" if same_content else "duplicate")
        self.same_content = same_content


class TokenError(SecurityError):
    """The user's on-behalf-of token is missing, invalid, expired, for someone else, or lacks a required scope.

    The message itself is authentic, so the workflow faults (never retried) instead of being dropped as forged.
    """


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
