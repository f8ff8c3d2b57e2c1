"""Steering a workflow: compensation, fallbacks, cancellation and deadlines, on every transport.

Each test runs signed workers in this process on the in-memory transport, Redis and RabbitMQ alike (the process
tests are in `tests/test_steering_processes.py`). What ran is recorded by the activities themselves; where a
workflow ended is read from its status, projected from the events its workers reported.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import Key
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    Activity,
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    EndWorkflow,
    FunctionActivity,
    InMemoryWaitingStore,
    NonRetryableError,
    PaigeantMessage,
    RetryPolicy,
    Revision,
    UserError,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._cancel import CancelRequest, sign_cancel
from paigeant_ai._cli_workflows import render_status
from paigeant_ai._sealing import seal
from paigeant_ai.contracts import Compensation
from paigeant_ai.exceptions import UnknownWorkflow
from paigeant_ai.security import MessageSigner, TokenValidator, TrustPolicy, generate_key
from paigeant_ai.store import InMemoryWorkflowStore, WorkflowStatus
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, Cancellations
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport

from .brokers import dead_letters
from .scripted import refunder

ISSUER = "https://id.example.com"
AUDIENCE = "paigeant-workers"


@dataclass(frozen=True)
class Keys:
    orders: Key = field(default_factory=lambda: generate_key("orders-1"))
    """The dispatcher's key: it may start and cancel workflows."""
    shop: Key = field(default_factory=lambda: generate_key("shop-1"))
    """The workers' key."""
    desk: Key = field(default_factory=lambda: generate_key("desk-1"))
    """A front desk's key: it may neither start nor cancel workflows by itself."""
    issuer: Key = field(default_factory=lambda: generate_key("idp-1", "ES256"))


KEYS = Keys()
POLICY = TrustPolicy.load(
    {
        "keys": {
            "orders-1": {"may": ["start", "cancel"], "send_to": "*"},
            "shop-1": {"may": ["revise"], "send_to": "*"},
            "desk-1": {"send_to": "*"},
        }
    }
)


def user_token(subject: str = "alice") -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 600}
    return jwt.encode({"alg": "ES256", "kid": KEYS.issuer.kid}, claims, KEYS.issuer, algorithms=["ES256"])


def signer(key: Key, transport: Transport | None = None) -> MessageSigner:
    tokens = TokenValidator({"keys": [KEYS.issuer.as_dict(private=False)]}, issuer=ISSUER, audience=AUDIENCE)
    return MessageSigner(
        key,
        [KEYS.orders, KEYS.shop, KEYS.desk],
        tokens=tokens,
        policy=POLICY,
        replay_cache=RedisReplayCache(transport) if isinstance(transport, RedisTransport) else None,
    )


@dataclass
class Shop:
    """An order workflow's steps, each recording what it did; `fail` names the steps that fail for good."""

    transport: Transport
    fail: set[str] = field(default_factory=set[str])
    slow: float = 0.0
    ran: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    undone: list[tuple[str, str, Compensation]] = field(default_factory=list[tuple[str, str, Compensation]])
    interrupted: list[str] = field(default_factory=list[str])
    store: InMemoryWorkflowStore = field(default_factory=InMemoryWorkflowStore)
    waiting: InMemoryWaitingStore = field(default_factory=InMemoryWaitingStore)

    def __post_init__(self) -> None:
        self.dispatcher = self.dispatcher_with(KEYS.orders)

    def dispatcher_with(self, key: Key, **options: Any) -> WorkflowDispatcher:
        return WorkflowDispatcher(
            self.transport, security=signer(key), on_event=self.store.apply, waiting_store=self.waiting, **options
        )

    def step(self, name: str, *, compensate: str | None = None, fallbacks: tuple[str, ...] = ()) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, Any]:
            self.ran.append((name, ctx.correlation_id))
            if name == "pack" and self.slow:
                try:
                    await asyncio.sleep(self.slow)
                except asyncio.CancelledError:
                    self.interrupted.append(ctx.correlation_id)
                    raise
            if name in self.fail:
                raise NonRetryableError(f"{name} is down")
            if name == "end-early":
                raise EndWorkflow("nothing to ship", output={"shipped": False})
            return {name.replace("-", "_"): f"{name} of {ctx.correlation_id[:8]}"}

        return FunctionActivity(
            run, name=name, compensate=compensate, fallbacks=fallbacks, retry=RetryPolicy(max_attempts=1)
        )

    def undo(self, name: str, *, attempts: int = 1) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, Any]:
            assert ctx.undoing is not None
            assert ctx.unwinding is not None
            self.undone.append((name, ctx.correlation_id, ctx.undoing))
            if name in self.fail:
                raise NonRetryableError(f"{name} is down")
            return {f"{name.replace('-', '_')}_done": True}

        return FunctionActivity(run, name=name, retry=RetryPolicy(max_attempts=attempts, initial_interval=0.01))

    def worker(self, *extra: Activity) -> Worker:
        steps = [
            self.step("reserve", compensate="release"),
            self.step("charge", compensate="refund", fallbacks=("charge-backup",)),
            self.step("charge-backup", compensate="refund-backup"),
            self.step("pack"),
            self.step("ship"),
            self.step("end-early"),
            self.undo("release"),
            self.undo("refund"),
            self.undo("refund-backup"),
            *extra,
        ]
        worker = Worker(
            self.transport,
            steps,
            security=signer(KEYS.shop, self.transport),
            on_event=self.store.apply,
            waiting_store=self.waiting,
            concurrency=20,
        )
        worker.cancel_poll = 0.05
        return worker

    def order(self, cid: str) -> list[str]:
        return [name for name, of in self.ran if of == cid]

    def undid(self, cid: str) -> list[str]:
        return [name for name, of, _ in self.undone if of == cid]

    async def status(self, cid: str) -> WorkflowStatus:
        status = await self.store.get(cid)
        assert status is not None
        return status

    async def until(self, check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def ended(self, cid: str, state: str) -> WorkflowStatus:
        async def done() -> bool:
            status = await self.store.get(cid)
            return status is not None and status.state == state

        await self.until(done, f"{cid} to end {state}")
        return await self.status(cid)


ORDER = ["reserve", "charge", "pack", "ship"]


async def test_a_fault_undoes_the_completed_steps_latest_first(transport: Transport) -> None:
    shop = Shop(transport, fail={"ship"})
    cid = await shop.dispatcher.dispatch_workflow(ORDER, {"order": 7})
    await shop.worker().run(burst=True)

    assert shop.order(cid) == ["reserve", "charge", "pack", "ship"]
    assert shop.undid(cid) == ["refund", "release"], "each completed step undone once, the latest first"
    refund, release = (record for _, _, record in shop.undone)
    assert (refund.step, refund.activity, refund.output) == (1, "charge", {"charge": f"charge of {cid[:8]}"})
    assert refund.idempotency_key == f"{cid}:1:charge"
    assert (release.step, release.activity) == (0, "reserve")
    status = await shop.ended(cid, "compensated")
    assert status.failure == "step 'ship' failed: NonRetryableError: ship is down"
    assert status.compensation is not None
    assert "reserve (by release)" in status.compensation
    undo_steps = [(step.step, step.activity, step.undoes, step.state) for step in status.steps if step.undoes]
    assert undo_steps == [(0, "release", "reserve", "completed"), (1, "refund", "charge", "completed")]
    assert status.payload is not None
    assert status.payload["release_done"] is True
    assert await dead_letters(transport) == [], "a fault that was undone leaves nothing to replay"


async def test_a_failed_step_falls_back_in_order_and_the_log_says_why(transport: Transport) -> None:
    shop = Shop(transport, fail={"charge"})
    cid = await shop.dispatcher.dispatch_workflow(
        ["reserve", ActivitySpec(name="charge", fallbacks=("charge-backup",))]
    )
    await shop.worker().run(burst=True)

    assert shop.order(cid) == ["reserve", "charge", "charge-backup"]
    status = await shop.ended(cid, "completed")
    assert status.payload is not None
    assert status.payload["charge_backup"] == f"charge-backup of {cid[:8]}"
    failed = [step for step in status.steps if step.state == "failed"]
    assert [(step.activity, step.error) for step in failed] == [
        ("charge", "NonRetryableError: charge is down; falling back to 'charge-backup'")
    ]


async def test_a_fallback_may_revise_the_route_as_its_step_could(transport: Transport) -> None:
    shop = Shop(transport, fail={"charge"})

    async def backup(ctx: ActivityContext) -> dict[str, Any]:
        shop.ran.append(("charge-backup", ctx.correlation_id))
        remaining = [*ctx.routing_slip.itinerary[1:], ActivitySpec(name="ship")]
        ctx.revisions.append(
            Revision(step=ctx.step, activity="charge-backup", action="add", reason="backup", remaining=remaining)
        )
        return {"charged_by": "backup"}

    worker = shop.worker()
    worker.activities["charge-backup"] = FunctionActivity(backup, name="charge-backup")
    cid = await shop.dispatcher.dispatch_workflow(
        ["reserve", ActivitySpec(name="charge", fallbacks=("charge-backup",))]
    )
    await worker.run(burst=True)

    assert shop.order(cid) == ["reserve", "charge", "charge-backup", "ship"]
    await shop.ended(cid, "completed")


async def test_when_every_fallback_fails_the_workflow_faults_and_is_undone(transport: Transport) -> None:
    shop = Shop(transport, fail={"charge", "charge-backup"})
    cid = await shop.dispatcher.dispatch_workflow(
        ["reserve", ActivitySpec(name="charge", fallbacks=("charge-backup",))]
    )
    await shop.worker().run(burst=True)

    assert shop.order(cid) == ["reserve", "charge", "charge-backup"]
    assert shop.undid(cid) == ["release"]
    status = await shop.ended(cid, "compensated")
    assert status.failure == "step 'charge-backup' failed: NonRetryableError: charge-backup is down"


async def test_fallbacks_run_in_order_once_retries_are_exhausted_and_the_fallback_that_ran_is_undone(
    transport: Transport,
) -> None:
    shop = Shop(transport, fail={"charge-backup", "ship"})

    async def charge_card(ctx: ActivityContext) -> None:
        shop.ran.append(("charge-card", ctx.correlation_id))
        raise ConnectionError("the card network timed out")

    async def charge_invoice(ctx: ActivityContext) -> dict[str, str]:
        shop.ran.append(("charge-invoice", ctx.correlation_id))
        return {"invoice": f"inv-{ctx.correlation_id[:8]}"}

    async def void_invoice(ctx: ActivityContext) -> dict[str, str]:
        assert ctx.undoing is not None
        shop.undone.append(("void-invoice", ctx.correlation_id, ctx.undoing))
        if ctx.attempt < 2:
            raise ConnectionError("the invoicing service is busy")
        return {"voided": str(ctx.undoing.output["invoice"])}

    fast = RetryPolicy(max_attempts=3, initial_interval=0.01)
    card = FunctionActivity(
        charge_card, name="charge-card", retry=fast, compensate="refund", fallbacks=("charge-backup", "charge-invoice")
    )
    worker = shop.worker(
        card,
        FunctionActivity(charge_invoice, name="charge-invoice", compensate="void-invoice"),
        FunctionActivity(void_invoice, name="void-invoice", retry=fast),  # its own policy: three attempts
    )
    cid = await shop.dispatcher.dispatch_workflow(["reserve", card, "ship"])
    await worker.run(burst=True)

    tried = ["charge-card"] * 3 + ["charge-backup", "charge-invoice"]
    assert shop.order(cid) == ["reserve", *tried, "ship"], "retries exhausted, then each fallback in order"
    assert shop.undid(cid) == ["void-invoice"] * 3 + ["release"], "the fallback that ran is undone, retried"
    void = shop.undone[0][2]
    assert (void.step, void.activity, void.compensate) == (1, "charge-invoice", "void-invoice")
    assert void.output == {"invoice": f"inv-{cid[:8]}"}
    status = await shop.ended(cid, "compensated")
    failed = [(step.activity, step.error) for step in status.steps if step.state == "failed"]
    assert failed == [
        (
            "charge-card",
            "retries exhausted after 3 attempts: ConnectionError: the card network timed out; "
            "falling back to 'charge-backup'",
        ),
        ("charge-backup", "NonRetryableError: charge-backup is down; falling back to 'charge-invoice'"),
        ("ship", "NonRetryableError: ship is down"),
    ]
    undo = [(step.step, step.activity, step.undoes, step.attempts) for step in status.steps if step.undoes]
    assert undo == [(0, "release", "reserve", 1), (1, "void-invoice", "charge-invoice", 3)]
    assert worker.stats.fell_back == 2


async def test_a_compensation_that_fails_for_good_is_dead_lettered_and_its_replay_finishes_the_undoing(
    transport: Transport,
) -> None:
    shop = Shop(transport, fail={"ship", "refund"})
    cid = await shop.dispatcher.dispatch_workflow(ORDER)
    worker = shop.worker()
    await worker.run(burst=True)

    assert shop.undid(cid) == ["refund"], "the undoing stops where a compensation failed"
    status = await shop.ended(cid, "compensation_failed")
    assert status.failure == "step 'refund' failed: NonRetryableError: refund is down"
    [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER] == "step 'refund' failed: NonRetryableError: refund is down"

    from paigeant_ai._cli_dead_letters import _letter, replay_dead_letter

    shop.fail.discard("refund")  # the operator fixed the refund service
    await replay_dead_letter(transport, _letter(letter), signer(KEYS.orders))
    await worker.run(burst=True)
    assert shop.undid(cid) == ["refund", "refund", "release"]
    await shop.ended(cid, "compensated")


async def test_a_token_refused_at_a_step_faults_the_workflow_without_fallbacks_and_undoes_it(
    transport: Transport,
) -> None:
    shop = Shop(transport)
    charge = ActivitySpec(name="charge", required_scopes=("payments:write",), fallbacks=("charge-backup",))
    cid = await shop.dispatcher.dispatch_workflow(["reserve", charge], obo_token=user_token("alice"))
    await shop.worker().run(burst=True)

    assert shop.order(cid) == ["reserve"], "neither the step nor its fallback ran: the token would not do for either"
    assert shop.undid(cid) == ["release"]
    status = await shop.ended(cid, "compensated")
    assert status.failure is not None
    assert "lacks scope 'payments:write'" in status.failure


async def test_ending_early_is_a_success_and_undoes_nothing(transport: Transport) -> None:
    shop = Shop(transport)
    cid = await shop.dispatcher.dispatch_workflow(["reserve", "end-early", "ship"])
    await shop.worker().run(burst=True)

    status = await shop.ended(cid, "completed")
    assert status.ended is not None
    assert status.ended.startswith("nothing to ship")
    assert shop.undone == []


async def test_a_cancel_before_a_step_starts_stops_the_workflow_there(transport: Transport) -> None:
    shop = Shop(transport)
    cid = await shop.dispatcher.dispatch_workflow(ORDER)
    done = await shop.dispatcher.cancel(cid, "the customer withdrew", by="support:bob")
    assert done.state == "requested"
    await shop.worker().run(burst=True)  # a worker started after the cancel

    assert shop.order(cid) == []
    status = await shop.ended(cid, "cancelled")
    assert status.cancelled == "cancelled by support:bob: the customer withdrew"


async def test_a_cancel_interrupts_the_running_step_and_undoes_the_completed_ones(transport: Transport) -> None:
    shop = Shop(transport, slow=30.0)
    async with shop.worker():
        cid = await shop.dispatcher.dispatch_workflow(ORDER)
        other = await shop.dispatcher.dispatch_workflow(["reserve", "charge"])
        await shop.until(_true(lambda: shop.order(cid) == ["reserve", "charge", "pack"]), "pack to start")
        await shop.dispatcher.cancel(cid, "the customer withdrew", by="support:bob")
        status = await shop.ended(cid, "cancelled")
        await shop.ended(other, "completed")

    assert shop.interrupted == [cid], "the running step's task saw the cancellation"
    assert shop.order(cid) == ["reserve", "charge", "pack"], "ship never started"
    assert shop.undid(cid) == ["refund", "release"]
    assert shop.undid(other) == []
    pack = next(step for step in status.steps if step.activity == "pack")
    assert pack.state == "failed"
    assert pack.error is not None
    assert pack.error.startswith("interrupted: cancelled by support:bob")


async def test_a_cancel_stops_an_agent_run_mid_way_and_an_agent_steps_function_undoes_it(transport: Transport) -> None:
    shop = Shop(transport)
    asked: list[int] = []  # the model requests of the carrier agent
    pickups: list[str] = []  # the carrier agent's tool calls that started
    carrier_called_off: list[str] = []
    quotes_withdrawn: list[str] = []

    def quote_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("12.50")])

    def carrier_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked.append(len(messages))
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("book_pickup", {})])
        return ModelResponse(parts=[TextPart("booked")])

    carrier: Agent[None, str] = Agent(FunctionModel(carrier_model), name="book-carrier")

    @carrier.tool_plain
    async def book_pickup() -> str:
        pickups.append("started")
        try:
            await asyncio.sleep(30)  # the carrier's API is slow today
        except asyncio.CancelledError:
            carrier_called_off.append("book_pickup")
            raise
        return "pickup booked"

    async def withdraw_quote(ctx: ActivityContext) -> None:
        assert ctx.undoing is not None
        assert ctx.unwinding is not None
        quotes_withdrawn.append(f"{ctx.undoing.output['quote']} ({ctx.unwinding.cause})")

    quote = AgentActivity(Agent(FunctionModel(quote_model), name="quote"), compensate=withdraw_quote)
    book = AgentActivity(carrier)
    async with shop.worker(quote, book):
        cid = await shop.dispatcher.dispatch_workflow([quote, book, "ship"])
        await shop.until(_true(lambda: pickups == ["started"]), "the carrier agent's tool call to start")
        await shop.dispatcher.cancel(cid, "the customer withdrew", by="support:bob")
        status = await shop.ended(cid, "cancelled")

    assert carrier_called_off == ["book_pickup"], "the agent's run was cancelled inside its tool call"
    assert asked == [1], "the model was never asked again: the run stopped mid-way, not after it finished"
    assert shop.order(cid) == [], "ship never started"
    assert quotes_withdrawn == ["12.50 (cancelled)"], "the agent step undone by its function, once"
    undo = [(step.activity, step.undoes) for step in status.steps if step.undoes]
    assert undo == [("quote.compensate", "quote")]


async def test_a_cancel_replayed_after_the_workflow_was_cancelled_changes_nothing(transport: Transport) -> None:
    assert isinstance(transport, Cancellations)
    board = transport.cancel_board()
    await board.open()
    shop = Shop(transport, slow=30.0)
    async with shop.worker():
        cid = await shop.dispatcher.dispatch_workflow(ORDER)
        await shop.until(_true(lambda: shop.order(cid) == ["reserve", "charge", "pack"]), "pack to start")
        await shop.dispatcher.cancel(cid, "the customer withdrew", by="support:bob")
        await shop.ended(cid, "cancelled")
        posted = await board.records(cid)

        for record in posted:  # replayed as it was, signature and all
            await board.post(cid, record, ttl=60)
        assert await board.records(cid) == posted, "the same request is kept once"
        again = await shop.dispatcher.cancel(cid, "the customer withdrew", by="support:bob")  # and a new one
        assert again.state == "requested", "without a store the dispatcher cannot tell it ended: the workers can"
        other = await shop.dispatcher.dispatch_workflow(["reserve", "charge"])
        await shop.ended(other, "completed")  # the worker read the board since

    assert shop.undid(cid) == ["refund", "release"], "undone once"
    assert shop.order(cid) == ["reserve", "charge", "pack"]
    status = await shop.status(cid)
    assert status.state == "cancelled"
    assert status.cancelled == "cancelled by support:bob: the customer withdrew"
    assert shop.undid(other) == []


async def test_a_cancel_releases_a_waiting_workflow_and_undoes_it(transport: Transport) -> None:
    shop = Shop(transport)
    refund = refunder()
    worker = shop.worker(refund)
    cid = await shop.dispatcher.dispatch_workflow(["reserve", refund, "ship"])
    await worker.run(burst=True)
    assert (await shop.status(cid)).state == "waiting"

    done = await shop.dispatcher.cancel(cid, "no longer needed", by="alice")
    assert done.state == "cancelled"
    assert await shop.waiting.get(cid) is None, "released"
    await worker.run(burst=True)

    assert shop.undid(cid) == ["release"]
    assert shop.order(cid) == ["reserve"]
    await shop.ended(cid, "cancelled")
    with pytest.raises(UserError, match="is not waiting for input"):
        await shop.dispatcher.resume(cid, approve_all=True, approver="alice")


async def test_cancelling_a_finished_or_unknown_workflow_says_so_and_changes_nothing(transport: Transport) -> None:
    shop = Shop(transport)
    cid = await shop.dispatcher.dispatch_workflow(["reserve"])
    await shop.worker().run(burst=True)
    await shop.ended(cid, "completed")

    done = await shop.dispatcher.cancel(cid, "too late", store=shop.store)
    assert done.state == "finished"
    assert "had already ended completed; nothing was cancelled" in done.detail
    with pytest.raises(UnknownWorkflow, match="no workflow 'no-such-order' is known: check the ID"):
        await shop.dispatcher.cancel("no-such-order", store=shop.store)
    assert shop.undone == []


async def test_forged_misfiled_and_unauthorized_cancels_change_nothing(transport: Transport) -> None:
    assert isinstance(transport, Cancellations)
    board = transport.cancel_board()
    await board.open()
    shop = Shop(transport)
    cid = await shop.dispatcher.dispatch_workflow(["reserve", "charge"])
    other = await shop.dispatcher.dispatch_workflow(["reserve"])
    genuine_for_other = sign_cancel(CancelRequest(correlation_id=other, by="bob"), signer(KEYS.orders))
    forged = CancelRequest(correlation_id=cid, by="mallory").model_copy(
        update={"signature": genuine_for_other.signature}
    )
    unauthorized = sign_cancel(CancelRequest(correlation_id=cid, by="desk"), signer(KEYS.desk))
    await board.post(cid, b"not a cancel request", ttl=60)
    await board.post(cid, genuine_for_other.to_bytes(), ttl=60)  # misfiled: a cancel of another workflow
    await board.post(cid, forged.to_bytes(), ttl=60)
    await board.post(cid, unauthorized.to_bytes(), ttl=60)
    worker = shop.worker()
    await worker.run(burst=True)

    assert shop.order(cid) == ["reserve", "charge"], "none of them held"
    await shop.ended(cid, "completed")
    assert dict(worker.cancels.refused) == {"malformed": 1, "misfiled": 1, "bad_signature": 1, "not_allowed": 1}

    # The genuine cancel, posted after all that, holds: the board keeps every record, and readers try each.
    late = await shop.dispatcher.dispatch_workflow(["reserve", "charge"])
    for record in (b"garbage", forged.to_bytes()):
        await board.post(late, record, ttl=60)
    await shop.dispatcher.cancel(late, "changed my mind")
    await worker.run(burst=True)
    assert shop.order(late) == []
    await shop.ended(late, "cancelled")


async def test_the_initiators_own_token_lets_a_key_without_cancel_cancel(transport: Transport) -> None:
    shop = Shop(transport)
    desk = shop.dispatcher_with(KEYS.desk)
    with pytest.raises(UserError, match="may not cancel workflows under the trust policy: pass token="):
        await desk.cancel("any-order")
    cid = await shop.dispatcher.dispatch_workflow(["reserve", "charge"], obo_token=user_token("alice"))
    strangers = await shop.dispatcher.dispatch_workflow(["reserve", "charge"], obo_token=user_token("carol"))
    await desk.cancel(cid, "alice asked", token=user_token("alice"))
    await desk.cancel(strangers, "alice asked", token=user_token("alice"))  # alice's token, carol's workflow
    worker = shop.worker()
    await worker.run(burst=True)

    status = await shop.ended(cid, "cancelled")
    assert status.cancelled == "cancelled by alice: alice asked"
    assert shop.order(strangers) == ["reserve", "charge"]
    assert worker.cancels.refused["not_allowed"] == 1


async def test_the_deadline_ends_a_workflow_expired_and_undoes_it(transport: Transport) -> None:
    shop = Shop(transport, slow=30.0)
    hurried = shop.dispatcher_with(KEYS.orders, ttl=1.5)
    async with shop.worker():
        cid = await hurried.dispatch_workflow(ORDER)
        await shop.until(_true(lambda: shop.order(cid) == ["reserve", "charge", "pack"]), "pack to start")
        running = render_status(await shop.status(cid))  # what `paigeant status` prints while pack runs
        status = await shop.ended(cid, "expired")

    assert "  deadline: " in running
    [pack_line] = [line.split() for line in running.splitlines() if line.split()[1:3] == ["pack", "running"]]
    assert pack_line[5] == "timeout", "the step's timeout, cut to the deadline, is in the status"
    assert 0 < float(pack_line[6].removesuffix("s")) <= 1.5
    assert shop.order(cid) == ["reserve", "charge", "pack"]
    assert shop.interrupted == [cid], "the running step was cut short at the deadline"
    assert shop.undid(cid) == ["refund", "release"]
    assert status.deadline is not None
    assert status.failure is not None
    assert "passed while step 'pack' ran" in status.failure
    pack = next(step for step in status.steps if step.activity == "pack")
    assert pack.timeout is not None
    assert pack.timeout <= 1.5


async def test_a_hop_that_arrives_after_the_deadline_runs_nothing_and_ends_the_workflow_expired(
    transport: Transport,
) -> None:
    shop = Shop(transport)
    cid = await shop.dispatcher_with(KEYS.orders, ttl=0.5).dispatch_workflow(["reserve", "charge"])
    await asyncio.sleep(0.8)  # nobody served the queue in time
    await shop.worker().run(burst=True)

    assert shop.order(cid) == []
    status = await shop.ended(cid, "expired")
    assert status.failure is not None
    assert "passed before step 'reserve' ran" in status.failure


# -- what a key that may only send hops can no longer do ---------------------------------------------------------


async def _tampered(transport: Transport, change: Callable[[PaigeantMessage], None], shop: Shop) -> list[str]:
    """Run a workflow to its second step, take that hop, change it, sign it with the desk's key (which may send
    to any step, and nothing else) and publish it; the reasons the worker refused it."""
    planned = [
        ActivitySpec(name="reserve", compensate="release"),  # named in the plan: what the check holds it to
        ActivitySpec(name="charge", fallbacks=("charge-backup",)),
        "ship",
    ]
    cid = await shop.dispatcher.dispatch_workflow(planned)
    seen: list[PaigeantMessage] = []

    async def capture(ctx: ActivityContext) -> None:
        seen.append(ctx.message.model_copy(deep=True))

    worker = shop.worker(FunctionActivity(capture, name="observe"))
    worker.activities["charge"] = FunctionActivity(capture, name="charge")  # the hop is captured, never run
    await worker.run(burst=True)
    [hop] = [message for message in seen if message.correlation_id == cid]
    change(hop)
    body = seal(hop.next_hop(attempt=hop.attempt + 1), signer(KEYS.desk), max_bytes=1024 * 1024)
    await transport.publish(hop.routing_slip.current or "", body)
    worker.activities["charge"] = shop.step("charge")
    await worker.run(burst=True)
    return [letter.headers[REASON_HEADER] for letter in await dead_letters(transport)]


def _forge_compensation(hop: PaigeantMessage) -> None:
    record = hop.routing_slip.compensations[0]
    hop.routing_slip.compensations[0] = record.model_copy(update={"compensate": "refund"})


def _skip_to_the_fallback(hop: PaigeantMessage) -> None:
    hop.routing_slip.current = "charge-backup"


def _unwind_with_a_chosen_compensation(hop: PaigeantMessage) -> None:
    from paigeant_ai.contracts import Unwinding

    hop.routing_slip.unwind(Unwinding(cause="faulted", reason="forged", step=1))
    hop.routing_slip.itinerary = [ActivitySpec(name="refund")]
    hop.routing_slip.current = "refund"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_forge_compensation, "step 0 is undone by 'refund', but its plan names 'release'"),
        (_skip_to_the_fallback, "step 1 runs as 'charge-backup', but its alternatives give 'charge' now"),
        (_unwind_with_a_chosen_compensation, "the compensations to run ['refund'] are not the ones the compensation"),
    ],
    ids=["compensation-log-rewritten", "fallback-taken-early", "undoing-invented"],
)
async def test_attack_on_the_steering_of_a_workflow_is_refused(
    transport: Transport, change: Callable[[PaigeantMessage], None], reason: str
) -> None:
    shop = Shop(transport)
    reasons = await _tampered(transport, change, shop)
    assert len(reasons) == 1
    assert reasons[0].startswith("security check failed: plan: ")
    assert reason in reasons[0]
    assert "refund" not in [name for name, _, _ in shop.undone], "nothing was undone on the attacker's word"
    assert Counter(name for name, _ in shop.ran)["charge-backup"] == 0


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


def test_steering_mistakes_are_named() -> None:
    with pytest.raises(UserError, match="fallbacks of 'charge' must be a list of activity names"):
        activity(name="charge", fallbacks="charge-backup")(lambda ctx: None)  # pyright: ignore[reportArgumentType]
    with pytest.raises(UserError, match="must be other activities, each named once"):
        activity(name="charge", fallbacks=["charge"])(lambda ctx: None)
    with pytest.raises(UserError, match="compensate of 'charge' must be an activity name, an activity or a function"):
        activity(name="charge", compensate=42)(lambda ctx: None)  # pyright: ignore[reportArgumentType]
