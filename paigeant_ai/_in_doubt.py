"""What an at-most-once step leaves behind: its start record, the answers that settle a doubt, and who decided.

An activity declared `at_most_once=True` must not run twice blindly: before it runs, the worker writes a
`StartRecord` (signed with its key) where every replica sees it, and confirms it; a copy of the step that finds one
did not see the step finish, so it asks the activity's `reconcile` hook, or parks the workflow `in_doubt` (an
`InDoubt` in its parked record) until a person says what happened with `WorkflowDispatcher.resume(cid,
in_doubt=Ran(...) | RunAgain())`. That answer is a signed `DoubtDecision` (see `paigeant_ai._at_most_once`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pydantic import ConfigDict, Field, JsonValue, ValidationError

from ._wire import FROM_WIRE, Wire
from .exceptions import ParkWorkflow, SecurityError

if TYPE_CHECKING:
    from .activity import ActivityContext
    from .security import MessageSecurity

__all__ = (
    "DECISION_TYPE",
    "STARTED_TYPE",
    "DoubtDecision",
    "InDoubt",
    "Ran",
    "ReconcileFunc",
    "Reconciliation",
    "RunAgain",
    "SignedDecision",
    "StartRecord",
    "StepInDoubt",
)

STARTED_TYPE = "paigeant-started+jws"
"""The `typ` of a start record's signature."""
DECISION_TYPE = "paigeant-in-doubt+jws"
"""The `typ` of the signature of a person's decision on an in-doubt step."""


@dataclass(frozen=True, slots=True)
class Ran:
    """The step did run: it completes with `output`, as if its activity had just returned it, and is not run.

    Returned by a `reconcile` hook that found the step's effect, or given by a person to
    `WorkflowDispatcher.resume(cid, in_doubt=Ran(output))`.
    """

    output: Any = None


@dataclass(frozen=True, slots=True)
class RunAgain:
    """The step did not run (or running it again is wanted): it runs now.

    Returned by a `reconcile` hook that found no trace of the step's effect, or given by a person to
    `WorkflowDispatcher.resume(cid, in_doubt=RunAgain())`.
    """


Reconciliation: TypeAlias = Ran | RunAgain
"""What a `reconcile` hook returns, and a person answers an in-doubt step with."""
ReconcileFunc: TypeAlias = "Callable[[ActivityContext], Reconciliation | Awaitable[Reconciliation]]"
"""`reconcile(ctx)`: whether the step whose start record was found did its work (`Ran(output)`) or not
(`RunAgain()`); sync or async. It gets the step's context, so `ctx.idempotency_key` names what to look for."""


class StartRecord(Wire):
    """That a worker started an at-most-once step, written and confirmed before the activity runs.

    Kept under `key(idempotency_key, attempt)` until the step settled; `proof` is the worker's detached JWS
    (`typ: paigeant-started+jws`) over the record without it.
    """

    v: Literal[1] = 1
    correlation_id: str
    activity: str
    step: int
    idempotency_key: str
    attempt: int
    worker: str
    """Which process started it (host and process id)."""
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    proof: str | None = Field(default=None, repr=False)

    @staticmethod
    def key(idempotency_key: str, attempt: int) -> str:
        """Where the record of `attempt` of the step `idempotency_key` is kept."""
        return f"started:{idempotency_key}:{attempt}"

    def signed_bytes(self) -> bytes:
        return self.model_dump_json(exclude={"proof"}).encode()

    def sign(self, security: MessageSecurity) -> StartRecord:
        """Set `proof` with `security`'s key; returns the record."""
        self.proof = security.sign_bytes(self.signed_bytes(), typ=STARTED_TYPE)
        return self

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def verified(cls, raw: str, security: MessageSecurity, *, idempotency_key: str, attempt: int) -> StartRecord:
        """The record `raw` holds, once it is a record of this very attempt, signed by a key that may run the step.

        Raises:
            SecurityError: Why it cannot be trusted (code `start_record`).
        """
        try:
            record = cls.model_validate_json(raw, context=FROM_WIRE)
        except ValidationError:
            raise SecurityError("its start record is not a start record", code="start_record") from None
        try:
            kid = security.verify_bytes(record.proof, record.signed_bytes(), typ=STARTED_TYPE)
            security.policy.require_send(kid, record.activity)
        except SecurityError as exc:
            raise SecurityError(f"its start record does not verify: {exc}", code="start_record") from None
        if (record.idempotency_key, record.attempt) != (idempotency_key, attempt):
            raise SecurityError("its start record is of another step", code="start_record")
        return record


class InDoubt(Wire):
    """Why a parked step is in doubt: it may have run, and must not run again blindly."""

    model_config = ConfigDict(frozen=True)

    idempotency_key: str
    attempt: int
    started_at: datetime | None = None
    """When the copy that may have run started (None when its start record did not verify)."""
    started_by: str | None = None
    reason: str

    def describe(self, correlation_id: str, activity: str) -> str:
        """One line: what is in doubt, since when, and how to resolve it."""
        since = f" since {self.started_at.isoformat()}" if self.started_at is not None else ""
        by = f" on {self.started_by}" if self.started_by is not None else ""
        return (
            f"in doubt: step {activity!r} (key {self.idempotency_key}, attempt {self.attempt}) started{by}{since} "
            f"and may have run: {self.reason}; resolve with `paigeant resume {correlation_id} --ran OUTPUT_JSON` or "
            "`--run-again` (WorkflowDispatcher.resume(cid, in_doubt=Ran(output) | RunAgain()))"
        )


class DoubtDecision(Wire):
    """A person's answer to an in-doubt step, bound to the parked record it settles."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    correlation_id: str
    step: int
    activity: str
    parked_digest: str
    decision: Literal["ran", "run_again"]
    output: JsonValue = None
    """For `ran`: the step's output, as its activity would have returned it."""
    approver: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def describe(self, who: str) -> str:
        """One line for the audit trail."""
        if self.decision == "ran":
            digest = hashlib.sha256(json.dumps(self.output, sort_keys=True).encode()).hexdigest()[:16]
            return f"in-doubt step {self.activity!r} declared run by {who} (output sha256 {digest}...)"
        return f"in-doubt step {self.activity!r} sent to run again by {who}"


class SignedDecision(Wire):
    """A `DoubtDecision` with its signature, as the resume hop carries it (in `Resumption.approvals`)."""

    kind: Literal["in_doubt"] = "in_doubt"
    decision: DoubtDecision
    proof: str | None = Field(default=None, repr=False)

    def signed_bytes(self) -> bytes:
        return self.decision.model_dump_json().encode()


class StepInDoubt(ParkWorkflow):
    """The step may have run and must not run blindly: the worker parks it `in_doubt` (see `InDoubt`)."""

    def __init__(self, in_doubt: InDoubt) -> None:  # pyright: ignore[reportMissingSuperCall]
        Exception.__init__(self, in_doubt.reason)  # it waits for a person, not for deferred tool calls
        self.in_doubt = in_doubt
