"""`WorkflowStore`: the status and history of each workflow by correlation ID, projected from its events.

A store is a projection, not an orchestrator: workflows run the same without one. Feed it the `WorkflowEvent`s
workers and dispatchers report, in process (`Worker(..., on_event=store.apply)`) or from the `events` address
of a transport (`WorkflowProjector`), and ask it where a workflow is, what happened to it, and why it failed.

The status is computed from the events each time it is read, ordered by when they happened, so events that
arrive late or twice (several processes, at-least-once delivery) give the same answer. Events cannot tell that
nobody serves the step a workflow waits at: `mark_stalled` asks the transport.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, JsonValue

from ._events import WorkflowEvent
from ._ledger import most_used
from ._projector import WorkflowProjector
from ._usage import Usage
from ._wire import assume_utc
from .exceptions import UserError
from .transports.base import ConsumerWatch, SharedStores

if TYPE_CHECKING:
    from .security import MessageSecurity
    from .transports.base import Transport

__all__ = (
    "InMemoryWorkflowStore",
    "StepStatus",
    "WorkflowProjector",
    "WorkflowState",
    "WorkflowStatus",
    "WorkflowStore",
    "get_workflow_store",
    "mark_stalled",
    "project",
)

logger = logging.getLogger("paigeant_ai.store")

WorkflowState = Literal[
    "pending",
    "running",
    "waiting",
    "in_doubt",
    "budget_exhausted",
    "stalled",
    "completed",
    "faulted",
    "compensating",
    "compensated",
    "compensation_failed",
    "cancelled",
    "expired",
]
"""Where a workflow is. It ends `completed` (early too, by `EndWorkflow`), or stops: `faulted`, `cancelled` or
`expired`, and, with completed steps to undo, goes through `compensating` to `compensated` (a fault undone),
`cancelled`, `expired`, or `compensation_failed` (a compensation failed for good)."""
FINAL_STATES: frozenset[str] = frozenset(
    {"completed", "faulted", "compensated", "compensation_failed", "cancelled", "expired"}
)
"""The states a workflow never leaves."""
StepState = Literal["running", "retrying", "waiting", "in_doubt", "budget_exhausted", "completed", "failed"]

DEFAULT_MAX_EVENTS = 1000
"""Events kept per workflow; past it the oldest are forgotten."""


class StepStatus(BaseModel):
    """One step of a workflow as its events tell it."""

    step: int
    activity: str
    state: StepState
    attempts: int = 0
    """How many attempts started (retries and replays included)."""
    started_at: datetime | None = None
    """When the first attempt started."""
    finished_at: datetime | None = None
    """When it completed or failed for good."""
    duration: float | None = None
    """Seconds the successful attempt ran."""
    error: str | None = None
    """Why the last failed attempt failed (or what the step waits for)."""
    timeout: float | None = Field(default=None, exclude_if=lambda value: value is None)
    """Seconds its latest attempt may run (cut short to the workflow's deadline)."""
    undoes: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a compensation: the completed step it undoes (`step` is that step's index)."""
    branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """For a branch of a parallel group: its key (`step` is the group's index; its branches are side by side)."""
    version: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """The version of the activity that ran its latest attempt (see `activity(version=...)`)."""


class WorkflowStatus(BaseModel):
    """Where a workflow is and how it got there."""

    correlation_id: str
    state: WorkflowState
    current_step: int | None = None
    """The index of the step running, waiting or due next; `None` once the workflow ended."""
    current_activity: str | None = None
    steps: list[StepStatus] = Field(default_factory=list[StepStatus])
    remaining: list[str] = Field(default_factory=list[str])
    """The steps still to run, the current one first, as the latest event that knew them said."""
    started_at: datetime
    updated_at: datetime
    payload: dict[str, JsonValue] | None = None
    """The final payload of a completed workflow."""
    failure: str | None = None
    """Why a faulted workflow failed."""
    ended: str | None = None
    """Why a completed workflow ended early, when a step ended it (`EndWorkflow`)."""
    waiting_for: str | None = None
    """What a waiting workflow waits for."""
    deadline: datetime | None = Field(default=None, exclude_if=lambda value: value is None)
    """When the workflow expires: it then ends `expired` and its completed steps are undone."""
    cancelled: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """Who cancelled the workflow and why (once a cancel was requested, then once it took effect)."""
    compensation: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """What its compensations undo, or undid, once the workflow stopped with completed steps to undo."""
    stalled: str | None = Field(default=None, exclude_if=lambda reason: reason is None)
    """Why a stalled workflow does not move: no worker consumes its current step (see `mark_stalled`)."""
    owner: str | None = Field(default=None, exclude_if=lambda owner: owner is None)
    """The principal that dispatched it, from its earliest `dispatched` event (see `WorkflowDispatcher`), kept by
    the store once known even when that event is trimmed; the planner shows a workflow only to its owner, and one
    whose owner is unknown (None) to nobody."""
    usage: Usage | None = Field(default=None, exclude_if=lambda usage: usage is None)
    """What the workflow used so far, over all its steps, attempts and compensations: the largest total its events
    told (each tells its slip's; a parallel group's branches each tell their own); `None` until one used any."""
    events: list[WorkflowEvent] = Field(default_factory=list[WorkflowEvent])
    """The history, oldest first."""


_STOPS = frozenset(
    {"cancel_requested", "faulted", "cancelled", "expired", "compensating", "compensated", "compensation_failed"}
)
_STEP_KINDS = frozenset(
    {
        "step_started",
        "step_completed",
        "step_retried",
        "step_failed",
        "waiting",
        "in_doubt",
        "budget_exhausted",
        "rejected",
    }
)
"""The events that tell a step's story; the others only mention it."""
_RANK = {
    "dispatched": 0,
    "step_started": 1,
    "completed": 3,
    "faulted": 3,
    "rejected": 3,
    "cancelled": 3,
    "expired": 3,
    "compensating": 4,
    "compensated": 5,
    "compensation_failed": 5,
}
_UNDONE: dict[str, WorkflowState] = {"faulted": "compensated", "cancelled": "cancelled", "expired": "expired"}
"""The state a workflow that stopped for a cause ends in once its compensations ran."""


def event_order(event: WorkflowEvent) -> tuple[datetime, int]:
    """The sort key of `event`: when it happened, then its rank, so that events of one instant keep their
    causal order (a step's events come before the workflow's outcome)."""
    return event.at, _RANK.get(event.kind, 2)


class _Projection:
    def __init__(self, correlation_id: str, first: WorkflowEvent) -> None:
        self.status = WorkflowStatus(
            correlation_id=correlation_id, state="pending", started_at=first.at, updated_at=first.at
        )
        self.steps: dict[tuple[int, str, str | None], StepStatus] = {}
        self.cause = "faulted"
        self.unwinding = False
        """A `compensating` event was seen: the steps that run from then on undo the workflow."""
        self.undone: str | None = None
        """How the undoing ended (`compensated`, `compensation_failed`), once an event said so: a stop reported
        later by another process (its clock a little ahead) cannot reopen it."""

    def step(self, event: WorkflowEvent) -> StepStatus | None:
        if event.step is None or event.activity is None:
            return None
        key = (event.step, event.activity, event.branch)
        record = self.steps.get(key)
        if record is None and event.kind in _STEP_KINDS:
            record = self.steps[key] = StepStatus(
                step=event.step, activity=event.activity, state="running", branch=event.branch
            )
        return record

    def apply(self, event: WorkflowEvent) -> None:
        status = self.status
        status.updated_at = max(status.updated_at, event.at)
        if event.remaining is not None:
            status.remaining = list(event.remaining)
        if event.usage is not None:
            status.usage = most_used(status.usage, event.usage)
        kind = event.kind
        record = self.step(event) if kind != "dispatched" else None
        if kind == "dispatched" and status.owner is None:
            status.owner = event.owner  # the earliest dispatch names the owner; a later one cannot change it
        if kind == "dispatched" and event.deadline is not None:
            status.deadline = event.deadline
        if record is not None and event.undoes is not None:
            record.undoes = event.undoes
        if record is not None and event.version is not None and kind != "waiting":
            record.version = event.version
        if kind in _STOPS:
            self._stop(event)
        elif kind == "step_started" and record is not None:
            record.state, record.timeout = "running", event.timeout
            record.attempts = max(record.attempts, event.attempt + 1)
            record.started_at = record.started_at or event.at
            record.finished_at = None
            self._running()
        elif kind == "step_completed" and record is not None:
            record.state, record.finished_at, record.duration = "completed", event.at, event.duration
            record.attempts = max(record.attempts, event.attempt + 1)
        elif kind == "step_retried" and record is not None:
            record.state, record.error = "retrying", event.detail
        elif kind == "step_failed" and record is not None:
            record.state, record.error, record.finished_at = "failed", event.detail, event.at
        elif kind in ("waiting", "in_doubt", "budget_exhausted"):  # each waits for a person
            if record is not None:
                record.state, record.error = kind, event.detail
            status.state, status.waiting_for = kind, event.detail
        elif kind == "resumed" and status.state in FINAL_STATES:
            pass  # a resume that came too late (its step had settled): the skipped copy changes nothing
        elif kind in ("resumed", "replayed"):
            if record is not None and record.state in ("waiting", "in_doubt", "budget_exhausted"):
                record.state, record.error = "running", None
            self._running()
        elif kind == "completed":
            status.state, status.payload, status.remaining = "completed", event.payload, []
            status.failure = status.waiting_for = None
            status.ended = event.detail
        elif kind == "rejected" and status.state not in FINAL_STATES:
            if record is not None:
                record.state, record.error, record.finished_at = "failed", event.detail, event.at
            status.state, status.failure = "faulted", f"rejected: {event.detail}"

    def _running(self) -> None:
        if self.undone == "compensated":  # a late branch's own undoing, after the rest: the workflow stays undone
            return
        if self.unwinding:  # a compensation's step: the workflow still unwinds, and keeps why it stopped
            self.status.state, self.status.waiting_for = "compensating", None
            return
        self.status.state = "running"
        self.status.failure = self.status.waiting_for = None

    def _stop(self, event: WorkflowEvent) -> None:
        """The events of a workflow that stops before its end, and of its compensations."""
        status, kind = self.status, event.kind
        if kind == "cancel_requested":
            if status.state in FINAL_STATES or self.unwinding:  # too late: it changes nothing, so it says nothing
                return
            status.cancelled = f"requested by {event.by or 'an unnamed service'}" + (
                f": {event.detail}" if event.detail else ""
            )
            return
        status.waiting_for = None
        if kind == "faulted":
            self.cause, status.state, status.failure = "faulted", "faulted", event.detail
        elif kind == "cancelled":
            self.cause, status.state, status.cancelled = "cancelled", "cancelled", event.detail
        elif kind == "expired":
            self.cause, status.state, status.failure = "expired", "expired", event.detail
        elif kind == "compensating":
            status.state, status.compensation, self.unwinding = "compensating", event.detail, True
        elif kind == "compensated":
            status.payload, status.compensation, self.undone = event.payload, event.detail, kind
        elif kind == "compensation_failed":
            status.failure, self.undone = event.detail, kind
        if self.undone == "compensated":
            status.state = _UNDONE.get(self.cause, "compensated")
        elif self.undone == "compensation_failed":
            status.state = "compensation_failed"

    def finish(self, events: list[WorkflowEvent]) -> WorkflowStatus:
        status = self.status
        status.steps = sorted(self.steps.values(), key=lambda record: record.step)
        status.events = events
        if status.state in FINAL_STATES:
            status.current_step = status.current_activity = None
            return status
        open_steps = [record for record in status.steps if record.state not in ("completed", "failed")]
        if open_steps:
            status.current_step, status.current_activity = open_steps[-1].step, open_steps[-1].activity
        elif status.remaining:
            done = [record.step for record in status.steps if record.state == "completed"]
            status.current_step = max(done) + 1 if done else 0
            status.current_activity = status.remaining[0]
        return status


def project(correlation_id: str, events: Iterable[WorkflowEvent]) -> WorkflowStatus | None:
    """The status of the workflow `correlation_id` told by `events`, in any order; `None` without events."""
    ordered = sorted((event for event in events if event.correlation_id == correlation_id), key=event_order)
    if not ordered:
        return None
    projection = _Projection(correlation_id, ordered[0])
    for event in ordered:
        projection.apply(event)
    return projection.finish(ordered)


async def mark_stalled(
    statuses: Iterable[WorkflowStatus],
    transport: Transport,
    *,
    after: float = 60.0,
    now: datetime | None = None,
    security: MessageSecurity | None = None,
) -> list[WorkflowStatus]:
    """`statuses`, with each workflow whose current step has had no consumer for `after` seconds `stalled`.

    A pending or running workflow is stalled when the transport (a `ConsumerWatch`) says nobody consumes its
    current step now, and nothing has happened to it since: neither an event of the workflow nor a consumer of
    the step (where the transport knows when it last saw one) in the last `after` seconds. A transport that cannot
    tell leaves every status as it is. The transport is asked once per step.

    Where the transport keeps a registry of live workers (`Advertising`) that knows the step, the registry answers
    instead (verified with `security`, by default the `PAIGEANT_*` keys): a workflow is stalled once the workers of
    its current step have been silent two heartbeats, one to two after the last one died (see `paigeant_ai._stalls`).
    """
    statuses = list(statuses)
    judged = await _judged_by_registry(statuses, transport, security)
    if not isinstance(transport, ConsumerWatch):
        return [verdict or status for status, verdict in zip(statuses, judged, strict=True)]
    now = now or datetime.now(UTC)
    unserved: dict[str, datetime | None] = {}
    marked: list[WorkflowStatus] = []
    for status, verdict in zip(statuses, judged, strict=True):
        if verdict is not None:
            marked.append(verdict)
            continue
        activity = status.current_activity
        if status.state not in ("pending", "running", "compensating") or activity is None:
            marked.append(status)
            continue
        if activity not in unserved:
            unserved[activity] = await _unserved_since(transport, activity)
        since = unserved[activity]
        idle = (now - max(since, assume_utc(status.updated_at))).total_seconds() if since is not None else 0.0
        if idle < after:
            marked.append(status)
            continue
        reason = f"no worker consumes {activity!r} for {_span(idle)}"
        marked.append(status.model_copy(update={"state": "stalled", "stalled": reason}))
    return marked


_NEVER = datetime.min.replace(tzinfo=UTC)


async def _judged_by_registry(
    statuses: list[WorkflowStatus], transport: Transport, security: MessageSecurity | None
) -> list[WorkflowStatus | None]:
    """What the registry of `transport` says of each status (see `paigeant_ai._stalls`); all None without one."""
    from ._registry import read_registry
    from ._stalls import judged_by_registry
    from .exceptions import TransportError

    try:
        registry = await read_registry(transport, security)
    except (UserError, TransportError):  # no keys here to verify it with, or it cannot be read: ask who consumes
        registry = None
    return judged_by_registry(statuses, registry) if registry is not None else [None] * len(statuses)


async def _unserved_since(transport: ConsumerWatch, activity: str) -> datetime | None:
    """Since when `activity` has had no consumer (`_NEVER` if it never had one); `None` if it has, or unknown."""
    count = await transport.consumers(activity)
    if count is None or count > 0:
        return None
    return await transport.last_consumed(activity) or _NEVER


def _span(seconds: float) -> str:
    """`seconds` as people say it: 45s, 3m, 5h, 2d."""
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 2 * 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


@runtime_checkable
class WorkflowStore(Protocol):
    """The status and history of workflows by correlation ID, fed with their events."""

    async def apply(self, event: WorkflowEvent) -> None:
        """Record `event`; applying the same event twice changes nothing."""
        ...

    async def get(self, correlation_id: str) -> WorkflowStatus | None:
        """The status of one workflow, or `None` if the store has never heard of it."""
        ...

    async def list(self, *, limit: int = 20) -> Sequence[WorkflowStatus]:
        """The most recently updated workflows, newest first."""
        ...


def check_store_limits(*, max_workflows: int, max_events: int, ttl: float | None = None) -> None:
    """Raise the `UserError` a workflow store raises for limits it cannot keep (every store checks the same)."""
    if ttl is not None and ttl <= 0:
        raise UserError("ttl must be a positive number of seconds")
    if max_workflows < 1 or max_events < 1:
        raise UserError("max_workflows and max_events must be at least 1")


class InMemoryWorkflowStore:
    """A store in this process's memory: the latest `max_workflows` workflows, `max_events` events each.

    `Worker(..., on_event=store.apply)` feeds it directly; `WorkflowProjector` feeds it from a transport.
    """

    def __init__(self, *, max_workflows: int = 10_000, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        check_store_limits(max_workflows=max_workflows, max_events=max_events)
        self.max_workflows = max_workflows
        self.max_events = max_events
        self._events: OrderedDict[str, dict[str, WorkflowEvent]] = OrderedDict()
        self._owners: dict[str, tuple[datetime, str]] = {}
        """Each workflow's owner and when it was dispatched: kept when the `dispatched` event is trimmed."""

    async def apply(self, event: WorkflowEvent) -> None:
        correlation_id = event.correlation_id
        if correlation_id is None:
            return  # a message so broken its workflow is unknown: only the dead-letter queue has it
        events = self._events.get(correlation_id)
        if events is None:
            events = self._events[correlation_id] = {}
        self._events.move_to_end(correlation_id)
        events[event.model_dump_json()] = event
        owner = self._owners.get(correlation_id)
        if event.kind == "dispatched" and event.owner is not None and (owner is None or event.at < owner[0]):
            self._owners[correlation_id] = (event.at, event.owner)  # the earliest dispatch names the owner
        if len(events) > self.max_events:
            oldest = min(events, key=lambda key: event_order(events[key]))
            del events[oldest]
        if len(self._events) > self.max_workflows:
            evicted, _ = self._events.popitem(last=False)
            self._owners.pop(evicted, None)

    async def get(self, correlation_id: str) -> WorkflowStatus | None:
        events = self._events.get(correlation_id)
        return with_owner(
            project(correlation_id, events.values()) if events else None, self._owners.get(correlation_id)
        )

    async def list(self, *, limit: int = 20) -> Sequence[WorkflowStatus]:
        found: list[WorkflowStatus] = []
        for correlation_id in reversed(self._events):
            if len(found) >= limit:
                break
            status = await self.get(correlation_id)
            if status is not None:
                found.append(status)
        return found

    async def ids_starting_with(self, prefix: str) -> list[str]:
        """The correlation IDs of the kept workflows that start with `prefix`, sorted."""
        return sorted(correlation_id for correlation_id in self._events if correlation_id.startswith(prefix))


def with_owner(status: WorkflowStatus | None, owner: tuple[datetime, str] | None) -> WorkflowStatus | None:
    """`status` with the owner its store kept (from the earliest `dispatched` event, which may have been trimmed)."""
    if status is not None and owner is not None:
        status.owner = owner[1]
    return status


def get_workflow_store(transport: Transport) -> WorkflowStore:
    """The workflow store that fits `transport`: the one its processes share if it offers `SharedStores` (on
    Redis a `RedisWorkflowStore` on its connection, on SQLite one in its file), else one in this process's memory.

    ```python
    store = get_workflow_store(transport)
    worker = Worker(transport, activities, on_event=store.apply)  # or WorkflowProjector(transport, store)
    ```
    """
    return transport.workflow_store() if isinstance(transport, SharedStores) else InMemoryWorkflowStore()
