from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from dirty_equals import IsStr
from inline_snapshot import snapshot
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    FunctionActivity,
    InMemoryTransport,
    ItineraryRevision,
    RetryPolicy,
    RoutingSlip,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)

from .scripted import Script, Turn, call, tool_returns

DONE = ModelResponse(parts=[TextPart("triaged")])


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


@activity(name="escalate")
async def escalate(ctx: ActivityContext) -> dict[str, bool]:
    """Page the on-call engineer."""
    return {"escalated": True}


@activity(name="route-to-team")
async def route_to_team(ctx: ActivityContext) -> dict[str, str]:
    """Pick the team."""
    return {"team": "billing"}


@activity(name="follow-up")
async def follow_up(ctx: ActivityContext) -> None:
    """Schedule a follow-up call."""


class Route:
    """The last step: records the slip it arrives with."""

    def __init__(self, name: str = "respond") -> None:
        self.slips: list[RoutingSlip] = []
        self.activity = FunctionActivity(self.respond, name=name)

    async def respond(self, ctx: ActivityContext) -> None:
        self.slips.append(ctx.routing_slip.model_copy(deep=True))


def catalog_of(*activities: FunctionActivity) -> ActivityCatalog:
    catalog = ActivityCatalog()
    for item in activities:
        catalog.add(item, produces=["team"] if item is route_to_team else None)  # its return type does not say
    catalog.add(ActivitySpec(name="notify-team", description="Page the team."), needs=["team"])
    catalog.add(ActivitySpec(name="refund-payment", description="Refund the customer."))
    return catalog


async def run_workflow(
    transport: InMemoryTransport,
    turns: list[Turn],
    route: list[str],
    *,
    max_revisions: int = 3,
    retry: RetryPolicy | None = None,
) -> tuple[Script, Route, list[WorkflowEvent]]:
    respond = Route()
    catalog = catalog_of(escalate, route_to_team, follow_up, respond.activity)
    script = Script(turns)
    triage = AgentActivity(
        Agent(script.model, name="triage"),
        toolsets=[ItineraryRevision(catalog, max_revisions=max_revisions, forbidden={"refund-payment"})],
        retry=retry,
    )
    notify = FunctionActivity(lambda ctx: None, name="notify-team")
    events: list[WorkflowEvent] = []
    worker = Worker(
        transport, [triage, escalate, route_to_team, follow_up, notify, respond.activity], on_event=events.append
    )
    await WorkflowDispatcher(transport).dispatch_workflow(route, {"ticket": "can't log in"})
    await worker.run(burst=True)
    return script, respond, events


def ran(events: list[WorkflowEvent]) -> list[str | None]:
    return [event.activity for event in events if event.kind == "step_completed"]


async def test_an_agent_adds_a_step_and_the_workflow_follows_the_revised_route(transport: InMemoryTransport) -> None:
    add = call("add_steps", {"activities": ["escalate"], "reason": "the customer paid and is locked out"})
    script, respond, events = await run_workflow(transport, [add, DONE], ["triage", "respond"])

    # Added at the end of the route, the default: the worker publishes to the revised route.
    assert ran(events) == ["triage", "respond", "escalate"]
    assert json.loads(tool_returns(script.requests[1])[0].model_response_str()) == ["respond", "escalate"]
    [slip] = respond.slips
    assert [revision.model_dump(mode="json") for revision in slip.revisions] == snapshot(
        [
            {
                "step": 0,
                "activity": "triage",
                "action": "add",
                "reason": "the customer paid and is locked out",
                "added": [
                    {
                        "name": "escalate",
                        "description": "Page the on-call engineer.",
                        "arguments": {},
                        "retry": None,
                        "timeout": None,
                        "required_scopes": [],
                    }
                ],
                "discarded": [],
                "remaining": [
                    {
                        "name": "respond",
                        "description": "",
                        "arguments": {},
                        "retry": None,
                        "timeout": None,
                        "required_scopes": [],
                    },
                    {
                        "name": "escalate",
                        "description": "Page the on-call engineer.",
                        "arguments": {},
                        "retry": None,
                        "timeout": None,
                        "required_scopes": [],
                    },
                ],
                "at": IsStr(),
                "signature": IsStr(),
            }
        ]
    )
    assert [entry.name for entry in slip.completed] == ["triage"]
    revised = [event for event in events if event.kind == "revised"]
    assert [(event.activity, event.detail, event.remaining) for event in revised] == snapshot(
        [
            (
                "triage",
                "triage added escalate (the customer paid and is locked out); remaining: respond, escalate",
                ["triage", "respond", "escalate"],
            )
        ]
    )


async def test_added_steps_can_go_before_a_remaining_one(transport: InMemoryTransport) -> None:
    add = call("add_steps", {"activities": ["escalate", "follow-up"], "reason": "urgent", "before": "respond"})
    _, respond, events = await run_workflow(transport, [add, DONE], ["triage", "respond"])

    assert ran(events) == ["triage", "escalate", "follow-up", "respond"]
    assert [entry.name for entry in respond.slips[0].completed] == ["triage", "escalate", "follow-up"]


async def test_replace_and_remove_are_logged_with_what_they_added_and_discarded(transport: InMemoryTransport) -> None:
    replace = call(
        "replace_remaining_steps", {"activities": ["escalate", "follow-up", "respond"], "reason": "urgent route"}
    )
    remove = call("remove_steps", {"activities": ["follow-up"], "reason": "escalation covers it"})
    _, respond, events = await run_workflow(transport, [replace, remove, DONE], ["triage", "route-to-team", "respond"])

    assert ran(events) == ["triage", "escalate", "respond"]
    log = [
        (r.action, [s.name for s in r.added], [s.name for s in r.discarded], [s.name for s in r.remaining])
        for r in respond.slips[0].revisions
    ]
    assert log == snapshot(
        [
            (
                "replace",
                ["escalate", "follow-up"],
                ["route-to-team"],
                ["escalate", "follow-up", "respond"],
            ),
            ("remove", [], ["follow-up"], ["escalate", "respond"]),
        ]
    )


async def test_unknown_and_forbidden_activities_come_back_as_retries(transport: InMemoryTransport) -> None:
    unknown = call("add_steps", {"activities": ["page-ceo", "refund-payment"], "reason": "angry customer"})
    not_remaining = call("remove_steps", {"activities": ["escalate"], "reason": "not needed"})
    script, respond, events = await run_workflow(transport, [unknown, not_remaining, DONE], ["triage", "respond"])

    assert [part.content for part in tool_returns(script.requests[-1])] == snapshot(
        [
            "The route was not changed: unknown activity 'page-ceo'; use only: escalate, route-to-team, follow-up, "
            "respond, notify-team; activity 'refund-payment' is not allowed here.",
            "The route was not changed: 'escalate' is not a remaining step (remaining: respond).",
        ]
    )
    assert ran(events) == ["triage", "respond"]
    assert respond.slips[0].revisions == []


async def test_revisions_are_bounded_per_workflow(transport: InMemoryTransport) -> None:
    first = call("add_steps", {"activities": ["follow-up"], "reason": "needs a call"})
    second = call("add_steps", {"activities": ["escalate"], "reason": "urgent"})
    script, respond, events = await run_workflow(
        transport, [first, second, DONE], ["triage", "respond"], max_revisions=1
    )

    assert tool_returns(script.requests[-1])[-1].content == snapshot(
        "The route was not changed: this workflow has used all 1 revisions it may make. Continue with the current "
        "route."
    )
    assert ran(events) == ["triage", "respond", "follow-up"]
    assert len(respond.slips[0].revisions) == 1


async def test_a_revision_that_leaves_a_step_without_its_variables_is_refused(transport: InMemoryTransport) -> None:
    remove = call("remove_steps", {"activities": ["route-to-team"], "reason": "skip routing"})
    script, _, events = await run_workflow(transport, [remove, DONE], ["triage", "route-to-team", "notify-team"])

    assert tool_returns(script.requests[-1])[0].content == snapshot(
        "The route was not changed: remaining step 1 'notify-team' needs variable 'team', which nothing before it "
        "provides."
    )
    assert ran(events) == ["triage", "route-to-team", "notify-team"]


async def test_the_revisions_of_a_failed_attempt_are_dropped(transport: InMemoryTransport) -> None:
    def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError("model provider unavailable")

    add = call("add_steps", {"activities": ["escalate"], "reason": "urgent"})
    retry = RetryPolicy(max_attempts=2, initial_interval=0.01, jitter=0)
    _, respond, events = await run_workflow(transport, [add, fail, DONE], ["triage", "respond"], retry=retry)

    assert ran(events) == ["triage", "respond"]
    assert respond.slips[0].revisions == []
    assert not [event for event in events if event.kind == "revised"]


async def test_the_revision_tools_the_model_sees(transport: InMemoryTransport) -> None:
    script, _, _ = await run_workflow(transport, [DONE], ["triage", "respond"])

    info = script.infos[0]
    tools = [
        {"name": tool.name, "description": tool.description, "parameters": tool.parameters_json_schema}
        for tool in info.function_tools
    ]
    assert tools == snapshot(
        [
            {
                "name": "view_itinerary",
                "description": (
                    "Show the route: the steps done, this one, the steps still to run, and the activities you may add."
                ),
                "parameters": {"additionalProperties": False, "properties": {}, "type": "object"},
            },
            {
                "name": "add_steps",
                "description": "Add steps to the workflow's remaining route; returns the remaining route.",
                "parameters": {
                    "additionalProperties": False,
                    "properties": {
                        "activities": {
                            "description": "Activity names to add, in the order they run.",
                            "items": {"type": "string"},
                            "type": "array",
                        },
                        "reason": {"description": "Why the route needs them.", "type": "string"},
                        "before": {
                            "anyOf": [{"type": "string"}, {"type": "null"}],
                            "default": None,
                            "description": "A remaining step to put them before; at the end when omitted.",
                        },
                    },
                    "required": ["activities", "reason"],
                    "type": "object",
                },
            },
            {
                "name": "remove_steps",
                "description": "Remove steps from the workflow's remaining route; returns the remaining route.",
                "parameters": {
                    "additionalProperties": False,
                    "properties": {
                        "activities": {
                            "description": "Names of remaining steps to remove (the first one of each name).",
                            "items": {"type": "string"},
                            "type": "array",
                        },
                        "reason": {"description": "Why they are not needed.", "type": "string"},
                    },
                    "required": ["activities", "reason"],
                    "type": "object",
                },
            },
            {
                "name": "replace_remaining_steps",
                "description": "Replace all remaining steps with new ones; returns the remaining route.",
                "parameters": {
                    "additionalProperties": False,
                    "properties": {
                        "activities": {
                            "description": (
                                "Activity names to run after this step instead, in order ([] ends the workflow here)."
                            ),
                            "items": {"type": "string"},
                            "type": "array",
                        },
                        "reason": {"description": "Why the route changes.", "type": "string"},
                    },
                    "required": ["activities", "reason"],
                    "type": "object",
                },
            },
        ]
    )
    assert info.instructions == snapshot(
        "You run as step 'triage' of a durable workflow. Steps still to run after yours: respond. Only if your task "
        "calls for it, change them with `add_steps`, `remove_steps` or `replace_remaining_steps`, using activities "
        "that `view_itinerary` lists, and give a reason. The workflow may be revised 3 more time(s), adding at most 5 "
        "step(s) at a time."
    )


async def test_view_itinerary_shows_the_route_and_the_catalog(transport: InMemoryTransport) -> None:
    script, _, _ = await run_workflow(transport, [call("view_itinerary", {}), DONE], ["triage", "respond"])

    view = json.loads(tool_returns(script.requests[-1])[0].model_response_str())
    assert {key: value for key, value in view.items() if key != "available"} == snapshot(
        {"completed": [], "current": "triage", "remaining": ["respond"], "revisions_left": 3}
    )
    assert [entry["name"] for entry in view["available"]] == [
        "escalate",
        "route-to-team",
        "follow-up",
        "respond",
        "notify-team",
    ]
