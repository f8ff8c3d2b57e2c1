"""One hop on its way through a worker, and its first stage, `admit`.

The stages of a hop, in order (see `Worker.process`):

1. admit (here): the bytes, their size, the route and the expiry. A refusal is a `Reject`; nothing is trusted.
2. authenticate (`Worker._authenticate`): the signature and the signer's right to send to the step, no I/O.
3. authorize (`Worker._authorize`): the claim (replay), the user's token, and the dedupe store.
4. run (`Worker._run`): the activity, with its timeout, inside its span; what it does becomes an `Outcome`.
5. settle (`paigeant_ai._settle.settle`): the successor is made safe with the broker, then the delivery is acked.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._outcome import Halt, Reject
from ._step_record import StepRecord
from .activity import Activity, ActivityContext
from .contracts import ActivitySpec, PaigeantMessage
from .exceptions import InvalidMessage
from .transports.base import Delivery

__all__ = ("EXPIRY_GRACE", "Hop", "admit", "effective_spec")

EXPIRY_GRACE = timedelta(days=1)
"""How long after its workflow's deadline a hop still ends the workflow `expired` (its compensations run); the
replay cache remembers every hop that long past its expiry, so a copy replayed in that time is refused. Later, it is
refused as expired, with nothing undone."""


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
        expired: The workflow's deadline passed before the hop arrived (it ends `expired` once authenticated).
        deadline_bound: The step's timeout was cut short to the workflow's deadline.
        interrupt: Why the running step was interrupted (its workflow was cancelled), if it was.
        raised: What the step raised, if it failed (for an at-most-once step: whether it may have run).
        detached: Its delivery was handed back to the broker while the step ran (acked, a watch copy left behind:
            see `paigeant_ai._long_steps`); settling it acks nothing more.
        version: The version of the activity that runs it (see `paigeant_ai._versions`), as its worker found it
            once for all its hops.
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
    expired: bool = False
    deadline_bound: bool = False
    interrupt: Halt | None = None
    raised: BaseException | None = None
    detached: bool = False
    version: str | None = None
    holder: str = field(default_factory=lambda: _holders.next())
    """A token of this copy of the hop, stored with its running claim: who holds it (see `_replay`)."""

    @property
    def record(self) -> StepRecord | None:
        """What its agent saw and produced, for the step's `step_completed` event (None for other activities)."""
        return self.ctx.records[-1] if self.ctx is not None and self.ctx.records else None


class _Holders:
    """Tokens no two copies of a hop anywhere share: a random prefix of this process (drawn again in a forked child),
    then a count of its hops; one random draw a process instead of a system call on every hop."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix, self._count = secrets.token_hex(8), itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_holders = _Holders()
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_holders.reset)


def admit(delivery: Delivery, activities: Mapping[str, Activity], max_bytes: int) -> Hop | Reject:
    """The hop `delivery` is, if its bytes are a message of a size, route and age this worker accepts.

    A hop past its workflow's deadline by less than `EXPIRY_GRACE` is admitted (`Hop.expired`) unless it undoes the
    workflow: its signature decides whether the workflow then ends `expired`. A compensation past its own deadline,
    or any hop past the grace, is refused.
    """
    if len(delivery.body) > max_bytes:
        return Reject(f"message too large: {len(delivery.body)} bytes, the limit is {max_bytes}")
    try:
        message = PaigeantMessage.from_json(delivery.body)
    except InvalidMessage as exc:
        return Reject(str(exc))
    slip = message.routing_slip
    wire, current = slip.current_activity, slip.current
    if current != delivery.address:
        return Reject(f"misrouted: the message is for step {current!r} but arrived on {delivery.address!r}")
    activity = activities.get(delivery.address)
    if activity is None or wire is None or current is None:
        known = ", ".join(sorted(activities))
        return Reject(f"unknown activity {current!r}; this worker runs: {known}")
    expires_at, now = message.expires_at, datetime.now(UTC)
    expired = expires_at is not None and expires_at < now
    if expires_at is not None and expired and (slip.unwinding is not None or expires_at + EXPIRY_GRACE < now):
        return Reject(f"expired at {expires_at.isoformat()}")
    return Hop(delivery, message, activity, effective_spec(activity.spec, wire, current), expired=expired)


def effective_spec(own: ActivitySpec, wire: ActivitySpec, current: str | None = None) -> ActivitySpec:
    """The worker's spec, with the workflow's explicit overrides and the union of required scopes.

    A fallback (`current` is not the step's own name) runs with the step's arguments and scopes, and its own retry
    policy, timeout and compensation.
    """
    scopes = tuple(dict.fromkeys((*own.required_scopes, *wire.required_scopes)))
    if current is not None and current != wire.name:
        return own.model_copy(update={"arguments": {**own.arguments, **wire.arguments}, "required_scopes": scopes})
    if (
        wire.retry is None
        and wire.timeout is None
        and not wire.arguments
        and not wire.required_scopes
        and wire.compensate is None
        and wire.model_settings is None
        and wire.usage_limits is None
    ):
        return own  # the usual case: nothing overridden
    return own.model_copy(
        update={
            "arguments": {**own.arguments, **wire.arguments},
            "retry": wire.retry or own.retry,
            "timeout": wire.timeout or own.timeout,
            "required_scopes": scopes,
            "compensate": wire.compensate or own.compensate,
            "model_settings": wire.model_settings,
            "usage_limits": wire.usage_limits,
        }
    )
