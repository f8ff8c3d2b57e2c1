"""One hop on its way through a worker, and its first stage, `admit`.

The stages of a hop, in order (see `Worker.process`):

1. admit (here): the bytes, their size, the route and the expiry. A refusal is a `Reject`; nothing is trusted.
2. authenticate (`Worker._authenticate`): the signature and the signer's right to send to the step, no I/O.
3. authorize (`Worker._authorize`): the claim (replay), the user's token, and the dedupe store.
4. run (`Worker._run`): the activity, with its timeout, inside its span; what it does becomes an `Outcome`.
5. settle (`paigeant_ai._settle.settle`): the successor is made safe with the broker, then the delivery is acked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ._outcome import Reject
from .activity import Activity, ActivityContext
from .contracts import ActivitySpec, PaigeantMessage
from .exceptions import InvalidMessage
from .transports.base import Delivery

__all__ = ("Hop", "admit", "effective_spec")


@dataclass(slots=True)
class Hop:
    """A delivery that is a message for an activity this worker runs, as it goes through the stages.

    Attributes:
        delivery: What the broker handed out.
        message: The message it holds.
        activity: The activity that runs the step.
        spec: The step's effective spec: the worker's own, with the workflow's overrides.
        started: When the step started running (until then, when the hop was admitted).
        signer: The key id that signed the hop, once authenticated (None when messages are not signed).
        digest: A digest of exactly what the hop's signature covers, once authenticated (its claim's content).
        claims: The validated claims of the user's token, once authorized.
        ctx: What the activity was given, once it runs (its route revisions are applied when the hop settles).
        approvals: For a resume hop, once authorized: who approved or denied which call (for the step's log).
    """

    delivery: Delivery
    message: PaigeantMessage
    activity: Activity
    spec: ActivitySpec
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    signer: str | None = None
    digest: str = ""
    claims: Mapping[str, Any] | None = None
    ctx: ActivityContext | None = None
    approvals: list[str] = field(default_factory=list[str])


def admit(delivery: Delivery, activities: Mapping[str, Activity], max_bytes: int) -> Hop | Reject:
    """The hop `delivery` is, if its bytes are a message of a size, route and age this worker accepts."""
    if len(delivery.body) > max_bytes:
        return Reject(f"message too large: {len(delivery.body)} bytes, the limit is {max_bytes}")
    try:
        message = PaigeantMessage.from_json(delivery.body)
    except InvalidMessage as exc:
        return Reject(str(exc))
    wire = message.routing_slip.current_activity
    current = wire.name if wire is not None else None
    if current != delivery.address:
        return Reject(f"misrouted: the message is for step {current!r} but arrived on {delivery.address!r}")
    activity = activities.get(delivery.address)
    if activity is None or wire is None:
        known = ", ".join(sorted(activities))
        return Reject(f"unknown activity {current!r}; this worker runs: {known}")
    if message.expires_at is not None and message.expires_at < datetime.now(UTC):
        return Reject(f"expired at {message.expires_at.isoformat()}")
    return Hop(delivery, message, activity, effective_spec(activity.spec, wire))


def effective_spec(own: ActivitySpec, wire: ActivitySpec) -> ActivitySpec:
    """The worker's spec, with the workflow's explicit overrides and the union of required scopes."""
    if wire.retry is None and wire.timeout is None and not wire.arguments and not wire.required_scopes:
        return own  # the usual case: nothing overridden
    return own.model_copy(
        update={
            "arguments": {**own.arguments, **wire.arguments},
            "retry": wire.retry or own.retry,
            "timeout": wire.timeout or own.timeout,
            "required_scopes": tuple(dict.fromkeys((*own.required_scopes, *wire.required_scopes))),
        }
    )
