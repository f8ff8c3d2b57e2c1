"""Budgets carried by the workflow: enforced before every step and inside each agent step, parked or faulted when
spent, extended by a signed grant on resume, shared among a group's branches, and never raised by a forged hop.

Each agent step's model reports `STEP` tokens per request (FunctionModel), so what a workflow spends is exact.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from joserfc.jwk import Key
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    Budget,
    InMemoryTransport,
    Parallel,
    Price,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai._budget import exhaustion, logged_usages, spent
from paigeant_ai._budget_resume import EXTENSION_TYPE
from paigeant_ai._join import join_store_for
from paigeant_ai._sealing import seal
from paigeant_ai.approval import WaitingStore, get_waiting_store
from paigeant_ai.cli import _parser, main
from paigeant_ai.contracts import ActivitySpec, BudgetExtension, PaigeantMessage, Plan, Usage
from paigeant_ai.planner import PaigeantToolset
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.store import project
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, SharedStores
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.trust import TrustPolicy

from .brokers import REDIS_URL, dead_letters, delete_redis_namespace, redis_command_line
from .test_cli_cancel import paigeant
from .test_parallel import joinable as joinable_transport

STEP = 1000
"""Tokens each model request of a step uses: 600 in, 400 out."""

ORDERS, WORKERS, DESK = generate_key("orders-1"), generate_key("workers-1"), generate_key("desk-1")
POLICY_DATA = {
    "keys": {
        "orders-1": {"may": ["start", "cancel"], "send_to": "*"},
        "workers-1": {"send_to": "*"},
        "desk-1": {"may": ["approve"], "send_to": "*"},
    }
}
POLICY = TrustPolicy.load(POLICY_DATA)


def signer(key: Key, transport: Transport) -> MessageSigner:
    cache = transport.replay_cache() if isinstance(transport, SharedStores) else None
    return MessageSigner(key, [ORDERS, WORKERS, DESK], policy=POLICY, replay_cache=cache)


@dataclass
class Team:
    """Agent steps that each use `STEP` tokens per request, and who dispatches, works and approves."""

    transport: Transport
    store: WaitingStore
    calls: list[str] = field(default_factory=list[str])
    events: list[WorkflowEvent] = field(default_factory=list[WorkflowEvent])

    def step(self, name: str) -> AgentActivity[None, str]:
        def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            self.calls.append(name)
            return ModelResponse(
                parts=[TextPart(f"{name} done")], usage=RequestUsage(input_tokens=600, output_tokens=400)
            )

        agent = Agent(FunctionModel(model, model_name=f"fn:{name}"), name=name)
        return AgentActivity(agent, prompt=f"do {name}", output_key=name, name=name)

    def dispatcher(self, key: Key = ORDERS) -> WorkflowDispatcher:
        return WorkflowDispatcher(self.transport, security=signer(key, self.transport), waiting_store=self.store)

    async def work(self, names: list[str]) -> None:
        worker = Worker(
            self.transport,
            [self.step(name) for name in names],
            security=signer(WORKERS, self.transport),
            waiting_store=self.store,
            on_event=self.events.append,
        )
        await worker.run(burst=True)

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events if event.kind in ("budget_exhausted", "completed", "faulted")]

    def last(self, kind: str) -> WorkflowEvent:
        return [event for event in self.events if event.kind == kind][-1]


@pytest.fixture
async def memory() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport() as transport:
        yield transport


STEPS = ["draft", "review", "publish"]


async def test_a_spent_budget_parks_before_the_next_step_and_a_signed_grant_completes_it(transport: Transport) -> None:
    team = Team(transport, get_waiting_store(transport))
    cid = await team.dispatcher().dispatch_workflow(
        [team.step(name) for name in STEPS], budget=Budget(tokens=STEP + STEP // 2)
    )
    await team.work(STEPS)

    # draft used 1000; review had 500 left as its limit, went over it in its one request, and stopped there.
    assert team.calls == ["draft", "review"]
    assert team.kinds() == ["budget_exhausted"]
    parked = await team.dispatcher().parked(cid)
    assert parked.budget_exhausted is not None
    assert parked.activity == "review"
    spent_tokens = spent(logged_usages(parked.message), {}).tokens
    overshoot = spent_tokens - (STEP + STEP // 2)
    assert spent_tokens == 2 * STEP
    assert 0 < overshoot <= STEP
    # The status of the parked workflow counts the step stopped at its limit, as its reason does.
    parked_status = project(cid, team.events)
    assert parked_status is not None
    assert parked_status.state == "budget_exhausted"
    assert parked_status.usage is not None
    assert (parked_status.usage.requests, parked_status.usage.total_tokens) == (2, spent_tokens)

    # A grant the desk signs: review runs again (its first attempt's tokens stay counted), then publish.
    await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=3 * STEP), approver="carol")
    await team.work(STEPS)
    assert team.calls == ["draft", "review", "review", "publish"]
    assert team.kinds() == ["budget_exhausted", "completed"]
    assert await team.store.get(cid) is None


async def test_a_workflow_parked_budget_exhausted_can_be_cancelled_and_its_completed_steps_are_undone(
    memory: InMemoryTransport,
) -> None:
    team = Team(memory, get_waiting_store(memory))
    undone: list[str] = []

    @activity(name="undo-draft")
    async def undo_draft(ctx: ActivityContext) -> None:
        undone.append(ctx.correlation_id)

    plain = team.step("draft")
    draft = AgentActivity(plain.agent, prompt="do draft", output_key="draft", name="draft", compensate="undo-draft")
    steps = [draft, team.step("review"), team.step("publish")]
    worker = Worker(
        memory,
        [*steps, undo_draft],
        security=signer(WORKERS, memory),
        waiting_store=team.store,
        on_event=team.events.append,
    )
    cid = await team.dispatcher().dispatch_workflow(steps, budget=Budget(tokens=STEP))
    await worker.run(burst=True)
    assert team.kinds() == ["budget_exhausted"]

    cancellation = await team.dispatcher().cancel(cid, "too dear", by="carol")
    assert cancellation.state == "cancelled"  # it waited: released here, its undoing started
    await worker.run(burst=True)
    assert undone == [cid]
    assert team.calls == ["draft"]  # neither review nor publish ever ran
    assert await team.store.get(cid) is None
    status = project(cid, team.events)
    assert status is not None
    assert status.state == "compensated"


async def test_a_budget_spent_exactly_stops_before_the_next_step_runs(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    cid = await team.dispatcher().dispatch_workflow([team.step(name) for name in STEPS], budget=Budget(tokens=STEP))
    await team.work(STEPS)
    assert team.calls == ["draft"]  # review's model was never called
    assert team.kinds() == ["budget_exhausted"]
    assert "used 1000 of its 1000 tokens" in (team.last("budget_exhausted").detail or "")
    assert (await team.dispatcher().parked(cid)).activity == "review"
    status = project(cid, team.events)
    assert status is not None
    assert status.state == "budget_exhausted"
    assert status.waiting_for == "budget exhausted before step 'review': it used 1000 of its 1000 tokens"
    assert [(step.activity, step.state) for step in status.steps] == [
        ("draft", "completed"),
        ("review", "budget_exhausted"),
    ]


async def test_on_exhausted_fault_faults_the_workflow(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    budget = Budget(tokens=STEP + 1, on_exhausted="fault")
    cid = await team.dispatcher().dispatch_workflow([team.step(name) for name in STEPS], budget=budget)
    await team.work(STEPS)
    assert team.calls == ["draft", "review"]
    assert team.kinds() == ["faulted"]
    assert "budget exhausted" in (team.last("faulted").detail or "")
    assert await team.store.get(cid) is None


async def test_requests_and_cost_are_budgets_too(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    await team.dispatcher().dispatch_workflow([team.step(name) for name in STEPS], budget=Budget(requests=2))
    await team.work(STEPS)
    assert team.calls == ["draft", "review"]
    assert "2 of its 2 model requests" in (team.last("budget_exhausted").detail or "")

    # 600 in at 1/Mtok and 400 out at 10/Mtok: 0.0046 a step. What is left is given to each step as tokens at the
    # dearer price (1100 at first, then 640), so review stops at its limit, and the cost never passes the budget.
    team = Team(memory, get_waiting_store(memory))
    prices = {f"fn:{name}": Price(input_per_mtok=1, output_per_mtok=10) for name in STEPS}
    await team.dispatcher().dispatch_workflow(
        [team.step(name) for name in STEPS], budget=Budget(cost=0.011, prices=prices)
    )
    await team.work(STEPS)
    assert team.calls == ["draft", "review"]
    assert "reached the limit what was left gave it" in (team.last("budget_exhausted").detail or "")


async def test_tool_calls_are_a_budget_kept_inside_a_step_and_before_the_next(memory: InMemoryTransport) -> None:
    """Each step's agent calls its tool twice: a budget of one tool call stops the first step at its second call."""
    team = Team(memory, get_waiting_store(memory))
    looked_up: list[str] = []

    def looker(name: str) -> AgentActivity[None, str]:
        def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            returned = sum(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)
            if returned < 2:
                return ModelResponse(parts=[ToolCallPart("look_up", {"term": name})])
            return ModelResponse(parts=[TextPart(f"{name} done")])

        agent = Agent(FunctionModel(model), name=name)

        @agent.tool_plain
        def look_up(term: str) -> str:  # pyright: ignore[reportUnusedFunction]
            looked_up.append(term)
            return "found"

        return AgentActivity(agent, name=name)

    steps = [looker("first"), looker("second")]
    worker = Worker(
        memory, steps, security=signer(WORKERS, memory), waiting_store=team.store, on_event=team.events.append
    )
    cid = await team.dispatcher().dispatch_workflow(steps, budget=Budget(tool_calls=1))
    await worker.run(burst=True)
    assert looked_up == ["first"]  # its second call was refused at the limit what was left gave it
    assert team.kinds() == ["budget_exhausted"]
    assert (await team.dispatcher().parked(cid)).activity == "first"

    # One more tool call lets the first step finish; the second then finds the budget spent before it runs.
    await team.dispatcher(DESK).resume(cid, budget=Budget(tool_calls=2), approver="carol")
    await worker.run(burst=True)
    assert looked_up == ["first", "first", "first"]
    assert "it used 3 of its 3 tool calls" in (team.last("budget_exhausted").detail or "")
    assert (await team.dispatcher().parked(cid)).activity == "second"


async def test_a_model_missing_from_the_price_table_exhausts_a_cost_budget(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    budget = Budget(cost=1.0, prices={"fn:draft": Price(input_per_mtok=1, output_per_mtok=1)})
    await team.dispatcher().dispatch_workflow([team.step(name) for name in STEPS], budget=budget)
    await team.work(STEPS)
    assert team.calls == ["draft", "review"]
    assert "no price for fn:review" in (team.last("budget_exhausted").detail or "")


def test_wall_time_counts_from_the_plan() -> None:
    message = PaigeantMessage.new([ActivitySpec(name="draft")])
    assert exhaustion(message) is None  # no plan, no budget
    message.plan = Plan(correlation_id=message.correlation_id, steps=[], budget=Budget(wall_time=60))
    start = message.plan.created_at
    assert exhaustion(message, now=start + timedelta(seconds=59)) is None
    assert exhaustion(message, now=start + timedelta(seconds=61)) == "it ran 61.0s of its 60s of wall time"


async def test_mistakes_are_refused_with_the_fix(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    with pytest.raises(UserError, match="prices="):
        await team.dispatcher().dispatch_workflow([team.step("draft")], budget=Budget(cost=1.0))
    with pytest.raises(UserError, match="Budget"):
        await team.dispatcher().dispatch_workflow([team.step("draft")], budget={"tokens": 5})  # pyright: ignore[reportArgumentType]
    cid = await team.dispatcher().dispatch_workflow([team.step(n) for n in STEPS], budget=Budget(tokens=STEP))
    await team.work(STEPS)
    with pytest.raises(UserError, match="approver="):
        await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=5))
    with pytest.raises(UserError, match="may not grant more budget"):
        await team.dispatcher(WORKERS).resume(cid, budget=Budget(tokens=5), approver="mallory")
    with pytest.raises(UserError, match="has no limit on"):
        await team.dispatcher(DESK).resume(cid, budget=Budget(requests=5), approver="carol")
    with pytest.raises(UserError, match="pass budget="):
        await team.dispatcher(DESK).resume(cid, approver="carol")


@pytest.mark.parametrize(
    ("model", "arguments", "match"),
    [
        (Budget, {"tokens": float("nan")}, "Budget refuses tokens=nan"),
        (Budget, {"requests": -1}, "Budget refuses requests=-1"),
        (Budget, {"cost": float("inf")}, "Budget refuses cost=inf"),
        (Price, {"input_per_mtok": -1, "output_per_mtok": 1}, "Price refuses input_per_mtok=-1"),
        (Budget, {"tokenz": 3}, "unknown field 'tokenz'"),
    ],
)
def test_a_limit_that_is_not_a_finite_number_of_at_least_0_is_a_user_error(
    model: type[Budget | Price], arguments: dict[str, object], match: str
) -> None:
    with pytest.raises(UserError, match=match):
        model(**arguments)  # pyright: ignore[reportArgumentType]
    assert Budget.model_validate_json('{"tokens": 5}') == Budget(tokens=5)


async def test_a_hop_whose_budget_was_raised_or_granted_by_a_forger_is_refused(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    cid = await team.dispatcher().dispatch_workflow([team.step(n) for n in STEPS], budget=Budget(tokens=STEP))
    await team.work(STEPS)
    parked = await team.dispatcher().parked(cid)
    workers = signer(WORKERS, memory)

    # A key that may send to the step raises the plan's budget and signs the hop.
    raised = parked.message.next_hop()
    assert raised.plan is not None
    assert raised.plan.budget is not None
    raised.plan = raised.plan.model_copy(update={"budget": Budget(tokens=10**9)})
    raised.message_id = "forged-1"
    await memory.publish("review", seal(raised, workers, max_bytes=1 << 20))

    # The same key grants itself more budget: it may not approve.
    granted = parked.message.next_hop()
    extension = BudgetExtension(correlation_id=cid, add=Budget(tokens=10**9), by="mallory")
    body = extension.model_dump_json(exclude={"signature"}).encode()
    granted.budget_extensions = [
        extension.model_copy(update={"signature": workers.sign_bytes(body, typ=EXTENSION_TYPE)})
    ]
    granted.message_id = "forged-2"
    await memory.publish("review", seal(granted, workers, max_bytes=1 << 20))

    # A genuine grant for another workflow, replayed into this one.
    desk = signer(DESK, memory)
    other = BudgetExtension(correlation_id="another", add=Budget(tokens=10**9), by="carol")
    signed = desk.sign_bytes(other.model_dump_json(exclude={"signature"}).encode(), typ=EXTENSION_TYPE)
    moved = parked.message.next_hop()
    moved.budget_extensions = [other.model_copy(update={"signature": signed})]
    moved.message_id = "forged-3"
    await memory.publish("review", seal(moved, workers, max_bytes=1 << 20))

    await team.work(STEPS)
    assert team.calls == ["draft"]  # none of them ran the step
    assert await team.store.get(cid) is not None  # and the workflow still waits for a genuine grant
    reasons = sorted(delivery.headers.get(REASON_HEADER, "") for delivery in await dead_letters(memory))
    assert len(reasons) == 3
    assert "plan: the plan's signature does not hold" in reasons[2]
    assert "budget: extension 1 (by 'carol') was granted to another workflow" in reasons[0]
    assert "budget: extension 1 (by 'mallory') is refused" in reasons[1]


async def test_branches_share_what_is_left(memory: InMemoryTransport) -> None:
    """Ten branches of a group after a step that used STEP, with a budget for three more: at most four run."""
    team = Team(memory, get_waiting_store(memory))
    branches = [f"b{n}" for n in range(10)]
    await team.dispatcher().dispatch_workflow(
        [team.step("draft"), Parallel(*(team.step(name) for name in branches))], budget=Budget(tokens=4 * STEP)
    )
    await team.work(["draft", *branches])
    ran = [name for name in team.calls if name != "draft"]
    assert sorted(ran) == ["b0", "b1", "b2"]  # the estimate (draft's 1000) pays for three; the others get no share
    assert len(team.calls) * STEP <= 4 * STEP + STEP  # the budget, and at most one step's own overshoot


async def test_a_branch_resumed_with_more_budget_lets_another_branch_of_its_group_wait(
    memory: InMemoryTransport,
) -> None:
    team = Team(memory, get_waiting_store(memory))
    group = Parallel(*(team.step(name) for name in ("b0", "b1", "b2")))
    cid = await team.dispatcher().dispatch_workflow([team.step("draft"), group], budget=Budget(tokens=3 * STEP))
    await team.work(["draft", "b0", "b1", "b2"])
    parked = await team.dispatcher().parked(cid)
    assert parked.activity == "b2"  # draft's 1000 pays for two branches, b0 and b1: b2, sent after them, has no share
    assert team.calls[0] == "draft"
    assert sorted(team.calls[1:]) == ["b0", "b1"]  # side by side: either may call its model first

    await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=STEP), approver="carol")
    await team.work(["b2"])
    assert team.calls[3:] == ["b2"]
    joins = join_store_for(memory, None)
    assert joins is not None
    assert await joins.hold_wait(f"{cid}/1", "b1", ttl=60) == "b1"  # b2 waits no more: b1 may park
    assert team.kinds() == ["budget_exhausted", "completed"]


async def test_a_run_resumed_after_approval_counts_its_earlier_part_once(memory: InMemoryTransport) -> None:
    """A step asks to send (STEP tokens), waits for approval, then answers (STEP more), within a budget of 2.5 STEP."""
    team = Team(memory, get_waiting_store(memory))

    def asks_then_answers(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        team.calls.append("reply")
        used = RequestUsage(input_tokens=600, output_tokens=400)
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("send", {"text": "hi"}, tool_call_id="send-1")], usage=used)
        return ModelResponse(parts=[TextPart("sent")], usage=used)

    agent = Agent(FunctionModel(asks_then_answers), name="reply")

    @agent.tool_plain(requires_approval=True)
    def send(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return "sent"

    reply = AgentActivity(agent, name="reply")
    worker = Worker(
        memory, [reply], security=signer(WORKERS, memory), waiting_store=team.store, on_event=team.events.append
    )
    cid = await team.dispatcher().dispatch_workflow([reply], budget=Budget(tokens=2 * STEP + STEP // 2))
    await worker.run(burst=True)
    await team.dispatcher(DESK).resume(cid, approvals={"send-1": True}, approver="carol")
    await worker.run(burst=True)
    assert team.calls == ["reply", "reply"]
    assert team.kinds() == ["completed"]  # not stopped at 1.5 STEP, as if the first request counted twice


joinable = joinable_transport  # the transport, with the store its workers share for the join


async def test_ten_branches_first_in_the_workflow_with_a_budget_for_three_park_then_complete_on_more_budget(
    joinable: Transport,
) -> None:
    """No step before the group tells what a branch uses: the first runs alone, then the others know. Those the
    budget does not pay for wait, the workflow parks once as `budget_exhausted`, and more budget lets them run."""
    team = Team(joinable, get_waiting_store(joinable))
    branches = [f"b{n}" for n in range(10)]
    cid = await team.dispatcher().dispatch_workflow(
        [Parallel(*(team.step(name) for name in branches))], budget=Budget(tokens=3 * STEP)
    )
    await team.work(branches)
    assert sorted(team.calls) == ["b0", "b1", "b2"]  # b0 alone, then what is left pays for two more
    assert team.kinds() == ["budget_exhausted"]  # not faulted, nothing undone
    assert "compensating" not in [event.kind for event in team.events]
    status = project(cid, team.events)
    assert status is not None
    assert status.state == "budget_exhausted"
    parked = await team.dispatcher().parked(cid)
    assert (parked.activity, parked.budget_exhausted is not None) == ("b3", True)

    await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=7 * STEP), approver="carol")
    await team.work(branches)
    assert sorted(team.calls) == sorted(branches)  # each branch ran once
    assert team.kinds() == ["budget_exhausted", "completed"]
    status = project(cid, team.events)
    assert status is not None
    assert status.state == "completed"
    payload = team.last("completed").payload or {}
    assert sorted(payload) == branches  # every branch's output, joined
    assert await team.store.get(cid) is None


async def test_a_grant_for_one_more_branch_runs_one_and_parks_again(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    branches = [f"b{n}" for n in range(4)]
    cid = await team.dispatcher().dispatch_workflow(
        [team.step("draft"), Parallel(*(team.step(name) for name in branches))], budget=Budget(tokens=2 * STEP)
    )
    await team.work(["draft", *branches])
    assert team.calls == ["draft", "b0"]
    assert (await team.dispatcher().parked(cid)).activity == "b1"

    await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=STEP), approver="carol")
    await team.work(branches)
    assert team.calls == ["draft", "b0", "b1"]
    assert (await team.dispatcher().parked(cid)).activity == "b2"  # parked again, at the next branch held back

    await team.dispatcher(DESK).resume(cid, budget=Budget(tokens=2 * STEP), approver="carol")
    await team.work(branches)
    assert sorted(team.calls) == ["b0", "b1", "b2", "b3", "draft"]
    assert team.kinds() == ["budget_exhausted", "budget_exhausted", "completed"]


async def test_a_budget_that_faults_sends_every_branch_and_faults_its_group(memory: InMemoryTransport) -> None:
    team = Team(memory, get_waiting_store(memory))
    branches = [f"b{n}" for n in range(4)]
    await team.dispatcher().dispatch_workflow(
        [team.step("draft"), Parallel(*(team.step(name) for name in branches))],
        budget=Budget(tokens=2 * STEP, on_exhausted="fault"),
    )
    await team.work(["draft", *branches])
    assert sorted(team.calls) == ["b0", "draft"]  # the others have no share: each faults before its step runs
    assert team.kinds() == ["faulted"]


async def test_an_agent_whose_model_is_a_name_is_priced_and_limited_under_that_name(memory: InMemoryTransport) -> None:
    """The ledger records a run under its agent's model as written, the name the price table and the step's
    cost-derived limit use: priced, it completes within its cost; a cost for fewer tokens than it needs stops it."""
    team = Team(memory, get_waiting_store(memory))
    writer = AgentActivity(Agent("test", name="writer"), prompt="write", output_key="text", name="writer")
    worker = Worker(
        memory, [writer], security=signer(WORKERS, memory), waiting_store=team.store, on_event=team.events.append
    )
    # Agent("test") makes a TestModel of the name, whose responses say "test": it is named provider:model.
    prices = {"test:test": Price(input_per_mtok=1_000_000, output_per_mtok=1_000_000)}  # one per token
    await team.dispatcher().dispatch_workflow([writer], budget=Budget(cost=10_000, prices=prices))
    await worker.run(burst=True)
    assert team.kinds() == ["completed"]
    usage = team.last("completed").usage
    assert usage is not None
    assert usage.model == "test:test"

    await team.dispatcher().dispatch_workflow([writer], budget=Budget(cost=5, prices=prices))
    await worker.run(burst=True)
    assert team.kinds() == ["completed", "budget_exhausted"]  # stopped at the 5 tokens its cost left, not after
    assert "it cost 55 of its 5; step 'writer' stopped at its limit" in (team.last("budget_exhausted").detail or "")


def test_usage_of_a_log_counts_the_branches() -> None:
    usage = Usage(model="m", input_tokens=3, output_tokens=2, requests=1)
    assert spent([usage, usage], {"m": Price(input_per_mtok=1e6, output_per_mtok=0)}).cost == 6
    assert json.loads(Budget(tokens=5).model_dump_json()) == {"tokens": 5, "on_exhausted": "park"}


# -- `paigeant resume --budget`, on Redis, from a process of its own ----------------------------------------------


def test_resume_takes_budget_amounts_and_refuses_bad_ones(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["resume", "6e5c217c", "--budget", "tokens=5000", "cost=0.5", "--by", "carol"])
    assert (args.budget, args.by) == (["tokens=5000", "cost=0.5"], "carol")
    for bad, said in (
        ("tokens=1.5", "--budget tokens= takes a positive whole number, not '1.5'"),
        ("cost=nan", "--budget cost= takes a positive number, not 'nan'"),
        ("money=5", "--budget takes NAME=AMOUNT with NAME one of tokens, requests, tool_calls, cost, wall_time"),
    ):
        assert main(["resume", "6e5c217c", "--transport", "redis", "--budget", bad]) == 2
        assert said in capsys.readouterr().err


async def test_paigeant_resume_budget_extends_a_parked_workflow_on_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = redis_command_line(monkeypatch)
    monkeypatch.delenv("PAIGEANT_ALLOW_UNSIGNED")
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(DESK.as_dict(private=True)))
    keys = {"keys": [key.as_dict(private=False) for key in (ORDERS, WORKERS, DESK)]}
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps(keys))
    monkeypatch.setenv("PAIGEANT_TRUST_POLICY", json.dumps(POLICY_DATA))
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            team = Team(transport, get_waiting_store(transport))
            cid = await team.dispatcher().dispatch_workflow(
                [team.step(name) for name in STEPS], budget=Budget(tokens=STEP)
            )
            await team.work(STEPS)
            assert team.kinds() == ["budget_exhausted"]

            code, out = await paigeant("resume", cid, "--budget", "tokens=2000", "--by", "carol")
            assert (code, out) == (0, f"resumed {cid}: its budget extended (+2000 tokens) by carol\n")
            await team.work(STEPS)
            assert team.calls == ["draft", "review", "publish"]
            assert team.kinds() == ["budget_exhausted", "completed"]
    finally:
        await delete_redis_namespace(namespace)


def test_the_planners_status_tool_tells_the_model_of_budget_exhausted() -> None:
    assert "budget_exhausted" in (PaigeantToolset.get_workflow_status.__doc__ or "")
