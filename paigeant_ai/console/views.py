"""What the console's pages show, read from the stores and streams the command line reads; no HTTP here.

Everything shown came from workflows (payloads, reasons, tool arguments): the templates escape it as HTML, and
payloads have what looks like a secret redacted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import JsonValue
from pydantic_ai import ConversationTypeAdapter
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from .._cli_dead_letters import DeadLetter, browse_dead_letters
from .._cli_workflows import _describe  # pyright: ignore[reportPrivateUsage]
from .._escape import escape_control
from .._events import WorkflowEvent
from .._ledger import describe_usage
from .._step_record import REDACTED, StepRecord
from ..approval import ParkedStep, PendingToolCall
from ..store import FINAL_STATES, StepStatus, WorkflowStatus
from ..transports import Transport

__all__ = (
    "LetterView",
    "Request",
    "Row",
    "StepSeen",
    "TimelineRow",
    "WorkflowView",
    "age",
    "dead_letters",
    "redact",
    "requests",
    "rows",
    "step_records",
    "timeline",
    "workflow_view",
)

_SECRET = re.compile(
    r"secret|token|passw|pwd|api[_-]?key|auth(?!or)|bearer|credential|private|cookie|session|signature", re.I
)


def redact(value: Any) -> Any:
    """`value` with the value of every key that names a secret (token, password, api_key, ...) replaced."""
    if isinstance(value, dict):
        return {key: REDACTED if _SECRET.search(str(key)) else redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def pretty(value: JsonValue | dict[str, Any] | None) -> str:
    """`value`, redacted, as indented JSON for a page."""
    return json.dumps(redact(value), indent=2, sort_keys=True, ensure_ascii=False, default=str)


def age(at: datetime, now: datetime | None = None) -> str:
    """How long ago `at` was, in the largest unit that fits: `12s`, `5m`, `3h`, `2d`."""
    seconds = max(0, int(((now or datetime.now(UTC)) - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- the list ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One workflow in the list."""

    correlation_id: str
    state: str
    step: str
    note: str
    age: str
    usage: str
    ended: bool


def _note(status: WorkflowStatus) -> str:
    note = status.stalled or status.cancelled or status.failure or status.waiting_for or status.ended or ""
    return escape_control(note if len(note) <= 100 else note[:97] + "...")


def rows(statuses: Sequence[WorkflowStatus], *, state: str = "", activity: str = "", prefix: str = "") -> list[Row]:
    """The list's rows: the workflows in `state` (`active` for those still going, `ended` for the others), whose
    current or any step is `activity`, whose ID starts with `prefix`."""
    shown: list[Row] = []
    for status in statuses:
        ended = status.state in FINAL_STATES
        if (state == "active" and ended) or (state == "ended" and not ended):
            continue
        if state not in ("", "active", "ended") and status.state != state:
            continue
        if activity and activity != status.current_activity and all(s.activity != activity for s in status.steps):
            continue
        if prefix and not status.correlation_id.startswith(prefix.strip()):
            continue
        where = f"{status.current_step} {status.current_activity}" if status.current_activity else ""
        usage = describe_usage(status.usage) if status.usage is not None else ""
        shown.append(
            Row(status.correlation_id, status.state, where, _note(status), age(status.started_at), usage, ended)
        )
    return shown


# -- one workflow -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TimelineRow:
    """One row of the timeline: a step, its parallel branches side by side, or a compensation."""

    step: int
    kind: str
    """`step`, `parallel` or `undo`."""
    cells: list[StepStatus]


def timeline(status: WorkflowStatus) -> list[TimelineRow]:
    """The steps as rows in the order they ran: a parallel group's branches in one row, compensations after."""
    forward: dict[int, TimelineRow] = {}
    undoing: list[TimelineRow] = []
    for step in status.steps:
        if step.undoes:
            undoing.append(TimelineRow(step.step, "undo", [step]))
            continue
        row = forward.setdefault(step.step, TimelineRow(step.step, "step", []))
        row.cells.append(step)
        if step.branch:
            row.kind = "parallel"
    undoing.sort(key=lambda row: -row.step)
    return [forward[index] for index in sorted(forward)] + undoing


@dataclass(frozen=True, slots=True)
class StepSeen:
    """What an agent step saw and produced, from its recorded `step_completed` (secrets redacted)."""

    payload: str | None
    """The payload the step saw."""
    output: str | None
    """Its output, as it put it in the payload under `output_key`."""
    output_key: str
    tools: list[str]
    """The tools its agent called, in order."""
    omitted: int | None
    """The record's size in bytes when it was too large to keep more than the tools called."""


StepKey = tuple[int, str, str | None]
"""A step's place in the timeline: its index, activity and branch."""


def _seen(record: StepRecord) -> StepSeen:
    if record.omitted is not None:
        return StepSeen(None, None, record.output_key, record.tool_calls, record.omitted)
    # the output sits under its key in the payload: redacted as the payload would redact it
    output = redact({record.output_key: record.output})[record.output_key]
    shown = json.dumps(output, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return StepSeen(pretty(record.inputs), escape_control(shown), record.output_key, record.tool_calls, None)


def step_records(status: WorkflowStatus) -> dict[StepKey, StepSeen]:
    """What each recorded agent step saw and produced (its latest report), by its place in the timeline."""
    found: dict[StepKey, StepSeen] = {}
    for event in status.events:
        if event.kind != "step_completed" or event.record is None or event.undoes is not None:
            continue
        if event.step is not None and event.activity:
            found[(event.step, event.activity, event.branch)] = _seen(event.record)
    return found


@dataclass(slots=True)
class EventLine:
    at: str
    offset: str
    kind: str
    text: str
    payload: str | None


@dataclass(slots=True)
class WorkflowView:
    """One workflow's page."""

    status: WorkflowStatus
    rows: list[TimelineRow]
    events: list[EventLine]
    revisions: list[str]
    usage: str
    payload: str | None
    trace_url: str | None
    parked: ParkedStep | None = None
    notes: list[str] = field(default_factory=list[str])
    seen: dict[StepKey, StepSeen] = field(default_factory=dict[StepKey, StepSeen])
    """What each recorded agent step saw and produced (see `step_records`)."""


def _event_line(event: WorkflowEvent, started: datetime) -> EventLine:
    offset = f"+{(event.at - started).total_seconds():.3f}s"
    payload = pretty(event.payload) if event.payload is not None and event.kind != "completed" else None
    return EventLine(f"{event.at:%H:%M:%S.%f}"[:-3], offset, event.kind, escape_control(_describe(event)), payload)


def workflow_view(status: WorkflowStatus, trace_url: str | None, parked: ParkedStep | None) -> WorkflowView:
    """What the page of one workflow shows; `trace_url` a template with `{correlation_id}`."""
    revisions = [escape_control(_describe(event)) for event in status.events if event.kind == "revised"]
    link = trace_url.replace("{correlation_id}", quote(status.correlation_id, safe="")) if trace_url else None
    return WorkflowView(
        status=status,
        rows=timeline(status),
        events=[_event_line(event, status.started_at) for event in status.events],
        revisions=revisions,
        usage=describe_usage(status.usage) if status.usage is not None else "",
        payload=pretty(status.payload) if status.payload is not None else None,
        trace_url=link,
        parked=parked,
        seen=step_records(status),
    )


# -- dead letters -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LetterView:
    """One dead letter as the console shows it."""

    message_id: str | None
    correlation_id: str | None
    step: str
    attempt: int
    source: str
    reason: str
    problem: str | None
    payload: str | None
    log: list[str]


def _letter_view(letter: DeadLetter) -> LetterView:
    message = letter.message
    reason, source = escape_control(letter.reason), escape_control(letter.source)
    if message is None:
        return LetterView(None, None, "", 0, source, reason, letter.problem, None, [])
    slip = message.routing_slip
    step = f"{message.step} {slip.current}" if slip.current else "no step left"
    log = [
        escape_control(
            f"{entry.name}: {entry.outcome} (attempt {entry.attempt + 1})" + (f": {entry.error}" * bool(entry.error))
        )
        for entry in slip.completed
    ]
    payload = pretty(dict(message.payload))
    return LetterView(
        message.message_id, message.correlation_id, step, message.attempt + 1, source, reason, None, payload, log
    )


async def dead_letters(transport: Transport, limit: int = 200) -> tuple[int, list[LetterView]]:
    """The oldest `limit` letters of the dead-letter queue (each put back where it was), and how many there are."""
    shown: list[LetterView] = []

    async def note(letter: DeadLetter) -> bool:
        if len(shown) < limit:
            shown.append(_letter_view(letter))
        return True

    total = await browse_dead_letters(transport, note)
    return total, shown


# -- approvals --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One tool call a parked workflow waits for a person to answer."""

    correlation_id: str
    activity: str
    step: int
    parked_at: str
    why: str
    call: PendingToolCall
    args: str
    task: str
    """What the agent was asked (the step's prompt)."""
    said: str
    """What the agent said as it asked for the call."""


def _words(parked: ParkedStep) -> tuple[str, str]:
    """The agent's task (its first prompt) and what it said last, from the signed conversation."""
    messages = ConversationTypeAdapter.validate_python(parked.conversation).messages
    prompts = [
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]
    said = ""
    for message in reversed(messages):
        if isinstance(message, ModelResponse):
            said = " ".join(part.content for part in message.parts if isinstance(part, TextPart)).strip()
            break
    return escape_control(prompts[0] if prompts else ""), escape_control(said)


def requests(waiting: Sequence[ParkedStep]) -> list[Request]:
    """The approval requests of the workflows that wait for a person, oldest first."""
    found: list[Request] = []
    for parked in waiting:
        why = escape_control(parked.describe())
        for call in parked.pending:
            if call.kind != "approval":
                continue
            args = json.dumps(call.args, indent=2, sort_keys=True, ensure_ascii=False)
            at = f"{parked.parked_at:%Y-%m-%d %H:%M:%S} UTC"
            task, said = _words(parked)
            found.append(Request(parked.correlation_id, parked.activity, parked.step, at, why, call, args, task, said))
    return found
