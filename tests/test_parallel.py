"""Parallel groups: fan-out, the durable join and the merge, a group's failure, on every transport.

Signed workers run in this process on the in-memory transport, Redis and RabbitMQ alike; on RabbitMQ the join store
is the shared Redis store (`PAIGEANT_SHARED_STORE_URL`). What ran is recorded by the activities themselves; where a
workflow ended is read from its status, projected from the events its workers reported.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from logfire.testing import CaptureLogfire
from pydantic_ai import Agent, FunctionToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    Activity,
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    FunctionActivity,
    InMemoryTransport,
    InvalidPlan,
    NonRetryableError,
    NoWorker,
    Parallel,
    RetryPolicy,
    Revision,
    UserError,
    Worker,
    WorkflowDispatcher,
)
from paigeant_ai._cli_workflows import render_status
from paigeant_ai._group_marks import GroupMark
from paigeant_ai._join import NO_JOIN_STORE, BranchResult, InMemoryJoinStore
from paigeant_ai._sealing import seal
from paigeant_ai.approval import WaitingStore, get_waiting_store
from paigeant_ai.contracts import ActivityLogEntry, Compensation, PaigeantMessage, utcnow
from paigeant_ai.planner import _marked  # pyright: ignore[reportPrivateUsage]
from paigeant_ai.security import generate_key
from paigeant_ai.store import InMemoryWorkflowStore, WorkflowStatus
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.transports.redis._joins import RedisJoinStore
from paigeant_ai.transports.sqlite import SQLiteJoinStore

from .brokers import REDIS_URL, dead_letters, delete_redis_namespace
from .test_steering import KEYS, signer

GROUP = Parallel("research", "inventory", "pricing")


@pytest.fixture
async def joinable(transport: Transport, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Transport]:
    """`transport`, with the Redis store its RabbitMQ workers and dispatchers share (in its namespace)."""
    namespace = str(getattr(transport, "namespace", ""))
    if transport.name == "rabbitmq":
        monkeypatch.setenv("PAIGEANT_SHARED_STORE_URL", REDIS_URL)
        monkeypatch.setenv("PAIGEANT_NAMESPACE", namespace)
    yield transport
    if transport.name == "rabbitmq":
        await delete_redis_namespace(namespace)


@dataclass
class Team:
    """A workflow's steps, each recording what it did; `fail` names the steps that fail for good, `flaky` those that
    fail on their first attempt, and `waits` what a step waits for before it returns."""

    transport: Transport
    fail: set[str] = field(default_factory=set[str])
    flaky: set[str] = field(default_factory=set[str])
    waits: dict[str, Callable[[], bool]] = field(default_factory=dict[str, Callable[[], bool]])
    ran: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    undone: list[tuple[str, str, Compensation]] = field(default_factory=list[tuple[str, str, Compensation]])
    interrupted: list[str] = field(default_factory=list[str])
    seen: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    store: InMemoryWorkflowStore = field(default_factory=InMemoryWorkflowStore)
    waiting: WaitingStore | None = None

    def __post_init__(self) -> None:
        self.dispatcher = WorkflowDispatcher(
            self.transport, security=signer(KEYS.orders), on_event=self.store.apply, waiting_store=self.waiting
        )
        self.worker_ = self.worker()

    def step(self, name: str, *, compensate: str | None = None) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, Any]:
            self.ran.append((name, ctx.correlation_id))
            self.seen[f"{name} {ctx.correlation_id}"] = dict(ctx.payload)
            if name in self.flaky and ctx.attempt == 0:
                raise RuntimeError(f"{name} hiccupped")
            if name in self.fail:
                raise NonRetryableError(f"{name} is down")
            if (condition := self.waits.get(name)) is not None:
                try:
                    while not condition():  # noqa: ASYNC110  # a condition on what other steps did
                        await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    self.interrupted.append(name)
                    raise
            return {"by": name, "of": ctx.correlation_id[:8]}

        retry = RetryPolicy(max_attempts=2, initial_interval=0.01)
        return FunctionActivity(run, name=name, compensate=compensate, retry=retry)

    def undo(self, name: str) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, Any]:
            assert ctx.undoing is not None
            self.undone.append((name, ctx.correlation_id, ctx.undoing))
            return {}

        return FunctionActivity(run, name=name, retry=RetryPolicy(max_attempts=1))

    def worker(self, *extra: Activity) -> Worker:
        steps = [
            self.step("validate", compensate="unvalidate"),
            self.step("research", compensate="forget-research"),
            self.step("inventory", compensate="release-stock"),
            self.step("pricing"),
            self.step("broken"),
            self.step("decide"),
            self.undo("unvalidate"),
            self.undo("forget-research"),
            self.undo("release-stock"),
            *extra,
        ]
        worker = Worker(
            self.transport,
            steps,
            security=signer(KEYS.shop, self.transport),
            on_event=self.store.apply,
            concurrency=20,
            waiting_store=self.waiting,
        )
        worker.cancel_poll = 0.05
        return worker

    def order(self, cid: str) -> list[str]:
        return [name for name, of in self.ran if of == cid]

    def undid(self, cid: str) -> list[str]:
        return [name for name, of, _ in self.undone if of == cid]

    async def until(self, check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def ended(self, cid: str, state: str) -> WorkflowStatus:
        async def done() -> bool:
            status = await self.store.get(cid)
            return status is not None and status.state == state

        await self.until(done, f"{cid} to end {state}")
        status = await self.store.get(cid)
        assert status is not None
        return status


async def test_a_group_runs_its_branches_and_merges_their_outputs_under_their_keys(joinable: Transport) -> None:
    team = Team(joinable)
    cid = await team.dispatcher.dispatch_workflow(["validate", GROUP, "decide"], {"order": 7})
    await team.worker_.run(burst=True)

    status = await team.ended(cid, "completed")
    assert sorted(team.order(cid)) == ["decide", "inventory", "pricing", "research", "validate"]
    assert team.order(cid)[0] == "validate"
    assert team.order(cid)[-1] == "decide", "the step after the group runs once, after every branch"
    for name in ("research", "inventory", "pricing"):
        assert team.seen[f"{name} {cid}"] == {"order": 7, "by": "validate", "of": cid[:8]}, (
            "each sees the payload before"
        )
        assert team.seen[f"decide {cid}"][name] == {"by": name, "of": cid[:8]}
    assert status.payload is not None
    assert status.payload["research"] == {"by": "research", "of": cid[:8]}
    assert status.payload["by"] == "decide"
    assert await dead_letters(joinable) == []
    steps = [(step.step, step.activity, step.branch, step.state) for step in status.steps]
    assert sorted(steps, key=str) == sorted(
        [
            (0, "validate", None, "completed"),
            (1, "research", "research", "completed"),
            (1, "inventory", "inventory", "completed"),
            (1, "pricing", "pricing", "completed"),
            (2, "decide", None, "completed"),
        ],
        key=str,
    ), "the branches side by side, at the group's step"
    kinds = [event.kind for event in status.events]
    assert kinds.count("fanned_out") == kinds.count("joined") == 1
    fanned = next(event for event in status.events if event.kind == "fanned_out")
    assert fanned.detail == "3 branches: research (research), inventory (inventory), pricing (pricing)"
    shown = render_status(status)  # what `paigeant status` prints
    assert "branch research" in shown
    assert "fanned_out" in shown
    joined = next(event for event in status.events if event.kind == "joined")
    assert (joined.step, joined.activity, joined.detail) == (
        1,
        "parallel",
        "3 branches merged: research, inventory, pricing",
    )


async def test_a_group_may_start_a_workflow_and_end_it_with_keys_of_its_own(joinable: Transport) -> None:
    team = Team(joinable)
    group = Parallel("research", ActivitySpec(name="research", key="second-look"), keys=["first-look", None])
    assert group.keys == ["first-look", "second-look"]
    cid = await team.dispatcher.dispatch_workflow([group])
    await team.worker_.run(burst=True)

    status = await team.ended(cid, "completed")
    assert team.order(cid) == ["research", "research"]
    assert status.payload == {
        "first-look": {"by": "research", "of": cid[:8]},
        "second-look": {"by": "research", "of": cid[:8]},
    }


async def test_a_branch_is_retried_on_its_own(joinable: Transport) -> None:
    team = Team(joinable, flaky={"inventory"})
    cid = await team.dispatcher.dispatch_workflow(["validate", GROUP, "decide"])
    await team.worker_.run(burst=True)

    await team.ended(cid, "completed")
    assert sorted(team.order(cid)) == ["decide", "inventory", "inventory", "pricing", "research", "validate"]


async def test_a_branch_falls_back_in_order_and_its_fallbacks_output_goes_under_its_key(joinable: Transport) -> None:
    team = Team(joinable, fail={"broken"})
    branch = ActivitySpec(name="broken", fallbacks=("pricing",))
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel(branch, "inventory"), "decide"])
    await team.worker_.run(burst=True)

    status = await team.ended(cid, "completed")
    assert sorted(team.order(cid)) == ["broken", "decide", "inventory", "pricing", "validate"]
    assert status.payload is not None
    assert status.payload["broken"] == {"by": "pricing", "of": cid[:8]}, "the branch's key, the fallback's output"
    failed = [(step.activity, step.branch, step.state) for step in status.steps if step.state == "failed"]
    assert failed == [("broken", "broken", "failed")]


async def test_a_branch_that_fails_for_good_undoes_the_steps_before_and_the_branches_that_completed(
    joinable: Transport,
) -> None:
    team = Team(joinable)
    group = Parallel("research", "inventory", "broken")

    async def broken(ctx: ActivityContext) -> None:  # fails once validate and the other two branches completed
        team.ran.append(("broken", ctx.correlation_id))
        while team.worker_.stats.completed_steps < 3:  # noqa: ASYNC110  # the worker's count
            await asyncio.sleep(0.02)
        raise NonRetryableError("broken is down")

    team.worker_.activities["broken"] = FunctionActivity(broken, name="broken", retry=RetryPolicy(max_attempts=1))
    cid = await team.dispatcher.dispatch_workflow(["validate", group, "decide"])
    await team.worker_.run(burst=True)

    status = await team.ended(cid, "compensated")
    assert "decide" not in team.order(cid)
    undid = team.undid(cid)
    assert sorted(undid[:2]) == ["forget-research", "release-stock"], "the completed branches, latest first"
    assert undid[2:] == ["unvalidate"], "then the step before the group"
    branch_records = [record for name, _, record in team.undone if name != "unvalidate"]
    assert {record.branch for record in branch_records} == {"research", "inventory"}
    assert all(record.step == 1 for record in branch_records)
    assert status.failure is not None
    assert "broken is down" in status.failure
    group_rows = {(row.branch, row.activity): row.state for row in status.steps if row.step == 1 and row.branch}
    assert group_rows == {
        ("research", "research"): "completed",
        ("inventory", "inventory"): "completed",
        ("broken", "broken"): "failed",
    }, "each branch in its own row, the failed one failed"
    assert not [row for row in status.steps if row.activity == "broken" and row.branch is None]
    assert await dead_letters(joinable) == []


async def test_a_branch_that_completes_after_its_group_failed_is_undone_not_joined(joinable: Transport) -> None:
    team = Team(joinable, fail={"broken"})
    cid_box: list[str] = []

    def group_failed() -> bool:
        return bool(cid_box) and "unvalidate" in team.undid(cid_box[0])

    team.waits["research"] = group_failed
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "broken"), "decide"])
    cid_box.append(cid)
    await team.worker_.run(burst=True)

    await team.until(_now(lambda: "forget-research" in team.undid(cid)), "the late branch to be undone")
    assert sorted(team.undid(cid)) == ["forget-research", "unvalidate"], "each undone once"
    assert "decide" not in team.order(cid)
    status = await team.ended(cid, "compensated")
    research = [row for row in status.steps if row.activity == "research"]
    assert [row.state for row in research] == ["completed"], "it did complete, and was undone"
    assert status.failure is not None
    assert "broken" in status.failure, "the late branch's undoing keeps why the workflow stopped"


async def test_a_cancel_stops_the_running_branches(joinable: Transport) -> None:
    team = Team(joinable)
    team.waits["research"] = team.waits["inventory"] = lambda: False  # until interrupted
    async with team.worker_:
        cid = await team.dispatcher.dispatch_workflow(["validate", GROUP, "decide"])
        await team.until(_now(lambda: {"research", "inventory"} <= set(team.order(cid))), "the branches to start")
        await team.dispatcher.cancel(cid, "no longer needed", by="support:bob")
        await team.ended(cid, "cancelled")
        await team.until(_now(lambda: team.undid(cid) == ["unvalidate"]), "the step before the group to be undone")

    assert sorted(team.interrupted) == ["inventory", "research"]
    assert team.undid(cid) == ["unvalidate"], "the steps before the group undone once; no branch had completed"
    assert "decide" not in team.order(cid)


async def test_the_workflows_deadline_stops_the_running_branches(joinable: Transport) -> None:
    team = Team(joinable)
    team.waits["research"] = lambda: False  # until its timeout is cut short by the deadline
    dispatcher = WorkflowDispatcher(joinable, security=signer(KEYS.orders), on_event=team.store.apply, ttl=2)
    async with team.worker_:
        cid = await dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
        await team.ended(cid, "expired")
        await team.until(_now(lambda: sorted(team.undid(cid)) == ["release-stock", "unvalidate"]), "the undoing")

    assert team.interrupted == ["research"]
    assert team.undid(cid)[-1] == "unvalidate", "the completed branch first, then the step before the group"
    assert "decide" not in team.order(cid)


async def test_a_group_of_more_than_64_branches_is_refused_at_dispatch_and_in_a_revision(
    joinable: Transport,
) -> None:
    team = Team(joinable)
    many = [f"part-{number}" for number in range(100)]
    with pytest.raises(UserError, match=r"^a parallel group may have at most 64 branches, not 100: split"):
        Parallel(*many)
    with pytest.raises(UserError, match="at most 64 branches, not 100"):
        await team.dispatcher.dispatch_workflow(
            ["validate", ActivitySpec(name="parallel", branches=tuple(ActivitySpec(name=name) for name in many))]
        )

    async def planner(ctx: ActivityContext) -> dict[str, Any]:
        group = ActivitySpec(name="parallel", branches=tuple(ActivitySpec(name=name) for name in many))
        ctx.revisions.append(
            Revision(step=ctx.step, activity="planner", action="add", reason="fan out", remaining=[group])
        )
        return {}

    worker = team.worker(FunctionActivity(planner, name="planner"))
    cid = await team.dispatcher.dispatch_workflow(["planner"])
    await worker.run(burst=True)
    status = await team.ended(cid, "faulted")
    assert status.failure is not None
    assert "parallel group 'parallel' has 100 branches, at most 64 are allowed" in status.failure


def test_two_branches_with_one_key_are_refused_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"have the key 'research'; give one of them its own key, as in Parallel\("):
        Parallel("research", "research")
    with pytest.raises(UserError, match="cannot hold another group"):
        Parallel("research", Parallel("inventory", "pricing"))  # pyright: ignore[reportArgumentType]
    assert Parallel("research", "research", keys=["a", "b"]).keys == ["a", "b"]


async def test_a_forged_branch_result_in_the_join_store_is_refused_and_the_genuine_one_joins(
    joinable: Transport,
) -> None:
    team = Team(joinable)
    team.waits["inventory"] = lambda: team.worker_.stats.rejected >= 1  # completes once the forgery was refused
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
    now = utcnow()
    forged = BranchResult(
        correlation_id=cid,
        step=1,
        key="inventory",
        entries=[ActivityLogEntry(name="inventory", step=1, started_at=now, finished_at=now, branch="inventory")],
        output={"stock": 10**6},
    ).sign(signer(generate_key("mallory-1")))
    record = forged.model_dump_json().encode()
    if joinable.name == "rabbitmq":  # the shared store the workers join in
        async with RedisTransport(REDIS_URL, namespace=str(getattr(joinable, "namespace", ""))) as shared:
            await shared.join_store().add(f"{cid}/1", "inventory", record, ttl=60)
    else:
        assert team.worker_.joins is not None
        await team.worker_.joins.add(f"{cid}/1", "inventory", record, ttl=60)
    await team.worker_.run(burst=True)

    status = await team.ended(cid, "completed")
    assert status.payload is not None
    assert status.payload["inventory"] == {"by": "inventory", "of": cid[:8]}, "the forged output was never joined"
    letters = await dead_letters(joinable)
    assert len(letters) == 1
    reason = letters[0].headers[REASON_HEADER]
    assert reason.startswith("security check failed: branch_result: the result of branch 'inventory'")


async def test_a_continuation_that_forges_a_groups_log_is_refused(joinable: Transport) -> None:
    team = Team(joinable)
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
    async with await joinable.consume("validate") as consumer:
        delivery = await asyncio.wait_for(anext(consumer), 5)
        await joinable.ack(delivery)
    message = PaigeantMessage.from_json(delivery.body)
    slip = message.routing_slip
    now = utcnow()
    slip.mark_complete("validate")
    research = ActivityLogEntry(name="research", step=1, started_at=now, finished_at=now, branch="research")
    slip.completed.append(
        ActivityLogEntry(name="parallel", step=1, started_at=now, finished_at=now, branches=[research])
    )
    slip.itinerary.pop(0)
    slip.current = "decide"
    message.payload["research"] = {"verdict": "approve"}
    forged = message.next_hop()
    await joinable.publish("decide", seal(forged, signer(KEYS.desk), max_bytes=1 << 20))
    await team.worker_.run(burst=True)

    assert team.order(cid) == []
    letters = await dead_letters(joinable)
    assert len(letters) == 1
    reason = letters[0].headers[REASON_HEADER]
    assert "plan: parallel group 'parallel' at step 1 did not log each branch completed once" in reason


def _now(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def checked() -> bool:
        return check()

    return checked


@pytest.mark.rabbitmq
async def test_on_rabbitmq_a_group_needs_a_shared_store_at_dispatch_and_at_the_worker(
    transport: Transport, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if transport.name != "rabbitmq":
        pytest.skip("RabbitMQ alone has no store its workers share")
    monkeypatch.delenv("PAIGEANT_SHARED_STORE_URL", raising=False)
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        team = Team(transport)
    assert NO_JOIN_STORE in caplog.text, "the worker says so when it starts"
    with pytest.raises(UserError) as refused:
        await team.dispatcher.dispatch_workflow(["validate", GROUP])
    assert str(refused.value) == NO_JOIN_STORE
    assert "PAIGEANT_SHARED_STORE_URL=redis://" in NO_JOIN_STORE

    monkeypatch.setenv("PAIGEANT_SHARED_STORE_URL", REDIS_URL)  # a dispatcher that has one, a worker that has not
    cid = await Team(transport).dispatcher.dispatch_workflow([Parallel("research")])
    await team.worker_.run(burst=True)
    assert team.order(cid) == []
    letters = await dead_letters(transport)
    assert [letter.headers[REASON_HEADER] for letter in letters] == [NO_JOIN_STORE]


async def test_the_branches_hop_spans_are_siblings_sent_by_the_hop_that_fanned_out(capfire: CaptureLogfire) -> None:
    async with InMemoryTransport() as transport:
        team = Team(transport)
        cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
        await team.worker_.run(burst=True)
        await team.ended(cid, "completed")

    spans = capfire.exporter.exported_spans_as_dict()
    by_id = {span["context"]["span_id"]: span for span in spans}
    hops = {
        span["attributes"]["paigeant.activity"]: span
        for span in spans
        if span["attributes"].get("paigeant.activity") and span["name"] == "paigeant.hop"
    }
    assert {"validate", "research", "inventory", "decide"} <= set(hops), sorted(span["name"] for span in spans)
    assert len({span["context"]["trace_id"] for span in spans}) == 1, "one workflow, one trace"
    assert all(hops[name]["attributes"]["correlation_id"] == cid for name in hops)
    # Every hop's span is a child of the workflow's root (the dispatch span), linked to the hop that sent it.
    dispatch = next(span for span in spans if span["name"] == "paigeant.dispatch")
    assert {hop["parent"]["span_id"] for hop in hops.values()} == {dispatch["context"]["span_id"]}

    def sender(hop: dict[str, Any]) -> str:
        [link] = [link for link in hop.get("links", []) if link["attributes"]["paigeant.link"] == "sender"]
        return by_id[link["context"]["span_id"]]["attributes"]["paigeant.activity"]

    assert sender(hops["research"]) == sender(hops["inventory"]) == "validate", "siblings sent by the fan-out"
    assert sender(hops["decide"]) in ("research", "inventory"), "the continuation is sent by the joining branch"


def test_a_plan_may_hold_a_group_whose_branches_see_the_variables_before_it() -> None:
    catalog = ActivityCatalog()
    catalog.add(ActivitySpec(name="validate"), needs=["order"], produces=["customer"])
    catalog.add(ActivitySpec(name="research"), needs=["customer"], produces=["history"])
    catalog.add(ActivitySpec(name="inventory"), needs=["order"])
    catalog.add(ActivitySpec(name="decide"), needs=["research", "inventory"])
    catalog.add(ActivitySpec(name="peek"), needs=["history"])

    specs = catalog.plan(["validate", ["research", "inventory"], "decide"], ["order"])
    assert [spec.name for spec in specs] == ["validate", "parallel", "decide"]
    assert [branch.branch_key for branch in specs[1].branches] == ["research", "inventory"]

    with pytest.raises(InvalidPlan, match="step 2 'peek' needs variable 'history'"):
        catalog.plan(["validate", ["research", "peek"]], ["order"])  # a branch does not see another's output
    with pytest.raises(InvalidPlan, match="have the key 'research'"):
        catalog.plan(["validate", ["research", "research"]], ["order"])


async def test_require_workers_asks_for_every_branch_of_a_first_group() -> None:
    async with InMemoryTransport() as transport:
        team = Team(transport)
        async with team.worker_:
            with pytest.raises(NoWorker, match="no worker consumes 'unknown-branch'"):
                await team.dispatcher.dispatch_workflow([Parallel("research", "unknown-branch")], require_workers=True)
            cid = await team.dispatcher.dispatch_workflow([Parallel("research", "inventory")], require_workers=True)
            await team.ended(cid, "completed")


def asks_approval(name: str) -> AgentActivity[None, str]:
    """A step whose agent calls a tool that needs approval (so it parks), then answers."""
    tools = FunctionToolset[Any](id=f"tools-{name}")

    @tools.tool_plain(requires_approval=True)
    def send(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Send `text`."""
        return "sent"

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("send", {"text": name}, tool_call_id=f"{name}-1")])
        return ModelResponse(parts=[TextPart(f"{name} done")])

    return AgentActivity(Agent(FunctionModel(model), name=name, toolsets=[tools]), prompt="go", output_key="reply")


async def test_a_second_branch_that_would_wait_while_another_waits_fails_its_group_and_says_why(
    joinable: Transport,
) -> None:
    team = Team(joinable, waiting=get_waiting_store(joinable))

    async def parked() -> bool:
        return team.waiting is not None and await team.waiting.get(cid) is not None

    worker = team.worker(asks_approval("ask-a"), asks_approval("ask-b"))
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("ask-a", "ask-b", "research"), "decide"])
    async with worker:
        await team.until(parked, "a branch to park")
        status = await team.ended(cid, "compensated")
    assert status.failure is not None
    assert "may wait at a time: approve or resolve that one first" in status.failure
    assert team.waiting is not None
    record = await team.waiting.get(cid)
    assert record is not None
    assert record.activity in {"ask-a", "ask-b"}, "the branch that parked first still waits, untouched"
    assert "decide" not in team.order(cid)
    assert "unvalidate" in team.undid(cid)


async def test_cancelling_a_workflow_whose_branch_waits_undoes_the_branches_that_completed(
    joinable: Transport,
) -> None:
    team = Team(joinable, waiting=get_waiting_store(joinable))
    worker = team.worker(asks_approval("ask-a"))
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("ask-a", "research"), "decide"])
    async with worker:

        async def parked_and_research_done() -> bool:
            assert team.waiting is not None
            return await team.waiting.get(cid) is not None and worker.stats.completed_steps >= 2

        await team.until(parked_and_research_done, "the branch to park beside the completed one")
        cancellation = await team.dispatcher.cancel(cid, "no longer needed", by="support:bob")
        assert cancellation.state == "cancelled"
        status = await team.ended(cid, "cancelled")
        await team.until(_now(lambda: len(team.undid(cid)) == 2), "the undoing")

    assert team.undid(cid) == ["forget-research", "unvalidate"], "the completed branch, then the step before"
    assert "decide" not in team.order(cid)
    assert status.cancelled is not None
    assert "no longer needed" in status.cancelled


async def forge_failure_mark(team: Team, group: str, mark: bytes) -> None:
    """Write `mark` as the failure mark of `group` straight into the join store, as whoever can write there could."""
    if team.transport.name == "rabbitmq":  # the shared store the workers join in
        async with RedisTransport(REDIS_URL, namespace=str(getattr(team.transport, "namespace", ""))) as shared:
            joins = shared.join_store()
            await joins.transport.client.hset(joins.key(group), "failed", mark)  # pyright: ignore[reportUnknownMemberType]
        return
    joins = team.worker_.joins
    if isinstance(joins, RedisJoinStore):
        await joins.transport.client.hset(joins.key(group), "failed", mark)  # pyright: ignore[reportUnknownMemberType]
    elif isinstance(joins, SQLiteJoinStore):
        with sqlite3.connect(joins.transport.path) as db:
            db.execute(
                "INSERT OR REPLACE INTO joins VALUES (?, ?, 'failed', ?)", (joins.transport.namespace, group, mark)
            )
    else:
        assert isinstance(joins, InMemoryJoinStore)
        joins._failed[group] = mark  # pyright: ignore[reportPrivateUsage]


async def test_an_unsigned_failure_mark_in_the_join_store_is_ignored_and_the_group_joins(
    joinable: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    team = Team(joinable)
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
    forged = GroupMark(correlation_id=cid, step=1, key="research").sign(signer(generate_key("mallory-2")))
    await forge_failure_mark(team, f"{cid}/1", forged.to_bytes())
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        await team.worker_.run(burst=True)

    await team.ended(cid, "completed")
    assert team.order(cid)[-1] == "decide", "the forged mark made no branch late"
    assert team.undid(cid) == []
    assert any("does not verify and is ignored" in record.getMessage() for record in caplog.records)


async def test_a_revision_may_not_remove_a_group_whose_branch_is_mandatory(joinable: Transport) -> None:
    team = Team(joinable)

    async def planner(ctx: ActivityContext) -> dict[str, Any]:
        remaining = [ActivitySpec(name="decide")]
        ctx.revisions.append(
            Revision(step=ctx.step, activity="planner", action="remove", reason="skip it", remaining=remaining)
        )
        return {}

    worker = team.worker(FunctionActivity(planner, name="planner"))
    group = Parallel(ActivitySpec(name="research", mandatory=True), "inventory")
    cid = await team.dispatcher.dispatch_workflow(["planner", group, "decide"])
    await worker.run(burst=True)

    status = await team.ended(cid, "faulted")
    assert status.failure is not None
    assert "removes mandatory step 'parallel' (a group is mandatory when one of its branches is)" in status.failure
    assert "decide" not in team.order(cid)


def test_a_planners_mandatory_steps_are_marked_inside_groups() -> None:
    group = Parallel("research", "inventory").spec
    marked = _marked([group, ActivitySpec(name="decide")], {"research"}, ["decide"])
    assert [branch.mandatory for branch in marked[0].branches] == [True, False]
    assert marked[1].mandatory
    asked = _marked([group], set(), ["inventory"])
    assert [branch.mandatory for branch in asked[0].branches] == [False, True]
    with pytest.raises(InvalidPlan, match="mandatory step 'pricing' is not an activity of the plan"):
        _marked([group], set(), ["pricing"])


async def test_a_forged_result_does_not_keep_the_other_branches_from_being_undone(
    joinable: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    team = Team(joinable)
    cid_box: list[str] = []

    async def broken(ctx: ActivityContext) -> None:  # fails once validate and research completed
        team.ran.append(("broken", ctx.correlation_id))
        while team.worker_.stats.completed_steps < 2:  # noqa: ASYNC110  # the worker's count
            await asyncio.sleep(0.02)
        raise NonRetryableError("broken is down")

    team.worker_.activities["broken"] = FunctionActivity(broken, name="broken", retry=RetryPolicy(max_attempts=1))
    team.waits["inventory"] = lambda: bool(cid_box) and "unvalidate" in team.undid(cid_box[0])
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory", "broken"), "decide"])
    cid_box.append(cid)
    now = utcnow()
    forged = BranchResult(
        correlation_id=cid,
        step=1,
        key="inventory",
        entries=[ActivityLogEntry(name="inventory", step=1, started_at=now, finished_at=now, branch="inventory")],
    ).sign(signer(generate_key("mallory-3")))
    await store_record(team, f"{cid}/1", "inventory", forged.model_dump_json().encode())
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        await team.worker_.run(burst=True)
        await team.until(_now(lambda: "release-stock" in team.undid(cid)), "the late branch to be undone")

    assert team.undid(cid)[:2] == ["forget-research", "unvalidate"], "the genuine branch undone despite the forgery"
    assert any("branch 'inventory' is not undone, the other branches are" in r.getMessage() for r in caplog.records)


async def store_record(team: Team, group: str, key: str, record: bytes) -> None:
    """Store `record` as branch `key`'s result of `group` straight into the join store."""
    if team.transport.name == "rabbitmq":  # the shared store the workers join in
        async with RedisTransport(REDIS_URL, namespace=str(getattr(team.transport, "namespace", ""))) as shared:
            await shared.join_store().add(group, key, record, ttl=60)
        return
    assert team.worker_.joins is not None
    await team.worker_.joins.add(group, key, record, ttl=60)


async def test_a_branch_redelivered_after_it_failed_its_group_undoes_the_whole_group(joinable: Transport) -> None:
    team = Team(joinable)

    async def inventory(ctx: ActivityContext) -> dict[str, Any]:  # marks its group failed, as a crashed copy did
        team.ran.append(("inventory", ctx.correlation_id))
        while ("research", ctx.correlation_id) not in team.ran:  # noqa: ASYNC110  # what the other branch did
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        mark = GroupMark(correlation_id=ctx.correlation_id, step=1, key="inventory")
        assert team.worker_.joins is not None
        await team.worker_.joins.fail(f"{ctx.correlation_id}/1", mark.sign(team.worker_.security).to_bytes(), ttl=60)
        return {"stock": 3}

    activity = FunctionActivity(inventory, name="inventory", compensate="release-stock")
    team.worker_.activities["inventory"] = activity
    cid = await team.dispatcher.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
    await team.worker_.run(burst=True)

    await team.ended(cid, "compensated")
    await team.until(_now(lambda: len(team.undid(cid)) == 3), "the undoing")
    assert sorted(team.undid(cid)) == ["forget-research", "release-stock", "unvalidate"]
    assert "decide" not in team.order(cid)


def test_an_empty_branch_key_is_refused_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"^branch 'research' of the parallel group has an empty key: give it a non"):
        Parallel("research", "inventory", keys=["", None])
    with pytest.raises(ValueError, match="at least 1 character"):
        ActivitySpec(name="research", key="")


async def test_a_variable_a_branch_would_overwrite_is_refused_at_dispatch(joinable: Transport) -> None:
    team = Team(joinable)
    with pytest.raises(UserError, match=r"^the variable 'stock' would be overwritten by the output of branch 'inv"):
        await team.dispatcher.dispatch_workflow(
            ["validate", Parallel("research", "inventory", keys=[None, "stock"])], {"stock": 3}
        )
    assert await dead_letters(joinable) == []


async def sqlite_group_expiry(joins: SQLiteJoinStore, group: str) -> int:
    """-1 if the group's row in the file has no expiry (as Redis's PTTL says of a key without one), else 1."""
    while True:
        with sqlite3.connect(joins.transport.path) as db:
            row = db.execute("SELECT expires FROM join_groups WHERE grp = ?", (group,)).fetchone()
        if row is not None:
            return -1 if row[0] is None else 1
        await asyncio.sleep(0.02)


async def test_without_a_deadline_a_groups_results_are_kept_until_it_joins(joinable: Transport) -> None:
    if joinable.name == "inmemory":
        pytest.skip("process memory does not expire")
    team = Team(joinable)
    ttls: list[int] = []

    async def inventory(ctx: ActivityContext) -> dict[str, Any]:  # reads the group's expiry once research is stored
        joins = team.worker_.joins
        if isinstance(joins, SQLiteJoinStore):
            ttls.append(await sqlite_group_expiry(joins, f"{ctx.correlation_id}/1"))
            return {"stock": 3}
        assert isinstance(joins, RedisJoinStore)
        key = joins.key(f"{ctx.correlation_id}/1")
        while not await joins.transport.client.exists(key):  # pyright: ignore[reportUnknownMemberType]  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        ttls.append(await joins.transport.client.pttl(key))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
        return {"stock": 3}

    team.worker_.activities["inventory"] = FunctionActivity(inventory, name="inventory")
    forever = WorkflowDispatcher(joinable, security=signer(KEYS.orders), on_event=team.store.apply, ttl=None)
    cid = await forever.dispatch_workflow(["validate", Parallel("research", "inventory"), "decide"])
    await team.worker_.run(burst=True)

    await team.ended(cid, "completed")
    assert ttls == [-1], "no expiry: a sibling's result cannot expire before the group joins"
