"""The suites' custom evaluators. Each one is a dataclass a YAML case names with its arguments, for example:

```yaml
evaluators:
- EndsAs: completed                       # one argument: passed positionally
- StepOrder: {steps: [a, b], order: in_order}
```

Every evaluator returns an assertion with a reason, so a failing case says what it expected and what it saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import JsonValue
from pydantic_evals.evaluators import EvaluationReason, Evaluator, EvaluatorContext

from paigeant_ai import InvalidPlan

from .cases import PlannerCase, PlannerRun, WorkflowCase, WorkflowRun, WorkflowStatus
from .catalog import build_catalog

__all__ = (
    "PLANNER_EVALUATORS",
    "WORKFLOW_EVALUATORS",
    "AsksClarification",
    "CatalogBeforeDispatch",
    "EndsAs",
    "FollowsCatalogRules",
    "Itinerary",
    "PayloadHas",
    "PlanVariables",
    "Refused",
    "RefusedByCatalog",
    "RetriesTaken",
    "StepOrder",
    "ToolCalls",
    "matches",
)

Order = Literal["exact", "in_order", "any_order"]


def matches(actual: list[str], expected: list[str], order: Order = "exact") -> bool:
    """Whether `actual` fits `expected`.

    `exact`: the same steps in the same order. `in_order`: `expected` appears in `actual` in that order, with other
    steps allowed in between. `any_order`: the same steps, in any order.
    """
    if order == "exact":
        return actual == expected
    if order == "any_order":
        return sorted(actual) == sorted(expected)
    remaining = iter(actual)
    return all(step in remaining for step in expected)


def _verdict(passed: bool, reason: str) -> EvaluationReason:
    return EvaluationReason(value=passed, reason=reason)


# -- the workflow suite ----------------------------------------------------------------------------------------

WorkflowContext = EvaluatorContext[WorkflowCase, WorkflowRun, dict[str, Any]]


@dataclass(repr=False)
class EndsAs(Evaluator[WorkflowCase, WorkflowRun, dict[str, Any]]):
    """The workflow finished with `status` and, if given, a reason that contains `reason_contains`."""

    status: WorkflowStatus
    reason_contains: str | None = None

    def evaluate(self, ctx: WorkflowContext) -> EvaluationReason:
        run = ctx.output
        if run.status != self.status:
            return _verdict(False, f"expected {self.status}, the workflow {run.status}: {run.reason or 'no reason'}")
        if self.reason_contains is not None and self.reason_contains not in (run.reason or ""):
            return _verdict(False, f"the reason {run.reason!r} does not mention {self.reason_contains!r}")
        return _verdict(True, f"{run.status}" + (f": {run.reason}" if run.reason else ""))


@dataclass(repr=False)
class StepOrder(Evaluator[WorkflowCase, WorkflowRun, dict[str, Any]]):
    """The steps completed match `steps` (see `matches` for the orders)."""

    steps: list[str]
    order: Order = "exact"

    def evaluate(self, ctx: WorkflowContext) -> EvaluationReason:
        done = ctx.output.steps
        reason = f"completed {done}, expected {self.steps} ({self.order})"
        return _verdict(matches(done, self.steps, self.order), reason)


@dataclass(repr=False)
class PayloadHas(Evaluator[WorkflowCase, WorkflowRun, dict[str, Any]]):
    """The final payload has every key in `keys`, every key-value pair in `values`, and none of the keys in `absent`."""

    keys: list[str] = field(default_factory=list[str])
    values: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])
    absent: list[str] = field(default_factory=list[str])

    def evaluate(self, ctx: WorkflowContext) -> EvaluationReason:
        payload = ctx.output.payload
        if payload is None:
            return _verdict(False, "the workflow left no payload")
        missing = [key for key in (*self.keys, *self.values) if key not in payload]
        wrong = [
            f"{key}={payload[key]!r}, expected {value!r}"
            for key, value in self.values.items()
            if key in payload and payload[key] != value
        ]
        unexpected = [key for key in self.absent if key in payload]
        problems = [
            *([f"missing {', '.join(missing)}"] if missing else []),
            *wrong,
            *([f"unexpected {', '.join(unexpected)}"] if unexpected else []),
        ]
        return _verdict(not problems, "; ".join(problems) or "all expected keys and values are there")


@dataclass(repr=False)
class RetriesTaken(Evaluator[WorkflowCase, WorkflowRun, dict[str, Any]]):
    """Each step was retried exactly as often as `retries` says; steps it does not name, never."""

    retries: dict[str, int] = field(default_factory=dict[str, int])

    def evaluate(self, ctx: WorkflowContext) -> EvaluationReason:
        taken = ctx.output.retries
        steps = sorted({*taken, *self.retries})
        wrong = [
            f"{step}: {taken.get(step, 0)}, expected {self.retries.get(step, 0)}"
            for step in steps
            if taken.get(step, 0) != self.retries.get(step, 0)
        ]
        return _verdict(not wrong, "; ".join(wrong) or f"retries as expected: {taken or 'none'}")


WORKFLOW_EVALUATORS: tuple[type[Evaluator[WorkflowCase, WorkflowRun, dict[str, Any]]], ...] = (
    EndsAs,
    PayloadHas,
    RetriesTaken,
    StepOrder,
)
"""The custom evaluators `workflows.yaml` may name."""


# -- the planner suite -----------------------------------------------------------------------------------------

PlannerContext = EvaluatorContext[PlannerCase, PlannerRun, dict[str, Any]]


def _dispatched(run: PlannerRun) -> str:
    plans = [" -> ".join(plan.activities) for plan in run.dispatched]
    return "; ".join(plans) if plans else f"nothing dispatched (reply: {run.reply[:200]!r})"


@dataclass(repr=False)
class Itinerary(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """Exactly one workflow was dispatched, and its activities match `expected` or one of the `alternatives`.

    `order` says how they are compared (see `matches`): `exact` by default, `in_order` to allow extra steps.
    """

    expected: list[str]
    alternatives: list[list[str]] = field(default_factory=list[list[str]])
    order: Order = "exact"

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        run = ctx.output
        acceptable = " or ".join(str(option) for option in [self.expected, *self.alternatives])
        if len(run.dispatched) != 1:
            return _verdict(False, f"expected one workflow ({acceptable}), got: {_dispatched(run)}")
        actual = run.dispatched[0].activities
        ok = any(matches(actual, option, self.order) for option in [self.expected, *self.alternatives])
        return _verdict(ok, f"dispatched {actual}, acceptable ({self.order}): {acceptable}")


@dataclass(repr=False)
class PlanVariables(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """Every dispatched workflow starts with each key in `keys` and each key-value pair in `values`."""

    values: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])
    keys: list[str] = field(default_factory=list[str])

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        if not ctx.output.dispatched:
            return _verdict(False, "nothing was dispatched")
        problems: list[str] = []
        for plan in ctx.output.dispatched:
            variables = plan.variables
            problems += [f"no {key!r}" for key in (*self.keys, *self.values) if key not in variables]
            problems += [
                f"{key}={variables[key]!r}, expected {value!r}"
                for key, value in self.values.items()
                if key in variables and variables[key] != value
            ]
        return _verdict(not problems, "; ".join(problems) or "the variables are as expected")


@dataclass(repr=False)
class Refused(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """Nothing was dispatched, and the planner told the user why (or what it needs to know)."""

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        run = ctx.output
        if run.dispatched:
            return _verdict(False, f"dispatched {_dispatched(run)}")
        if not run.reply.strip():
            return _verdict(False, "nothing was dispatched, but the planner said nothing")
        return _verdict(True, f"nothing dispatched; the planner said: {run.reply[:200]}")


@dataclass(repr=False)
class ToolCalls(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """The planner called every tool in `required`, in that order (others may come in between), and none in
    `forbidden`."""

    required: list[str] = field(default_factory=list[str])
    forbidden: list[str] = field(default_factory=list[str])

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        called = [call.name for call in ctx.output.tool_calls]
        problems: list[str] = []
        if not matches(called, self.required, "in_order"):
            problems.append(f"expected calls to {self.required} in that order")
        problems += [f"called {name}" for name in dict.fromkeys(called) if name in self.forbidden]
        return _verdict(not problems, "; ".join([*problems, f"calls: {called}"]))


@dataclass(repr=False)
class CatalogBeforeDispatch(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """The planner looked at the catalog (`list_activities`) before it dispatched anything."""

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        called = [call.name for call in ctx.output.tool_calls]
        if "dispatch_workflow" not in called:
            return _verdict(True, "nothing was dispatched")
        first = called.index("dispatch_workflow")
        ok = "list_activities" in called[:first]
        return _verdict(ok, "listed the activities first" if ok else f"dispatched without listing: {called}")


@dataclass(repr=False)
class RefusedByCatalog(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """Nothing was dispatched because the toolset refused the plan: a `dispatch_workflow` call came back with a
    refusal that contains `rule`, and the planner told the user why. Refused by the catalog, whatever the model
    would have done."""

    rule: str

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        run = ctx.output
        if run.dispatched:
            return _verdict(False, f"dispatched {_dispatched(run)}")
        refusals = [call.refusal or "" for call in run.tool_calls if call.name == "dispatch_workflow" and call.retried]
        if not any(self.rule in refusal for refusal in refusals):
            return _verdict(False, f"no plan was refused for {self.rule!r}; refusals: {refusals or 'none'}")
        if not run.reply.strip():
            return _verdict(False, "the toolset refused the plan, but the planner said nothing")
        return _verdict(True, f"the toolset refused {self.rule!r}; the planner said: {run.reply[:200]}")


@dataclass(repr=False)
class AsksClarification(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """The planner asked a question instead of guessing: nothing dispatched, and a reply with a question mark and
    each word of `about` in it (what it asked for)."""

    about: list[str] = field(default_factory=list[str])

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        run = ctx.output
        if run.dispatched:
            return _verdict(False, f"it dispatched instead of asking: {_dispatched(run)}")
        missing = [word for word in self.about if word.lower() not in run.reply.lower()]
        if "?" not in run.reply or missing:
            return _verdict(False, f"no question about {missing or self.about} in the reply: {run.reply[:200]!r}")
        return _verdict(True, f"asked: {run.reply[:200]}")


@dataclass(repr=False)
class FollowsCatalogRules(Evaluator[PlannerCase, PlannerRun, dict[str, Any]]):
    """Every dispatched workflow keeps the ordering rules of the suite's catalog (nothing shipped before it is
    paid for, say): a check of the dispatched plans themselves, whatever refused or let them through."""

    def evaluate(self, ctx: PlannerContext) -> EvaluationReason:
        catalog = build_catalog()
        broken: list[str] = []
        for plan in ctx.output.dispatched:
            try:
                catalog.plan(plan.activities, plan.variables)
            except InvalidPlan as exc:
                broken.append(f"{' -> '.join(plan.activities)}: {exc}")
        return _verdict(not broken, "; ".join(broken) or "every dispatched plan keeps the catalog's rules")


PLANNER_EVALUATORS: tuple[type[Evaluator[PlannerCase, PlannerRun, dict[str, Any]]], ...] = (
    AsksClarification,
    CatalogBeforeDispatch,
    FollowsCatalogRules,
    Itinerary,
    PlanVariables,
    Refused,
    RefusedByCatalog,
    ToolCalls,
)
"""The custom evaluators `planner.yaml` may name."""
