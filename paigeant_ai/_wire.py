"""The base of every wire type, the retry policy, and the signed plan of a workflow.

Re-exported from `paigeant_ai.contracts`, the home of the wire format; kept apart so that `contracts` stays small.

Within wire version 1 the wire is forward compatible: a model read from the wire (validated with `FROM_WIRE` as its
context) keeps the fields it does not know, at any depth, and writes them back unchanged after its own, so a
worker forwards a newer worker's message with everything it carried, and what was signed over it still verifies.
Built in Python, a model refuses a field it does not know: a misspelt argument raises.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .exceptions import UserError

__all__ = (
    "FROM_WIRE",
    "Budget",
    "BudgetExtension",
    "Plan",
    "PlannedStep",
    "Price",
    "RetryPolicy",
    "RevisionLimits",
    "Wire",
    "assume_utc",
    "utcnow",
)

FROM_WIRE: Mapping[str, Any] = {"paigeant_wire": True}
"""The validation context of what is read from the wire (or a store): fields a newer sender added are kept."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def assume_utc(at: datetime) -> datetime:
    """`at` with a time zone: a naive one (as an older store or a caller may give) is taken as UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class Wire(BaseModel):
    """The base of every wire type: versioned JSON, strict when built in Python, forward compatible on the wire.

    A field a newer sender added is kept in `__pydantic_extra__` and encoded after the known ones, in the order it
    arrived; a newer release declares its new fields after the existing ones, so both encode a model alike.
    """

    # NaN and infinity are refused where values are validated and encoded bare where they are not (a payload
    # updated in place), so that `_sealing` finds them instead of sending them as null.
    model_config = ConfigDict(
        extra="allow",
        validate_assignment=False,
        ser_json_timedelta="float",
        allow_inf_nan=False,
        ser_json_inf_nan="constants",
    )

    def model_post_init(self, context: Any, /) -> None:
        # Run where a model is built, not where one already built is passed into another: a model read from the
        # wire, with what it kept, goes into a new one (a parked record holds the message it parked) as it is.
        extra = self.__pydantic_extra__
        if extra and not (context or {}).get("paigeant_wire"):
            names = ", ".join(repr(name) for name in extra)
            raise PydanticCustomError(
                "extra_forbidden",
                "unknown field {names} for {model}: check its spelling",
                {"names": names, "model": type(self).__name__},
            )


class RetryPolicy(Wire):
    """How often and how patiently a failing activity is tried again.

    The delay before attempt `n` (1-based retry) is `initial_interval * backoff ** (n - 1)`, capped at
    `max_interval`, then spread by up to `jitter` (a fraction) either way so retries do not arrive in lockstep.
    """

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(default=3, ge=1, le=1000)
    initial_interval: float = Field(default=1.0, ge=0)
    backoff: float = Field(default=2.0, ge=1)
    max_interval: float = Field(default=60.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)

    def delay_before(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before running `attempt` (0 is the first try, which never waits)."""
        if attempt <= 0:
            return 0.0
        base = min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval)
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


class RevisionLimits(Wire):
    """How far the steps of a workflow may change its route, carried in the workflow's signed plan.

    Every worker refuses a hop whose logged revisions go past them; `ItineraryRevision` holds its agent to the
    stricter of these and its own. A step is added when a revision's route holds it more often than the route
    before it did, so moving steps around adds none and replacing one step with another adds one.
    """

    model_config = ConfigDict(frozen=True)

    max_revisions: int = Field(default=10, ge=0, le=1000)
    """Revisions the whole workflow may have, all steps together."""
    max_steps_per_revision: int = Field(default=5, ge=0, le=1000)
    """Steps one revision may add."""
    max_added_steps: int = Field(default=20, ge=0, le=10_000)
    """Steps all revisions of the workflow may add together."""


def _false(value: bool) -> bool:
    return not value


def _none(value: object) -> bool:
    return value is None


class _Limits(Wire):
    """A wire type a user builds with numbers: a value it refuses raises `UserError` naming the field and the fix."""

    @model_validator(mode="wrap")
    @classmethod
    def _refused_as_user_error(cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo) -> Self:
        if (info.context or {}).get("paigeant_wire"):
            return handler(data)
        try:
            return handler(data)
        except ValidationError as error:
            first = error.errors()[0]
            if not first["loc"]:  # a misspelt field
                raise UserError(f"{cls.__name__}: {first['msg']}") from None
            where = ".".join(str(part) for part in first["loc"])
            raise UserError(
                f"{cls.__name__} refuses {where}={first.get('input')!r} ({first['msg'][0].lower()}{first['msg'][1:]}): "
                "give a finite number of at least 0, or leave it out"
            ) from None


class Price(_Limits):
    """What one model costs, in the currency of the budget's `cost`, per million tokens."""

    model_config = ConfigDict(frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float | None = Field(default=None, ge=0, exclude_if=_none)
    """Cache reads; None: priced as input."""
    cache_write_per_mtok: float | None = Field(default=None, ge=0, exclude_if=_none)
    """Cache writes; None: priced as input."""


class Budget(_Limits):
    """What a whole workflow may use, all steps and branches together, carried in its signed plan.

    Each limit left `None` is not enforced. See `paigeant_ai._budget` and the docs' "Budgets" section.
    """

    model_config = ConfigDict(frozen=True)

    tokens: int | None = Field(default=None, ge=0, exclude_if=_none)
    """Input and output tokens, all models together."""
    requests: int | None = Field(default=None, ge=0, exclude_if=_none)
    """Model requests."""
    tool_calls: int | None = Field(default=None, ge=0, exclude_if=_none)
    """Tool calls the agents ran."""
    cost: float | None = Field(default=None, ge=0, exclude_if=_none)
    """Cost, priced by `prices`."""
    wall_time: float | None = Field(default=None, ge=0, exclude_if=_none)
    """Seconds from the workflow's start (its plan's `created_at`)."""
    prices: dict[str, Price] = Field(default_factory=dict[str, Price], exclude_if=lambda value: not value)
    """The price of each model by its name as pydantic-ai reports it (`"openai:gpt-5"`), for `cost`."""
    on_exhausted: Literal["park", "fault"] = "park"
    """`park`: the workflow waits as `budget_exhausted` until it is resumed with more, or cancelled; `fault`: it
    faults (its completed steps are undone)."""


class BudgetExtension(Wire):
    """More budget for one workflow, granted by a person when it is resumed (see `WorkflowDispatcher.resume`).

    Signed by the key of the service that resumed it (which must hold `approve`); every worker verifies each one a
    hop carries, bound to its workflow, before it counts it (see `paigeant_ai._budget`).
    """

    model_config = ConfigDict(frozen=True)

    correlation_id: str
    add: Budget
    """The amounts added to each limit of the workflow's budget (its `prices` and `on_exhausted` are not used)."""
    by: str
    """Who granted it."""
    at: AwareDatetime = Field(default_factory=utcnow)
    signature: str | None = Field(default=None, repr=False)
    """A detached JWS (`typ` `paigeant-budget+jws`) over the record's JSON without this field; None when unsigned."""


class PlannedStep(Wire):
    """One step of a plan: its name, whether revisions may remove it, and the digest of its whole `ActivitySpec`."""

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str
    """The spec's digest (see `paigeant_ai._plan.spec_digest`): arguments, retry, timeout and scopes included."""
    mandatory: bool = Field(default=False, exclude_if=_false)
    fallbacks: tuple[str, ...] = Field(default=(), exclude_if=lambda value: not value)
    """The step's fallbacks (see `ActivitySpec.fallbacks`): the activities that may run it instead."""
    compensate: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """The activity that undoes the step, when the spec names one."""
    branches: tuple[PlannedStep, ...] = Field(default=(), exclude_if=lambda value: not value)
    """For a parallel group: its branches (each with its `key`)."""
    key: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a branch of a parallel group: its payload key."""


class Plan(Wire):
    """The route a workflow was started with, signed by the dispatcher (or planner) that started it.

    It travels unchanged beside the live route on every hop; each worker checks that the live route is this plan
    changed only by the slip's logged, signed revisions, within `limits` (see `paigeant_ai._plan`). The steps are
    kept as digests of their specs, so a plan adds a few dozen bytes per step however large their arguments.
    """

    correlation_id: str
    steps: list[PlannedStep]
    initiator: str | None = None
    """The subject (`sub`) of the workflow's on-behalf-of token when it was started; every hop's token must have it."""
    owner: str | None = Field(default=None, exclude_if=lambda owner: owner is None)
    """The principal the workflow belongs to: the `principal=` given to `dispatch_workflow`, else the subject of its
    token (see `WorkflowStatus.owner`)."""
    limits: RevisionLimits = Field(default_factory=RevisionLimits)
    created_at: AwareDatetime = Field(default_factory=utcnow)
    expires_at: AwareDatetime | None = None
    signature: str | None = Field(default=None, repr=False)
    """A detached JWS (`typ` `paigeant-plan+jws`) over the plan's JSON without this field; None when unsigned."""
    budget: Budget | None = Field(default=None, exclude_if=_none)
    """What the whole workflow may use (see `Budget`); None: no budget."""
