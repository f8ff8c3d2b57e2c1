"""One hierarchy of errors under `PaigeantError`, and the control signals activities raise.

Errors say something went wrong; control signals (`RetryActivity`, `NonRetryableError`, `EndWorkflow`,
`ParkWorkflow`) are how an activity tells the worker what to do next, the way pydantic-ai keeps `ModelRetry` apart
from `UserError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic_ai import Conversation, DeferredToolRequests

__all__ = (
    "DuplicateMessage",
    "EndWorkflow",
    "InvalidMessage",
    "InvalidPlan",
    "MessageTooLarge",
    "NoWorker",
    "NonFiniteNumber",
    "NonRetryableError",
    "PaigeantError",
    "ParkWorkflow",
    "ReplayedMessage",
    "RetryActivity",
    "SecurityError",
    "TokenError",
    "TransportError",
    "UnknownTransport",
    "UnknownWorkflow",
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


class UnknownTransport(UserError):
    """A step names a transport that the dispatcher or worker was not configured with (see `docs/deployment.md`).

    Attributes:
        address: What the step names.
    """

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message)
        self.address = address


class UnknownWorkflow(UserError):
    """A cancel for a correlation ID that no workflow the status store knows has.

    Attributes:
        correlation_id: The ID nobody knows.
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
    """A copy of exactly a hop that was already settled: a replay, or the broker's own redelivery after a lost ack.

    The worker tells the two apart by the delivery: a copy the broker marks as redelivered is skipped, any other
    is refused as a replay.
    """

    def __init__(self, message: str, *, running: bool = False) -> None:
        super().__init__(message, code="replayed")
        self.running = running
        """The hop runs (its claim is live), rather than was settled."""


class DuplicateMessage(PaigeantError):
    """A hop already settled, produced anew, and signed, by a trusted signer: an upstream step that re-ran after a
    crash. Not an attack, so not a `SecurityError`: the step ran once, and the copy is skipped.
    """


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


class ParkWorkflow(Exception):
    """Raised by a step to wait for input: the worker parks the workflow until it is resumed.

    Args:
        conversation: The agent's conversation; its `deferred_tool_requests` say what the step waits for.
    """

    def __init__(self, conversation: Conversation) -> None:
        requests = conversation.deferred_tool_requests
        if requests is None or not (requests.calls or requests.approvals):
            raise UserError("ParkWorkflow needs a conversation that waits for deferred tool calls")
        super().__init__(f"waiting for {describe_requests(requests)}")
        self.conversation = conversation
        self.requests = requests


class EndWorkflow(Exception):
    """Raise inside an activity to end the workflow here, as a business outcome rather than a failure.

    The remaining steps are skipped (and logged as skipped), `output` is merged into the payload, and the
    workflow completes with `reason`: an out-of-stock order, a duplicate signup, a ticket closed by the customer.
    """

    def __init__(self, reason: str, *, output: dict[str, object] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = output or {}


def describe_requests(requests: DeferredToolRequests) -> str:
    """What deferred tool calls wait for, in words: `approval of refund, the result of lookup`."""
    parts = [f"approval of {call.tool_name}" for call in requests.approvals]
    parts += [f"the result of {call.tool_name}" for call in requests.calls]
    return ", ".join(parts)
