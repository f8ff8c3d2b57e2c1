"""Replaying a recorded dataset against candidate agents (see `paigeant_ai.evals`), and the evaluators that score
a candidate's output against the recorded one: field by field, by schema, and by the tools called."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from pydantic import JsonValue, PrivateAttr, TypeAdapter, ValidationError
from pydantic_ai import DeferredToolRequests
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.models import Model
from pydantic_evals import Case, Dataset
from pydantic_evals.evaluators import EvaluationReason, Evaluator, EvaluatorContext, LLMJudge
from pydantic_evals.reporting import EvaluationReport

from ._recorded import RecordedDataset, RecordedStep, RecordedWorkflow
from .activity import ActivityContext, AgentActivity
from .contracts import ActivitySpec, PaigeantMessage
from .exceptions import ParkWorkflow, UserError
from .observability import TRACER_NAME

__all__ = ("FieldsMatch", "ReplayReport", "ReplayedStep", "SameToolCalls", "SchemaValid", "replay_dataset")

Candidate = AbstractAgent[Any, Any] | AgentActivity[Any, Any]
"""A new version of a step: an agent (run on the recorded prompt) or an `AgentActivity` (which renders its own)."""


class _Replayed(RecordedStep):
    """A recorded step's inputs, replayed: its recorded output is at hand for the schema check."""

    _recorded_output: JsonValue = PrivateAttr(default=None)

    def recorded_output(self) -> JsonValue:
        return self._recorded_output


@dataclass
class ReplayedStep:
    """What a candidate did with a recorded step's inputs."""

    output: JsonValue
    tool_calls: list[str]
    schema_errors: list[str] = field(default_factory=list[str])


StepContext = EvaluatorContext[RecordedStep, ReplayedStep, dict[str, Any]]


@dataclass
class FieldsMatch(Evaluator[RecordedStep, ReplayedStep, dict[str, Any]]):
    """The candidate's output equals the recorded one, field by field; the reason names the fields that differ."""

    def evaluate(self, ctx: StepContext) -> EvaluationReason:
        differences = list(differ(ctx.expected_output, ctx.output.output))
        return EvaluationReason(value=not differences, reason="; ".join(differences) or "same output")


@dataclass
class SchemaValid(Evaluator[RecordedStep, ReplayedStep, dict[str, Any]]):
    """The candidate's output, and the recorded one (what the workflow's later steps read), validate against the
    candidate agent's output type."""

    def evaluate(self, ctx: StepContext) -> EvaluationReason:
        errors = ctx.output.schema_errors
        return EvaluationReason(value=not errors, reason="; ".join(errors) or "valid")


@dataclass
class SameToolCalls(Evaluator[RecordedStep, ReplayedStep, dict[str, Any]]):
    """The candidate called the same tools as the recorded run, as often (in any order)."""

    def evaluate(self, ctx: StepContext) -> EvaluationReason:
        recorded = list((ctx.metadata or {}).get("tool_calls", []))
        called = ctx.output.tool_calls
        if sorted(recorded) == sorted(called):
            return EvaluationReason(value=True, reason=f"called {called or 'no tools'}")
        return EvaluationReason(value=False, reason=f"called {called}, the recorded run {recorded}")


def differ(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected`: one line per field (`priority: expected 'urgent', got 'normal'`)."""
    where = path or "output"
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = [*expected, *(key for key in actual if key not in expected)]  # pyright: ignore[reportUnknownVariableType]
        lines: list[str] = []
        for key in keys:  # pyright: ignore[reportUnknownVariableType]
            inner = f"{path}.{key}" if path else str(key)  # pyright: ignore[reportUnknownArgumentType]
            if key not in actual:
                lines.append(f"{inner}: missing")
            elif key not in expected:
                lines.append(f"{inner}: not in the recorded output")
            else:
                lines += differ(expected[key], actual[key], inner)
        return lines
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):  # pyright: ignore[reportUnknownArgumentType]
        pairs = enumerate(zip(expected, actual, strict=True))  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
        return [line for index, (old, new) in pairs for line in differ(old, new, f"{where}[{index}]")]
    return [] if expected == actual else [f"{where}: expected {expected!r}, got {actual!r}"]


@dataclass
class ReplayReport:
    """The outcome of a replay: pydantic-evals' report and the cases that regressed."""

    report: EvaluationReport[RecordedStep, ReplayedStep, dict[str, Any]]
    regressions: dict[str, list[str]]
    """Each regressed case's name, and why: the failed checks, or the error the candidate raised."""
    skipped: int
    """Cases not replayed: workflows, and steps of activities without a candidate."""

    def render(self) -> str:
        """The regressions, one case a line, and a verdict."""
        replayed = len(self.report.cases) + len(self.report.failures)
        lines = [f"REGRESSION {name}: {'; '.join(reasons)}" for name, reasons in sorted(self.regressions.items())]
        lines.append(f"{len(self.regressions)} of {replayed} replayed cases regressed ({self.skipped} not replayed)")
        return "\n".join(lines)


async def replay_dataset(
    dataset: RecordedDataset,
    candidates: Mapping[str, Candidate],
    *,
    judge: Model | str | None = None,
    max_concurrency: int | None = None,
    progress: bool = False,
) -> ReplayReport:
    """Run each candidate on the recorded inputs of its activity's steps, and score it against the recorded outputs.

    Args:
        dataset: A dataset `record_dataset` made.
        candidates: The new version of each activity to replay, by activity name.
        judge: A real model for an `LLMJudge` that also grades each output against the recorded one; none by default.
        max_concurrency: Cases run at once; all by default.
        progress: Show pydantic-evals' progress bar.

    A case regressed when a check failed (`FieldsMatch`, `SchemaValid`, `SameToolCalls`, the judge) or the candidate
    raised. The replay runs in a `paigeant.evals.replay` span, so that with Logfire configured the results reach
    its evals view.
    """
    unknown = sorted(set(candidates) - {case.inputs.activity for case in _steps(dataset.cases)})
    if unknown:
        raise UserError(f"the dataset has no steps of {unknown}: check the activity names given")
    cases = [case for case in _steps(dataset.cases) if case.inputs.activity in candidates]
    evaluators: list[Evaluator[RecordedStep, ReplayedStep, dict[str, Any]]] = [
        FieldsMatch(),
        SchemaValid(),
        SameToolCalls(),
    ]
    if judge is not None:
        evaluators.append(
            LLMJudge(
                rubric="The output says the same as the expected output.",
                model=judge,
                include_input=True,
                include_expected_output=True,
            )
        )
    replay = Dataset[RecordedStep, ReplayedStep, dict[str, Any]](name=dataset.name, cases=cases, evaluators=evaluators)

    async def task(inputs: RecordedStep) -> ReplayedStep:
        return await replay_step(inputs, candidates[inputs.activity])

    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span("paigeant.evals.replay", attributes={"dataset": dataset.name}):
        report = await replay.evaluate(
            task, name=dataset.name, max_concurrency=max_concurrency, progress=progress, task_name="replay"
        )
    return ReplayReport(report=report, regressions=regressions(report), skipped=len(dataset.cases) - len(cases))


def regressions(report: EvaluationReport[RecordedStep, ReplayedStep, dict[str, Any]]) -> dict[str, list[str]]:
    """The cases of `report` that regressed, and why."""
    found: dict[str, list[str]] = {}
    for case in report.cases:
        reasons = [f"{name}: {result.reason}" for name, result in case.assertions.items() if result.value is not True]
        reasons += [f"{failure.name}: {failure.error_message}" for failure in case.evaluator_failures]
        if reasons:
            found[case.name] = reasons
    for failure in report.failures:
        found[failure.name] = [f"the candidate failed: {failure.error_message}"]
    return found


async def replay_step(inputs: RecordedStep, candidate: Candidate) -> ReplayedStep:
    """Run `candidate` as the step `inputs` recorded, on its payload and route, without a broker."""
    step = candidate if isinstance(candidate, AgentActivity) else _as_step(candidate, inputs)
    message = PaigeantMessage.new([ActivitySpec(name=name) for name in inputs.route or [inputs.activity]])
    message.payload.update(inputs.payload)
    ctx = ActivityContext(message=message, spec=step.spec)
    try:
        update = await step.run(ctx)
    except ParkWorkflow:
        raise UserError(f"the candidate of {inputs.activity!r} waits for approval; a replay cannot approve") from None
    output = update.get(step.output_key)
    called = ctx.records[-1].tool_calls if ctx.records else []
    errors = _schema_errors(step, output, "the output")
    if isinstance(inputs, _Replayed):
        errors += _schema_errors(step, inputs.recorded_output(), "the recorded output")
    return ReplayedStep(output=output, tool_calls=called, schema_errors=errors)


def _as_step(agent: AbstractAgent[Any, Any], inputs: RecordedStep) -> AgentActivity[Any, Any]:
    """An agent as the recorded step, run on the recorded prompt."""
    recorded = inputs.prompt or ""
    return AgentActivity(
        agent, name=inputs.activity, prompt=lambda _ctx: recorded, output_key=inputs.output_key, record=True
    )


def _schema_errors(step: AgentActivity[Any, Any], output: JsonValue, what: str) -> list[str]:
    """Why `output`, as stored in a payload, does not validate against the candidate agent's output type."""
    try:
        _output_adapter(step.agent.output_type).validate_python(output)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        return [f"{what} does not validate: {where + ': ' if where else ''}{error['msg']}"]
    return []


def _output_adapter(output_type: Any) -> TypeAdapter[Any]:
    """A validator of the agent's output, `DeferredToolRequests` aside (a replay never parks)."""
    kind: Any = output_type
    if isinstance(output_type, Sequence) and not isinstance(output_type, str):
        kinds = [item for item in output_type if item is not DeferredToolRequests]  # pyright: ignore[reportUnknownVariableType]
        kind = kinds[0] if len(kinds) == 1 else Any
    return TypeAdapter[Any](kind)


def _steps(
    cases: Sequence[Case[RecordedStep | RecordedWorkflow, JsonValue, dict[str, Any]]],
) -> list[Case[RecordedStep, ReplayedStep, dict[str, Any]]]:
    """The step cases of a recorded dataset, as cases of a replay."""
    replayed: list[Case[RecordedStep, ReplayedStep, dict[str, Any]]] = []
    for case in cases:
        if not isinstance(case.inputs, RecordedStep):
            continue
        inputs = _Replayed.model_validate(case.inputs.model_dump())
        inputs._recorded_output = case.expected_output  # pyright: ignore[reportPrivateUsage]
        # The expected output stays the recorded JSON: the evaluators compare the candidate's output with it.
        replayed.append(
            Case[RecordedStep, ReplayedStep, dict[str, Any]](
                name=case.name,
                inputs=inputs,
                expected_output=case.expected_output,  # pyright: ignore[reportArgumentType]
                metadata=case.metadata,
            )
        )
    return replayed
