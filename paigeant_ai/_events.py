"""Workflow events: their wire type (`WorkflowEvent`, published on `events`), and the one reporter that the
worker, the dispatcher and the command line tell them through.

An event goes to four places: the `on_event` callbacks of the process, the span of the hop that produced it
(see `observability.record_event`), and (unless publishing is off) the transport's `events` address, where a
`WorkflowProjector` in any process feeds them to a `WorkflowStore`, and its workflow's progress stream, where
`WorkflowDispatcher.watch` reads them (see `paigeant_ai._progress_write`, written in the background).

Events are a projection, not part of the workflow. A worker batches them off the hop's path; an event that must
be safe before a hop is acked (the `completed` event, the only home of a workflow's result) is published at once,
after the batch before it so that the workflow's events stay in order.

Each published batch is signed once by the reporter's `MessageSecurity` (see `paigeant_ai._event_auth`), so that
a store applies only events a trusted key reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, JsonValue, TypeAdapter
from pydantic_core import to_json

from . import observability
from ._escape import escape_control
from ._ledger import usage_if_any
from ._progress_write import ProgressWriter
from ._step_record import StepRecord
from ._usage import Usage
from ._wire import FROM_WIRE
from .contracts import EVENTS, WIRE_VERSION, PaigeantMessage, Wire, utcnow
from .transports.base import Transport

if TYPE_CHECKING:
    from .security import MessageSecurity

EventKind = Literal[
    "dispatched",
    "step_started",
    "step_completed",
    "step_retried",
    "step_failed",
    "step_skipped",
    "completed",
    "faulted",
    "rejected",
    "revised",
    "waiting",
    "resumed",
    "replayed",
    "cancel_requested",
    "cancelled",
    "expired",
    "compensating",
    "compensated",
    "compensation_failed",
    "in_doubt",
    "budget_exhausted",
    "reconciled",
    "fanned_out",
    "joined",
    "agent_output",
]
"""What a `WorkflowEvent` reports; `replayed` is a step sent again from the dead-letter queue.

A workflow that stops before its end (`faulted`, `cancelled`, `expired`) with completed steps to undo goes on with
`compensating`, the compensations as steps (their events name the step they undo in `undoes`), and ends
`compensated` or `compensation_failed`. An at-most-once step found started and not finished is `reconciled` (it
completes without running) or parks the workflow `in_doubt` until a person says whether it ran. A workflow whose
budget is spent parks `budget_exhausted` until it is resumed with more (or cancelled). A parallel group
reports `fanned_out` when its branches are sent and `joined` when the step after it is; its branches' step events
name their `branch`. `agent_output` carries what a step's agent said or did as it ran (`AgentActivity(...,
stream_progress=True)`): it goes only to the workflow's progress stream."""


class WorkflowEvent(Wire):
    """One thing that happened to a workflow, as workers report it (published on `events`).

    `detail` explains retries, faults and rejections; `payload` is the final payload of a completed workflow.
    Events never carry tokens or signatures.
    """

    v: Literal[1] = WIRE_VERSION
    kind: EventKind
    correlation_id: str | None
    activity: str | None = None
    step: int | None = None
    attempt: int = 0
    message_id: str | None = None
    at: datetime = Field(default_factory=utcnow)
    detail: str | None = None
    duration: float | None = None
    payload: dict[str, JsonValue] | None = None
    remaining: list[str] | None = None
    """The names of the steps still to run when it happened, the current one first (`None`: not known)."""
    owner: str | None = None
    """On a `dispatched` event: the principal that dispatched the workflow (see `WorkflowStatus.owner`)."""
    undoes: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """On the events of a compensation: the completed step it undoes (`step` is that step's index)."""
    by: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """On `cancel_requested` and `cancelled`: who cancelled the workflow."""
    deadline: datetime | None = Field(default=None, exclude_if=lambda value: value is None)
    """On `dispatched`: when the workflow expires (it then ends `expired`)."""
    timeout: float | None = Field(default=None, exclude_if=lambda value: value is None)
    """On `step_started`: the seconds the attempt may run."""
    branch: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """On the events of a parallel group's branch: its key (`step` is the group's index)."""
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)
    """On the events that end a step, a workflow or its undoing, and on a wait: what the workflow used so far, as
    the slip at that point tells (see `workflow_usage`); left out while nothing was used."""
    version: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """On `step_started` and `step_completed`: the version of the activity that ran it; on `waiting`, for a step
    pinned to versions no worker that took it has, the range it waits for."""
    part: Literal["text", "tool_call", "tool_result", "note"] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    """On `agent_output`: what `detail` holds: streamed text, a tool call, a tool's result, or a note."""
    record: StepRecord | None = Field(default=None, exclude_if=lambda value: value is None)
    """On `step_completed` of an agent step: what it saw and produced (see `AgentActivity(record=...)`)."""


_WITH_USAGE = frozenset(
    {
        *("step_completed", "joined", "waiting", "in_doubt", "budget_exhausted"),
        *("completed", "faulted", "cancelled", "expired", "compensated", "compensation_failed"),
    }
)
"""The events that carry the workflow's usage so far: the ones that end a step, or it, or its undoing, or park it."""

_EVENT_BATCH = TypeAdapter(list[WorkflowEvent])


def decode_events(body: bytes | str) -> list[WorkflowEvent]:
    """The events of one `events` message: a JSON array of events, or a single event.

    Raises:
        ValidationError: The body is neither.
    """
    text = body.lstrip()[:1]
    if text in (b"[", "["):
        return _EVENT_BATCH.validate_json(body, context=FROM_WIRE)
    return [WorkflowEvent.model_validate_json(body, context=FROM_WIRE)]


__all__ = ("EventCallback", "EventKind", "EventReporter", "WorkflowEvent", "decode_events")

logger = logging.getLogger("paigeant_ai.events")

EventCallback = Callable[[WorkflowEvent], Awaitable[None] | None]
"""Called, sync or async, with every event a worker or dispatcher reports."""

_DEFAULTS: dict[str, Any] = {
    name: field.default
    for name, field in WorkflowEvent.model_fields.items()
    if not field.is_required() and field.default_factory is None and field.exclude_if is None
} | {"correlation_id": None}


class EventReporter:
    """Reports events to callbacks, the current hop's span and the broker.

    Args:
        transport: Where events are published.
        on_event: A callback or callbacks for every event.
        publish: Publish events on the transport's `events` address.
        batched: Gather events and publish them a batch at a time (a worker); otherwise each is published at
            once, and a failure to publish is logged (a dispatcher, the command line).
        on_span: Note each event on the span of the hop that runs (a worker's own events). A dispatcher's are
            not: one called inside a step reports another workflow, which is not that hop's.
        security: Signs each published batch (one signature a batch); without it, or unsigned, batches go
            out unsigned and a store that checks signatures refuses them.
    """

    def __init__(
        self,
        transport: Transport,
        on_event: EventCallback | Sequence[EventCallback] | None = None,
        *,
        publish: bool = True,
        batched: bool = True,
        on_span: bool = True,
        security: MessageSecurity | None = None,
    ) -> None:
        self.transport = transport
        self.security = security
        if on_event is None:
            self.callbacks: list[EventCallback] = []
        elif callable(on_event):
            self.callbacks = [on_event]
        else:
            self.callbacks = list(on_event)
        self.publish = publish
        self._batch = _EventBatcher(transport, security) if batched else None
        self.on_span = on_span
        self.progress = self._batch.progress if self._batch is not None else _progress_writer(transport, security)

    async def report(
        self, kind: EventKind, message: PaigeantMessage | None, *, now: bool = False, **fields: Any
    ) -> None:
        """Report an event about `message` (None: a message nothing of which is trusted).

        Args:
            kind: What happened.
            message: The hop it happened to; its workflow, step, attempt and route fill the event.
            now: Publish it before returning (after what is batched), raising `TransportError` on failure.
            **fields: Other `WorkflowEvent` fields, over those taken from `message`.
        """
        values = _values(kind, message, fields)
        if self.publish:
            if self._batch is not None and not now:
                self._batch.add(values)  # the usual case, on every hop: no await
            else:
                await self._publish(values, now=now)
        on_span = self.on_span and observability.tracing_enabled()
        if not self.callbacks and not on_span:
            return  # nobody here reads the event: building the model on every hop would only cost time
        # Every field comes from the reporter's own, already valid values: no need to validate them again.
        event = WorkflowEvent.model_construct(**values)
        if on_span:
            observability.record_event(event)
        for callback in self.callbacks:
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "an on_event callback failed for the %s event of %s",
                    kind,
                    escape_control(str(event.correlation_id)),
                )

    def report_progress(self, kind: EventKind, message: PaigeantMessage, **fields: Any) -> None:
        """Send an event to its workflow's progress stream only, in the background (not to `events`, the
        callbacks or the span): what a running step says as it goes."""
        if self.publish:
            if self._batch is not None:
                self._batch.form()  # the events reported before it go into the stream before it
            values = _values(kind, message, fields)
            body = to_json([values])
            self.progress.add([values], body, events_headers(self.security, body))

    async def _publish(self, values: dict[str, Any], *, now: bool) -> None:
        body = to_json([values])
        headers = events_headers(self.security, body)
        if self._batch is not None:
            await self._batch.flush()  # keep the workflow's events in order
            self.progress.add([values], body, headers)  # in the background, after the batch before it
            await self.transport.publish(EVENTS, body, headers=headers)
            return
        try:
            await self.transport.publish(EVENTS, body, headers=headers)
        except Exception:
            if now:
                raise
            logger.warning(
                "could not publish the %s event of %s",
                values["kind"],
                escape_control(str(values["correlation_id"])),
                exc_info=True,
            )
        await self.progress.write([values], body, headers)

    async def flush(self) -> None:
        """Publish what is waiting in the batch, now, and write what waits for the progress streams."""
        if self._batch is not None:
            await self._batch.flush()
        await self.progress.flush()


def _values(kind: EventKind, message: PaigeantMessage | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The values of an event about `message`: its workflow, step, attempt and route, then `fields`."""
    values: dict[str, Any] = {**_DEFAULTS, "kind": kind, "at": datetime.now(UTC)}
    if message is not None:
        values["correlation_id"] = message.correlation_id
        values["activity"] = message.routing_slip.current
        values["step"] = message.step
        values["attempt"] = message.attempt
        values["message_id"] = message.message_id
        values["remaining"] = [spec.name for spec in message.routing_slip.itinerary]
        if message.routing_slip.branch is not None:
            values["branch"] = message.routing_slip.branch
    if kind in _WITH_USAGE and message is not None and (used := usage_if_any(message)) is not None:
        values["usage"] = used
    values.update(fields)
    return values


class _EventBatcher:
    """Publishes events in batches (one message a batch), off the hop's path.

    A hop reports two or three events; publishing each on its own would cost as many broker round trips as the
    step itself. A batch that cannot be published is logged and dropped, and at most `interval` seconds of
    events are lost when a process dies. A running step's output (`report_progress`) forms the batch that waits
    first, so that in the progress stream it follows the events reported before it.
    """

    def __init__(
        self, transport: Transport, security: MessageSecurity | None, *, interval: float = 0.05, max_batch: int = 500
    ) -> None:
        self.transport = transport
        self.security = security
        self.interval = interval
        self.max_batch = max_batch
        self._pending: list[dict[str, Any]] = []
        self._formed: deque[tuple[int, bytes, dict[str, str] | None]] = deque()
        """Batches in the progress streams already, still to publish on `events` (their size, body and headers)."""
        self._task: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._sending = asyncio.Lock()
        """Held while batches go to the broker, one at a time and in order: a flush waits for it, whoever sends."""
        self.progress = _progress_writer(transport, security)

    def add(self, event: dict[str, Any]) -> None:
        """Queue an event, given as the values of a `WorkflowEvent`."""
        self._pending.append(event)
        if len(self._pending) >= self.max_batch:
            self._full.set()
        self._run_soon()

    def form(self) -> None:
        """Make what waits a batch now: into the progress streams at once, ahead of what is written after it (a
        running step's output), and on `events` in the background, in order."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        body = to_json(batch)  # the array `decode_events` reads
        headers = events_headers(self.security, body)
        self.progress.add(batch, body, headers)
        self._formed.append((len(batch), body, headers))
        self._full.set()
        self._run_soon()

    def _run_soon(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="paigeant-events")

    async def _run(self) -> None:
        while self._pending or self._formed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._full.wait()
            await self._publish()

    async def _publish(self) -> None:
        self.form()
        self._full.clear()
        async with self._sending:  # a batch another caller is sending goes out first, and this waits for it
            while self._formed:
                size, body, headers = self._formed.popleft()
                try:
                    await self.transport.publish(EVENTS, body, headers=headers)
                except Exception:
                    logger.warning("could not publish %d workflow events", size, exc_info=True)

    async def flush(self) -> None:
        """Publish what is waiting, now, and return once every batch taken before is sent (or failed).

        A batch may be on its way from another flush rather than the background task (events that came as the
        task ended); an event published after the flush must not overtake it.
        """
        if self._task is not None and not self._task.done():
            self._full.set()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._publish()


EVENTS_SIGNATURE_TYPE = "paigeant-events+jws"
"""The `typ` of a batch's signature: a hop's signature can never pass for one, nor the other way round."""
EVENTS_SIGNATURE_HEADER = "x-paigeant-events-signature"
"""The header a batch's detached signature travels in."""


def events_headers(security: MessageSecurity | None, body: bytes) -> dict[str, str] | None:
    """The headers that sign `body`, a batch of events; None when nothing signs (no signer, or unsigned)."""
    if security is None:
        return None
    signature = security.sign_bytes(body, typ=EVENTS_SIGNATURE_TYPE)
    return {EVENTS_SIGNATURE_HEADER: signature} if signature else None


def _progress_writer(transport: Transport, security: MessageSecurity | None) -> ProgressWriter:
    """What writes the reporter's batches into the workflows' progress streams, signing a batch split there."""
    return ProgressWriter(transport, security)
