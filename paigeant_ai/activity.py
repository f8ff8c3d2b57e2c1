"""Activities: what a worker runs at one step. Plain functions, and any pydantic-ai `Agent` as `AgentActivity`."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from copy import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, overload, runtime_checkable

from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_ai import Conversation, DeferredToolRequests, DeferredToolResults, capture_run_messages
from pydantic_ai.agent import AbstractAgent, AgentRunResult
from pydantic_ai.exceptions import ModelAPIError
from pydantic_ai.settings import ModelSettings
from pydantic_ai.toolsets import AbstractToolset
from pydantic_ai.usage import RequestUsage, RunUsage, UsageLimits
from pydantic_core import PydanticSerializationError, to_jsonable_python

from ._agent_progress import OutputLimits, StepProgress
from ._agents import model_error_signal, run_output_type
from ._budget import step_limits
from ._in_doubt import ReconcileFunc
from ._json_values import is_finite
from ._ledger import by_model, run_model_name, to_usage, usage_since
from ._model_settings import check_overridable, step_run_options
from ._plan_rules import plan_rules
from ._step_record import DEFAULT_RECORD_BYTES, StepRecord, record_step
from ._versions import check_version
from .approval import resumed_run
from .contracts import (
    ActivitySpec,
    Compensation,
    PaigeantMessage,
    RetryPolicy,
    Revision,
    RoutingSlip,
    Unwinding,
    Usage,
)
from .exceptions import NonRetryableError, ParkWorkflow, UserError

__all__ = (
    "Activity",
    "ActivityContext",
    "AgentActivity",
    "FunctionActivity",
    "StepToolset",
    "ToolsetFactory",
    "activity",
    "as_activity",
)

DEFAULT_TIMEOUT = 300.0

DepsT = TypeVar("DepsT")
OutputT = TypeVar("OutputT")

_PAYLOAD = TypeAdapter(dict[str, JsonValue])


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What an activity knows about the step it runs.

    Attributes:
        message: The message being processed (read it, don't change it: the worker owns the slip).
        spec: The activity's effective spec: the workflow's overrides over the worker's own.
        obo_claims: The validated claims of the user's on-behalf-of token, when the worker checks tokens.
        revisions: Changes the step made to the rest of the route (a per-step toolset such as
            `ItineraryRevision` records them here); the worker applies them to the slip when the step succeeds
            or parks.
        usage: What the step used so far, one `Usage` per model: an `AgentActivity` records its run's here,
            any activity its own models' with `add_usage`; the worker logs it in the step's entry.
        progress: Where the step's running output goes (its workflow's progress stream), set by the worker;
            `AgentActivity(..., stream_progress=True)` sends its agent's output there.
        records: What an `AgentActivity` saw and produced (its prompt, the payload, its output, the tools it
            called), added by it; the worker reports the latest with the step's `step_completed` event.
    """

    message: PaigeantMessage
    spec: ActivitySpec
    obo_claims: Mapping[str, Any] | None = None
    revisions: list[Revision] = field(default_factory=list[Revision])
    usage: list[Usage] = field(default_factory=list[Usage])
    progress: StepProgress | None = field(default=None, repr=False, compare=False)
    records: list[StepRecord] = field(default_factory=list[StepRecord], repr=False, compare=False)
    _payload: Mapping[str, JsonValue] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_payload", MappingProxyType(self.message.payload))

    def add_usage(self, usage: Usage | RunUsage | RequestUsage, *, model: str | None = None) -> None:
        """Record what a model the step called used: `ctx.add_usage(result.usage, model="openai:gpt-5")`.

        Args:
            usage: A pydantic-ai `RunUsage` (`result.usage`) or `RequestUsage`, or a `Usage`.
            model: The model's name (a `Usage` keeps its own unless this is given).
        """
        self.usage[:] = by_model([*self.usage, to_usage(usage, model)])

    @property
    def payload(self) -> Mapping[str, JsonValue]:
        """The workflow's variables so far (read-only; return what you add)."""
        return self._payload

    @property
    def arguments(self) -> Mapping[str, JsonValue]:
        """Step-specific arguments from the activity's spec in the itinerary."""
        return self.spec.arguments

    @property
    def correlation_id(self) -> str:
        """The workflow's id."""
        return self.message.correlation_id

    @property
    def attempt(self) -> int:
        """0 on the first try, 1 on the first retry, and so on."""
        return self.message.attempt

    @property
    def step(self) -> int:
        """The index of this step in the workflow."""
        return self.message.step

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt and redelivery of this step: key external side effects on it."""
        return self.message.idempotency_key

    @property
    def routing_slip(self) -> RoutingSlip:
        """The workflow's route: what is done and what is left."""
        return self.message.routing_slip

    @property
    def undoing(self) -> Compensation | None:
        """When this step is a compensation: the completed step it undoes, with that step's output and
        idempotency key (`undoing.output`, `undoing.idempotency_key`); None for an ordinary step."""
        return self.message.routing_slip.undoing

    @property
    def unwinding(self) -> Unwinding | None:
        """When this step is a compensation: why the workflow stopped (`cause`: faulted, cancelled, expired)."""
        return self.message.routing_slip.unwinding


@runtime_checkable
class Activity(Protocol):
    """Anything a `Worker` can run as a step: a spec and an async `run`."""

    @property
    def spec(self) -> ActivitySpec: ...

    async def run(self, ctx: ActivityContext) -> Any:
        """Do the step's work; the returned mapping (or model) is merged into the payload."""
        ...


def _make_spec(
    name: str,
    *,
    description: str | None,
    retry: RetryPolicy | None,
    timeout: float | None,
    required_scopes: Sequence[str],
    compensate: str | None = None,
    fallbacks: Sequence[str] = (),
    at_most_once: bool = False,
) -> ActivitySpec:
    if isinstance(fallbacks, str):
        raise UserError(f"fallbacks of {name!r} must be a list of activity names: write fallbacks=[{fallbacks!r}]")
    try:
        return ActivitySpec(
            name=name,
            description=description or "",
            retry=retry or RetryPolicy(),
            timeout=timeout or DEFAULT_TIMEOUT,
            required_scopes=tuple(required_scopes),
            compensate=compensate,
            fallbacks=tuple(fallbacks),
            at_most_once=at_most_once,
        )
    except ValidationError as exc:
        raise UserError(f"invalid activity {name!r}: {exc.errors(include_url=False)[0]['msg']}") from None


ActivityFunc = Callable[[ActivityContext], Any]


def _compensation_of(name: str, compensate: str | Activity | ActivityFunc | None) -> tuple[Activity | None, str | None]:
    """The activity this worker runs to undo step `name` (None when another worker's activity does, or nothing
    does), and the name of the activity that undoes it."""
    if compensate is None:
        return None, None
    if isinstance(compensate, str):
        return None, compensate
    if isinstance(compensate, Activity):
        return compensate, compensate.spec.name
    if callable(compensate):
        doc = inspect.getdoc(compensate)
        undo = FunctionActivity(
            compensate, name=f"{name}.compensate", description=f"Undoes {name!r}" + (f": {doc}" if doc else "")
        )
        return undo, undo.spec.name
    raise UserError(
        f"compensate of {name!r} must be an activity name, an activity or a function, not {type(compensate).__name__}"
    )


def _reconcile_of(name: str, at_most_once: bool, reconcile: ReconcileFunc | None) -> ReconcileFunc | None:
    if reconcile is not None and not at_most_once:
        raise UserError(f"reconcile of {name!r} is for an at-most-once step: add at_most_once=True")
    if reconcile is not None and not callable(reconcile):
        raise UserError(f"reconcile of {name!r} must be a function of the step's context, returning Ran or RunAgain")
    return reconcile


class FunctionActivity:
    """A plain function as a step: `async def step(ctx: ActivityContext) -> dict | BaseModel | None`.

    A returned mapping or model is merged into the payload; any other value is stored under `output_key` (the
    activity's name unless given). Sync functions run in a worker thread; a thread cannot be interrupted, so one
    that overruns its timeout goes on running beside the retry: prefer async functions for steps that may hang.
    """

    def __init__(
        self,
        func: ActivityFunc,
        *,
        name: str | None = None,
        description: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        required_scopes: Sequence[str] = (),
        output_key: str | None = None,
        compensate: str | Activity | ActivityFunc | None = None,
        fallbacks: Sequence[str] = (),
        at_most_once: bool = False,
        reconcile: ReconcileFunc | None = None,
        version: str | None = None,
        after: Sequence[str] = (),
        requires: Sequence[str] = (),
        conflicts: Sequence[str] = (),
        max_per_plan: int | None = None,
    ) -> None:
        self.func = func
        resolved = name or func.__name__.replace("_", "-")
        self.version = check_version(version, resolved)
        """The version of the step's code (see `paigeant_ai._versions`); None derives it."""
        self.reconcile = _reconcile_of(resolved, at_most_once, reconcile)
        self.compensation, compensate_name = _compensation_of(resolved, compensate)
        self.rules = plan_rules(
            resolved, after=after, requires=requires, conflicts=conflicts, max_per_plan=max_per_plan
        )
        """Where the step may go in a plan (see `PlanRules`)."""
        self.spec = _make_spec(
            resolved,
            description=description or inspect.getdoc(func),
            retry=retry,
            timeout=timeout,
            required_scopes=required_scopes,
            compensate=compensate_name,
            fallbacks=fallbacks,
            at_most_once=at_most_once,
        )
        self.output_key = output_key or resolved

    async def run(self, ctx: ActivityContext) -> dict[str, JsonValue]:
        if inspect.iscoroutinefunction(self.func):
            result = await self.func(ctx)
        else:
            result = await asyncio.to_thread(self.func, ctx)
            if inspect.isawaitable(result):
                result = await result
        return to_payload_update(result, self.output_key, self.spec.name)

    def __repr__(self) -> str:
        return f"FunctionActivity({self.spec.name!r})"


@overload
def activity(func: ActivityFunc, /) -> FunctionActivity: ...


@overload
def activity(
    *,
    name: str | None = None,
    description: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    required_scopes: Sequence[str] = (),
    output_key: str | None = None,
    compensate: str | Activity | ActivityFunc | None = None,
    fallbacks: Sequence[str] = (),
    at_most_once: bool = False,
    reconcile: ReconcileFunc | None = None,
    version: str | None = None,
    after: Sequence[str] = (),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    max_per_plan: int | None = None,
) -> Callable[[ActivityFunc], FunctionActivity]: ...


def activity(
    func: ActivityFunc | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    required_scopes: Sequence[str] = (),
    output_key: str | None = None,
    compensate: str | Activity | ActivityFunc | None = None,
    fallbacks: Sequence[str] = (),
    at_most_once: bool = False,
    reconcile: ReconcileFunc | None = None,
    version: str | None = None,
    after: Sequence[str] = (),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    max_per_plan: int | None = None,
) -> FunctionActivity | Callable[[ActivityFunc], FunctionActivity]:
    """Decorate a function to make it an activity; its name defaults to the function's, with `-` for `_`.

    `compensate` names what undoes the step once it completed, should the workflow later fault, be cancelled or
    expire: another activity's name (`compensate="release-inventory"`), or an activity or function that this
    step's worker then also runs (as `<name>.compensate` for a function). The compensation gets the step's output
    and idempotency key as `ctx.undoing`. `fallbacks` are the activities to try instead, in order, once the step
    failed for good; they travel with the step when it is dispatched as this activity.

    `at_most_once=True` is for a step whose effect has no idempotency key to lean on (an e-mail, a payment
    without keys): it is never run twice blindly. A copy that finds it started and not finished (a crash between
    the effect and the ack) asks `reconcile(ctx)`, which returns `Ran(output)` or `RunAgain()`; without a hook,
    the workflow parks `in_doubt` until a person resumes it (see `WorkflowDispatcher.resume`).

    `version` is the version of the step's code (PEP 440, like `"2.1.0"`): each log entry records the version that
    ran the step, and a workflow may pin the step to a range (`ActivitySpec(version="~=2.1")`). Without it, the
    version of the installed distribution the function belongs to is used, else `0+` and a digest of its source.

    `after`, `requires`, `conflicts` and `max_per_plan` say where the step may go in a plan a catalog checks
    (see `PlanRules`): `@activity(after=["process-payment"])` is never planned before the payment, or without it.
    """

    def wrap(f: ActivityFunc) -> FunctionActivity:
        return FunctionActivity(
            f,
            name=name,
            description=description,
            retry=retry,
            timeout=timeout,
            required_scopes=required_scopes,
            output_key=output_key,
            compensate=compensate,
            fallbacks=fallbacks,
            at_most_once=at_most_once,
            reconcile=reconcile,
            version=version,
            after=after,
            requires=requires,
            conflicts=conflicts,
            max_per_plan=max_per_plan,
        )

    return wrap(func) if func is not None else wrap


def as_activity(item: Activity | ActivityFunc) -> Activity:
    """An `Activity` for `item`: activities as they are, plain functions wrapped in `FunctionActivity`."""
    if isinstance(item, Activity):
        return item
    if callable(item):
        return FunctionActivity(item)
    raise UserError(f"{item!r} is not an activity: pass an Activity, an AgentActivity or a function")


def to_payload_update(result: Any, output_key: str, activity_name: str) -> dict[str, JsonValue]:
    """What an activity's return value adds to the payload; JSON values only."""
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        value: Any = result.model_dump(mode="json")
    elif isinstance(result, Mapping):
        value = dict(result)  # pyright: ignore[reportUnknownArgumentType]
    else:
        value = {output_key: result}
    try:
        return _PAYLOAD.validate_python(value)
    except ValidationError as exc:
        raise NonRetryableError(
            f"activity {activity_name!r} returned a value that is not JSON: {exc.errors(include_url=False)[0]['msg']}"
        ) from None


class _PayloadFormat(dict[str, Any]):
    def __init__(self, values: Mapping[str, Any], activity_name: str) -> None:
        super().__init__(values)
        self.activity_name = activity_name

    def __missing__(self, key: str) -> Any:
        raise NonRetryableError(
            f"the prompt of {self.activity_name!r} needs {key!r}, which is not in the workflow's payload"
        )


PromptSource = str | Callable[[ActivityContext], str | Awaitable[str]]
DepsSource = Callable[[ActivityContext], Any]
ToolsetFactory = Callable[[ActivityContext], AbstractToolset[Any]]
"""Builds a toolset for one step from its context (`ItineraryRevision` is one)."""
StepToolset = AbstractToolset[Any] | ToolsetFactory
"""A toolset an `AgentActivity` adds to its agent's for each run: as it is, or built for the step."""


class AgentActivity(Generic[DepsT, OutputT]):
    """Any pydantic-ai agent as one step of a workflow.

    The prompt is a template filled from the payload (`"Check {customer_email}"`) or a function of the
    context; without one, the agent gets the payload as JSON. The agent's output, structured or text, is
    stored in the payload under `output_key` (the activity's name with `_` for `-`). Each run uses the
    workflow's correlation ID as `conversation_id` and `<correlation_id>:<step>` as `run_id`, so its spans
    and messages can be found by workflow.

    A run that ends with deferred tool calls (a tool that requires approval, or one that raised `CallDeferred`)
    parks the workflow until `WorkflowDispatcher.resume` answers them; the agent then continues its
    conversation. `DeferredToolRequests` is added to the agent's output types for that, unless the agent lists
    it itself; an agent with output validators must, if it has tools that wait for approval.

    A model request the provider rejected for good (`ModelRequestRejectedError`: authentication, an unknown
    model, the context window; or `ModelQuotaExceededError`) faults the workflow at once. One the provider asked
    to retry later (a rate limit's `retry_after`) is retried after that wait.

    Args:
        agent: The agent to run.
        name: The activity's name; defaults to `agent.name`.
        prompt: A `str.format` template over the payload, or a (possibly async) function of the context.
        deps: Builds the agent's deps from the context; by default the context itself when the agent's
            `deps_type` is `ActivityContext`, else nothing.
        output_key: Where the output goes in the payload.
        description: What the step does, for planners; defaults to the agent's description.
        retry: The retry policy of the step.
        timeout: Seconds one attempt may take.
        usage_limits: Limits for each run of the agent; a step's spec can lower them, never raise them.
        model_settings: Model settings for each run of the agent.
        overridable: The model settings a step's spec may set (`["temperature", "max_tokens"]`); by default none.
        required_scopes: OAuth scopes the user's token must grant.
        toolsets: Toolsets added to the agent's for each run, or factories that build one for the step from
            its context: `toolsets=[ItineraryRevision(catalog)]` lets the agent revise the steps after its own.
        compensate: What undoes the step (see `activity`): another activity's name, or an activity or function
            this worker runs.
        fallbacks: Activities to try instead, in order, once the step failed for good.
        at_most_once: Never run the step twice blindly (see `activity`).
        reconcile: For an at-most-once step: whether a copy that did not finish did its work (see `activity`).
        version: The version of the step's code (see `activity`); by default the installed distribution's of the
            module that builds the activity, else `0+` and a digest of that module's source.
        after: Activities that must come before the step in a plan (see `PlanRules` for these four rules).
        requires: Activities that must be in the same plan.
        conflicts: Activities that must not be in the same plan.
        max_per_plan: How many times the step may appear in one plan; None for no limit.
        stream_progress: Forward the agent's output as it happens (text, tool calls and their results) to the
            workflow's progress stream (`WorkflowDispatcher.watch`): `True` with the default limits, or
            `OutputLimits(rate=..., max_chars=..., max_events=...)`. Off by default.
        record: Record what each run saw and produced (its rendered prompt, the payload, its output, the tools it
            called) in the step's `step_completed` event, for `paigeant_ai.evals.record_dataset`: `True` keeps
            records up to 32,000 bytes of JSON, a number sets that bound, `False` records nothing. The user's
            token and the message's signature are never recorded.
    """

    def __init__(
        self,
        agent: AbstractAgent[DepsT, OutputT],
        *,
        name: str | None = None,
        prompt: PromptSource | None = None,
        deps: DepsSource | None = None,
        output_key: str | None = None,
        description: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        usage_limits: UsageLimits | None = None,
        model_settings: ModelSettings | None = None,
        overridable: Sequence[str] = (),
        required_scopes: Sequence[str] = (),
        toolsets: Sequence[StepToolset] = (),
        compensate: str | Activity | ActivityFunc | None = None,
        fallbacks: Sequence[str] = (),
        at_most_once: bool = False,
        reconcile: ReconcileFunc | None = None,
        version: str | None = None,
        after: Sequence[str] = (),
        requires: Sequence[str] = (),
        conflicts: Sequence[str] = (),
        max_per_plan: int | None = None,
        stream_progress: bool | OutputLimits = False,
        record: bool | int = True,
    ) -> None:
        resolved = name or agent.name
        if not resolved:
            raise UserError("AgentActivity needs a name: give the agent a name (Agent(..., name=...)) or pass name=")
        self.version = check_version(version, resolved)
        """The version of the step's code (see `activity`); None derives it from the module that built it."""
        self.defined_in: str | None = sys._getframe(1).f_globals.get("__name__")  # pyright: ignore[reportPrivateUsage]
        self.agent = agent
        self.prompt = prompt
        self.deps = deps
        self.usage_limits = usage_limits
        self.model_settings = model_settings
        self.overridable = check_overridable(resolved, overridable)
        self.toolsets: list[StepToolset] = list(toolsets)
        agent_description = getattr(agent, "description", None)
        self.rules = plan_rules(
            resolved, after=after, requires=requires, conflicts=conflicts, max_per_plan=max_per_plan
        )
        """Where the step may go in a plan (see `PlanRules`)."""
        self.compensation, compensate_name = _compensation_of(resolved, compensate)
        self.spec = _make_spec(
            resolved,
            description=description or (agent_description if isinstance(agent_description, str) else None),
            retry=retry,
            timeout=timeout,
            required_scopes=required_scopes,
            compensate=compensate_name,
            fallbacks=fallbacks,
            at_most_once=at_most_once,
        )
        self.reconcile = _reconcile_of(resolved, at_most_once, reconcile)
        self.output_key = output_key or resolved.replace("-", "_")
        self._run_output_type = run_output_type(agent, resolved)
        self.record_bytes = (DEFAULT_RECORD_BYTES if record else 0) if isinstance(record, bool) else record
        """The largest record of a run it keeps (see `record`); 0 records nothing."""
        self.output_limits = (
            stream_progress
            if isinstance(stream_progress, OutputLimits)
            else OutputLimits()
            if stream_progress
            else None
        )

    async def build_prompt(self, ctx: ActivityContext) -> str:
        """The user prompt for this step."""
        if self.prompt is None:
            variables = json.dumps(dict(ctx.payload), indent=2, sort_keys=True)
            return f"Workflow step {self.spec.name!r}. Workflow variables:\n{variables}"
        if isinstance(self.prompt, str):
            return self.prompt.format_map(_PayloadFormat({**ctx.payload, **ctx.arguments}, self.spec.name))
        prompt = self.prompt(ctx)
        return await prompt if inspect.isawaitable(prompt) else prompt

    async def build_deps(self, ctx: ActivityContext) -> Any:
        """The agent's deps for this step."""
        if self.deps is not None:
            deps = self.deps(ctx)
            return await deps if inspect.isawaitable(deps) else deps
        if getattr(self.agent, "deps_type", None) is ActivityContext:
            return ctx
        return None

    def build_toolsets(self, ctx: ActivityContext) -> list[AbstractToolset[Any]]:
        """The toolsets added to the agent's for this step."""
        return [item if isinstance(item, AbstractToolset) else item(ctx) for item in self.toolsets]

    async def run(self, ctx: ActivityContext) -> dict[str, JsonValue]:
        try:
            result = await self._run_agent(ctx)
        except (ModelAPIError, ExceptionGroup) as exc:
            signal = model_error_signal(exc, self.spec.name)
            if signal is None:
                raise
            raise signal from exc
        if isinstance(result.output, DeferredToolRequests):
            raise ParkWorkflow(result.conversation)
        try:
            output = to_jsonable_python(result.output)
        except PydanticSerializationError as exc:
            raise NonRetryableError(f"the output of {self.spec.name!r} cannot be stored as JSON: {exc}") from None
        if self.record_bytes > 0 and is_finite(output):  # a NaN output faults the step when the worker settles it
            ctx.records.append(record_step(ctx, result, output, self.output_key, max_bytes=self.record_bytes))
        return to_payload_update({self.output_key: output}, self.output_key, self.spec.name)

    async def _run_agent(self, ctx: ActivityContext) -> AgentRunResult[Any]:
        resume = ctx.message.resume
        conversation, results = resumed_run(resume) if resume is not None else (None, None)
        settings, limits = step_run_options(
            self.spec.name,
            ctx.correlation_id,
            self.model_settings,
            self.overridable,
            self.usage_limits,
            ctx.spec.model_settings,
            ctx.spec.usage_limits,
        )
        # Filled as the run goes, so that a run that raises still tells what it used. A resumed run goes on from its
        # conversation's usage (its limits count the whole step) and records only what it adds.
        start = copy(conversation.usage) if conversation is not None else RunUsage()
        limits = step_limits(ctx.message, limits, run_model_name((), getattr(self.agent, "model", None)), start)
        usage = copy(start)
        with capture_run_messages() as messages:
            try:
                return await self._start(ctx, conversation, results, settings, limits, usage)
            finally:
                model = run_model_name(messages, getattr(self.agent, "model", None))
                ctx.add_usage(usage_since(usage, start), model=model)

    async def _start(
        self,
        ctx: ActivityContext,
        conversation: Conversation | None,
        results: DeferredToolResults | None,
        settings: ModelSettings | None,
        limits: UsageLimits | None,
        usage: RunUsage,
    ) -> AgentRunResult[Any]:
        resume = ctx.message.resume
        return await self.agent.run(
            await self.build_prompt(ctx) if resume is None else None,
            output_type=self._run_output_type,
            # A resumed run continues the step's conversation, its id and the first run's `run_id` (passed as
            # pieces: the conversation's usage is the one given here).
            message_history=conversation.messages if conversation is not None else None,
            deferred_tool_results=results,
            deps=await self.build_deps(ctx),  # pyright: ignore[reportArgumentType]
            conversation_id=ctx.correlation_id if conversation is None else conversation.conversation_id,
            run_id=f"{ctx.correlation_id}:{ctx.step}" + (f":resume-{resume.count}" if resume is not None else ""),
            usage_limits=limits,
            model_settings=settings,
            usage=usage,
            toolsets=self.build_toolsets(ctx) or None,
            metadata={
                "correlation_id": ctx.correlation_id,
                "activity": self.spec.name,
                "attempt": ctx.attempt,
            },
            event_stream_handler=(
                ctx.progress.handler(self.output_limits)
                if ctx.progress is not None and self.output_limits is not None
                else None
            ),
        )

    def __repr__(self) -> str:
        return f"AgentActivity({self.spec.name!r})"
