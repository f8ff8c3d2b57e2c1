"""Workflows to datasets, and datasets replayed against a new version of an agent (needs the `evals` extra).

`record_dataset` turns the completed workflows of a `WorkflowStore` into a pydantic-evals `Dataset`: one case per
agent step (its rendered prompt and the payload it saw as inputs, its output as the expected output) and one per
workflow (the payload its first step saw, its plan, and its final payload). `replay_dataset` runs candidate agents
on the recorded inputs, no broker involved, and reports each case whose output, schema or tool calls changed.

```python
dataset = await record_dataset(store, activities=["classify-ticket-priority"], redact=["customer"])
dataset.to_file("support.yaml")
report = await replay_dataset(load_dataset("support.yaml"), {"classify-ticket-priority": new_classifier})
assert not report.regressions, report.render()
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import JsonValue

try:
    from ._recorded import RecordedCase, RecordedDataset, RecordedStep, RecordedWorkflow
    from ._replay_evals import FieldsMatch, ReplayedStep, ReplayReport, SameToolCalls, SchemaValid, replay_dataset
except ImportError as _exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        'paigeant_ai.evals needs pydantic-evals, the `evals` extra: pip install "paigeant-ai[evals]"'
    ) from _exc

from ._events import WorkflowEvent
from ._step_record import REDACTED, StepRecord
from ._wire import assume_utc
from .exceptions import UserError
from .store import FINAL_STATES, WorkflowStatus, WorkflowStore

__all__ = (
    "FieldsMatch",
    "RecordedDataset",
    "RecordedStep",
    "RecordedWorkflow",
    "ReplayReport",
    "ReplayedStep",
    "SameToolCalls",
    "SchemaValid",
    "load_dataset",
    "record_dataset",
    "replay_dataset",
)


async def record_dataset(
    store: WorkflowStore,
    *,
    name: str = "recorded-workflows",
    activities: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    states: Sequence[str] = ("completed",),
    redact: Sequence[str] = (),
    limit: int = 1000,
) -> RecordedDataset:
    """A pydantic-evals dataset of the workflows `store` keeps.

    Args:
        store: Where the workflows' statuses are (in memory, on Redis or SQLite).
        name: The dataset's name.
        activities: Only the steps of these activities, and the workflows that ran one; all when empty.
        since: Only workflows started at or after this time.
        until: Only workflows started before this time.
        states: Only workflows in these states (final ones: `completed`, `faulted`, `compensated`...).
        redact: Payload fields (`customer.email`) replaced by `[redacted]` in every input, output and prompt.
        limit: How many of the most recently updated workflows to look at.

    Steps whose record was too large to keep (see `AgentActivity(record=...)`) are left out. Nothing of a
    workflow's security context is ever in a record; `redact` is for what the payload itself holds.
    """
    unknown = sorted(set(states) - FINAL_STATES)
    if unknown:
        raise UserError(f"cannot record workflows in {unknown}: use final states, {sorted(FINAL_STATES)}")
    statuses = [status for status in await store.list(limit=limit) if _wanted(status, states, since, until)]
    cases: list[RecordedCase] = []
    paths = [path.split(".") for path in redact]
    for status in sorted(statuses, key=lambda status: status.started_at):
        steps = [(event, _step_inputs(event, record, paths)) for event, record in _records(status.events)]
        chosen = [_step_case(*step) for step in steps if not activities or step[1][0].activity in activities]
        if activities and not chosen:
            continue
        first = steps[0][1][0].payload if steps and steps[0][0].step == 0 else None
        cases += [*chosen, _workflow_case(status, first, paths)]
    return RecordedDataset(name=name, cases=cases)


def load_dataset(path: Path | str) -> RecordedDataset:
    """A dataset `record_dataset` made, from its YAML or JSON file."""
    return RecordedDataset.from_file(path)


def _wanted(status: WorkflowStatus, states: Sequence[str], since: datetime | None, until: datetime | None) -> bool:
    started = assume_utc(status.started_at)
    return (
        status.state in states
        and (since is None or started >= assume_utc(since))
        and (until is None or started < assume_utc(until))
    )


def _records(events: Iterable[WorkflowEvent]) -> list[tuple[WorkflowEvent, StepRecord]]:
    """Each recorded step of a workflow once (the latest report of a step wins), in step order."""
    found: dict[tuple[int | None, str | None, str | None], tuple[WorkflowEvent, StepRecord]] = {}
    for event in events:
        record = event.record
        if event.kind == "step_completed" and record is not None and record.omitted is None and event.undoes is None:
            found[(event.step, event.activity, event.branch)] = (event, record)
    return sorted(found.values(), key=lambda pair: (pair[0].step or 0, pair[0].branch or ""))


def _step_inputs(
    event: WorkflowEvent, record: StepRecord, paths: list[list[str]]
) -> tuple[RecordedStep, JsonValue, list[str]]:
    """What a recorded step saw, its output, and the tools it called, with the fields at `paths` redacted."""
    payload, output = dict(record.inputs), record.output
    hidden: list[str] = []
    for path in paths:
        hidden += _redact(payload, path)
        if len(path) > 1 and path[0] == record.output_key and isinstance(output, dict):
            output = dict(output)
            hidden += _redact(output, path[1:])
        elif path == [record.output_key] and output is not None:
            hidden.append(_text(output))
            output = REDACTED
    inputs = RecordedStep(
        activity=event.activity or "?",
        prompt=_scrub(record.prompt, hidden),
        payload=payload,
        output_key=record.output_key,
        route=record.route,
    )
    return inputs, output, record.tool_calls


def _step_case(event: WorkflowEvent, step: tuple[RecordedStep, JsonValue, list[str]]) -> RecordedCase:
    inputs, output, tool_calls = step
    branch = f":{event.branch}" if event.branch else ""
    return RecordedCase(
        name=f"{event.correlation_id}:{event.step}{branch}:{inputs.activity}",
        inputs=inputs,
        expected_output=output,
        metadata={
            "kind": "step",
            "correlation_id": event.correlation_id,
            "step": event.step,
            "activity": inputs.activity,
            "version": event.version,
            "tool_calls": tool_calls,
            "at": event.at.isoformat(),
        },
    )


def _workflow_case(
    status: WorkflowStatus, request: dict[str, JsonValue] | None, paths: list[list[str]]
) -> RecordedCase:
    final = dict(status.payload or {})
    for path in paths:
        _redact(final, path)
    return RecordedCase(
        name=status.correlation_id,
        inputs=RecordedWorkflow(
            request=request,
            plan=[step.activity for step in status.steps if step.undoes is None],
        ),
        expected_output=final,
        metadata={
            "kind": "workflow",
            "correlation_id": status.correlation_id,
            "state": status.state,
            "started_at": status.started_at.isoformat(),
        },
    )


def _redact(payload: dict[str, Any], path: list[str]) -> list[str]:
    """Replace the value at `path` in `payload` (in place) by `[redacted]`; the text of what it hid."""
    head, *rest = path
    if head not in payload:
        return []
    if rest:
        inner = payload[head]
        if not isinstance(inner, dict):
            return []
        payload[head] = copied = dict(inner)  # pyright: ignore[reportUnknownArgumentType]
        return _redact(copied, rest)
    hidden = payload[head]
    payload[head] = REDACTED
    return [_text(hidden)] if hidden is not None else []


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _scrub(prompt: str | None, hidden: list[str]) -> str | None:
    """`prompt` with the redacted values it quoted redacted too."""
    if prompt is None:
        return None
    for value in sorted((value for value in hidden if value), key=len, reverse=True):
        prompt = prompt.replace(value, REDACTED)
    return prompt
