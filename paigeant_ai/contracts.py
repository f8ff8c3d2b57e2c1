"""Wire types: what travels between a dispatcher and its workers (wire format v1).

Everything here is validated JSON with a version field, never pickle. A message carries its whole route
(`RoutingSlip`), the workflow's variables (`payload`) and its security context, so any worker can pick it up.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, ConfigDict, Field, JsonValue, ValidationError, model_validator
from pydantic_core import from_json, to_json

from ._addresses import check_transport_address
from ._json_values import check_finite
from ._model_settings import StepModelSettings, StepUsageLimits
from ._usage import Usage, sum_usage
from ._wire import (
    FROM_WIRE,
    Budget,
    BudgetExtension,
    Plan,
    PlannedStep,
    Price,
    RetryPolicy,
    RevisionLimits,
    Wire,
    utcnow,
)
from .exceptions import InvalidMessage, UserError

__all__ = (
    "DEAD_LETTER",
    "EVENTS",
    "WIRE_VERSION",
    "ActivityLogEntry",
    "ActivitySpec",
    "Budget",
    "BudgetExtension",
    "Compensation",
    "PaigeantMessage",
    "Plan",
    "PlannedStep",
    "Price",
    "Resumption",
    "RetryPolicy",
    "Revision",
    "RevisionLimits",
    "RoutingSlip",
    "SecurityContext",
    "Unwinding",
    "Usage",
    "derive_message_id",
    "sum_usage",
)

WIRE_VERSION = 1
EVENTS = "events"
"""The address of workflow lifecycle events."""
DEAD_LETTER = "dead-letter"
"""The address of messages that could not be processed, each with a reason."""
RESERVED_ADDRESSES = frozenset({EVENTS, DEAD_LETTER})


MAX_FALLBACKS = 8
"""Fallbacks one step may name."""

ActivityName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
TransportAddress = Annotated[str, Field(min_length=1, max_length=500)]
"""Where a step lives: the name of a configured transport (`billing`), or its URL without credentials."""


class ActivitySpec(Wire):
    """One step of a workflow, as the routing slip carries it.

    `ActivitySpec(name="validate-customer-data")` is enough; the rest has defaults.
    """

    model_config = ConfigDict(frozen=True)

    name: ActivityName
    description: str = ""
    arguments: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    """Step-specific inputs, given to the activity next to the workflow's payload."""
    retry: RetryPolicy | None = None
    """How failures are retried; `None` leaves it to the activity's own spec in the worker."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one attempt may run before it is cancelled and counted as a failure; `None` leaves it to the
    activity's own spec in the worker (300 seconds unless it says otherwise)."""
    required_scopes: tuple[str, ...] = ()
    """OAuth scopes the user's on-behalf-of token must grant for this step to run."""
    mandatory: bool = Field(default=False, exclude_if=lambda value: not value)
    """No revision of the route may remove this step (checked by every worker against the signed plan)."""
    compensate: ActivityName | None = Field(default=None, exclude_if=lambda value: value is None)
    """The activity that undoes this step once it completed, should the workflow later fault, be cancelled or
    expire; `None` leaves it to the activity's own spec in the worker (see `activity(compensate=...)`)."""
    fallbacks: tuple[ActivityName, ...] = Field(
        default=(), max_length=MAX_FALLBACKS, exclude_if=lambda value: not value
    )
    """Activities to try instead, in order, once this step has failed for good (its retries exhausted, or a
    failure no retry can help); each runs with this step's arguments and its own retry policy."""
    at_most_once: bool = Field(default=False, exclude_if=lambda value: not value)
    """The step must not run twice blindly: a copy that finds it started and not finished reconciles it, or parks
    the workflow `in_doubt` (decided by the worker's own spec; see `activity(at_most_once=True)`)."""
    branches: tuple[ActivitySpec, ...] = Field(default=(), exclude_if=lambda value: not value)
    """For a parallel group (see `Parallel`): its branches, each a step that runs at the same time as the others;
    the workflow goes on once all completed, each one's output under its key in the payload."""
    key: str | None = Field(default=None, min_length=1, max_length=200, exclude_if=lambda value: value is None)
    """For a branch of a parallel group: the payload key its output goes under (its name when `None`)."""
    model_settings: StepModelSettings | None = Field(default=None, exclude_if=lambda value: value is None)
    """Model settings for an agent's run at this step (`{"temperature": 0.2}`); the worker applies only those its
    activity lets a plan set (`AgentActivity(overridable=[...])`) and logs the others as left out."""
    usage_limits: StepUsageLimits | None = Field(default=None, exclude_if=lambda value: value is None)
    """Usage limits for an agent's run at this step (`{"request_limit": 3}`); each can only lower the worker's."""
    version: str | None = Field(default=None, min_length=1, max_length=200, exclude_if=lambda value: value is None)
    """The versions of the activity that may run the step, a PEP 440 range (`"~=2.1"`, `">=2,<3"`): a worker whose
    version is outside it hands the step back for one that fits (see `paigeant_ai._versions`)."""
    transport: TransportAddress | None = Field(default=None, exclude_if=lambda value: value is None)
    """The transport the step lives on: the name of one its workers and dispatcher are configured with
    (`PAIGEANT_TRANSPORTS`), or that transport's URL without credentials; `None` keeps it on the transport the
    workflow is on when it gets there. It only ever selects among configured transports (see `docs/deployment.md`)."""

    @model_validator(mode="after")
    def _not_reserved(self) -> Self:
        if self.transport is not None:
            check_transport_address(self.transport)
        if self.name in RESERVED_ADDRESSES:
            raise ValueError(f"{self.name!r} is reserved for paigeant's own queues; choose another activity name")
        others = [name for name in (self.compensate, *self.fallbacks) if name in RESERVED_ADDRESSES]
        if others:
            raise ValueError(f"{others[0]!r} is reserved for paigeant's own queues; choose another activity name")
        if len({self.name, *self.fallbacks}) != len(self.fallbacks) + 1:
            raise ValueError(f"the fallbacks of {self.name!r} must be other activities, each named once")
        if self.branches:
            check_group_shape(self)
        return self

    @property
    def branch_key(self) -> str:
        """For a branch of a parallel group: the payload key its output goes under."""
        return self.key if self.key is not None else self.name

    def branch(self, key: str) -> ActivitySpec | None:
        """For a parallel group: its branch with payload key `key`, if it has one."""
        for spec in self.branches:
            if spec.branch_key == key:
                return spec
        return None

    @property
    def alternatives(self) -> tuple[str, ...]:
        """The activities that may run this step, in the order they are tried: its own, then its fallbacks."""
        return (self.name, *self.fallbacks)


def _is_empty(value: Any) -> bool:
    return not value


class ActivityLogEntry(Wire):
    """What happened at one step: who ran it, when, on which attempt, and how it ended."""

    name: str
    step: int = Field(ge=0)
    attempt: int = Field(default=0, ge=0)
    outcome: Literal["completed", "failed", "ended"] = "completed"
    """`ended`: the step ended the workflow early (see `EndWorkflow`); `error` then holds the reason."""
    started_at: AwareDatetime
    finished_at: AwareDatetime
    output_keys: list[str] = Field(default_factory=list[str])
    error: str | None = None
    approvals: list[str] = Field(default_factory=list[str], exclude_if=_is_empty)
    """For a resumed step: who approved or denied which tool call, with any arguments they changed."""
    fallback: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a failed step: the alternative tried next in its place (see `ActivitySpec.fallbacks`)."""
    branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a step of a parallel group's branch: the branch's key."""
    branches: list[ActivityLogEntry] = Field(default_factory=list["ActivityLogEntry"], exclude_if=_is_empty)
    """For a parallel group that completed: what happened in each of its branches, in the group's order."""
    usage: list[Usage] = Field(default_factory=list[Usage], exclude_if=_is_empty)
    """What the attempt used, one `Usage` per model it called (empty for a step that called none)."""
    version: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """The version of the activity's code that ran the step (see `paigeant_ai._versions`)."""

    @property
    def duration(self) -> float:
        """Seconds the step took."""
        return (self.finished_at - self.started_at).total_seconds()


class Revision(Wire):
    """A change a step made to the rest of its workflow's route, as the slip logs it.

    `remaining` is the whole route after the change (the steps after `activity`), so the log shows what each
    revision left as well as what it `added` and `discarded`.
    """

    step: int = Field(ge=0)
    activity: str
    """The step that made the change."""
    action: Literal["add", "remove", "replace"]
    reason: str = ""
    added: list[ActivitySpec] = Field(default_factory=list[ActivitySpec])
    discarded: list[ActivitySpec] = Field(default_factory=list[ActivitySpec])
    remaining: list[ActivitySpec] = Field(default_factory=list[ActivitySpec])
    at: datetime = Field(default_factory=utcnow)
    signature: str | None = Field(default=None, repr=False, exclude_if=lambda value: value is None)
    """A detached JWS (`typ` `paigeant-revision+jws`) by the worker that made the revision; see `paigeant_ai._plan`."""

    @property
    def summary(self) -> str:
        """One line: what changed, why, and the route it left."""

        def names(specs: list[ActivitySpec]) -> str:
            return ", ".join(spec.name for spec in specs) or "nothing"

        changed = {"add": f"added {names(self.added)}", "remove": f"removed {names(self.discarded)}"}.get(
            self.action, f"replaced {names(self.discarded)} with {names(self.added)}"
        )
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.activity} {changed}{reason}; remaining: {names(self.remaining)}"


class Compensation(Wire):
    """A completed step that can be undone, as the slip's compensation log keeps it.

    Recorded when the step completes (if it names a compensation); marked done once its compensation ran.
    """

    step: int = Field(ge=0)
    """The index of the completed step."""
    activity: str
    """The activity that ran the step (a fallback's name when a fallback ran it)."""
    compensate: ActivityName
    """The activity that undoes it."""
    idempotency_key: str
    """The completed step's `ctx.idempotency_key`: what its side effects were keyed on."""
    output: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    """What the step added to the payload."""
    compensated_at: AwareDatetime | None = Field(default=None, exclude_if=lambda value: value is None)
    """When its compensation completed; `None` while it is still to run."""
    branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a branch of a parallel group (`step` is the group's index): the branch's key."""
    usage: list[Usage] = Field(default_factory=list[Usage], exclude_if=_is_empty)
    """What its compensation used, one `Usage` per model, once it ran."""
    transport: TransportAddress | None = Field(default=None, exclude_if=lambda value: value is None)
    """The transport the step ran on, where its compensation runs; `None`: the one the workflow is on then."""


UnwindCause = Literal["faulted", "cancelled", "expired"]


class Unwinding(Wire):
    """Why a workflow stopped and is being undone: set once, when its compensations start.

    While it is set the itinerary holds the compensations still to run, the latest completed step's first.
    """

    cause: UnwindCause
    reason: str
    step: int = Field(ge=0)
    """The index of the step the workflow stopped at."""
    activity: str | None = None
    """The step the workflow stopped at, if one was due."""
    by: str | None = None
    """Who cancelled it (for `cancelled`)."""
    at: AwareDatetime = Field(default_factory=utcnow)
    cancel: str | None = Field(default=None, repr=False, exclude_if=lambda value: value is None)
    """For `cancelled`: the signed cancel request (see `paigeant_ai._cancel`), checked by every worker."""
    late_branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For the undoing of a branch that completed after its parallel group had failed: the branch's key. Its end is
    not the workflow's: the unwinding the group's failure started undoes the steps before the group."""


class RoutingSlip(Wire):
    """The route: the steps still to run (`itinerary`; the first is `current`) and the log of the done ones.

    `current` is the activity that runs the first step of the itinerary: its own name, or one of its fallbacks
    once the ones before failed.
    """

    itinerary: list[ActivitySpec]
    completed: list[ActivityLogEntry] = Field(default_factory=list[ActivityLogEntry])
    current: str | None = None
    compensations: list[Compensation] = Field(default_factory=list[Compensation])
    """The completed steps that can be undone, oldest first (see `Compensation`)."""
    revisions: list[Revision] = Field(default_factory=list[Revision], exclude_if=_is_empty)
    """Changes steps made to the route while the workflow ran, oldest first (left out of the JSON while empty)."""
    unwinding: Unwinding | None = Field(default=None, exclude_if=lambda value: value is None)
    """Set once the workflow stopped (faulted, cancelled, expired) and its compensations run."""
    branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """On a hop of a parallel group's branch: the branch's key (the first step of the itinerary is the group)."""
    carried_usage: list[Usage] = Field(default_factory=list[Usage], exclude_if=_is_empty)
    """What earlier attempts of the current step used (retried failures, a parked run), one `Usage` per model; the
    step's log entry takes it over once it is logged (see `paigeant_ai._ledger`)."""

    @model_validator(mode="after")
    def _current_matches_itinerary(self) -> Self:
        first = self.current_activity
        if self.branch is not None and first is None:
            raise ValueError(f"branch {self.branch!r} is not a branch of the itinerary's next step")
        expected = first.name if first is not None else None
        if self.current is None and expected is not None and "current" not in self.model_fields_set:
            self.current = expected
        elif first is None and self.current is not None:
            raise ValueError(f"current is {self.current!r} but the itinerary is empty")
        elif first is not None and self.current not in first.alternatives:
            raise ValueError(f"current is {self.current!r} but the itinerary's next step is {expected!r}")
        return self

    @property
    def undoing(self) -> Compensation | None:
        """While the workflow unwinds: the compensation log entry the current step undoes."""
        if self.unwinding is None or self.current is None:
            return None
        for record in reversed(self.compensations):
            if record.compensated_at is None:
                return record
        return None

    @property
    def hop_key(self) -> str:
        """What tells the current step apart from every other step of the workflow: its index, or, while the
        workflow unwinds, the index of the step being undone."""
        undoing = self.undoing
        if undoing is not None:
            return f"undo-{undoing.step}" + (f"/{undoing.branch}" if undoing.branch is not None else "")
        return f"{self.step}/{self.branch}" if self.branch is not None else str(self.step)

    @classmethod
    def from_activities(cls, activities: list[ActivitySpec]) -> RoutingSlip:
        """A new slip with `activities` to run in order."""
        if not activities:
            raise UserError("a workflow needs at least one activity")
        return cls(itinerary=list(activities))

    @property
    def is_complete(self) -> bool:
        """True when no step is left to run."""
        return not self.itinerary

    @property
    def step(self) -> int:
        """The index of the current step in the workflow (how many steps are done)."""
        done = 0
        for entry in self.completed:  # a plain loop: this is read several times on every hop
            if entry.outcome != "failed" and entry.branch is None:  # not a branch's, carried for its budget
                done += 1
        return done

    @property
    def current_activity(self) -> ActivitySpec | None:
        """The spec of the step to run next, if any: on a branch's hop, the branch's."""
        first = self.itinerary[0] if self.itinerary else None
        if first is not None and self.branch is not None:
            return first.branch(self.branch)
        return first

    def mark_complete(
        self,
        name: str,
        *,
        attempt: int = 0,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        output_keys: list[str] | None = None,
    ) -> ActivityLogEntry:
        """Log the current step as done and move on to the next one.

        Args:
            name: The step being completed; it must be the current one.
            attempt: Which attempt succeeded (0 is the first).
            started_at: When the step started; defaults to now.
            finished_at: When the step finished; defaults to now.
            output_keys: The payload keys the step wrote.

        Raises:
            UserError: `name` is not the current step.
        """
        if self.current != name:
            raise UserError(f"cannot complete {name!r}: the current step is {self.current!r}")
        finished = finished_at or utcnow()
        if self.unwinding is not None:
            return self._mark_compensated(name, attempt=attempt, started_at=started_at, finished_at=finished)
        entry = ActivityLogEntry(
            name=name,
            step=self.step,
            attempt=attempt,
            started_at=started_at or finished,
            finished_at=finished,
            output_keys=output_keys or [],
        )
        self.completed.append(entry)
        self.itinerary.pop(0)
        self.current = self.itinerary[0].name if self.itinerary else None
        return entry

    def _mark_compensated(
        self, name: str, *, attempt: int, started_at: datetime | None, finished_at: datetime
    ) -> ActivityLogEntry:
        undoing = self.undoing
        assert undoing is not None
        undoing.compensated_at = finished_at
        self.itinerary.pop(0)
        self.current = self.itinerary[0].name if self.itinerary else None
        return ActivityLogEntry(
            name=name, step=undoing.step, attempt=attempt, started_at=started_at or finished_at, finished_at=finished_at
        )

    def fall_back(self, *, attempt: int, started_at: datetime, error: str) -> str | None:
        """Log the current activity as failed and move on to the step's next fallback; that fallback's name, or
        `None` (and nothing logged) when the step has none left."""
        first = self.current_activity
        if first is None or self.current is None or self.unwinding is not None:
            return None
        alternatives = first.alternatives
        position = alternatives.index(self.current) + 1
        if position >= len(alternatives):
            return None
        entry = self.mark_failed(self.current, attempt=attempt, started_at=started_at, error=error)
        entry.fallback = self.current = alternatives[position]
        return self.current

    def unwind(self, unwinding: Unwinding) -> list[Compensation]:
        """Stop the workflow for `unwinding.cause`: the itinerary becomes the compensations still to run, the
        latest completed step's first; those compensations (none: the workflow just ends)."""
        pending = [record for record in self.compensations if record.compensated_at is None]
        self.unwinding, self.branch = unwinding, None
        self.itinerary = [ActivitySpec(name=record.compensate) for record in reversed(pending)]
        self.current = self.itinerary[0].name if self.itinerary else None
        return pending

    def mark_ended(
        self, name: str, *, attempt: int, started_at: datetime, reason: str, output_keys: list[str] | None = None
    ) -> ActivityLogEntry:
        """Log the current step as the one that ended the workflow early; the remaining steps are dropped."""
        if self.current != name:
            raise UserError(f"cannot end at {name!r}: the current step is {self.current!r}")
        skipped = [spec.name for spec in self.itinerary[1:]]
        entry = ActivityLogEntry(
            name=name,
            step=self.step,
            attempt=attempt,
            outcome="ended",
            started_at=started_at,
            finished_at=utcnow(),
            output_keys=output_keys or [],
            error=reason + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
        )
        self.completed.append(entry)
        self.itinerary.clear()
        self.current = None
        return entry

    def revise(self, revision: Revision) -> None:
        """Replace the steps after the current one with `revision.remaining`, and log the revision.

        Raises:
            UserError: The revision was made by another step than the current one.
        """
        if self.current is None or self.current != revision.activity:
            raise UserError(f"cannot revise from {revision.activity!r}: the current step is {self.current!r}")
        self.itinerary[1:] = revision.remaining
        self.revisions.append(revision)

    def mark_failed(self, name: str, *, attempt: int, started_at: datetime, error: str) -> ActivityLogEntry:
        """Log the current step as failed for good; the slip does not advance."""
        entry = ActivityLogEntry(
            name=name,
            step=self.step,
            attempt=attempt,
            outcome="failed",
            started_at=started_at,
            finished_at=utcnow(),
            error=error,
            branch=self.branch,
        )
        self.completed.append(entry)
        return entry


class SecurityContext(Wire):
    """The user's delegated token and the message's signature (both left out of `repr`, so never logged by accident)."""

    obo_token: str | None = Field(default=None, repr=False)
    jws_signature: str | None = Field(default=None, repr=False)
    """A detached JWS over the message as sent, with this field `null`; always the message's last value."""


def derive_message_id(correlation_id: str, step: int | str, name: str | None, attempt: int) -> str:
    """The id of one hop, the same every time that hop is produced, so a redelivery can be recognised."""
    seed = f"paigeant/v1/{correlation_id}/{step}/{name}/{attempt}".encode()
    digest = hashlib.blake2b(seed, digest_size=16).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"  # shaped like a UUID


class Resumption(Wire):
    """How a step that waited for input continues: its agent's conversation and the answers it waited for.

    Both are pydantic-ai values as JSON: a `Conversation` (`ConversationTypeAdapter`) and `DeferredToolResults`.
    """

    count: int = Field(default=1, ge=1)
    """How many times this step has been resumed, this time included."""
    conversation: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    """Left empty by `WorkflowDispatcher.resume`: the conversation is the one of the signed `parked` record."""
    results: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    parked: dict[str, JsonValue] | None = Field(default=None, exclude_if=_is_empty)
    """The parked record (`ParkedStep`) the step continues, with the proof of the worker that parked it."""
    approvals: list[dict[str, JsonValue]] = Field(default_factory=list[dict[str, JsonValue]], exclude_if=_is_empty)
    """The signed approvals (`SignedApproval`) of the calls the step waited for (see `paigeant_ai._approvals`)."""


class PaigeantMessage(Wire):
    """The envelope every hop carries (wire format v1)."""

    v: Literal[1] = WIRE_VERSION
    message_id: str = Field(min_length=1, max_length=200)
    correlation_id: str = Field(min_length=1, max_length=200)
    routing_slip: RoutingSlip
    payload: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    headers: dict[str, str] = Field(default_factory=dict[str, str])
    attempt: int = Field(default=0, ge=0)
    created_at: AwareDatetime = Field(default_factory=utcnow)
    expires_at: AwareDatetime | None = None
    resume: Resumption | None = Field(default=None, exclude_if=_is_empty)
    """Set on the hop that continues a step after it waited for input (see `WorkflowDispatcher.resume`)."""
    plan: Plan | None = Field(default=None, exclude_if=_is_empty)
    """The route the workflow was started with, signed; unchanged on every hop (see `paigeant_ai._plan`)."""
    budget_extensions: list[BudgetExtension] = Field(default_factory=list[BudgetExtension], exclude_if=_is_empty)
    """More budget granted since the workflow started, each signed by who granted it (see `paigeant_ai._budget`)."""
    sent_on: TransportAddress | None = Field(default=None, exclude_if=lambda value: value is None)
    """The name of the transport this hop was sent on, signed with it by a sender configured with named
    transports: a copy put on another transport is refused there (see `paigeant_ai._routes`)."""
    security: SecurityContext = Field(default_factory=SecurityContext)
    """Always the last field, with the signature last in it: see `paigeant_ai._sealing`."""

    @classmethod
    def new(
        cls,
        activities: list[ActivitySpec],
        variables: Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        obo_token: str | None = None,
        expires_at: datetime | None = None,
    ) -> PaigeantMessage:
        """The first message of a new workflow."""
        slip = RoutingSlip.from_activities(activities)
        check_finite(variables, "the variables")
        cid = correlation_id or str(uuid.uuid4())
        return cls(
            message_id=derive_message_id(cid, 0, slip.current, 0),
            correlation_id=cid,
            routing_slip=slip,
            payload=dict(variables or {}),
            security=SecurityContext(obo_token=obo_token),
            expires_at=expires_at,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> PaigeantMessage:
        """Parse and validate a message.

        Raises:
            InvalidMessage: The data is not JSON, has an unknown version, or does not have the v1 shape.
        """
        try:
            return cls.model_validate_json(data, context=FROM_WIRE)  # the common case, in one pass
        except ValidationError:
            pass  # find out what is wrong, to say it clearly
        try:
            raw = from_json(data)
        except ValueError as exc:
            raise InvalidMessage(f"malformed JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidMessage(f"expected a JSON object, got {type(raw).__name__}")
        version = raw.get("v")  # pyright: ignore[reportUnknownMemberType]
        if isinstance(version, int) and not isinstance(version, bool) and version > WIRE_VERSION:
            raise InvalidMessage(
                f"wire version {version} is newer than this worker reads ({WIRE_VERSION}): upgrade the worker"
            )
        if version != WIRE_VERSION:
            raise InvalidMessage(f"unsupported wire version {version!r}; this worker reads version {WIRE_VERSION}")
        try:
            return cls.model_validate(raw, context=FROM_WIRE)
        except ValidationError as exc:
            raise InvalidMessage(f"invalid message: {_summarize(exc)}") from None

    def to_json(self) -> bytes:
        """The message as compact JSON bytes, `security` last and its signature last in it (see `_sealing`)."""
        if not self.__pydantic_extra__ and not self.security.__pydantic_extra__:
            return self.model_dump_json().encode()
        # Fields a newer sender added (see `_wire`) go before `security` and its signature, not after them.
        data = self.model_dump(mode="json")
        security = data.pop("security")
        security["jws_signature"] = security.pop("jws_signature")
        return to_json({**data, "security": security}, inf_nan_mode="constants")

    @property
    def step(self) -> int:
        """The index of the current step."""
        return self.routing_slip.step

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt and redelivery of the current step, different for every other step."""
        slip = self.routing_slip
        return f"{self.correlation_id}:{slip.hop_key}:{slip.current}"

    def next_hop(self, *, attempt: int = 0) -> PaigeantMessage:
        """A copy addressed to the slip's current step, with its own id; the signature is dropped."""
        return self.model_copy(
            update={
                "message_id": derive_message_id(
                    self.correlation_id, self.routing_slip.hop_key, self.routing_slip.current, attempt
                ),
                "attempt": attempt,
                "sent_on": None,  # its sender names where it sends it
                "security": self.security.model_copy(update={"jws_signature": None}),
            }
        )


MAX_BRANCHES = 64
"""Branches one parallel group may have."""


def check_group_shape(group: ActivitySpec) -> None:
    """Check what every parallel group must be: branches with distinct keys, none a group, and nothing that only a
    single step can have (the branches carry their own retries, fallbacks and compensations).

    Raises:
        ValueError: With the reason.
    """
    if any(spec.branches for spec in group.branches):
        raise ValueError(f"parallel group {group.name!r} holds another group; groups cannot be nested")
    if group.fallbacks or group.compensate is not None or group.arguments or group.retry is not None:
        raise ValueError(
            f"parallel group {group.name!r} may not have fallbacks, a compensation, arguments or a retry policy: "
            "give them to its branches"
        )
    if group.model_settings is not None or group.usage_limits is not None:
        raise ValueError(
            f"parallel group {group.name!r} may not have model settings or usage limits: give them to its branches"
        )
    keys = [spec.branch_key for spec in group.branches]
    duplicate = next((key for key in keys if keys.count(key) > 1), None)
    if duplicate is not None:
        raise ValueError(
            f"two branches of parallel group {group.name!r} have the key {duplicate!r}; give each of them its own key"
        )


def _summarize(exc: ValidationError) -> str:
    parts: list[str] = []
    for error in exc.errors(include_url=False)[:5]:
        location = ".".join(str(item) for item in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
