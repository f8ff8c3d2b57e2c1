"""Model settings and usage limits per step: a plan may lower an agent's limits, never raise them, and set only the
model settings its activity allows."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import UsageLimits

from paigeant_ai import (
    ActivitySpec,
    AgentActivity,
    InMemoryTransport,
    InMemoryWorkflowStore,
    UserError,
    Worker,
    WorkflowDispatcher,
)
from paigeant_ai._model_settings import lowered_limits, step_run_options

pytestmark = pytest.mark.usefixtures("signed_with_one_key")


@pytest.fixture
async def memory() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


def test_a_plan_lowers_a_limit_and_never_raises_one() -> None:
    own = UsageLimits(request_limit=5, output_tokens_limit=1000)
    assert lowered_limits(own, {"request_limit": 10}) == own
    lowered = lowered_limits(own, {"request_limit": 2, "output_tokens_limit": 5000, "total_tokens_limit": 300})
    assert lowered is not None
    assert (lowered.request_limit, lowered.output_tokens_limit, lowered.total_tokens_limit) == (2, 1000, 300)
    assert own.request_limit == 5  # the worker's own limits are left as they were


def test_without_limits_of_its_own_an_agent_keeps_pydantic_ais_default_request_limit() -> None:
    assert lowered_limits(None, None) is None
    lowered = lowered_limits(None, {"request_limit": 500, "input_tokens_limit": 10})
    assert lowered is not None
    assert (lowered.request_limit, lowered.input_tokens_limit) == (UsageLimits().request_limit, 10)


def test_only_the_settings_the_activity_allows_apply(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.activity"):
        settings, limits = step_run_options(
            "draft",
            "wf-1",
            {"temperature": 0.9, "max_tokens": 400},
            ("temperature",),
            None,
            {"temperature": 0.2, "max_tokens": 100_000, "seed": 7},
            None,
        )
    assert settings == {"temperature": 0.2, "max_tokens": 400}
    assert limits is None
    assert caplog.messages == [
        "step draft of wf-1: model settings max_tokens, seed left out: the activity lets a plan set only temperature"
    ]


def test_a_step_spec_checks_its_settings_and_limits() -> None:
    with pytest.raises(ValidationError, match="request_limit"):
        ActivitySpec(name="draft", usage_limits={"requests": 3})  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ActivitySpec(name="draft", usage_limits={"request_limit": -1})
    with pytest.raises(ValidationError, match="1 to 100 characters"):
        ActivitySpec(name="draft", model_settings={"": 1})


def test_a_parallel_group_leaves_settings_and_limits_to_its_branches() -> None:
    branches = (ActivitySpec(name="research"), ActivitySpec(name="pricing", usage_limits={"request_limit": 2}))
    assert ActivitySpec(name="look", branches=branches).branches[1].usage_limits == {"request_limit": 2}
    with pytest.raises(ValidationError, match="give them to its branches"):
        ActivitySpec(name="look", branches=branches, model_settings={"temperature": 0})


def test_a_step_spec_without_settings_keeps_its_wire_json() -> None:
    assert ActivitySpec(name="draft").model_dump(mode="json") == {
        "name": "draft",
        "description": "",
        "arguments": {},
        "retry": None,
        "timeout": None,
        "required_scopes": [],
    }


def test_overridable_must_be_a_list_of_names() -> None:
    agent = Agent(FunctionModel(lambda messages, info: ModelResponse(parts=[TextPart("ok")])), name="draft")
    with pytest.raises(UserError, match=r"overridable=\['temperature'\]"):
        AgentActivity(agent, overridable="temperature")
    with pytest.raises(UserError, match="each model setting once"):
        AgentActivity(agent, overridable=["temperature", "temperature"])


async def test_a_step_runs_its_agent_with_the_plans_settings_within_the_workers_limits(
    memory: InMemoryTransport,
) -> None:
    seen: list[dict[str, Any]] = []

    def busy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(dict(info.model_settings or {}))
        return ModelResponse(parts=[ToolCallPart("look_up", {})])  # asks for a tool until stopped

    agent = Agent(FunctionModel(busy), name="draft")

    @agent.tool_plain
    def look_up() -> str:  # pyright: ignore[reportUnusedFunction]
        return "more"

    draft = AgentActivity(
        agent,
        model_settings={"temperature": 0.9},
        overridable=["temperature"],
        usage_limits=UsageLimits(request_limit=4),
    )
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(memory, on_event=store.apply)
    step = ActivitySpec(name="draft", model_settings={"temperature": 0.2, "seed": 1}, usage_limits={"request_limit": 2})
    lowered = await dispatcher.dispatch_workflow([step])
    raised = await dispatcher.dispatch_workflow([ActivitySpec(name="draft", usage_limits={"request_limit": 40})])
    await Worker(memory, [draft], on_event=store.apply).run(burst=True)

    # The first workflow's plan set the temperature (not the seed); the second's asked for more requests and ran
    # with the worker's settings and its limit of 4.
    assert (
        sorted(json.dumps(settings) for settings in seen)
        == [json.dumps({"temperature": 0.2})] * 2 + [json.dumps({"temperature": 0.9})] * 4
    )
    for cid, requests in ((lowered, 2), (raised, 4)):
        status = await store.get(cid)
        assert status is not None
        assert status.state == "faulted"
        assert status.failure is not None
        assert f"request_limit of {requests}" in status.failure
        assert status.usage is not None
        assert status.usage.requests == requests


def test_a_plan_that_may_set_max_tokens_only_lowers_the_workers(caplog: pytest.LogCaptureFixture) -> None:
    own: Any = {"max_tokens": 800}
    raised, _ = step_run_options("draft", "wf-1", own, ("max_tokens",), None, {"max_tokens": 100_000}, None)
    lowered, _ = step_run_options("draft", "wf-1", own, ("max_tokens",), None, {"max_tokens": 100}, None)
    assert raised == {"max_tokens": 800}
    assert lowered == {"max_tokens": 100}
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.activity"):
        worded, _ = step_run_options("draft", "wf-1", own, ("max_tokens",), None, {"max_tokens": "lots"}, None)
    assert worded == {"max_tokens": 800}
    assert caplog.messages == ["step draft of wf-1: model setting max_tokens left out: 'lots' is not a whole number"]
    unset, _ = step_run_options("draft", "wf-1", None, ("max_tokens",), None, {"max_tokens": 300}, None)
    assert unset == {"max_tokens": 300}  # the worker set no cap of its own
