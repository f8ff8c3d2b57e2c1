"""Each activity has a version, given or derived; each log entry records the version that ran its step; a step
pinned to a version range runs only on a worker whose version is in it."""

from __future__ import annotations

import asyncio
import functools
import re

import pydantic
import pytest
from pydantic_ai import Agent

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    EndWorkflow,
    PaigeantMessage,
    Parallel,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai._cli_workflows import render_status
from paigeant_ai._dedupe import InMemoryDedupeStore
from paigeant_ai._versions import activity_version, fits
from paigeant_ai.activity import FunctionActivity
from paigeant_ai.exceptions import NonRetryableError, UserError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.store import project
from paigeant_ai.transports import InMemoryTransport

from .brokers import wait_until

KEY = generate_key("versions-1")


async def _step(ctx: ActivityContext) -> dict[str, int]:
    return {"n": 1}


def test_a_given_version_is_the_activity_s_and_must_be_pep_440() -> None:
    assert activity_version(activity(name="a", version="2.1.0")(_step)) == "2.1.0"
    assert activity_version(AgentActivity(Agent("test", name="ag"), version="3.0")) == "3.0"
    with pytest.raises(UserError, match=r"the version 'two' of activity 'a' is not a PEP 440 version: write one"):
        activity(name="a", version="two")(_step)


def test_a_version_not_given_is_the_distribution_s_else_a_digest_of_the_code() -> None:
    assert re.fullmatch(r"0\+[0-9a-f]{8}", activity_version(activity(name="a")(_step)) or "")
    agent_version = activity_version(AgentActivity(Agent("test", name="ag")))  # built in this test module
    assert re.fullmatch(r"0\+[0-9a-f]{8}", agent_version or "")
    installed = activity_version(FunctionActivity(pydantic.validate_call, name="v"))  # pyright: ignore[reportArgumentType]
    assert installed == pydantic.VERSION
    assert fits(activity_version(activity(name="a")(_step)), "<1")  # a local version is below every release


def test_version_ranges() -> None:
    assert fits("2.1.3", "~=2.1")
    assert not fits("2.0.9", "~=2.1")
    assert fits("2.5", ">=2,<3")
    assert not fits("3.0", ">=2,<3")
    assert not fits(None, ">=0")


async def test_each_log_entry_records_the_version_that_ran_its_step() -> None:
    @activity(name="fails", version="1.0.1")
    async def fails(ctx: ActivityContext) -> None:
        raise NonRetryableError("no")

    @activity(name="ends", version="4.2")
    async def ends(ctx: ActivityContext) -> None:
        raise EndWorkflow("enough")

    finals: list[PaigeantMessage] = []

    @activity(name="last", version="1.0")
    async def last(ctx: ActivityContext) -> None:
        finals.append(ctx.message.model_copy(deep=True))

    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
        worker = Worker(
            transport,
            [activity(name="a", version="2.1.0")(_step), fails, ends, last],
            security=MessageSigner(KEY),
            on_event=events.append,
        )
        ended = await dispatcher.dispatch_workflow(["a", "ends"], {})
        done = await dispatcher.dispatch_workflow(["a", "last"], {})
        faulted = await dispatcher.dispatch_workflow(["fails"], {})
        await worker.run(burst=True)

    (final,) = finals
    assert [(entry.name, entry.version) for entry in final.routing_slip.completed] == [("a", "2.1.0")]
    status = project(ended, events)
    assert status is not None
    assert [(step.activity, step.state, step.version) for step in status.steps] == [
        ("a", "completed", "2.1.0"),
        ("ends", "completed", "4.2"),
    ]
    assert "version 4.2" in render_status(status)
    assert '"version":"2.1.0"' in status.model_dump_json()
    faulted_status = project(faulted, events)
    assert faulted_status is not None
    assert [(step.activity, step.version) for step in faulted_status.steps] == [("fails", "1.0.1")]
    assert project(done, events) is not None


@pytest.mark.parametrize("grouped", [False, True])
def test_a_pin_that_is_not_a_version_range_is_refused_at_dispatch(grouped: bool) -> None:
    pinned = ActivitySpec(name="a", version="2.x")

    async def dispatch() -> None:
        async with InMemoryTransport() as transport:
            route = [Parallel(pinned, "b")] if grouped else [pinned]
            await WorkflowDispatcher(transport).dispatch_workflow(route, {})

    with pytest.raises(UserError, match=r"the version range '2.x' of step 'a' is not a PEP 440 specifier: write"):
        asyncio.run(dispatch())


async def test_a_pinned_step_waits_for_a_worker_whose_version_fits_and_then_runs_there() -> None:
    ran: list[str] = []

    def charge(version: str) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, str]:
            ran.append(version)
            return {"charged_by": version}

        return activity(name="charge", version=version)(run)

    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
        correlation_id = await dispatcher.dispatch_workflow([ActivitySpec(name="charge", version="~=2.1")], {})
        old = Worker(transport, [charge("1.9")], security=MessageSigner(KEY), on_event=events.append)
        running = asyncio.create_task(old.run())
        await wait_until(lambda: any(event.kind == "waiting" for event in events), within=10, what="the wait")
        status = project(correlation_id, events)
        assert status is not None
        assert status.state == "waiting"
        assert "waiting for charge ~=2.1" in render_status(status)
        old.stop()
        await running
        new = Worker(transport, [charge("2.1.4")], security=MessageSigner(KEY), on_event=events.append)
        await new.run(burst=True)

    assert ran == ["2.1.4"]
    assert [event.kind for event in events].count("waiting") == 1  # once per hop, however often handed back
    assert not [event for event in events if event.kind in ("rejected", "faulted", "step_retried")]
    status = project(correlation_id, events)
    assert status is not None
    assert status.state == "completed"
    assert [(step.activity, step.version, step.attempts) for step in status.steps] == [("charge", "2.1.4", 1)]


async def test_a_pinned_branch_of_a_parallel_group_waits_for_its_version_and_the_group_joins() -> None:
    def research(version: str) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, str]:
            return {"found": version}

        return activity(name="research", version=version)(run)

    other = activity(name="inventory", version="1.0")(_step)
    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
        group = Parallel(ActivitySpec(name="research", version=">=2"), "inventory")
        correlation_id = await dispatcher.dispatch_workflow([group], {})
        old = Worker(transport, [research("1.5"), other], security=MessageSigner(KEY), on_event=events.append)
        running = asyncio.create_task(old.run())
        await wait_until(lambda: any(event.kind == "waiting" for event in events), within=10, what="the wait")
        old.stop()
        await running
        new = Worker(transport, [research("2.0"), other], security=MessageSigner(KEY), on_event=events.append)
        await new.run(burst=True)

    status = project(correlation_id, events)
    assert status is not None
    assert status.state == "completed"
    assert status.payload is not None
    assert status.payload["research"] == {"found": "2.0"}
    versions = {(step.activity, step.branch): step.version for step in status.steps if step.branch}
    assert versions == {("research", "research"): "2.0", ("inventory", "inventory"): "1.0"}


def test_a_derived_version_is_the_same_for_a_partial_and_for_a_callable_object() -> None:
    class Step:
        def __eq__(self, other: object) -> bool:  # defines equality, so it cannot be hashed
            return isinstance(other, Step)

        __hash__ = None  # pyright: ignore[reportAssignmentType]

        async def __call__(self, ctx: ActivityContext) -> None:
            return None

    plain = activity_version(FunctionActivity(_step, name="a"))
    assert activity_version(FunctionActivity(functools.partial(_step), name="a")) == plain
    made = activity_version(FunctionActivity(Step(), name="b"))
    assert made == activity_version(FunctionActivity(Step(), name="b"))
    assert re.fullmatch(r"0\+[0-9a-f]{8}", made or "")


async def test_a_workflow_waiting_for_its_pinned_version_is_cancelled_by_a_worker_outside_the_range() -> None:
    ran: list[str] = []

    async def charge(ctx: ActivityContext) -> dict[str, str]:
        ran.append("1.9")
        return {}

    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
        correlation_id = await dispatcher.dispatch_workflow([ActivitySpec(name="charge", version="~=2.1")], {})
        old = Worker(
            transport,
            [activity(name="charge", version="1.9")(charge)],
            security=MessageSigner(KEY),
            on_event=events.append,
        )
        running = asyncio.create_task(old.run())
        await wait_until(lambda: any(event.kind == "waiting" for event in events), within=10, what="the wait")
        await dispatcher.cancel(correlation_id, "no longer wanted", by="ops")
        await wait_until(lambda: any(event.kind == "cancelled" for event in events), within=10, what="the cancel")
        old.stop()
        await running

    assert ran == []
    status = project(correlation_id, events)
    assert status is not None
    assert status.state == "cancelled"


async def test_a_copy_of_a_pinned_step_that_ran_already_does_not_show_its_workflow_waiting_again() -> None:
    from paigeant_ai._plan import new_plan
    from paigeant_ai._sealing import seal

    message = PaigeantMessage.new([ActivitySpec(name="charge", version="~=2.1")], {})
    message.plan = new_plan(message, MessageSigner(KEY))
    body = seal(message, MessageSigner(KEY), max_bytes=1 << 20)
    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        await transport.publish("charge", body)
        signer, dedupe = MessageSigner(KEY), InMemoryDedupeStore()  # what the replicas share (Redis in production)
        new = Worker(transport, [activity(name="charge", version="2.1.4")(_step)], security=signer, dedupe=dedupe)
        await new.run(burst=True)
        await transport.publish("charge", body)  # the copy: a lost ack's redelivery, or a replay
        charge = activity(name="charge", version="1.9")(_step)
        old = Worker(transport, [charge], security=signer, dedupe=dedupe, on_event=events.append)
        running = asyncio.create_task(old.run())
        await wait_until(lambda: bool(events), within=10, what="the copy settled")
        await asyncio.sleep(0.3)  # time for a second event, were the copy handed back
        old.stop()
        await running

    assert "waiting" not in [event.kind for event in events]
    assert [event.kind for event in events] == ["rejected"]


async def test_a_pin_the_signed_plan_does_not_hold_is_refused_not_waited_for() -> None:
    from paigeant_ai._plan import new_plan
    from paigeant_ai._sealing import seal

    message = PaigeantMessage.new([ActivitySpec(name="charge")], {})
    message.plan = new_plan(message, MessageSigner(KEY))
    message.routing_slip.itinerary[0] = ActivitySpec(name="charge", version="~=9.0")  # pinned on the way
    body = seal(message, MessageSigner(KEY), max_bytes=1 << 20)
    async with InMemoryTransport() as transport:
        events: list[WorkflowEvent] = []
        await transport.publish("charge", body)
        charge = activity(name="charge", version="1.0")(_step)
        worker = Worker(transport, [charge], security=MessageSigner(KEY), on_event=events.append)
        running = asyncio.create_task(worker.run())
        await wait_until(lambda: bool(events), within=10, what="the hop settled")
        worker.stop()
        await running

    assert [event.kind for event in events] == ["rejected"]
    assert "plan" in (events[0].detail or "")
