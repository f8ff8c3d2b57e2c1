"""The evaluation suites run offline, pass as shipped, and fail when what they measure goes wrong."""

from __future__ import annotations

import inspect
import io
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_evals import Case
from rich.console import Console

from evals import planner, runner
from evals.cases import DispatchedPlan, PlannerCase, PlannerRun, ToolCall, WorkflowCase, WorkflowRun
from evals.evaluators import (
    AsksClarification,
    EndsAs,
    FollowsCatalogRules,
    Itinerary,
    PayloadHas,
    Refused,
    RefusedByCatalog,
    RetriesTaken,
    StepOrder,
    ToolCalls,
    matches,
)
from evals.planning import Activity, Dispatch, decide
from evals.policy import planner_policy
from evals.runner import Report, Suite, SuiteOptions, main, pass_rate, planner_suite, run_suites
from evals.workflows import WorkflowDataset, load_dataset, run_workflow

ROOT = Path(__file__).resolve().parent.parent


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.mark.slow
def test_the_runner_passes_offline_with_the_readme_command() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PAIGEANT_EVAL_MODEL", "PAIGEANT_MODEL")}
    result = subprocess.run(
        [sys.executable, "-m", "evals"],
        cwd=ROOT,
        env={**env, "PAIGEANT_TRANSPORT": "inmemory"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Evaluation Summary: planner (offline)" in result.stdout
    assert "Evaluation Summary: workflows" in result.stdout
    for suite in ("planner", "workflows"):
        passed = re.search(rf"PASS {suite}: (\d+)/(\d+) cases passed \(100%\), threshold 100%", result.stdout)
        assert passed is not None, result.stdout
        assert passed[1] == passed[2]


def test_the_runner_refuses_a_threshold_outside_0_to_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--threshold", "2"])
    assert exited.value.code == 2
    assert "--threshold must be between 0 and 1" in capsys.readouterr().err


def test_every_workflow_case_loads_with_its_evaluators() -> None:
    dataset = load_dataset()
    assert len(dataset.cases) >= 8
    assert all(case.evaluators for case in dataset.cases)
    assert {case.inputs.workflow for case in dataset.cases} == {"onboarding", "orders", "support"}


async def test_an_order_retries_payment_twice_and_completes() -> None:
    case = WorkflowCase(
        workflow="orders",
        stock={"SKU-BOOK": 5},
        variables={"order_id": "o-1", "sku": "SKU-BOOK", "quantity": 2, "amount": 10.0, "address": "here"},
    )
    run = await run_workflow(case)
    assert run.status == "completed"
    assert run.retries == {"process-payment": 2}
    assert run.steps[-1] == "send-confirmation"
    assert run.payload is not None
    assert run.payload["stock_left"] == 3


async def test_an_unknown_workflow_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown workflow 'nope'; the suite knows: onboarding, orders, support"):
        await run_workflow(WorkflowCase(workflow="nope"))


async def test_the_workflow_suite_fails_when_a_workflow_ends_wrong() -> None:
    """Expectations that do not hold (a wrong ending, order, payload or retry count) fail their cases."""
    order: dict[str, JsonValue] = {"order_id": "o-2", "sku": "SKU-LAMP", "quantity": 1, "amount": 5.0, "address": "x"}
    dataset = WorkflowDataset(
        name="wrong-expectations",
        cases=[
            Case(
                name="expects-completion",
                inputs=WorkflowCase(workflow="orders", stock={"SKU-LAMP": 0}, variables=order),
                evaluators=(EndsAs(status="completed"),),
            ),
            Case(
                name="expects-payment-first",
                inputs=WorkflowCase(workflow="orders", stock={"SKU-LAMP": 0}, variables=order),
                evaluators=(StepOrder(steps=["process-payment", "check-inventory"]),),
            ),
            Case(
                name="expects-a-payment",
                inputs=WorkflowCase(workflow="orders", stock={"SKU-LAMP": 0}, variables=order),
                evaluators=(PayloadHas(keys=["payment_id"]), RetriesTaken(retries={"process-payment": 2})),
            ),
        ],
    )
    report = await dataset.evaluate(run_workflow, progress=False, max_concurrency=1)
    assert pass_rate(report) == (0, 3)
    reasons = {name: result.reason for case in report.cases for name, result in case.assertions.items()}
    assert reasons["EndsAs"] == (
        "expected completed, the workflow ended: out of stock: SKU-LAMP has 0, the order needs 1 (skipped: "
        "process-payment, update-inventory, generate-shipping-label, send-confirmation)"
    )
    assert reasons["PayloadHas"] == "missing payment_id"
    assert reasons["RetriesTaken"] == "process-payment: 0, expected 2"


async def test_run_suites_reports_below_the_threshold() -> None:
    async def half_passing(options: SuiteOptions) -> Report:
        dataset = WorkflowDataset(
            name="half",
            cases=[
                Case(name="ok", inputs=WorkflowCase(workflow="onboarding"), evaluators=(StepOrder(steps=[]),)),
                Case(name="bad", inputs=WorkflowCase(workflow="onboarding"), evaluators=(StepOrder(steps=["x"]),)),
            ],
        )

        async def nothing_happens(case: WorkflowCase) -> WorkflowRun:
            return WorkflowRun(status="completed", steps=[], duration=0.0)

        return await dataset.evaluate(nothing_happens, progress=False)

    suites: dict[str, Suite] = {"half": half_passing}
    [strict] = await run_suites(["half"], suites=suites, console=quiet())
    assert (strict.passed, strict.total, strict.ok) == (1, 2, False)
    [lenient] = await run_suites(["half"], threshold=0.5, suites=suites, console=quiet())
    assert lenient.ok


@pytest.mark.parametrize(
    ("actual", "expected", "order", "result"),
    [
        (["a", "b", "c"], ["a", "b", "c"], "exact", True),
        (["a", "b", "c"], ["a", "c"], "exact", False),
        (["a", "b", "c"], ["a", "c"], "in_order", True),
        (["a", "b", "c"], ["c", "a"], "in_order", False),
        (["a", "b", "c"], ["c", "b", "a"], "any_order", True),
        (["a", "b"], ["a", "b", "c"], "any_order", False),
    ],
)
def test_matches(actual: list[str], expected: list[str], order: Any, result: bool) -> None:
    assert matches(actual, expected, order) is result


# -- the planner suite -----------------------------------------------------------------------------------------


def test_the_planner_suite_covers_the_three_use_cases_and_the_hard_requests() -> None:
    dataset = planner.load_dataset()
    metadata = [case.metadata or {} for case in dataset.cases]
    assert len(dataset.cases) >= 30
    assert {m["domain"] for m in metadata} >= {"onboarding", "orders", "support"}
    kinds = {"clear", "ambiguous", "clarify", "multi-turn", "missing-activity", "unsafe"}
    assert {m["kind"] for m in metadata} >= kinds
    unsafe = [case for case in dataset.cases if (case.metadata or {})["kind"] == "unsafe"]
    assert all(any(isinstance(e, Refused | RefusedByCatalog) for e in case.evaluators) for case in unsafe)
    by_catalog = [case for case in unsafe if any(isinstance(e, RefusedByCatalog) for e in case.evaluators)]
    assert {(case.metadata or {})["domain"] for case in by_catalog} >= {"onboarding", "orders", "support"}
    clarify = [case for case in dataset.cases if (case.metadata or {})["kind"] == "clarify"]
    assert all(any(isinstance(e, AsksClarification) for e in case.evaluators) for case in clarify)
    assert sum(1 for case in dataset.cases if case.inputs.history) >= 3


def test_the_offline_policy_sees_only_what_a_model_sees_and_names_no_activity() -> None:
    """Structurally unable to read the expected answers: it is called with the messages and the tool definitions
    only, and it knows activities only from what `list_activities` returns."""
    assert list(inspect.signature(planner_policy).parameters) == ["messages", "info"]
    names = planner.build_catalog().names
    for module in ("policy", "planning", "reading"):
        source = (ROOT / "evals" / f"{module}.py").read_text()
        assert not [name for name in names if name in source], module
        spelled = [name.replace("-", " ") for name in names if "-" in name]  # "check inventory": a name all the same
        assert not [name for name in spelled if name in source.lower()], module
        assert "planner.yaml" not in source
        assert "evaluators" not in source


@pytest.mark.parametrize("swapped", [False, True])
def test_the_offline_policy_reads_which_activity_a_request_means_from_the_catalogs_descriptions(swapped: bool) -> None:
    """No phrase of its own maps "check the order" or "in stock" to an activity: swap the descriptions of two
    activities whose names say neither, and its answers swap."""
    checks, stock = "Order: check an order before anything else.", "Order: make sure the items are in stock."
    if swapped:
        checks, stock = stock, checks
    catalog = [Activity("audit-purchase", checks, (), ()), Activity("reserve-items", stock, (), ())]
    checking, stocked = ["reserve-items", "audit-purchase"] if swapped else ["audit-purchase", "reserve-items"]
    assert decide(["Check the order ord-1."], [], [], catalog) == Dispatch([checking], {})
    assert decide(["Is SKU-A in stock for order ord-1?"], [], [], catalog) == Dispatch([stocked], {})


def dropping_a_step(first: bool = False) -> FunctionModel:
    """A broken planner: the offline policy, but every plan it dispatches loses its last (or first) step."""

    def policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        response = planner_policy(messages, info)
        parts = list(response.parts)
        for index, part in enumerate(parts):
            if isinstance(part, ToolCallPart) and part.tool_name == "dispatch_workflow":
                args = part.args_as_dict()
                if len(args["activities"]) > 1:
                    args["activities"] = args["activities"][1:] if first else args["activities"][:-1]
                parts[index] = ToolCallPart(part.tool_name, args, tool_call_id=part.tool_call_id)
        return ModelResponse(parts=parts)

    return FunctionModel(policy)


async def test_a_planner_that_drops_a_step_fails_the_planner_suite() -> None:
    output = io.StringIO()
    options = SuiteOptions(planner_model=dropping_a_step())
    [result] = await run_suites(["planner"], options=options, console=Console(file=output, width=200))
    assert not result.ok
    assert result.rate < 0.9
    out = output.getvalue()
    assert "x onboard-premium / Itinerary: dispatched ['validate-customer-data', 'create-customer-account', " in out
    assert "FAIL planner:" in out


def test_the_command_exits_1_when_a_suite_is_below_the_threshold(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken_planner_suite(options: SuiteOptions) -> Report:
        return await planner_suite(replace(options, planner_model=dropping_a_step()))

    monkeypatch.setitem(runner.SUITES, "planner", broken_planner_suite)
    assert main(["--suite", "planner", "--threshold", "0.9"]) == 1
    assert "below the threshold: planner" in capsys.readouterr().err


async def test_a_plan_missing_its_first_step_is_sent_back_and_nothing_is_dispatched() -> None:
    task = planner.planner_task(dropping_a_step(first=True))
    run = await task(PlannerCase(request="Onboard new.customer@example.com on the premium tier."))
    assert run.dispatched == []
    assert [(call.name, call.retried) for call in run.tool_calls] == [
        ("list_activities", False),
        ("dispatch_workflow", True),
        ("dispatch_workflow", True),  # its repair loses the step again: it gives up
    ]
    assert "needs variable 'validation'" in run.reply


async def test_the_offline_planner_dispatches_the_real_itinerary() -> None:
    run = await planner.planner_task()(PlannerCase(request="Process order ord-9: 1 x SKU-BOOK for $5, ship to 1 A St."))
    [plan] = run.dispatched
    assert plan.activities[0] == "validate-order"
    assert plan.variables == {"order_id": "ord-9", "sku": "SKU-BOOK", "quantity": 1, "amount": 5.0, "address": "1 A St"}
    assert plan.correlation_id in run.reply


def judge(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    verdict = {"reason": "the reply says what happened", "pass": True, "score": 1.0}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, verdict)])


async def test_a_judge_model_adds_an_llm_judge_to_the_planner_suite() -> None:
    report = await planner_suite(SuiteOptions(judge_model=FunctionModel(judge)))
    assert pass_rate(report) == (len(report.cases), len(report.cases))
    assert all(case.assertions["LLMJudge"].value for case in report.cases)


async def evaluate_planner_run(run: PlannerRun, *evaluators: Any) -> dict[str, tuple[bool, str | None]]:
    async def fixed(case: PlannerCase) -> PlannerRun:
        return run

    dataset = planner.PlannerDataset(name="one", cases=[Case(inputs=PlannerCase(request="r"), evaluators=evaluators)])
    report = await dataset.evaluate(fixed, progress=False)
    return {name: (bool(r.value), r.reason) for name, r in report.cases[0].assertions.items()}


async def test_the_planner_evaluators_judge_a_run() -> None:
    onboarding = ["validate-customer-data", "create-customer-account"]
    run = PlannerRun(
        dispatched=[DispatchedPlan(correlation_id="c", activities=onboarding, variables={})],
        tool_calls=[ToolCall(name="dispatch_workflow", args={})],
        reply="done",
    )
    results = await evaluate_planner_run(
        run,
        Itinerary(expected=[*onboarding, "send-welcome-email"], alternatives=[onboarding]),
        Refused(),
        ToolCalls(required=["list_activities", "dispatch_workflow"], forbidden=["dispatch_workflow"]),
    )
    assert results == {
        "Itinerary": (
            True,
            "dispatched ['validate-customer-data', 'create-customer-account'], acceptable (exact): "
            "['validate-customer-data', 'create-customer-account', 'send-welcome-email'] or "
            "['validate-customer-data', 'create-customer-account']",
        ),
        "Refused": (False, "dispatched validate-customer-data -> create-customer-account"),
        "ToolCalls": (
            False,
            "expected calls to ['list_activities', 'dispatch_workflow'] in that order; called dispatch_workflow; "
            "calls: ['dispatch_workflow']",
        ),
    }


def without(activity: str) -> FunctionModel:
    """A broken planner: the offline policy, but `activity` is taken out of every plan it dispatches."""

    def policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        response = planner_policy(messages, info)
        parts = list(response.parts)
        for index, part in enumerate(parts):
            if isinstance(part, ToolCallPart) and part.tool_name == "dispatch_workflow":
                args = part.args_as_dict()
                args["activities"] = [name for name in args["activities"] if name != activity]
                parts[index] = ToolCallPart(part.tool_name, args, tool_call_id=part.tool_call_id)
        return ModelResponse(parts=parts)

    return FunctionModel(policy)


async def test_a_planner_that_drops_the_payment_step_is_refused_by_the_toolset() -> None:
    task = planner.planner_task(without("process-payment"))
    run = await task(PlannerCase(request="Handle order ord-9 end to end: 1 x SKU-BOOK for $5, ship to 1 A St."))
    assert run.dispatched == []
    refused = [call for call in run.tool_calls if call.name == "dispatch_workflow"]
    assert len(refused) == 2  # the plan, and the same plan again after the repair: then it gives up
    assert all(call.retried for call in refused)
    assert all("'update-inventory' must come after 'process-payment'" in (call.refusal or "") for call in refused)
    assert run.reply.startswith("I could not dispatch a plan: The plan was not dispatched: ")


async def test_a_planner_that_never_asks_for_clarification_fails_the_suite() -> None:
    def never_asks(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        response = planner_policy(messages, info)
        if any(isinstance(part, TextPart) and part.content.endswith("?") for part in response.parts):
            return ModelResponse(parts=[TextPart("On it: I'll take care of that for you.")])
        return response

    output = io.StringIO()
    options = SuiteOptions(planner_model=FunctionModel(never_asks))
    [result] = await run_suites(["planner"], options=options, console=Console(file=output, width=200))
    assert not result.ok
    out = output.getvalue()
    assert "x onboard-without-an-email / AsksClarification: no question about ['email'] in the reply" in out
    assert re.search(r"clarify 0/\d+", out)
    assert "FAIL planner:" in out


async def test_the_rule_evaluators_fail_a_run_that_shipped_without_paying() -> None:
    unpaid = ["validate-order", "check-inventory", "generate-shipping-label", "send-confirmation"]
    variables: dict[str, JsonValue] = {"order_id": "o", "sku": "S", "quantity": 1, "address": "a"}
    run = PlannerRun(
        dispatched=[DispatchedPlan(correlation_id="c", activities=unpaid, variables=variables)],
        tool_calls=[ToolCall(name="dispatch_workflow", args={})],
        reply="Dispatched.",
    )
    results = await evaluate_planner_run(
        run, FollowsCatalogRules(), RefusedByCatalog(rule="process-payment"), AsksClarification(about=["amount"])
    )
    assert results["FollowsCatalogRules"] == (
        False,
        "validate-order -> check-inventory -> generate-shipping-label -> send-confirmation: 'generate-shipping-label' "
        "must come after 'process-payment', which the plan lacks: add 'process-payment' before "
        "'generate-shipping-label'; 'generate-shipping-label' must come after 'update-inventory', which the plan "
        "lacks: add 'update-inventory' before 'generate-shipping-label'",
    )
    assert results["RefusedByCatalog"][0] is False
    assert results["AsksClarification"][0] is False
